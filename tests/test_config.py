"""Typed configs: YAML loading, overrides, and errors that say what to fix."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from diffalign.config import BaseConfig, ConfigError, parse_override


@dataclass
class OptimConfig(BaseConfig):
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ToyConfig(BaseConfig):
    model: str = field(default="assets/tiny-shapes", metadata={"help": "Model folder or hub id."})
    steps: int = 10
    eta: float = 1.0
    use_lora: bool = True
    sampler: Literal["ddim", "ddpm"] = "ddim"
    reward_weights: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    prompts: list[str] = field(default_factory=list)
    out: Path | None = None
    max_grad_norm: float | None = 1.0
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\neta: 0.5\noptim:\n  learning_rate: 1e-5\nprompts: [a, b]\n")
    config = ToyConfig.from_yaml(
        path, ["optim.learning_rate=2e-4", "use_lora=false", "out=/tmp/x", "max_grad_norm=null"]
    )
    assert config.steps == 5 and config.eta == 0.5 and config.prompts == ["a", "b"]
    assert config.optim.learning_rate == pytest.approx(2e-4)
    assert config.optim.betas == (0.9, 0.999)
    assert config.use_lora is False and config.out == Path("/tmp/x")
    assert config.max_grad_norm is None


def test_scientific_notation_from_yaml_becomes_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 3e-6\n")  # PyYAML reads this as a string
    assert ToyConfig.from_yaml(path).optim.learning_rate == pytest.approx(3e-6)


def test_round_trip_through_yaml(tmp_path):
    config = ToyConfig(steps=7, reward_weights={"a": 0.5}, optim=OptimConfig(betas=(0.8, 0.9)))
    config.to_yaml(tmp_path / "c.yaml")
    assert ToyConfig.from_yaml(tmp_path / "c.yaml") == config
    assert config.with_overrides(["steps=8"]).steps == 8


def test_unknown_key_names_the_closest_match_and_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        ToyConfig.from_dict({"stesp": 3})
    message = str(info.value)
    assert "'stesp'" in message and "Did you mean 'steps'?" in message
    assert "use_lora" in message and "reward_weights" in message
    with pytest.raises(ConfigError, match="Did you mean 'optim.learning_rate'"):
        ToyConfig.from_dict({}, ["optim.learnig_rate=1"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("steps=2.5", "steps: expected an integer"),
        ("steps=many", "steps: expected int"),
        ("use_lora=maybe", "use_lora: expected true or false"),
        ("sampler=euler", "sampler: 'euler' is not one of"),
        ("prompts=a", "prompts: expected a list"),
        ("reward_weights.shapes=high", r"reward_weights.shapes: expected float"),
        ("eta=[1]", "eta: expected float"),
        ("steps=0", "steps must be >= 1"),
        ("steps", "not of the form key=value"),
        ("steps.x=1", "steps: expected int"),
    ],
)
def test_bad_values_raise_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        ToyConfig.from_dict({}, [override])


def test_dotted_override_into_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="'steps' is not a nested config"):
        ToyConfig.from_dict({"steps": 3}, ["steps.x=1"])


def test_missing_required_field_is_named():
    @dataclass
    class Needs(BaseConfig):
        model: str

    with pytest.raises(ConfigError, match="missing required keys: model"):
        Needs.from_dict({})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ToyConfig.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ToyConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        ToyConfig.from_yaml(tmp_path / "list.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("x=[1, 2]") == ("x", [1, 2])
    assert parse_override("name=a=b") == ("name", "a=b")
    assert ToyConfig.field_help()["model"] == "Model folder or hub id."


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_every_shipped_recipe_is_a_valid_config_of_its_method(method):
    from diffalign.commands.train import recipe_names, recipe_path
    from diffalign.train.config import AWMConfig, DDPOConfig

    config_cls = {"awm": AWMConfig, "ddpo": DDPOConfig}[method]
    names = recipe_names(method)
    assert {"tiny-shapes", "tiny-jpeg", "sd15-pickscore", "sdxl-pickscore"} <= set(names)
    for name in names:
        config = config_cls.from_yaml(recipe_path(method, name))
        assert config.samples_per_step % config.train_batch_size == 0, name
