"""FSDP2 (accelerate's FSDP with fsdp_version 2): whole runs in 2 CPU processes against DDP.

Each run is ``tests/distributed_run.py``: AWM on the built tiny pipeline with EMA, KL-EMA, a KL
to the reference, held-out evaluations, the guard, a checkpoint every round and ``final/``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffalign.models import build_tiny_pipeline
from diffalign.sharding import copy_into, gathered, reshard_optimizer_state, shard_like

from .conftest import launch_two_processes, requires_cuda

RUN = Path(__file__).with_name("distributed_run.py")
SHIPPED_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate-fsdp2.yaml"


def _fsdp_variables(config_file: Path) -> dict[str, str]:
    """The FSDP settings ``accelerate launch --config_file`` would hand the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    variables = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {key: value for key, value in variables.items() if key.startswith("FSDP_")}


def _final_unet(run: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(run / "final" / "unet").state_dict()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


def assert_run_ends_like(run: Path, ddp: Path, weights: str) -> None:
    """``run`` trained to the DDP run's weights (up to float summation order, which moves them
    by up to ~2e-5, where a lost optimizer, EMA or KL-EMA state moves them by 1e-3 or more),
    with the same evaluations and grad norms, and wrote ``lora/`` only with LoRA."""
    base = build_tiny_pipeline(seed=0).unet.state_dict()
    assert _largest_difference(_final_unet(ddp), base) > 1e-3  # the runs did train
    assert _largest_difference(_final_unet(run), _final_unet(ddp)) < 3e-5
    for ours, theirs in zip(_rows(run), _rows(ddp), strict=True):
        assert ours["step"] == theirs["step"] and ours["samples_seen"] == theirs["samples_seen"]
        assert ours["heldout_reward_mean"] == pytest.approx(theirs["heldout_reward_mean"], abs=1e-4)
        if "grad_norm" in theirs:
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)
    assert (run / "lora").exists() == (weights == "lora")
    assert (run / "final" / "README.md").exists()


# LoRA with the whole UNet sharded as one unit; full fine-tuning with the shipped accelerate
# config's settings (each attention and ResNet block its own unit), in fp32 on CPU
@pytest.mark.parametrize("weights", ["lora", "full"])
def test_an_fsdp_run_resumed_halfway_ends_where_a_ddp_run_does(weights, tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    settings = _fsdp_variables(SHIPPED_CONFIG) if weights == "full" else {}
    launch_two_processes(RUN, ddp, "ddp", weights, 2)
    launch_two_processes(RUN, fsdp, "fsdp", weights, 1, env=settings)
    launch_two_processes(RUN, fsdp, "fsdp", weights, 2, "resume", env=settings)
    assert_run_ends_like(fsdp, ddp, weights)
    if weights == "lora":  # a new FSDP run from the DDP run's first round ends where it does
        branch, start = tmp_path / "branch", ddp / "checkpoints" / "checkpoint-00000001"
        launch_two_processes(RUN, branch, "fsdp", weights, 2, f"from={start}")
        assert_run_ends_like(branch, ddp, weights)


def test_compiled_fsdp_and_ddp_runs_end_alike(tmp_path):
    # dynamo's capture with eager kernels (inductor would round differently): under DDP the
    # whole model compiled (the chains through the trainer's wrapper); under FSDP2 its blocks,
    # which accelerate compiles in place, so the chains run them too. Compiling the whole
    # sharded model fails, and is refused (test_trainers.py)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    dynamo = {"ACCELERATE_DYNAMO_BACKEND": "eager"}
    launch_two_processes(RUN, ddp, "ddp", "lora", 2, env=dynamo)
    regional = {**dynamo, "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "true"}
    launch_two_processes(RUN, fsdp, "fsdp", "lora", 2, env=regional)
    assert_run_ends_like(fsdp, ddp, "lora")


def test_the_guard_under_fsdp_restores_the_weights_it_kept(tmp_path):
    launch_two_processes(RUN, tmp_path, "fsdp", "guard", 2)
    rows = _rows(tmp_path)
    assert rows[-1]["step"] == 1 and "stopped_by_guard" in rows[-1]
    assert rows[1]["heldout_reward_mean"] != rows[0]["heldout_reward_mean"]  # round 1 moved them
    base = build_tiny_pipeline(seed=0).unet.state_dict()
    assert _largest_difference(_final_unet(tmp_path), base) == 0  # round 0's, kept and restored


def test_the_shipped_accelerate_config_asks_for_fsdp2_by_blocks():
    settings = _fsdp_variables(SHIPPED_CONFIG)
    assert settings["FSDP_VERSION"] == "2"
    assert settings["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert settings["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "BasicTransformerBlock,ResnetBlock2D"


def test_whole_tensors_pass_through_the_sharding_helpers_unchanged():
    value = torch.arange(6.0).reshape(2, 3)
    assert shard_like(value, torch.zeros(2, 3)) is value
    tree = {"a": [value, 1], "b": (value,), "c": "text"}
    assert gathered(tree) == tree
    target = torch.zeros(2, 3)
    copy_into(target, value)
    assert torch.equal(target, value)
    parameter = torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = torch.optim.AdamW([parameter])
    parameter.grad = torch.ones(2, 3)
    optimizer.step()
    before = {key: value.clone() for key, value in optimizer.state[parameter].items()}
    reshard_optimizer_state(optimizer)
    for key, value in optimizer.state[parameter].items():
        assert torch.equal(value, before[key])


def train_tiny_fully_on_cuda(out: Path, variables: dict[str, str], *settings: str) -> dict:
    """Run ``diffalign train awm --recipe tiny-shapes`` fully fine-tuned for 2 rounds in one
    process launched as ``accelerate launch`` would with ``variables``; check its rounds and
    files, and return the final UNet's weights."""
    env = {**os.environ, **variables}
    settings = ["max_steps=2", "prompts_per_step=2", "samples_per_prompt=2",
                "num_inference_steps=3", "train_batch_size=2", "num_heldout_prompts=2",
                "heldout_samples_per_prompt=1", "eval_every=1", "save_every=1",
                "log_with=none", "progress=false", "use_lora=false", *settings]  # fmt: skip
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                    "--standalone", "-m", "diffalign", "train", "awm", "--recipe",
                    "tiny-shapes", "--set", *settings, "--out", str(out)],
                   check=True, env=env, timeout=600)  # fmt: skip
    assert [row["step"] for row in _rows(out)] == [0, 1, 2]
    trained = _final_unet(out)
    assert all(value.isfinite().all() for value in trained.values())
    assert (out / "checkpoints").is_dir() and (out / "final" / "README.md").exists()
    return trained


@requires_cuda
def test_fsdp2_through_accelerate_on_a_cuda_device_in_bf16(tmp_path):
    # the real path, no state set by hand: accelerate reads FSDP from the environment as
    # `accelerate launch --use_fsdp --fsdp_version 2 --mixed_precision bf16` sets it (nccl)
    train_tiny_fully_on_cuda(tmp_path, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                        "ACCELERATE_MIXED_PRECISION": "bf16"})  # fmt: skip
