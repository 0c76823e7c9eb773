"""Training checkpoints load as pipelines: the run's base model with the checkpoint's weights."""

import json

import pytest
import torch

from diffalign.checkpoint import CheckpointError
from diffalign.cli import main
from diffalign.models import load_pipeline
from diffalign.world import recorded_guidance_scale

from .test_trainers import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-round AWM run of the tiny-shapes recipe with an EMA, checkpointed every round."""
    out = tmp_path_factory.mktemp("run")
    args = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", "save_every=1",
            "ema_decay=0.5", "guidance_scale=2.5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def _unet_weights(model) -> dict[str, torch.Tensor]:
    return load_pipeline(model).unet.state_dict()


def test_the_last_checkpoint_loads_as_the_final_pipeline(run):
    final = _unet_weights(run / "final")
    last = _unet_weights(run / "checkpoints" / "checkpoint-00000002")
    first = _unet_weights(run / "checkpoints" / "checkpoint-00000001")
    assert final.keys() == last.keys()  # the LoRA merged, as in final/
    for name, value in final.items():
        torch.testing.assert_close(last[name], value, atol=1e-6, rtol=0)
    assert max((first[k] - final[k]).abs().max().item() for k in final) > 1e-4  # it trained


def test_a_checkpoint_loads_its_live_weights_on_request(run):
    from diffalign.train.export import pipeline_from_checkpoint

    path = run / "checkpoints" / "checkpoint-00000002"
    ema = pipeline_from_checkpoint(path).unet.state_dict()
    live = pipeline_from_checkpoint(path, use_ema=False).unet.state_dict()
    assert max((ema[k] - live[k]).abs().max().item() for k in ema) > 0  # decay 0.5: they differ


def test_a_checkpoint_serves_the_commands_with_its_runs_cfg_scale(run, tmp_path):
    checkpoint = run / "checkpoints" / "checkpoint-00000001"
    assert recorded_guidance_scale(checkpoint) == 2.5
    args = ["sample", "--model", str(checkpoint), "--prompt", "a red circle", "--steps", "2",
            "--quiet", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "samples.json").read_text())


def test_a_checkpoint_that_does_not_fit_its_base_model_is_a_clear_error(run, tmp_path):
    import shutil

    copy = tmp_path / "checkpoint"
    shutil.copytree(run / "checkpoints" / "checkpoint-00000001", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["lora_target_modules"] = ["to_q"]  # fewer adapted layers than trained
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not match"):
        load_pipeline(copy)
