"""DeepSpeed ZeRO stages 1 and 2 under the trainers, launched through accelerate.

ZeRO-1 shards AdamW's moments and the fp32 master weights over the processes, ZeRO-2 the
gradients as well; every process still holds the whole UNet, which is what the rollouts, the EMA,
the guard and the reference network need between optimizer steps. ZeRO-3 (weights sharded too)
is refused: FSDP2 does that job and is supported.

The trainers count micro-batches themselves, so DeepSpeed is told to accumulate over one and is
given each step's boundary (``set_gradient_accumulation_boundary``). Checkpoints hold whole
tensors, as under DDP and FSDP2: the optimizer state is gathered from its ZeRO partitions
(DeepSpeed's ``safe_get_full_*`` functions) into the format ``torch.optim.AdamW.state_dict()``
has, so a checkpoint does not depend on how the state was partitioned (a DDP run resumes under
ZeRO and back, and with another number of processes).

Optimizer offload (``offload_optimizer: {device: cpu}``) keeps the partitions in CPU memory,
stepped by DeepSpeed's CPU AdamW, which accelerate puts in place of the trainer's AdamW with the
same parameter-group settings; it counts steps in an int, saved as AdamW's float tensor.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.config import ConfigError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

SUPPORTED_STAGES = (1, 2)
OWN_SECTIONS = ("optimizer", "scheduler")
"""DeepSpeed config sections the trainers build themselves (AdamW, the LR schedule)."""
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold")  # fmt: skip
"""``zero_optimization`` keys accelerate can fill as ``auto`` only from a transformer's hidden
size, which a UNet's config lacks; left out, they take DeepSpeed's defaults."""
CPU_FALLBACK_NOTICE = "Setting accelerator to CPU"
"""The start of the warning DeepSpeed prints to stdout on its first use without CUDA."""


class _WithoutCpuFallbackNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU ..., we were unable to
    detect it": accelerate imports DeepSpeed whenever it is installed (``unwrap_model`` does, in
    every run), so a CPU run that never uses DeepSpeed printed it, misleadingly, to stdout."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CPU_FALLBACK_NOTICE)


logging.getLogger("DeepSpeed").addFilter(_WithoutCpuFallbackNotice())


def deepspeed_launch() -> bool:
    """Whether this process was launched for accelerate's DeepSpeed strategy."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_deepspeed_config(ds_config: dict) -> None:
    """Refuse DeepSpeed settings the trainers cannot run as configured, naming the fix."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(
            f"diffalign's trainers run DeepSpeed ZeRO stage 1 or 2, not stage {stage}. Stage 0 "
            "shards nothing: use DDP (`accelerate launch --multi_gpu`). Stage 3 shards the "
            "UNet's weights, which the rollouts, the EMA and the guard read whole between "
            "optimizer steps: set zero_stage 2, or shard the weights with FSDP version 2 "
            "(fsdp_config: {fsdp_version: 2})."
        )
    for section in OWN_SECTIONS:
        if section in ds_config:
            raise ConfigError(
                f"The DeepSpeed config has an {section!r} section; diffalign builds AdamW and the "
                "learning-rate schedule from its own config (learning_rate, adam_*, "
                "lr_scheduler, lr_warmup_steps). Remove the section from the DeepSpeed config."
            )
    offload = _offload_device(ds_config)
    if offload not in ("none", "cpu"):
        raise ConfigError(
            f"offload_optimizer device {offload!r} is not supported: DeepSpeed offloads the "
            "optimizer to NVMe under ZeRO stage 3 only, which diffalign does not run. Set "
            "offload_optimizer_device to cpu or none."
        )
    if ds_config.get("fp16", {}).get("enabled") is True:
        raise ConfigError(
            "fp16 under DeepSpeed is not supported by diffalign's trainers (untested: its loss "
            "scaler skips steps the EMA and the logs would count). Use mixed_precision bf16 "
            "or no."
        )


def fill_deepspeed_config(ds_config: dict, train_batch_size: int, num_processes: int,
                          max_grad_norm: float) -> None:  # fmt: skip
    """Set the batch, accumulation and clipping entries of ``ds_config`` from the trainer's
    config (in place, before ``accelerator.prepare``); an explicit value that disagrees is an
    error naming the diffalign setting to use instead."""
    wanted = {
        "train_micro_batch_size_per_gpu": (train_batch_size, "train_batch_size"),
        "gradient_accumulation_steps": (1, "gradient_accumulation_steps"),
        "train_batch_size": (train_batch_size * num_processes, "train_batch_size"),
        "gradient_clipping": (float(max_grad_norm), "max_grad_norm"),
    }
    for key, (value, setting) in wanted.items():
        given = ds_config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(
                f"The DeepSpeed config sets {key}={given}, where diffalign needs {value}. Set it "
                f"to 'auto' and choose `--set {setting}=...` instead (the trainers count "
                "micro-batches and clip gradients from their own config)."
            )
        ds_config[key] = value
    zero = ds_config.setdefault("zero_optimization", {})
    for key in BUCKET_KEYS:
        if zero.get(key) == "auto":
            del zero[key]


def _offload_device(ds_config: dict) -> str:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device") or "none").lower()


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether ``ds_config`` keeps the optimizer's state and step in CPU memory (ZeRO-Offload)."""
    return _offload_device(ds_config) == "cpu"


def deepspeed_bf16(ds_config: dict) -> bool:
    """Whether ``ds_config`` trains in bf16 (the module in bf16, fp32 master weights)."""
    return ds_config.get("bf16", {}).get("enabled") is True


def deepspeed_backward(engine: DeepSpeedEngine, loss: Tensor, sync: bool) -> None:
    """Backpropagate ``loss`` through a DeepSpeed ``engine``; on the last micro-batch of an
    optimizer step (``sync``) reduce the gradients, clip and step (DeepSpeed's own order)."""
    engine.set_gradient_accumulation_boundary(sync)
    engine.backward(loss)
    if sync:
        engine.step()


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that updates the fp32 partitions (AdamW), under accelerate's and
    DeepSpeed's wrappers."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer) or not isinstance(
        optimizer, torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


def whole_weights(parameters: list[Tensor]) -> list[Tensor]:
    """The fp32 master weights of ``parameters``, whole (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p) for p in parameters]


@torch.no_grad()
def load_whole_weights(parameters: list[Tensor], values: list[Tensor]) -> None:
    """Set the master weights (this process's partition of them) and the module's weights."""
    from deepspeed.utils import safe_set_full_fp32_param

    for parameter, value in zip(parameters, values, strict=True):
        safe_set_full_fp32_param(parameter, value.float())
        parameter.copy_(value)


def whole_optimizer_state(optimizer: torch.optim.Optimizer, parameters: list[Tensor]) -> dict:
    """The optimizer's state in ``torch.optim.AdamW.state_dict()``'s format over
    ``parameters`` (state by index, one param group), gathered from the ZeRO partitions (a
    collective: every process must call it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = inner_optimizer(optimizer)
    if len(base.param_groups) != 1:
        raise ValueError(f"expected one parameter group, found {len(base.param_groups)}.")
    group = base.param_groups[0]
    flat = base.state.get(group["params"][0], {})  # empty before the first step
    state = {}
    for index, parameter in enumerate(parameters if flat else []):
        state[index] = {
            key: safe_get_full_optimizer_state(parameter, key)
            if _shaped_like(value, group["params"][0]) else _saved_counter(value)
            for key, value in flat.items()
        }  # fmt: skip
    settings = {key: value for key, value in group.items() if key != "params"}
    return {"state": state, "param_groups": [{**settings, "params": list(range(len(parameters)))}]}


def load_whole_optimizer_state(
    optimizer: torch.optim.Optimizer, parameters: list[Tensor], saved: dict
) -> None:
    """Restore what :func:`whole_optimizer_state` (or a DDP run's ``AdamW.state_dict()``)
    holds into the ZeRO partitions, before the first step."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = inner_optimizer(optimizer)
    group = base.param_groups[0]
    group.update({k: v for k, v in saved["param_groups"][0].items() if k != "params"})
    if not saved["state"]:
        return
    first = saved["state"][0]
    partition = group["params"][0]
    # DeepSpeed creates the partition's state at its first step and then links each
    # parameter's fragment of it; a resumed run needs both before that step
    base.state[partition] = {
        key: torch.zeros_like(partition) if _shaped_like(value, parameters[0])
        else _loaded_counter(base, value)
        for key, value in first.items()
    }  # fmt: skip
    zero_optimizer = optimizer.optimizer
    zero_optimizer._lazy_init_hp_params_optimizer_state()
    for index, parameter in enumerate(parameters):
        for key, value in saved["state"][index].items():
            if _shaped_like(value, parameter):
                safe_set_full_optimizer_state(parameter, value.to(partition), key)


def _saved_counter(value) -> Tensor:
    """A counter (AdamW's ``step``) as AdamW's ``state_dict`` holds it: a float tensor (DeepSpeed's
    CPU AdamW counts in an int)."""
    return value.clone() if isinstance(value, Tensor) else torch.tensor(float(value))


def _loaded_counter(optimizer: torch.optim.Optimizer, value):
    """A saved counter in the type ``optimizer`` counts in."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return int(value) if isinstance(optimizer, DeepSpeedCPUAdam) else _saved_counter(value)


def _shaped_like(value, like: Tensor) -> bool:
    """Whether ``value`` is a per-element state tensor of ``like`` (a moment, not a counter)."""
    return isinstance(value, Tensor) and value.shape == like.shape
