"""DeepSpeed ZeRO stages 1 and 2 through accelerate: whole runs in 2 CPU processes against DDP.

Each run is ``tests/distributed_run.py`` (AWM with EMA, KL-EMA, a KL to the reference, held-out
evaluations, the guard, a checkpoint every round and ``final/``). The DeepSpeed runs get the
variables ``accelerate launch`` sets from the shipped config, and the trainer builds its
accelerator itself, as ``diffalign train`` does; without CUDA it runs DeepSpeed over gloo.
"""

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from diffalign.config import ConfigError
from diffalign.models import build_tiny_pipeline
from diffalign.train.config import AWMConfig
from diffalign.train.deepspeed import fill_deepspeed_config
from diffalign.train.launch import check_launch
from diffalign.train.trainer import Trainer

from .conftest import launch_two_processes, requires_cuda
from .test_fsdp import (
    RUN,
    _final_unet,
    _largest_difference,
    _rows,
    assert_run_ends_like,
    train_tiny_fully_on_cuda,
)

pytest.importorskip("deepspeed")

SHIPPED_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate-deepspeed.yaml"


def _deepspeed_variables(*flags: str) -> dict[str, str]:
    """The variables ``accelerate launch --config_file <shipped> FLAGS`` hands the processes,
    with CUDA hidden (2 processes on CPU, over gloo, also on a machine with one GPU)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    parsed = launch_command_parser().parse_args(
        ["--config_file", str(SHIPPED_CONFIG), *flags, "train.py"]
    )
    args, defaults, _ = _validate_launch_command(parsed)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as
    _, variables = prepare_deepspeed_cmd_env(args)  # accelerate's launch_command does
    ours = {key: value for key, value in variables.items() if key.startswith("ACCELERATE_")}
    return {**ours, "CUDA_VISIBLE_DEVICES": ""}


def _ddp_run(out: Path, weights: str, *options: str) -> Path:
    launch_two_processes(RUN, out, "ddp", weights, 2, *options)
    return out


@pytest.fixture(scope="module")
def ddp_lora(tmp_path_factory) -> Path:
    """The DDP run (LoRA, 2 rounds) that several DeepSpeed runs are compared with."""
    return _ddp_run(tmp_path_factory.mktemp("ddp-lora"), "lora")


# AWM with LoRA under ZeRO-2 (gradients sharded too), the optimizer offloaded (DeepSpeed's
# compiled CPU AdamW steps it) and the module compiled by dynamo (eager kernels: DeepSpeed
# compiles the module in place, the rollouts' calls included); DDPO fully fine-tuned under
# ZeRO-1; fp32. (ZeRO-2 without offload or dynamo: the checkpoint and bf16 tests below.)
@pytest.mark.parametrize(
    ("stage", "weights", "method", "offload", "dynamo"),
    [("2", "lora", "awm", "cpu", "eager"), ("1", "full", "ddpo", "none", "no")],
)  # fmt: skip
def test_a_deepspeed_run_resumed_halfway_ends_where_a_ddp_run_does(stage, weights, method,
                                                                   offload, dynamo, ddp_lora,
                                                                   tmp_path):  # fmt: skip
    ddp = ddp_lora if method == "awm" else _ddp_run(tmp_path / "ddp", weights, method)
    zero = tmp_path / "zero"
    settings = _deepspeed_variables("--zero_stage", stage, "--offload_optimizer_device", offload)
    # accelerate's DeepSpeed launcher does not hand --dynamo_backend on: the variable does
    settings["ACCELERATE_DYNAMO_BACKEND"] = dynamo
    assert settings["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    assert settings["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == offload
    launch_two_processes(RUN, zero, "deepspeed", weights, 1, method, env=settings)
    launch_two_processes(RUN, zero, "deepspeed", weights, 2, "resume", method, env=settings)
    # the optimizer's moments, gathered from their partitions into the checkpoint and put back
    # (losing them moves the second round's weights by ~2e-2); grad norms are DeepSpeed's own
    assert_run_ends_like(zero, ddp, weights)


def test_checkpoints_move_between_ddp_and_deepspeed_and_process_counts(ddp_lora, tmp_path):
    # both hold whole tensors in AdamW's own format: a DDP run resumes under ZeRO-2 and back,
    # here with the optimizer offloaded (DeepSpeed's CPU AdamW counts its steps in an int)
    settings = _deepspeed_variables()
    offloaded = _deepspeed_variables("--offload_optimizer_device", "cpu")
    launch_two_processes(RUN, tmp_path / "there", "ddp", "lora", 1)
    shutil.copytree(tmp_path / "there", tmp_path / "alone-ddp")
    launch_two_processes(RUN, tmp_path / "there", "deepspeed", "lora", 2, "resume", env=offloaded)
    launch_two_processes(RUN, tmp_path / "back", "deepspeed", "lora", 1, env=offloaded)
    shutil.copytree(tmp_path / "back", tmp_path / "alone-zero")
    launch_two_processes(RUN, tmp_path / "back", "ddp", "lora", 2, "resume")
    for run in ("there", "back"):
        assert _largest_difference(_final_unet(tmp_path / run), _final_unet(ddp_lora)) < 3e-5
    # and with one process in place of two: ZeRO's partitions of 2 go into a whole state that
    # a single ZeRO process takes up exactly as a single DDP process does (same round 2)
    launch_two_processes(RUN, tmp_path / "alone-zero", "deepspeed", "lora", 2, "resume",
                         env=settings, processes=1)  # fmt: skip
    launch_two_processes(RUN, tmp_path / "alone-ddp", "ddp", "lora", 2, "resume", processes=1)
    alone = _final_unet(tmp_path / "alone-zero")
    assert _largest_difference(alone, _final_unet(tmp_path / "alone-ddp")) < 3e-5
    assert _largest_difference(alone, _final_unet(ddp_lora)) > 1e-4  # round 2 ran on its own


def test_bf16_under_deepspeed_resumes_exactly_and_saves_float32(ddp_lora, tmp_path):
    # DeepSpeed's bf16 mode keeps the module in bf16 and fp32 master weights in the optimizer;
    # a checkpoint holds the masters, so a resumed run continues bit for bit
    settings = _deepspeed_variables()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch_two_processes(RUN, straight, "deepspeed", "lora", 2, "bf16", env=settings)
    launch_two_processes(RUN, resumed, "deepspeed", "lora", 1, "bf16", env=settings)
    launch_two_processes(RUN, resumed, "deepspeed", "lora", 2, "resume", "bf16", env=settings)
    assert _largest_difference(_final_unet(resumed), _final_unet(straight)) == 0
    trained = _final_unet(straight)
    assert {value.dtype for value in trained.values()} == {torch.float32}
    base = build_tiny_pipeline(seed=0).unet.state_dict()
    moved = _largest_difference(trained, base)
    assert moved > 1e-3  # it trained; the masters kept it near the fp32 run (bf16's own
    assert _largest_difference(trained, _final_unet(ddp_lora)) < 0.05  # noise: ~2e-2 here)


def test_the_guard_under_deepspeed_restores_the_weights_it_kept(tmp_path):
    launch_two_processes(RUN, tmp_path, "deepspeed", "guard", 2, env=_deepspeed_variables())
    rows = _rows(tmp_path)
    assert rows[-1]["step"] == 1 and "stopped_by_guard" in rows[-1]
    assert rows[1]["heldout_reward_mean"] != rows[0]["heldout_reward_mean"]  # round 1 moved them
    base = build_tiny_pipeline(seed=0).unet.state_dict()
    assert _largest_difference(_final_unet(tmp_path), base) == 0  # round 0's, kept and restored


def _deepspeed_accelerator(ds_config: dict) -> SimpleNamespace:
    # accelerate builds a DeepSpeed accelerator only inside a launch: a stand-in carries it
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip


@pytest.mark.parametrize(
    ("ds_config", "error"),
    [({"zero_optimization": {"stage": 3}}, "not stage 3.*FSDP version 2"),
     ({"zero_optimization": {"stage": 0}}, "not stage 0.*DDP"),
     ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}},
      "'optimizer' section.*Remove"),
     ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
     ({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}, "fp16.*bf16 or no"),
     ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
      "device 'nvme'.*stage 3 only.*cpu or none")],
)  # fmt: skip
def test_deepspeed_settings_the_trainers_cannot_run_are_refused(ds_config, error):
    with pytest.raises(ConfigError, match=error):
        check_launch(_deepspeed_accelerator(ds_config))


def test_supported_deepspeed_settings_pass_the_launch_check():
    for stage, offload in itertools.product((1, 2), ("none", "cpu")):
        zero = {"stage": stage, "offload_optimizer": {"device": offload}}
        check_launch(_deepspeed_accelerator({"zero_optimization": zero, "bf16": {"enabled": True}}))


def test_8bit_adam_with_the_optimizer_offloaded_is_refused():
    # accelerate would hand the offload a 32-bit Adam in its place, silently
    offloaded = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    trainer = SimpleNamespace(config=AWMConfig(use_8bit_adam=True), uses_deepspeed=True,
                              _deepspeed_config=lambda: offloaded)  # fmt: skip
    with pytest.raises(ConfigError, match="use_8bit_adam.*offload.*use_8bit_adam=false"):
        Trainer._build_optimizer(trainer)


def test_the_deepspeed_config_takes_batch_and_clipping_from_the_trainer():
    ds_config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                 "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}  # fmt: skip
    fill_deepspeed_config(ds_config, train_batch_size=4, num_processes=2, max_grad_norm=1.5)
    assert ds_config["train_micro_batch_size_per_gpu"] == 4 and ds_config["train_batch_size"] == 8
    assert ds_config["gradient_accumulation_steps"] == 1  # the trainers mark each step's end
    assert ds_config["gradient_clipping"] == 1.5
    assert "reduce_bucket_size" not in ds_config["zero_optimization"]  # DeepSpeed's default
    fill_deepspeed_config(ds_config, train_batch_size=4, num_processes=2, max_grad_norm=1.5)
    with pytest.raises(ConfigError, match=r"gradient_clipping=1.5.*--set max_grad_norm"):
        fill_deepspeed_config(ds_config, train_batch_size=4, num_processes=2, max_grad_norm=0.5)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4.*--set gradient_acc"):
        fill_deepspeed_config({"gradient_accumulation_steps": 4}, 4, 2, 1.0)


UNWRAP_ON_CPU = """
import logging, torch
{imports}
from accelerate import Accelerator
Accelerator(cpu=True).unwrap_model(torch.nn.Linear(1, 1))  # imports DeepSpeed, as runs do
logging.getLogger("DeepSpeed").warning("another DeepSpeed warning")
"""


@pytest.mark.parametrize("with_trainer", [False, True])
def test_deepspeed_s_cpu_fallback_notice_stays_out_of_a_cpu_run_s_output(with_trainer):
    # DeepSpeed prints "Setting accelerator to CPU. If you have GPU ..." to stdout on first use;
    # accelerate imports it in every run, so the trainers drop that one notice (the control
    # without them shows it is real); DeepSpeed's other warnings still pass
    imports = "import diffalign.train.trainer" if with_trainer else ""
    done = subprocess.run([sys.executable, "-c", UNWRAP_ON_CPU.format(imports=imports)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert ("Setting accelerator to CPU" in done.stdout) is not with_trainer
    assert "another DeepSpeed warning" in done.stdout


@requires_cuda
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_deepspeed_zero2_through_accelerate_on_a_cuda_device_in_bf16(offload, tmp_path):
    # the real path: accelerate reads DeepSpeed from the environment as `accelerate launch
    # --use_deepspeed --zero_stage 2 [--offload_optimizer_device cpu]` sets it, over nccl;
    # offloaded, the optimizer's partitions live in CPU memory (copies the CPU tests lack)
    if offload == "cpu" and shutil.which("c++") is None:
        pytest.skip("DeepSpeed's CPU AdamW compiles on first use: needs a C++ compiler")
    variables = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": offload}  # fmt: skip
    trained = train_tiny_fully_on_cuda(tmp_path, variables, "mixed_precision=bf16")
    assert {value.dtype for value in trained.values()} == {torch.float32}
