"""The trainers end to end on tiny models: outputs, exact resume, and 2-process correctness."""

import dataclasses
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType, TorchDynamoPlugin
from PIL import Image
from safetensors import safe_open

from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.lora import load_lora, merge_lora
from diffalign.models import (
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    load_pipeline,
)
from diffalign.pipelines.rollout import rollout_pipeline
from diffalign.rewards import load_reward, registry
from diffalign.train import launch
from diffalign.train.advantages import prompt_groups
from diffalign.train.awm import AWMTrainer, stratified_timesteps
from diffalign.train.config import AWMConfig, DDPOConfig
from diffalign.train.ddpo import DDPOTrainer
from diffalign.train.frozen import frozen_components
from diffalign.train.launch import accelerator_options, check_launch
from diffalign.train.trackers import log_grid
from diffalign.train.trainer import Trainer, compiled_in_place
from diffalign.world import recorded_guidance_scale, shipped_model_path

from .conftest import launch_two_processes, requires_cuda

# --set takes several KEY=VALUE pairs and repeats; both forms are used here
TINY = ["--set", "max_steps=2", "prompts_per_step=2", "samples_per_prompt=2",
        "num_inference_steps=3", "--set", "train_batch_size=2", "num_heldout_prompts=2",
        "heldout_samples_per_prompt=1", "eval_every=1", "--set", "log_with=none",
        "progress=false"]  # fmt: skip
SMALL = {"prompts_per_step": 2, "samples_per_prompt": 2, "sample_batch_size": 4,
         "num_inference_steps": 3, "guidance_scale": 3.0, "train_batch_size": 2,
         "num_heldout_prompts": 2, "heldout_samples_per_prompt": 1, "eval_every": 1,
         "save_every": 1, "log_with": "none", "progress": False, "ema_decay": 0.9,
         "reward": "jpeg_compressibility"}  # fmt: skip


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_train_command_on_the_shipped_tiny_model_writes_a_loadable_run(method, tmp_path, capsys):
    assert main(["train", method, "--recipe", "tiny-shapes", *TINY, "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    keys = ("reward_mean", "reward_group_std", "heldout_reward_mean", "loss",
            "heldout_tiny_clip_mean")  # fmt: skip
    for key in keys:
        assert key in rows[-1] and rows[-1][key] == rows[-1][key]  # present and not NaN
    assert 0 <= rows[-1]["reward_group_std"] <= rows[-1]["reward_std"]  # within-prompt <= all
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    card = (tmp_path / "final" / "README.md").read_text()
    assert "library_name: diffusers" in card and "| heldout_tiny_clip_mean |" in card
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png"))[0] == "step-000000.png"
    pipeline = load_pipeline(tmp_path / "final")
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert recorded_guidance_scale(tmp_path / "final") == 4.5  # the recipe's, not the default 3
    assert "final pipeline" in capsys.readouterr().out
    # the same command again, without --resume, refuses rather than overwrite the run
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert main(["train", method, "--recipe", "tiny-shapes", *TINY, "--out", str(tmp_path)]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == logged


def test_a_run_started_from_another_run_s_checkpoint_ends_where_that_run_does(tmp_path, capsys):
    source, fork = tmp_path / "source", tmp_path / "fork"
    awm = ["train", "awm"]
    assert main([*awm, "--recipe", "tiny-shapes", *TINY, "--set", "save_every=1",
                 "--out", str(source)]) == 0  # fmt: skip
    logged = (source / "metrics.jsonl").read_text()
    checkpoint = source / "checkpoints" / "checkpoint-00000001"
    # no --recipe: the checkpoint's own settings; the source run is left as it was
    assert main([*awm, "--resume-from", str(checkpoint), "--out", str(fork)]) == 0
    assert (source / "metrics.jsonl").read_text() == logged
    rows = {run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                  for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (source, fork)}  # fmt: skip
    assert rows[fork] == rows[source] and len(rows[fork]) == 3  # round 0 and 1 copied, 2 rerun
    unet = Path("final") / "unet" / "diffusion_pytorch_model.safetensors"
    _same_tensors(source / unet, fork / unet)
    assert (fork / "config.yaml").read_text() == (source / "config.yaml").read_text()
    # --resume without --recipe goes on with the run's own settings too (not the defaults)
    assert main([*awm, "--resume", "--set", "max_steps=3", "--out", str(fork)]) == 0
    assert json.loads((fork / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    capsys.readouterr()
    refusals = [(awm, source, checkpoint, "a checkpoint of this run.*--out NEW.*--resume"),
                (awm, tmp_path / "other", tmp_path, "not a complete checkpoint"),
                (["train", "ddpo"], tmp_path / "ddpo", checkpoint,
                 "written by AWM training, which DDPO cannot.*train awm.*init_lora")]  # fmt: skip
    for command, out, start, error in refusals:
        for recipe in (["--recipe", "tiny-shapes"], []):  # without: the checkpoint's settings
            assert main([*command, *recipe, "--resume-from", str(start), "--out", str(out)]) == 2
            assert re.search(error, capsys.readouterr().err)
    assert main(["train", "ddpo", "--resume", "--out", str(fork)]) == 2  # its latest is AWM's
    assert "written by AWM training" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not both"):
        AWMTrainer(AWMConfig(**SMALL), tmp_path / "both").train(resume=True, resume_from=checkpoint)


def test_a_reward_of_your_own_trains_and_checks_from_a_file(tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("import torch\n\n\ndef quarter(images, prompts):\n"
                       "    return torch.full((len(prompts),), 0.25)\n")  # fmt: skip
    reference, run = f"{rewards}:quarter", tmp_path / "run"
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", f"reward={reference}",
            f"heldout_extra_rewards=[{reference}]", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["reward_mean"] for row in rows[1:]] == [0.25, 0.25]
    assert [row["reward_group_std"] for row in rows[1:]] == [0.0, 0.0]  # tells no sample apart
    assert rows[-1]["heldout_reward_mean"] == rows[-1]["heldout_quarter_mean"] == 0.25
    assert AWMConfig.from_yaml(run / "config.yaml").reward == reference


def test_lora_on_conv_layers_trains_and_its_adapter_reloads_onto_the_base(tmp_path):
    targets = "[conv1, conv2, proj_in, proj_out, to_q, to_k, to_v, to_out.0]"
    # at this rate the recipe's guard would stop the run after one round: tiny-clip falls 26%
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", "learning_rate=1e-2",
            f"lora_target_modules={targets}", "max_heldout_drop=0",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert AWMConfig.from_yaml(tmp_path / "config.yaml").lora_target_modules[0] == "conv1"
    final = load_pipeline(tmp_path / "final")
    base = load_pipeline(shipped_model_path())
    conv = "down_blocks.0.resnets.0.conv1.weight"
    moved = (final.unet.state_dict()[conv] - base.unet.state_dict()[conv]).abs().max()
    assert moved > 1e-6  # the conv layers were trained
    kohya = tmp_path / "lora" / "kohya_lora.safetensors"  # the same adapter for A1111 / ComfyUI
    for adapter in (tmp_path / "lora", kohya):  # lora/ itself loads diffusers' file
        base = load_pipeline(shipped_model_path())
        load_lora(base, adapter)
        merge_lora(base.unet)
        for name, weight in final.unet.state_dict().items():
            torch.testing.assert_close(base.unet.state_dict()[name], weight, atol=1e-5, rtol=1e-4)
    # the last checkpoint's adapter (no EMA: the live weights, as final/'s) converts to the same
    checkpoint = sorted((tmp_path / "checkpoints").glob("checkpoint-*"))[-1]
    converted = tmp_path / "from_checkpoint.safetensors"
    assert main(["convert", "--lora", str(checkpoint), "--out", str(converted)]) == 0
    _same_tensors(kohya, converted)
    with pytest.raises(SystemExit, match="brings its run's base model; drop --model"):
        main(["convert", "--lora", str(checkpoint), "--model", str(shipped_model_path()),
              "--out", str(converted)])  # fmt: skip


def _same_tensors(one_file, other_file):
    """Assert two .safetensors files hold the same tensors under the same names."""
    with safe_open(str(one_file), "pt") as one, safe_open(str(other_file), "pt") as other:
        assert set(one.keys()) == set(other.keys())
        assert all(torch.equal(one.get_tensor(key), other.get_tensor(key)) for key in one.keys())  # noqa: SIM118


def test_a_run_started_from_a_saved_adapter_begins_where_that_run_ended(tmp_path, capsys, caplog):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", "learning_rate=1e-2",
              "max_heldout_drop=0"]  # fmt: skip
    assert main([*common, "--out", str(first)]) == 0
    kohya = first / "lora" / "kohya_lora.safetensors"  # kohya's layout, as a web UI user's LoRA
    # settings of another layout give way to the adapter's (rank 16, the attention projections)
    other_layout = ["lora_rank=2", "lora_alpha=1", "lora_target_modules=[to_q]"]
    with caplog.at_level("WARNING", logger="diffalign.train.trainer"):
        assert main([*common, f"init_lora={kohya}", *other_layout, "--out", str(second)]) == 0
    assert ("lora_rank: 2 -> 16, lora_alpha: 1.0 -> 16.0, lora_target_modules: ['to_q'] -> "
            "['to_k', 'to_out.0', 'to_q', 'to_v']") in caplog.text  # fmt: skip
    settings = AWMConfig.from_yaml(second / "config.yaml")
    assert (settings.lora_rank, settings.lora_alpha) == (16, 16)
    assert settings.lora_target_modules == ["to_k", "to_out.0", "to_q", "to_v"]
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (first, second)}  # fmt: skip
    # the same held-out prompts and seeds: round 0 of the second run is the first run's end
    for key in ("heldout_reward_mean", "heldout_tiny_clip_mean"):
        assert rows[second][0][key] == rows[first][-1][key]
        assert rows[first][0][key] != rows[first][-1][key]  # which is not where it began
    assert "started from `" in (second / "final" / "README.md").read_text()
    missing = [*common, f"init_lora={tmp_path / 'nothing'}", "--out", str(tmp_path / "refused")]
    assert main(missing) == 2
    assert "No LoRA folder or file at" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs use_lora=true"):
        AWMConfig(init_lora=str(kohya), use_lora=False).validate()


def test_a_run_starts_from_a_web_ui_lora_of_varying_ranks_and_with_text_encoder_layers(tmp_path):
    from peft import LoraConfig

    from diffalign.kohya_lora import save_kohya_lora
    from diffalign.lora import add_lora, layers_matching, lora_layout

    from .test_lora import perturb_lora

    web_ui = load_pipeline(shipped_model_path())  # a kohya file resized per layer, as web UIs have
    add_lora(web_ui.unet, rank=8, alpha=8, rank_pattern={"attn2.to_k": 2, "attn2.to_v": 2},
             alpha_pattern={"to_out.0": 4})  # fmt: skip
    web_ui.text_encoder.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "out_proj"]))
    perturb_lora(web_ui.text_encoder)  # sd-scripts trains the text encoder too by default
    kohya = save_kohya_lora(web_ui, tmp_path / "resized.safetensors")
    run = tmp_path / "run"
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", f"init_lora={kohya}"]
    assert main([*argv, "--out", str(run)]) == 0
    given = lora_layout(load_pipeline(shipped_model_path()), kohya)
    trained = lora_layout(load_pipeline(shipped_model_path()), run / "lora")  # the same layout
    for key in ("rank", "alpha", "rank_pattern", "alpha_pattern", "layers", "text_encoders"):
        assert getattr(trained, key) == getattr(given, key)
    # the text encoder's part stays as the file has it, in lora/ and merged into final/
    written = run / "lora" / "kohya_lora.safetensors"
    with safe_open(str(kohya), "pt") as start, safe_open(str(written), "pt") as end:
        encoder_keys = [key for key in start.keys() if key.startswith("lora_te_")]  # noqa: SIM118
        assert encoder_keys and all(torch.equal(start.get_tensor(key), end.get_tensor(key))
                                    for key in encoder_keys)  # fmt: skip
    expected = load_lora(load_pipeline(shipped_model_path()), kohya)
    merge_lora(expected.text_encoder)
    final_encoder = load_pipeline(run / "final").text_encoder.state_dict()
    for name, weight in expected.text_encoder.state_dict().items():
        torch.testing.assert_close(final_encoder[name], weight)
    cross_kv = sorted(layers_matching(web_ui.unet, ["attn2.to_k", "attn2.to_v"]))
    assert given.rank_pattern == dict.fromkeys(cross_kv, 2)
    out = sorted(layers_matching(web_ui.unet, ["to_out.0"]))
    assert given.alpha_pattern == dict.fromkeys(out, 4)
    settings = AWMConfig.from_yaml(run / "config.yaml")
    assert settings.lora_rank_pattern == given.rank_pattern
    assert "LoRA rank 8 (2 to 8 by layer) started from" in (run / "final" / "README.md").read_text()
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"))[-1]  # rebuilt from its config
    converted = tmp_path / "from_checkpoint.safetensors"
    assert main(["convert", "--lora", str(checkpoint), "--out", str(converted)]) == 0
    _same_tensors(run / "lora" / "kohya_lora.safetensors", converted)


def test_a_fully_fine_tuned_run_gives_an_adapter_by_extraction_not_conversion(tmp_path, capsys):
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", "use_lora=false",
            "max_steps=1", "max_heldout_drop=0", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    checkpoint = sorted((tmp_path / "checkpoints").glob("checkpoint-*"))[-1]
    adapter = tmp_path / "adapter.safetensors"
    with pytest.raises(SystemExit, match="trained every weight .* extract one"):
        main(["convert", "--lora", str(checkpoint), "--out", str(adapter)])
    assert not (tmp_path / "lora").exists()  # nor does the run write an adapter
    capsys.readouterr()
    extract = ["convert", "--model", str(tmp_path / "final"), "--base", "diffalign:tiny-shapes"]
    assert main([*extract, "--lora-rank", "128", "--out", str(adapter)]) == 0
    # the tiny UNet's layers have at most 128 directions: all of their change is kept; the
    # trained biases and norms are named as left out
    report = capsys.readouterr().out
    assert "keeps 100.0% of the change" in report and "no LoRA holds are left out" in report
    final = load_pipeline(tmp_path / "final").unet.state_dict()
    base = load_pipeline(shipped_model_path())
    load_lora(base, adapter)
    merge_lora(base.unet)
    query = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(base.unet.state_dict()[query], final[query], atol=1e-5, rtol=0)
    with pytest.raises(SystemExit, match="--lora converts an adapter and --base extracts one"):
        main([*extract, "--lora", str(adapter), "--out", str(adapter)])


def test_unknown_lora_targets_fail_before_training(tmp_path, capsys):
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set",
            "lora_target_modules=[to_q, attn1]", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "['attn1'] match no Linear or Conv2d layer" in error and "Traceback" not in error


def _logged(trainer) -> list[dict]:
    """A run's metrics.jsonl rows without their timings."""
    lines = trainer.metrics_path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def _trainer(cls, config, out, flow_shift=None, model="sd", **kwargs):
    """A trainer on the tiny SD pipeline (a flow-matching one with ``flow_shift``; with
    ``model="sdxl"`` or ``"sd3"``, the tiny SDXL or SD3 pipeline)."""
    if model == "sdxl":
        pipeline = build_tiny_sdxl_pipeline(seed=0)
    elif model == "sd3":
        pipeline = build_tiny_sd3_pipeline(seed=0)
    else:
        pipeline = build_tiny_pipeline(seed=0, flow_shift=flow_shift)
    return cls(config, out, pipeline=rollout_pipeline(pipeline), **kwargs)


def _weights(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "cls, config_cls, extra",
    [(DDPOTrainer, DDPOConfig, {"stat_min_count": 2, "clip_range": 0.2}),
     (AWMTrainer, AWMConfig, {"beta_kl": 0.1, "beta_ema": 0.1, "num_train_timesteps": 2}),
     # rounds at 0, 1/2 and all of the learning rate: a fresh schedule would redo round 2 at 0
     (AWMTrainer, AWMConfig, {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}),
     # bf16 autocast with the frozen weights cast to bf16 (cast_frozen_weights, the default)
     (DDPOTrainer, DDPOConfig, {"stat_min_count": 2, "mixed_precision": "bf16"}),
     # a per-prompt stat tracker for each component of a balanced two-part reward
     (DDPOTrainer, DDPOConfig, {"stat_min_count": 2, "reward_balance": "advantages",
                                "reward": "jpeg_compressibility+0.1*tiny_clip"})],
)  # fmt: skip
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resumed_runs_match_uninterrupted_ones(cls, config_cls, extra, tmp_path, monkeypatch):
    monkeypatch.setattr(DDPOTrainer, "save_final", lambda self: None)
    monkeypatch.setattr(AWMTrainer, "save_final", lambda self: None)
    settings = {**SMALL, **extra}
    straight = _trainer(cls, config_cls(max_steps=3, **settings), tmp_path / "straight")
    straight.train()
    _trainer(cls, config_cls(max_steps=1, **settings), tmp_path / "split").train()
    with (tmp_path / "split" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "reward_me')  # a crash in the middle of logging round 2
    resumed = _trainer(cls, config_cls(max_steps=3, **settings), tmp_path / "split")
    resumed.train(resume=True)
    for name, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[name], value, atol=0, rtol=0)
    # DDPO's stat trackers (every round's rewards), AWM's KL-EMA weights
    torch.testing.assert_close(resumed.extra_states(), straight.extra_states(), atol=0, rtol=0)

    assert _logged(resumed) == _logged(straight) and len(_logged(straight)) == 4


def test_the_learning_rate_follows_its_schedule_round_by_round(tmp_path):
    config = AWMConfig(max_steps=4, learning_rate=1e-2, lr_scheduler="linear", lr_warmup_steps=2,
                       **{**SMALL, "eval_every": 4, "save_every": 4})  # fmt: skip
    trainer = _trainer(AWMTrainer, config, tmp_path)
    trainer.train()
    rates = [row["learning_rate"] for row in _logged(trainer) if "learning_rate" in row]
    # diffusers' linear schedule: warmup s / 2, then (4 - s) / (4 - 2), for rounds s = 0..3
    assert rates == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    with pytest.raises(ConfigError, match="lr_scheduler must be one of"):
        AWMConfig(lr_scheduler="exponential")


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0])  # clipped, and not clipped at all
def test_the_logged_gradient_norm_is_the_norm_before_clipping(max_grad_norm, tmp_path):
    config = AWMConfig(max_steps=1, max_grad_norm=max_grad_norm, **SMALL)
    trainer = _trainer(AWMTrainer, config, tmp_path)
    step, norms = trainer.optimizer_step, []

    def measure_then_step() -> None:
        norms.append(torch.cat([p.grad.flatten() for p in trainer.trainable]).norm().item())
        step()

    trainer.optimizer_step = measure_then_step
    trainer.train()
    (row,) = [row for row in _logged(trainer) if row["step"] == 1]
    assert norms and min(norms) > 0
    assert row["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_tensorboard_gets_the_metrics_and_the_sample_grids(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(AWMTrainer, "save_final", lambda self: None)
    config = AWMConfig(max_steps=2, **{**SMALL, "log_with": "tensorboard"})
    _trainer(AWMTrainer, config, tmp_path).train()
    events = tmp_path / "diffalign-awm"  # its subfolder holds the run's settings (hparams)
    logged = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    assert [e.step for e in logged.Scalars("heldout_reward_mean")] == [0, 1, 2]
    grids = logged.Images("heldout_samples")
    assert [e.step for e in grids] == [0, 1, 2] and grids[0].width > 0
    # wandb takes a list of images: a stand-in records what it gets
    trainer = _trainer(AWMTrainer, AWMConfig(max_steps=1, **SMALL), tmp_path / "wandb")
    logged_images = []
    wandb = SimpleNamespace(name="wandb", log_images=lambda values, step: logged_images.append(
        (values, step)))  # fmt: skip
    trainer.accelerator.trackers = [wandb]
    grid = Image.new("RGB", (8, 4))
    log_grid(trainer.accelerator.trackers, grid, 3)
    assert logged_images == [({"heldout_samples": [grid]}, 3)]


def test_heldout_evaluation_samples_sample_batch_size_images_a_call(tmp_path, monkeypatch):
    settings = {**SMALL, "num_heldout_prompts": 3, "heldout_samples_per_prompt": 3}
    trainer = _trainer(AWMTrainer, AWMConfig(max_steps=1, **settings), tmp_path)
    calls, call = [], type(trainer.pipeline).__call__

    def counted(self, prompts, **kwargs):
        calls.append(len(prompts))
        return call(self, prompts, **kwargs)

    monkeypatch.setattr(type(trainer.pipeline), "__call__", counted)
    batched = trainer.evaluate(0)
    assert calls == [4, 4, 1]  # 9 images, sample_batch_size 4: a prompt's images span calls
    calls.clear()
    trainer.config = dataclasses.replace(trainer.config, sample_batch_size=9)
    assert trainer.evaluate(0) == pytest.approx(batched, abs=1e-5) and calls == [9]


def test_a_resumed_run_records_and_reports_its_changed_settings(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(AWMTrainer, "save_final", lambda self: None)
    _trainer(AWMTrainer, AWMConfig(max_steps=1, **SMALL), tmp_path).train()
    assert AWMConfig.from_yaml(tmp_path / "config.yaml").max_steps == 1
    longer = {**SMALL, "eval_every": 2, "progress": True}  # a display setting: not reported
    with caplog.at_level("WARNING", logger="diffalign.train.trainer"):
        _trainer(AWMTrainer, AWMConfig(max_steps=2, **longer), tmp_path).train(resume=True)
    assert AWMConfig.from_yaml(tmp_path / "config.yaml").max_steps == 2
    assert "changed settings: eval_every: 1 -> 2, max_steps: 1 -> 2\n" in caplog.text


def brightness(sign: float):
    """Mean pixel value times ``sign``: a reward that every prompt raises the same way (a plain
    function is a reward too)."""

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sign * images.mean(dim=(1, 2, 3))

    return score


def _brightness_trainer(out, sign: float = 1.0, pipeline=None, **settings):
    """AWM with the brightness reward on four prompts that it trains and evaluates on (the
    shipped model unless ``pipeline`` is given)."""
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a red circle\na white square\na blue triangle\na green circle\n")
    config = AWMConfig(**{
        "prompts": str(prompts), "heldout_prompts": str(prompts), "heldout_extra_rewards": [],
        "prompts_per_step": 4, "samples_per_prompt": 8, "sample_batch_size": 32,
        "num_inference_steps": 3, "guidance_scale": 4.5, "train_batch_size": 16,
        "learning_rate": 1e-2, "max_steps": 8, "num_heldout_prompts": 4,
        "heldout_samples_per_prompt": 4, "eval_every": 8, "save_every": 8, "log_with": "none",
        "progress": False, **settings})  # fmt: skip
    return AWMTrainer(config, out, pipeline=pipeline, reward=brightness(sign))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_awm_moves_the_held_out_reward_the_way_the_reward_points(sign, tmp_path, monkeypatch):
    monkeypatch.setattr(AWMTrainer, "save_final", lambda self: None)
    rounds = {"max_steps": 4, "eval_every": 4, "save_every": 4}
    trainer = _brightness_trainer(tmp_path / "run", sign, **rounds)
    trainer.train()
    rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    first, last = rows[0]["heldout_reward_mean"], rows[-1]["heldout_reward_mean"]
    assert rows[-1]["step"] == 4 and last - first > 0.1  # measured: +0.25 brighter, +0.29 darker


def test_a_ddpo_update_moves_log_probs_the_way_of_the_advantages(tmp_path):
    config = DDPOConfig(max_steps=1, **{**SMALL, "train_batch_size": 4, "learning_rate": 1e-4})
    trainer = _trainer(DDPOTrainer, config, tmp_path)
    batch = trainer.sample_round(0)
    count, steps = len(batch.rollout), len(batch.rollout.timesteps)
    advantages = torch.tensor([1.0, -1.0]).repeat(count // 2)
    batch = dataclasses.replace(batch, advantages=advantages)

    @torch.no_grad()
    def chain_log_probs():
        index = torch.arange(count)
        return sum(trainer.transition_log_probs(batch.rollout, index, torch.full((count,), k))
                   for k in range(steps))  # fmt: skip

    before = chain_log_probs()
    torch.testing.assert_close(before, batch.rollout.log_probs.sum(1))
    trainer.train_on(batch, 0)
    change = chain_log_probs() - before
    assert (advantages * change).sum() > 0  # up for A > 0, down for A < 0, to first order


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_rollouts_evaluations_and_final_take_the_negative_prompt(model, tmp_path, monkeypatch):
    from diffalign.pipelines.conditioning import encode_conditioning
    from diffalign.world import model_guidance

    negative = "blurry, a red square"
    config = DDPOConfig(max_steps=1, negative_prompt=negative, **SMALL)
    trainer = _trainer(DDPOTrainer, config, tmp_path, model=model)
    rollout = trainer.sample_round(0).rollout
    device = trainer.pipeline._execution_device
    for text, same in ((negative, True), (None, False)):  # None: diffusers' default
        _, expected = encode_conditioning(trainer.pipeline, ["a"], device, 1, True, text)
        assert torch.equal(rollout.negative_prompt_embeds[0], expected.embeds[0]) is same
    called = []
    sample = type(trainer.pipeline).__call__

    def spy(self, *args, **kwargs):
        called.append(kwargs)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(type(trainer.pipeline), "__call__", spy)
    trainer.train()  # rollouts, held-out evaluations, then final/ records it
    assert len(called) >= 3 and all(kw["negative_prompt"] == negative for kw in called)
    assert model_guidance(str(tmp_path / "final")) == (3.0, negative)  # sample / eval's
    assert model_guidance(str(tmp_path / "final"), negative_prompt="") == (3.0, "")
    assert model_guidance(str(tmp_path / "final"), 1.0) == (1.0, None)  # no CFG, none
    assert negative in (tmp_path / "final" / "README.md").read_text()
    out = tmp_path / "sampled"  # two prompts: diffusers' SD wants the negative prompt as a list
    argv = ["sample", "--model", str(tmp_path / "final"), "--prompt", "a", "--prompt", "b",
            "--steps", "2", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["results"]["negative_prompt"] == negative


def test_a_negative_prompt_without_guidance_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="negative_prompt.*guidance_scale=1.0.*> 1"):
        DDPOConfig(negative_prompt="blurry", guidance_scale=1.0)
    argv = ["sample", "--model", "diffalign:tiny-random", "--prompt", "a", "--guidance-scale",
            "1", "--negative-prompt", "blurry", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit, match="--negative-prompt.*guidance scale 1 turns off"):
        main(argv)


def test_ddpo_noise_weighting_evens_out_the_steps_by_their_noise_level(tmp_path):
    config = DDPOConfig(max_steps=1, step_weighting="noise", **SMALL)
    trainer = _trainer(DDPOTrainer, config, tmp_path)
    rollout = trainer.sample_round(0).rollout
    weights = trainer.chain_step_weights(rollout)
    landing = trainer.schedule.following_timesteps(rollout.timesteps, rollout.num_inference_steps)
    zero = torch.zeros(1, 4, 4, 4)
    std = torch.tensor([float(trainer.schedule.step(zero, int(t), zero, int(t_next), rollout.eta,
                                                    prev_sample=zero).std)
                        for t, t_next in zip(rollout.timesteps, landing, strict=True)])  # fmt: skip
    torch.testing.assert_close(weights, std / std.mean())
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[-1] < weights[0] and torch.all(weights[1:] <= weights[:-1])
    uniform = _trainer(DDPOTrainer, DDPOConfig(max_steps=1, **SMALL), tmp_path / "u")
    assert torch.equal(uniform.chain_step_weights(rollout), torch.ones(len(weights)))
    with pytest.raises(ConfigError, match="step_weighting"):
        DDPOConfig(step_weighting="snr")


def test_awm_weighting_defaults_to_the_papers_and_refuses_unknown_names():
    assert AWMConfig().weighting == "ghuber"
    with pytest.raises(ConfigError, match=r"one of \('uniform', 'ghuber'\), got 'huber'"):
        AWMConfig(weighting="huber")


def _brightening_trainer(out, monkeypatch, **settings):
    """AWM that makes images brighter, evaluated every round with a check reward (``darkness``)
    that prefers them darker, so a guard on it trips."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    darkness = load_reward(brightness(-1.0))
    registry.register_reward("darkness", lambda **kwargs: darkness, "the check")
    # uniform weighting brightens fastest in the first rounds, so the guard trips mid-run
    checked = {"heldout_extra_rewards": ["darkness"], "eval_every": 1, "save_every": 1,
               "samples_per_prompt": 4, "num_train_timesteps": 2,
               "weighting": "uniform"}  # fmt: skip
    return _brightness_trainer(out, 1.0, **{**checked, **settings})


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_the_hacking_guard_stops_and_keeps_the_last_weights_that_passed(ema_decay, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    guarded = _brightening_trainer(tmp_path / "guarded", monkeypatch, ema_decay=ema_decay,
                                   max_heldout_drop=0.05)  # fmt: skip
    guarded.train()
    trip, rows = guarded.guard_trip, _logged(guarded)
    assert trip is not None and 1 < trip.step < 8 and trip.passed_step == trip.step - 1
    assert [row["step"] for row in rows] == list(range(trip.step + 1))
    assert rows[-1]["stopped_by_guard"] == "heldout_darkness_mean"
    start, now = rows[0]["heldout_darkness_mean"], rows[-1]["heldout_darkness_mean"]
    assert trip.drop == pytest.approx((start - now) / abs(start)) and trip.drop > 0.05
    assert all((start - row["heldout_darkness_mean"]) / abs(start) <= 0.05 for row in rows[:-1])
    record = json.loads((tmp_path / "guarded" / "final" / "training.json").read_text())
    assert record["stopped_by_guard"]["passed_step"] == trip.passed_step
    # the kept weights are those an unguarded run has when it stops at the last passing round
    plain = _brightening_trainer(tmp_path / "plain", monkeypatch, ema_decay=ema_decay,
                                 max_steps=trip.passed_step)  # fmt: skip
    plain.train()
    evaluated = plain._evaluated_weights()
    for kept, expected in zip(guarded._evaluated_weights(), evaluated, strict=True):
        torch.testing.assert_close(kept, expected, atol=0, rtol=0)
    unet = load_pipeline(tmp_path / "guarded" / "final").unet.state_dict()
    reference = load_pipeline(tmp_path / "plain" / "final").unet.state_dict()
    for name, weight in reference.items():
        torch.testing.assert_close(unet[name], weight, atol=0, rtol=0)


def test_a_resumed_guard_remembers_its_start_and_the_weights_that_passed(tmp_path, monkeypatch):
    monkeypatch.setattr(AWMTrainer, "save_final", lambda self: None)
    straight = _brightening_trainer(tmp_path / "straight", monkeypatch, max_heldout_drop=0.05)
    straight.train()
    trip = straight.guard_trip
    assert trip is not None and trip.step > 1
    # stop where the straight run last passed, then resume: the trip's round comes after the
    # checkpoint, so the weights to go back to can only come from it
    stopped = dict(max_heldout_drop=0.05, max_steps=trip.passed_step)
    _brightening_trainer(tmp_path / "split", monkeypatch, **stopped).train()
    resumed = _brightening_trainer(tmp_path / "split", monkeypatch, max_heldout_drop=0.05)
    resumed.train(resume=True)
    assert resumed.guard_trip == trip and _logged(resumed) == _logged(straight)
    for kept, expected in zip(resumed.trainable, straight.trainable, strict=True):
        torch.testing.assert_close(kept, expected, atol=0, rtol=0)


def _step_gradients(trainer, batch) -> dict[str, torch.Tensor]:
    """The gradient one round's optimizer step uses (after accumulation, before clipping)."""
    gradients, step = {}, trainer.optimizer_step

    def record_then_step() -> None:
        pairs = zip(trainer.trainable_names, trainer.trainable, strict=True)
        gradients.update({name: weight.grad.clone() for name, weight in pairs})
        step()

    trainer.optimizer_step = record_then_step
    trainer.train_on(batch, 0)
    return gradients


@pytest.mark.parametrize(
    "cls, config_cls, extra",
    [(DDPOTrainer, DDPOConfig, {"timestep_fraction": 0.5, "stat_min_count": 2}),
     (AWMTrainer, AWMConfig, {"beta_kl": 0.1, "num_train_timesteps": 2})],
)  # fmt: skip
def test_accumulation_and_checkpointing_give_the_one_batch_gradient(cls, config_cls, extra,
                                                                    tmp_path):  # fmt: skip
    def trainer(name, **settings):
        config = config_cls(max_steps=1, **{**SMALL, "samples_per_prompt": 4, "train_batch_size": 8,
                                            **extra, **settings})  # fmt: skip
        return _trainer(cls, config, tmp_path / name)

    whole = trainer("whole")
    batch = whole.sample_round(0)
    assert len(batch.rollout) == 8
    expected = _step_gradients(whole, batch)
    assert max(g.abs().max() for g in expected.values()) > 0
    accumulated = _step_gradients(trainer("acc", train_batch_size=4, gradient_accumulation_steps=2),
                                  batch)  # fmt: skip
    checkpointed = _step_gradients(trainer("ckpt", gradient_checkpointing=True), batch)
    for name, gradient in expected.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-4, atol=1e-7)
    halves = _step_gradients(trainer("half", train_batch_size=4), batch)  # two steps, not one
    assert not all(torch.allclose(halves[n], g, rtol=1e-3) for n, g in expected.items())


def test_training_changes_the_weights_and_stratifies_timesteps(tmp_path):
    trainer = _trainer(AWMTrainer, AWMConfig(max_steps=1, **SMALL), tmp_path)
    before = _weights(trainer)
    trainer.train_on(trainer.sample_round(0), 0)
    assert any(not torch.equal(before[n], w) for n, w in _weights(trainer).items())
    steps = stratified_timesteps(1000, 4, 800, torch.Generator().manual_seed(0))
    for k in range(4):
        assert steps[:, k].min() >= 200 * k and steps[:, k].max() < 200 * (k + 1)
    window = stratified_timesteps(1000, 4, 1000, torch.Generator().manual_seed(0), lower=600)
    for k in range(4):
        assert window[:, k].min() >= 600 + 100 * k and window[:, k].max() < 700 + 100 * k


def test_awm_trains_only_inside_its_timestep_window(tmp_path):
    config = AWMConfig(max_steps=1, min_timestep_fraction=0.5, timestep_fraction=0.75, **SMALL)
    trainer = _trainer(AWMTrainer, config, tmp_path)
    timesteps, noise = trainer.noise_plan(trainer.sample_round(0).rollout, 0, torch.Generator())
    assert timesteps.min() >= 500 and timesteps.max() < 750
    assert noise.shape[:2] == timesteps.shape


def test_awm_train_cfg_matches_the_guided_prediction_the_rollouts_used(tmp_path):
    from diffalign.sampling import add_noise, prediction_target
    from diffalign.train.losses import awm_loss

    trainer = _trainer(AWMTrainer, AWMConfig(max_steps=1, beta_kl=0.0, train_cfg=True, **SMALL),
                       tmp_path)  # fmt: skip
    rollout = trainer.sample_round(0).rollout
    x0, embeds, negative = (rollout.latents[:2, -1], rollout.prompt_embeds[:2],
                            rollout.negative_prompt_embeds[:2])  # fmt: skip
    timesteps, noise = torch.tensor([300, 800]), torch.randn_like(x0)
    advantages = torch.tensor([1.0, -1.0])
    alpha_bar = trainer.schedule.alpha_bar(timesteps, x0)
    noisy = add_noise(x0, noise, alpha_bar)
    with torch.no_grad():
        uncond = trainer.denoiser(noisy, timesteps, encoder_hidden_states=negative).sample
        cond = trainer.denoiser(noisy, timesteps, encoder_hidden_states=embeds).sample
    target = prediction_target(x0, noise, alpha_bar, trainer.schedule.prediction_type)
    fraction = timesteps.float() / 1000

    def expected(prediction):
        return awm_loss(prediction, target, advantages, fraction).diagnostics["mse"]

    guided = trainer.sample_loss(x0, embeds, advantages, timesteps, noise, negative, 3.0)
    plain = trainer.sample_loss(x0, embeds, advantages, timesteps, noise)
    assert guided.diagnostics["mse"] == pytest.approx(expected(uncond + 3.0 * (cond - uncond)))
    assert plain.diagnostics["mse"] == pytest.approx(expected(cond))
    assert guided.diagnostics["mse"] != pytest.approx(plain.diagnostics["mse"])
    calls, original = [], trainer.sample_loss

    def recording_loss(*args):
        calls.append((args[5], args[6]))
        return original(*args)

    trainer.sample_loss = recording_loss
    batch = trainer.sample_round(0)
    trainer.train_on(batch, 0)
    assert calls and all(n is not None and scale == SMALL["guidance_scale"] for n, scale in calls)
    trainer.config.train_cfg = False
    calls.clear()
    trainer.train_on(batch, 0)
    assert calls and all(n is None for n, _ in calls)


def test_awm_on_a_flow_model_regresses_the_velocity_at_shifted_times(tmp_path):
    from diffalign.train.losses import awm_loss

    config = AWMConfig(max_steps=1, beta_kl=0.0, **{**SMALL, "guidance_scale": 1.0})
    trainer = _trainer(AWMTrainer, config, tmp_path, flow_shift=3.0)
    rollout = trainer.sample_round(0).rollout
    x0, embeds = rollout.latents[:2, -1], rollout.prompt_embeds[:2]
    index, noise, advantages = torch.tensor([499, 899]), torch.randn_like(x0), torch.ones(2)
    sigma = 3 * (index + 1) / 1000 / (1 + 2 * (index + 1) / 1000)  # SD3's shift
    noisy = (1 - sigma.view(2, 1, 1, 1)) * x0 + sigma.view(2, 1, 1, 1) * noise
    with torch.no_grad():
        velocity = trainer.denoiser(noisy, sigma * 1000, encoder_hidden_states=embeds).sample
    expected = awm_loss(velocity, noise - x0, advantages, sigma).diagnostics["mse"]
    out = trainer.sample_loss(x0, embeds, advantages, index, noise)
    assert out.diagnostics["mse"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "cls, config_cls, extra",
    [(DDPOTrainer, DDPOConfig, {"stat_min_count": 2, "eta": 0.7}),
     (AWMTrainer, AWMConfig, {"num_train_timesteps": 2})],
)  # fmt: skip
def test_both_trainers_train_a_flow_model(cls, config_cls, extra, tmp_path):
    trainer = _trainer(cls, config_cls(max_steps=1, **SMALL, **extra), tmp_path, flow_shift=3.0)
    batch = trainer.sample_round(0)
    if cls is DDPOTrainer:  # before any update the recomputed log-probs are the rollout's
        steps = torch.arange(len(batch.rollout.timesteps))
        index = torch.zeros_like(steps)
        with torch.no_grad():
            out = trainer.step_loss(batch.rollout, batch.advantages, index, steps)
        assert out.diagnostics["approx_kl"] < 1e-8 and out.diagnostics["clipfrac"] == 0
    before = _weights(trainer)
    metrics = trainer.train_on(batch, 0)
    assert metrics["loss"] == metrics["loss"]  # not NaN
    assert any(not torch.equal(before[n], w) for n, w in _weights(trainer).items())


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate fixes the mixed precision once per process: reset it around a test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@requires_cuda
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("model", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("cls, config_cls", [(DDPOTrainer, DDPOConfig), (AWMTrainer, AWMConfig)])
def test_mixed_precision_step_on_cuda_updates_float32_lora_weights(cls, config_cls, precision,
                                                                    model, tmp_path):  # fmt: skip
    eta = {"eta": 0.7} if cls is DDPOTrainer and model == "sd3" else {}  # Flow-GRPO's SDE
    config = config_cls(max_steps=1, **{**SMALL, "mixed_precision": precision, **eta})
    trainer = _trainer(cls, config, tmp_path, model=model)
    assert trainer.accelerator.device.type == "cuda"
    half = torch.float16 if precision == "fp16" else torch.bfloat16
    assert trainer.frozen_weights_dtype() == half  # cast_frozen_weights, the default
    assert {p.dtype for p in trainer.denoiser.parameters() if not p.requires_grad} == {half}
    before = _weights(trainer)
    round_batch = trainer.sample_round(0)
    assert torch.isfinite(round_batch.rewards).all()
    assert round_batch.rollout.latents.dtype == torch.float32
    trainer.train_on(round_batch, 0)
    after = _weights(trainer)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(before[n], w) for n, w in after.items())


@pytest.mark.parametrize("model", ["sd", "sd3"])
def test_offloaded_text_encoders_encode_on_the_cpu_for_the_rounds(model, tmp_path):
    config = AWMConfig(max_steps=1, **{**SMALL, "offload_text_encoders": True})
    trainer = _trainer(AWMTrainer, config, tmp_path, model=model)
    assert trainer.pipeline.text_encoder_device == torch.device("cpu")
    encoders = [m for name, m in frozen_components(trainer.pipeline).items() if "text" in name]
    assert len(encoders) == (2 if model == "sd3" else 1)
    assert all(p.device.type == "cpu" for m in encoders for p in m.parameters())
    device = trainer.accelerator.device  # on a GPU the denoiser and the embeddings are there
    assert all(p.device.type == device.type for p in trainer.denoiser.parameters())
    batch = trainer.sample_round(0)
    assert batch.rollout.prompt_embeds.device.type == device.type
    loss = trainer.train_on(batch, 0)["loss"]
    assert loss == loss  # not NaN


def _noise_only_gradient(trainer, rollout, advantages, shared: bool) -> float:
    """Gradient norm of the policy loss when every sample of a group has the same latents."""
    trainer.config.shared_noise = shared
    timesteps, noise = trainer.noise_plan(rollout, 0, torch.Generator().manual_seed(1))
    trainer.model.zero_grad()
    out = trainer.sample_loss(rollout.latents[:, -1], rollout.prompt_embeds, advantages,
                              timesteps[:, 0], noise[:, 0])  # fmt: skip
    out.loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


def test_shared_noise_draws_once_per_prompt_and_cancels_the_noise_only_gradient(tmp_path):
    config = AWMConfig(max_steps=1, shared_noise=True, beta_kl=0.0, num_train_timesteps=2, **SMALL)
    trainer = _trainer(AWMTrainer, config, tmp_path)
    rollout = trainer.sample_round(0).rollout
    groups = list(prompt_groups(rollout.prompts).values())
    timesteps, noise = trainer.noise_plan(rollout, 0, torch.Generator().manual_seed(1))
    for index in groups:
        assert torch.equal(noise[index], noise[index[:1]].expand_as(noise[index]))
        assert torch.equal(timesteps[index], timesteps[index[:1]].expand_as(timesteps[index]))
    assert len(groups) == 2 and not torch.equal(noise[groups[0][0]], noise[groups[1][0]])
    # same latents within each group and advantages summing to zero per group: with one noise
    # draw per group the policy gradient vanishes; with a draw per sample it does not
    advantages = torch.zeros(len(rollout))
    for index in groups:
        rollout.latents[index, -1] = rollout.latents[index[0], -1]
        advantages[index] = torch.linspace(-1.0, 1.0, len(index))
    assert _noise_only_gradient(trainer, rollout, advantages, shared=True) < 1e-7
    assert _noise_only_gradient(trainer, rollout, advantages, shared=False) > 1e-4


def test_awm_advantages_follow_the_configured_std_floor():
    rewards, prompts = torch.tensor([1.0, 3.0, 5.0, 9.0]), ["a", "a", "b", "b"]
    floored = SimpleNamespace(config=AWMConfig(advantage_std_floor=4.0))
    plain = SimpleNamespace(config=AWMConfig())
    # batch std 2.958 < floor 4: deviations from the group means (-1, 1, -2, 2) over 4
    expected = torch.tensor([-0.25, 0.25, -0.5, 0.5])
    torch.testing.assert_close(
        AWMTrainer.compute_advantages(floored, prompts, rewards), expected, atol=1e-4, rtol=0
    )
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / 2.958
    torch.testing.assert_close(
        AWMTrainer.compute_advantages(plain, prompts, rewards), expected, atol=1e-3, rtol=0
    )


@pytest.mark.parametrize("use_lora", [True, False])
def test_ddpos_kl_term_starts_at_zero_and_pulls_back_to_the_reference(use_lora, tmp_path):
    settings = {**SMALL, "stat_min_count": 2, "beta_kl": 0.1, "use_lora": use_lora,
                "learning_rate": 1e-2 if use_lora else 1e-3}  # fmt: skip
    trainer = _trainer(DDPOTrainer, DDPOConfig(max_steps=1, **settings), tmp_path)
    assert (trainer.reference_denoiser is None) == use_lora  # LoRA: the adapter disabled
    batch = trainer.sample_round(0)
    index = torch.arange(len(batch.rollout))
    steps = torch.zeros(len(index), dtype=torch.long)
    zero = torch.zeros(len(index))

    def kl_loss():
        return trainer.step_loss(batch.rollout, zero, index, steps)

    assert kl_loss().diagnostics["kl"] == 0.0  # the policy starts as its reference
    trainer.train_on(batch, 0)
    moved = kl_loss()
    assert moved.diagnostics["kl"] > 0
    # with no advantage the loss is beta_kl * KL alone: a small step down its gradient lowers it
    trainer.model.zero_grad()
    moved.loss.backward()
    with torch.no_grad():
        for parameter in trainer.trainable:
            parameter -= 1e-3 * parameter.grad / parameter.grad.norm().clamp(min=1e-12)
    assert kl_loss().diagnostics["kl"] < moved.diagnostics["kl"]


def test_a_run_that_raises_still_closes_its_trackers_and_process_group(tmp_path, monkeypatch):
    trainer = _trainer(AWMTrainer, AWMConfig(max_steps=2, **SMALL), tmp_path)
    ended = []
    monkeypatch.setattr(trainer.accelerator, "end_training", lambda: ended.append(True))

    def failing_round():
        raise RuntimeError("a reward server went away")

    monkeypatch.setattr(trainer, "run_round", failing_round)
    with pytest.raises(RuntimeError, match="reward server"):
        trainer.train()
    assert ended == [True]


def test_ddpos_sde_window_samples_and_trains_only_its_steps(tmp_path, monkeypatch):
    settings = {**SMALL, "stat_min_count": 2, "num_inference_steps": 6, "sde_window": 2}
    trainer = _trainer(DDPOTrainer, DDPOConfig(max_steps=1, **settings), tmp_path)
    batch = trainer.sample_round(0)
    window = batch.rollout.stochastic_steps
    assert len(window) == 2 and window[1] == window[0] + 1  # consecutive, as drawn for round 0
    assert window == tuple(trainer.rollout_options(0)["stochastic_steps"])
    outside = [i for i in range(6) if i not in window]
    assert batch.rollout.log_probs[:, outside].isnan().all()
    trained = []
    original = DDPOTrainer.step_loss

    def recording(self, rollout, advantages, index, steps, step_weights=None):
        trained.extend(steps.tolist())
        return original(self, rollout, advantages, index, steps, step_weights)

    monkeypatch.setattr(DDPOTrainer, "step_loss", recording)
    metrics = trainer.train_on(batch, 0)
    assert set(trained) == set(window) and len(trained) == 2 * len(batch.rollout)
    assert metrics["loss"] == metrics["loss"]  # the window's log-probs are finite
    with pytest.raises(ConfigError, match="sde_window must be in"):
        DDPOConfig(num_inference_steps=4, sde_window=5)


def test_balanced_advantages_weigh_each_components_own_advantages():
    prompts = ["a", "a", "b", "b"]
    # a wide-spread component and a narrow one (weights 1 and 0.1), each deciding both groups
    parts = torch.tensor([[1000.0, 0.0], [0.0, 1.0], [3000.0, 1.0], [1000.0, 0.0]])
    weights = {"wide": 1.0, "narrow": 0.1}
    rewards = parts[:, 0] + 0.1 * parts[:, 1]

    def trainer(balance: str) -> SimpleNamespace:
        config = AWMConfig(global_std=False, reward_balance=balance, reward="wide+0.1*narrow")
        stub = SimpleNamespace(config=config, reward=SimpleNamespace(weights=weights),
                               reward_parts=list(weights))  # fmt: skip
        stub.compute_advantages = lambda p, r, key="reward": AWMTrainer.compute_advantages(
            stub, p, r, key
        )
        return stub

    # each component's group advantages are (1, -1, 1, -1) and (-1, 1, 1, -1); weighted: 1, 0.1
    balanced = Trainer.round_advantages(trainer("advantages"), prompts, rewards, parts)
    torch.testing.assert_close(balanced, torch.tensor([0.9, -0.9, 1.1, -1.1]), atol=1e-3, rtol=0)
    # summed first, the narrow component's say is lost in the wide one's spread
    summed = Trainer.round_advantages(trainer("sum"), prompts, rewards, parts)
    torch.testing.assert_close(summed, torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3, rtol=0)


def test_a_weighted_reward_logs_each_component_and_balance_needs_several(tmp_path):
    reward = "jpeg_compressibility+0.1*tiny_clip"
    config = DDPOConfig(max_steps=1, **{**SMALL, "stat_min_count": 2, "reward": reward,
                                        "reward_balance": "advantages"})  # fmt: skip
    trainer = _trainer(DDPOTrainer, config, tmp_path / "run")
    row = trainer.run_round()
    mixed = row["reward_jpeg_compressibility_mean"] + 0.1 * row["reward_tiny_clip_mean"]
    assert row["reward_mean"] == pytest.approx(mixed, rel=1e-5)
    assert set(trainer.component_trackers) == {"jpeg_compressibility", "tiny_clip"}
    assert all(len(b) == 2 for b in trainer.component_trackers["tiny_clip"].buffers.values())
    with pytest.raises(ConfigError, match="has one component"):  # a spec: told at once
        DDPOConfig(max_steps=1, **{**SMALL, "reward_balance": "advantages"})
    single = DDPOConfig(max_steps=1, **{**SMALL, "reward": "my_rewards.py:score",
                                        "reward_balance": "advantages"})  # fmt: skip
    with pytest.raises(ConfigError, match="has one component"):  # a reward object: once loaded
        _trainer(DDPOTrainer, single, tmp_path / "single", reward="jpeg_compressibility")
    with pytest.raises(ConfigError, match="reward_balance must be one of"):
        DDPOConfig(reward_balance="mean")


def test_bad_configs_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="eta > 0"):
        DDPOConfig(eta=0.0)
    with pytest.raises(ValueError, match="prompts_per_step"):
        AWMConfig(prompts_per_step=0)
    with pytest.raises(ValueError, match="min_timestep_fraction must be in"):
        AWMConfig(min_timestep_fraction=0.9, timestep_fraction=0.9)
    with pytest.raises(ValueError, match="advantage_std_floor must be >= 0"):
        AWMConfig(advantage_std_floor=-0.1)
    with pytest.raises(ValueError, match=r"none are set: .*heldout_extra_rewards=\[tiny_clip\]"):
        AWMConfig(max_heldout_drop=0.05)
    with pytest.raises(ValueError, match="max_heldout_drop must be >= 0"):
        AWMConfig(max_heldout_drop=-0.1, heldout_extra_rewards=["tiny_clip"])
    assert main(["train", "awm", "--recipe", "tiny-shapes", "--set", "prompts=nope.txt",
                 "--out", str(tmp_path)]) == 2  # fmt: skip


@pytest.mark.parametrize("package, setting", [("bitsandbytes", {"use_8bit_adam": True}),
                                              ("wandb", {"log_with": "wandb"})])  # fmt: skip
def test_a_setting_whose_package_is_missing_names_the_install(package, setting, tmp_path,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: imports and specs fail
    with pytest.raises(ConfigError, match=f"pip install {package}.*=(false|none)"):
        _trainer(DDPOTrainer, DDPOConfig(**{**SMALL, **setting}), tmp_path)


@pytest.mark.parametrize(
    ("strategy", "fsdp2", "error"),
    [("MEGATRON_LM", False, "MEGATRON_LM strategy.*fsdp_version: 2.*--zero_stage 2.*--multi_gpu"),
     ("FSDP", False, "need FSDP version 2.*fsdp_version 2")],
)  # fmt: skip
def test_strategies_the_rollouts_cannot_sample_with_are_refused(strategy, fsdp2, error, tmp_path):
    # accelerate builds these accelerators only on a GPU: a stand-in carries the type
    wrapped = SimpleNamespace(distributed_type=DistributedType(strategy), num_processes=2,
                              is_fsdp2=fsdp2)  # fmt: skip
    with pytest.raises(ConfigError, match=error):
        DDPOTrainer(DDPOConfig(log_with="none"), tmp_path, accelerator=wrapped)
    assert not any(tmp_path.iterdir())

    def fsdp2(**dynamo):
        state = SimpleNamespace(dynamo_plugin=TorchDynamoPlugin(**dynamo))
        return SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2,
                               is_fsdp2=True, state=state)  # fmt: skip

    check_launch(fsdp2())
    check_launch(fsdp2(backend="inductor", use_regional_compilation=True))
    # the whole sharded model compiled fails in dynamo's tracing (tests/test_fsdp.py runs the
    # regional compilation that the message asks for)
    with pytest.raises(ConfigError, match="Under FSDP2.*--dynamo_use_regional_compilation"):
        check_launch(fsdp2(backend="inductor"))


def test_processes_that_would_each_train_alone_are_refused(monkeypatch):
    # accelerate launch with use_cpu: true and a GPU strategy starts 2 processes that each run
    # as distributed type NO: every one trains its own copy into the same folder
    alone = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    check_launch(alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes were launched.*one DDP job"):
        check_launch(alone)
    check_launch(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))


def test_launches_without_a_gpu_get_a_gloo_process_group(monkeypatch):
    # accelerate starts one only for GPU-like devices: each process would run alone
    monkeypatch.setattr(launch, "has_accelerator", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert accelerator_options() == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerator_options() == {"cpu": True}  # DDP over gloo
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    (handler,) = accelerator_options()["kwargs_handlers"]
    assert handler.backend == "gloo"
    monkeypatch.setattr(launch, "has_accelerator", lambda: True)
    assert accelerator_options() == {}  # accelerate's own choice (nccl on CUDA)


def test_the_launch_precision_applies_unless_the_config_sets_one(monkeypatch, caplog):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with caplog.at_level("WARNING"):
        assert launch.resolve_mixed_precision(None) == "no"  # a plain run: nothing asked
        assert launch.resolve_mixed_precision("fp16") == "fp16"
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a launch's default
        assert launch.resolve_mixed_precision("bf16") == "bf16"
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        assert launch.resolve_mixed_precision(None) == "bf16"  # as accelerate launch asks
        assert launch.resolve_mixed_precision("bf16") == "bf16"
    assert not caplog.records
    with caplog.at_level("WARNING"):
        assert launch.resolve_mixed_precision("no") == "no"  # the config decides, and says so
    assert "asked for mixed precision 'bf16'" in caplog.text
    assert "--set mixed_precision=bf16" in caplog.text


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("setting", "trains_in"), [(None, "bf16"), ("no", "no")])
def test_a_trainer_takes_the_launch_precision_and_records_it(setting, trains_in, monkeypatch,
                                                              tmp_path):  # fmt: skip
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch --mixed_...`
    trainer = _trainer(AWMTrainer, AWMConfig(**SMALL, mixed_precision=setting), tmp_path)
    assert trainer.accelerator.mixed_precision == trains_in
    assert trainer.config.mixed_precision == trains_in  # what config.yaml and resumes see


def test_train_command_launched_as_accelerate_multi_gpu_runs_ddp_on_cpus(tmp_path):
    # `accelerate launch --multi_gpu --num_processes 2 $(which diffalign) train ...` on a machine
    # without a GPU: the processes used to run alone (refused); now they train as one DDP job
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(["--multi_gpu", "--num_processes", "2", "x.py"])
    variables = prepare_multi_gpu_env(_validate_launch_command(parsed)[0])
    env = {key: value for key, value in variables.items() if key.startswith("ACCELERATE_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    settings = ["max_steps=1", "prompts_per_step=2", "samples_per_prompt=2",
                "num_inference_steps=3", "train_batch_size=2", "num_heldout_prompts=2",
                "heldout_samples_per_prompt=1", "eval_every=1", "log_with=none",
                "progress=false"]  # fmt: skip
    # through torch.distributed.run itself, as `accelerate launch` runs it (the other
    # distributed tests fork their processes, see conftest)
    launch_two_processes("-m", "diffalign", "train", "awm", "--recipe", "tiny-shapes", "--set",
                         *settings, "--out", tmp_path, env=env, torchrun=True)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1] and rows[1]["samples_seen"] == 4
    assert (tmp_path / "final" / "unet").is_dir()


@pytest.mark.parametrize(
    "strategy, model",
    [("ddp", "sd"), ("fsdp", "sd"), ("ddp", "sdxl"), ("fsdp", "sdxl"), ("ddp", "sd3"),
     ("fsdp", "sd3")],
)  # fmt: skip
def test_two_processes_take_the_same_step_as_one_on_the_same_global_batch(strategy, model,
                                                                          tmp_path):  # fmt: skip
    script = Path(__file__).with_name("distributed_step.py")
    launch_two_processes(script, tmp_path, "ddp", model, processes=1)
    launch_two_processes(script, tmp_path, strategy, model)
    xl = "" if model == "sd" else f"-{model}"
    double = torch.load(tmp_path / f"result-2{'-fsdp' if strategy == 'fsdp' else ''}{xl}.pt")
    single = torch.load(tmp_path / f"result-1{xl}.pt")
    torch.testing.assert_close(double["rewards"], single["rewards"])  # gathered: all 8 samples
    torch.testing.assert_close(double["advantages"], single["advantages"])
    assert len(double["rewards"]) == 8
    assert any(g.abs().max() > 0 for g in single["gradients"].values())  # lora_B; lora_A waits
    for name, value in single["gradients"].items():  # equal up to float summation order
        difference = (double["gradients"][name] - value).norm()
        assert difference <= 1e-4 * value.norm() + 1e-9, name
    # AdamW moves each weight by about lr = 1e-2; where a gradient is ~1e-8, close to AdamW's eps,
    # float noise in the gradient moves that weight by up to a few 1e-4
    for name, value in single["weights"].items():
        torch.testing.assert_close(double["weights"][name], value, atol=1e-3, rtol=0)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_under_accelerate_s_dynamo_setting_the_chains_run_compiled_and_train_the_same(
    tmp_path, monkeypatch
):
    from accelerate.state import AcceleratorState

    config = DDPOConfig(max_steps=2, **{**SMALL, "stat_min_count": 2})
    plain = _trainer(DDPOTrainer, config, tmp_path / "plain")
    assert plain.pipeline.chain_denoiser is None  # no dynamo: the chains call the UNet
    plain.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    # what `accelerate launch --dynamo_backend eager` sets: dynamo's capture, eager kernels
    # (inductor's would round differently, and take a minute to compile)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")
    compiled = _trainer(DDPOTrainer, config, tmp_path / "compiled")
    chain = compiled.pipeline.chain_denoiser
    assert chain._orig_mod is compiled.denoiser  # a wrapper over the same weights, no copy
    calls = []
    chain.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    compiled.train()
    # evaluations of 2 images (rounds 0, 1, 2) and 2 rounds of 4 samples, 3 steps each, the
    # CFG batch doubled
    evaluation, rollout = [4] * 3, [8] * 3
    assert calls == evaluation + rollout + evaluation + rollout + evaluation
    assert _logged(compiled) == _logged(plain)
    trained = compiled.named_trainable()
    for name, value in plain.named_trainable().items():
        torch.testing.assert_close(trained[name], value, atol=0, rtol=0)
    compiled.denoiser.mid_block.compile(backend="eager")  # as DeepSpeed compiles, in place
    assert compiled_in_place(compiled.denoiser) and compiled._compiled_for_chains() is None


def _frozen_bytes(trainer) -> int:
    modules = [trainer.denoiser, trainer.pipeline.vae, trainer.pipeline.text_encoder]
    return sum(p.nbytes for m in modules for p in m.parameters() if not p.requires_grad)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("source", ["pipeline", "folder"])
def test_frozen_weights_in_half_precision_and_final_saved_from_float32(source, tmp_path):
    original = build_tiny_pipeline(seed=0)
    settings = {**SMALL, "stat_min_count": 2, "mixed_precision": "bf16", "ema_decay": 0.0}
    if source == "pipeline":  # the float32 values are kept on the CPU from the start
        halved = _trainer(DDPOTrainer, DDPOConfig(max_steps=1, **settings), tmp_path / "cast")
        assert halved.frozen.copies > 0
    else:  # the run loaded the model itself: no copies; final/ reads it again
        original.save_pretrained(tmp_path / "model")
        config = DDPOConfig(max_steps=1, **{**settings, "model": str(tmp_path / "model")})
        halved = DDPOTrainer(config, tmp_path / "cast")
        assert halved.frozen.copies == 0
    kept = _trainer(DDPOTrainer, DDPOConfig(max_steps=1, cast_frozen_weights=False, **settings),
                    tmp_path / "kept")  # fmt: skip
    assert _frozen_bytes(halved) * 2 == _frozen_bytes(kept)
    assert {p.dtype for p in halved.trainable} == {torch.float32}
    batch = halved.sample_round(0)
    assert batch.rollout.latents.dtype == torch.float32  # the chain and its log-probs stay float32
    count, steps = len(batch.rollout), len(batch.rollout.timesteps)
    with torch.no_grad():  # training sees the network that sampled
        recomputed = sum(halved.transition_log_probs(batch.rollout, torch.arange(count),
                                                     torch.full((count,), k))
                         for k in range(steps))  # fmt: skip
    torch.testing.assert_close(recomputed, batch.rollout.log_probs.sum(1))
    halved.train_on(batch, 0)
    lora = {name: value.detach().clone() for name, value in halved.named_trainable().items()}
    halved.out.mkdir(parents=True, exist_ok=True)
    row = {"step": 0, "samples_seen": 0, "reward_mean": 0.0}
    halved.metrics_path.write_text(json.dumps(row) + "\n")
    final = load_pipeline(halved.save_final())
    # final/ holds the untrained weights as they were (float32), with the float32 LoRA merged
    for name in ("vae", "text_encoder"):
        for key, value in getattr(original, name).state_dict().items():
            assert torch.equal(getattr(final, name).state_dict()[key], value), key
    from diffalign.lora import add_lora

    expected = original.unet
    add_lora(expected, rank=halved.config.lora_rank, alpha=halved.config.lora_alpha,
             target_modules=halved.config.lora_target_modules)  # fmt: skip
    expected.load_state_dict(lora, strict=False)
    merge_lora(expected)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(final.unet.state_dict()[key], value, atol=1e-6, rtol=0)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_final_keeps_rounded_frozen_weights_when_the_model_is_gone(tmp_path, caplog):
    import shutil

    original = build_tiny_pipeline(seed=0)
    original.save_pretrained(tmp_path / "model")
    settings = {**SMALL, "stat_min_count": 2, "mixed_precision": "bf16"}
    trainer = DDPOTrainer(DDPOConfig(max_steps=1, **{**settings, "model": str(tmp_path / "model")}),
                          tmp_path / "run")  # fmt: skip
    shutil.rmtree(tmp_path / "model")
    trainer.out.mkdir(parents=True, exist_ok=True)
    trainer.metrics_path.write_text(json.dumps({"step": 0, "samples_seen": 0}) + "\n")
    with caplog.at_level("WARNING", logger="diffalign.train.trainer"):
        final = load_pipeline(trainer.save_final())
    assert "reading" in caplog.text and str(tmp_path / "model") in caplog.text
    for key, value in original.vae.state_dict().items():  # float32, rounded once to bf16
        saved = final.vae.state_dict()[key]
        assert saved.dtype == torch.float32 and torch.equal(saved, value.bfloat16().float()), key


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_frozen_weights_stay_float32_where_autocast_does_not_run(tmp_path):
    # accelerate runs fp16 without autocast on a CPU: half weights would meet float32 inputs
    config = DDPOConfig(max_steps=1, **{**SMALL, "mixed_precision": "fp16"})
    trainer = _trainer(DDPOTrainer, config, tmp_path)
    assert trainer.frozen_weights_dtype() is None
    assert {p.dtype for p in trainer.denoiser.parameters()} == {torch.float32}


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_full_fine_tuning_kl_reference_is_kept_in_half_precision(tmp_path):
    config = AWMConfig(max_steps=1, use_lora=False, beta_kl=0.1, num_train_timesteps=1,
                       **{**SMALL, "mixed_precision": "bf16"})  # fmt: skip
    trainer = _trainer(AWMTrainer, config, tmp_path)
    assert {p.dtype for p in trainer.reference_denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.trainable} == {torch.float32}  # the whole UNet trains
    metrics = trainer.train_on(trainer.sample_round(0), 0)
    assert metrics["kl"] > 0 and metrics["loss"] == metrics["loss"]
