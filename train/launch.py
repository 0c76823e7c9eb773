"""Checks that a training launch will run as it is configured, made before any work.

accelerate accepts launches the trainers would run wrongly (a strategy that shards the model in a
way the rollouts cannot sample with, or processes that each run alone) and only warns about a
tracker it cannot load; these turn each into a :class:`~diffalign.config.ConfigError` that names
the fix.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING

import torch

from diffalign.config import ConfigError
from diffalign.train.deepspeed import check_deepspeed_config, deepspeed_launch

if TYPE_CHECKING:
    from accelerate import Accelerator

UNSUPPORTED_STRATEGIES = ("MEGATRON_LM",)
"""accelerate strategies that wrap the model in an engine the rollouts cannot sample with."""


logger = logging.getLogger(__name__)


def resolve_mixed_precision(setting: str | None) -> str:
    """The precision a run trains in: the config's ``mixed_precision`` when set (with a warning
    when ``accelerate launch`` asked for another mixed precision), else the launch's, else
    ``"no"`` (a launch's ``"no"`` is its default, so a config's precision overrides it quietly)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if setting is None:
        return launched
    if launched not in ("no", setting):
        logger.warning(
            "accelerate launch asked for mixed precision %r, but this run's mixed_precision "
            "setting is %r, which decides; pass --set mixed_precision=%s to train in %s.",
            launched, setting, launched, launched,
        )  # fmt: skip
    return setting


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def accelerator_options() -> dict:
    """Extra ``Accelerator`` arguments that make a launch of several processes on a machine
    without a GPU train as one job over gloo.

    accelerate starts a process group only with a GPU-like device's backend: on CPUs each
    process of `accelerate launch --multi_gpu` (or torchrun) would run alone, and DeepSpeed's
    processes likewise. ``cpu=True`` gives DDP over gloo; DeepSpeed gets the gloo backend.
    """
    if has_accelerator():
        return {}
    if deepspeed_launch():
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"cpu": True}
    return {}


def compiles(accelerator: Accelerator) -> bool:
    """Whether accelerate's dynamo setting compiles the prepared model (a backend other than
    ``no``: ``accelerate launch --dynamo_backend``, or ``ACCELERATE_DYNAMO_BACKEND``)."""
    backend = accelerator.state.dynamo_plugin.backend
    return getattr(backend, "value", str(backend)).upper() != "NO"


def compiles_whole_model(accelerator: Accelerator) -> bool:
    """Whether accelerate's dynamo setting compiles the prepared model whole (a backend, and no
    regional compilation)."""
    return compiles(accelerator) and not accelerator.state.dynamo_plugin.use_regional_compilation


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch the trainers would run wrongly: Megatron-LM, FSDP version 1 (FSDP
    version 2 is supported), FSDP2 with the whole model compiled (dynamo without regional
    compilation, which fails in tracing), DeepSpeed other than ZeRO stage 1 or 2 or with settings
    the trainers own (see :func:`~diffalign.train.deepspeed.check_deepspeed_config`), or several
    launched processes that accelerate runs each on its own.

    Between optimizer steps the trainers sample rollouts by calling the UNet module itself. FSDP2
    shards it in place and gathers each block's weights inside its forward, and ZeRO-1/2 leave
    every process the whole weights, so those work; FSDP1 and Megatron-LM put the weights into a
    wrapper (flattened, or partitioned by an engine) that only the wrapper's own forward can run.
    Processes that do not know of each other would each train their own copy into the same run
    folder.
    """
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in UNSUPPORTED_STRATEGIES:
        raise ConfigError(
            f"diffalign's trainers do not support accelerate's {kind} strategy (it wraps the "
            "UNet, which the rollouts sample with between optimizer steps, in its own engine). "
            "Use FSDP version 2 to shard the model (distributed_type: FSDP with "
            "fsdp_config: {fsdp_version: 2} in the accelerate config), DeepSpeed ZeRO stage 1 "
            "or 2 (`accelerate launch --use_deepspeed --zero_stage 2`), or DDP "
            "(`accelerate launch --multi_gpu --num_processes N ...`); with LoRA, the default, "
            "each process holds only a few MB of trainable state beyond the frozen model."
        )
    if kind == "DEEPSPEED":
        check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config)
    if kind == "FSDP" and not accelerator.is_fsdp2:
        raise ConfigError(
            "diffalign's trainers need FSDP version 2 (FSDP1 flattens the UNet's weights into "
            "a wrapper the rollouts cannot sample with): set fsdp_version: 2 under fsdp_config "
            "in the accelerate config, or `accelerate launch --use_fsdp --fsdp_version 2 ...`."
        )
    if kind == "FSDP" and compiles_whole_model(accelerator):
        raise ConfigError(
            "Under FSDP2, compiling the whole sharded UNet (--dynamo_backend without regional "
            "compilation) fails in dynamo's tracing: the sharded weights reach the graph as "
            "DTensors ('mixed torch.Tensor and DTensor'). Compile its blocks instead, which "
            "accelerate does in place, the rollouts' calls included: `accelerate launch "
            "--dynamo_use_regional_compilation ...` (or ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"
            "=true), or leave out --dynamo_backend."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate runs "
            f"this one alone (distributed_type {kind}): each would train its own copy into "
            "the same run folder. Launch them as one DDP job (`accelerate launch --multi_gpu "
            "--num_processes N`; on CPUs the trainers then run DDP over gloo, while `--cpu` "
            "starts one process), or launch one."
        )


def check_tracker(log_with: str) -> None:
    """Refuse a tracker whose package is missing (accelerate would only warn and drop it)."""
    if log_with != "none" and importlib.util.find_spec(log_with) is None:
        raise ConfigError(
            f"log_with={log_with} needs the {log_with} package: pip install {log_with}, or set "
            "log_with=none (metrics.jsonl is written either way)."
        )
