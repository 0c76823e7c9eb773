"""Moving training state between sharded (FSDP2) and whole tensors.

Under accelerate's FSDP2 strategy every parameter of the UNet is a ``DTensor`` of which a process
holds one shard, and so are the optimizer's moments and the EMA's averages. Checkpoints hold whole
tensors whatever the strategy (so a run resumes under another one, and a checkpoint reads the same
everywhere): :func:`gathered` makes them whole before a save, and :func:`copy_into` and
:func:`reshard_optimizer_state` cut them back to each process's shard after a load. Without
sharding every function here returns its input as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a tensor spread over processes)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def whole(tensor: Tensor) -> Tensor:
    """The whole tensor behind a shard (a collective: every process must call it), else
    ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def gathered(tree: Any) -> Any:
    """``tree`` (dicts, lists and tuples of tensors and other values) with every shard made
    whole; a collective whenever the tree holds shards, so every process must call it."""
    if isinstance(tree, Tensor):
        return whole(tree)
    if isinstance(tree, dict):
        return {key: gathered(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gathered(value) for value in tree)
    return tree


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """``value``, a whole tensor that every process holds, cut into this process's shard of
    ``like`` (same placements and device mesh, no communication); ``value`` itself when ``like``
    is not sharded or ``value`` already is."""
    if not is_sharded(like) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    if value.shape != like.shape:
        raise ValueError(f"cannot shard a tensor of shape {tuple(value.shape)} like a "
                         f"parameter of shape {tuple(like.shape)}.")  # fmt: skip
    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def copy_into(target: Tensor, value: Tensor) -> None:
    """``target.copy_(value)``, where ``target`` may be a shard and ``value`` whole."""
    target.copy_(shard_like(value, target))


def cpu_snapshot(weights: list[Tensor]) -> list[Tensor]:
    """Whole CPU copies of ``weights`` (a collective when they are shards: every process must
    call it), to be put back later with :func:`restore_snapshot`."""
    return [whole(weight.detach()).to("cpu", copy=True) for weight in weights]


@torch.no_grad()
def restore_snapshot(targets: list[list[Tensor]], snapshot: list[Tensor]) -> None:
    """Copy ``snapshot`` (from :func:`cpu_snapshot`) into each list of ``targets`` (live
    weights, EMA averages), shards included."""
    for target in targets:
        for tensor, kept in zip(target, snapshot, strict=True):
            copy_into(tensor, kept)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of whole tensors, cut each per-parameter state tensor
    of a parameter's shape (Adam's moments) into that parameter's shard; counters stay."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == parameter.shape:
                    state[key] = shard_like(value, parameter)


def is_fsdp(module: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` has sharded ``module``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard_after_every_forward(module: nn.Module) -> None:
    """Make an FSDP2 module free its gathered weights after every forward, the root's too.

    FSDP2 keeps the root's gathered weights after a forward (the backward would gather them
    again) and gathers only when they were freed, so a change to the shards made between two
    forwards without a backward (an EMA swap, the guard's restore, a resume) would go unseen
    by the second. The trainers change weights that way, and sample without backward.
    """
    if is_fsdp(module):
        module.set_reshard_after_forward(True)


def unsharded_class(module: nn.Module) -> type:
    """The class a module had before FSDP2's ``fully_shard`` subclassed it in place."""
    if not torch.distributed.is_available():
        return type(module)
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))
