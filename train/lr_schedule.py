"""The learning-rate schedule of a run: diffusers' schedules, stepped once per round.

A round (sampling, then every optimizer step on its samples) trains at one learning rate, so
``lr_warmup_steps`` and the schedule's length count rounds, as ``max_steps`` does. The schedules
are diffusers' (``diffusers.optimization.get_scheduler``), whose warmup starts from 0.
"""

from __future__ import annotations

import torch

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                "polynomial")  # fmt: skip


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_rounds: int,
                       rounds: int) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """The schedule ``name`` over ``rounds`` rounds with ``warmup_rounds`` of linear warmup."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULES}, got {name!r}.")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_rounds,
                         num_training_steps=rounds)  # fmt: skip


def current_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the next round trains at (the first parameter group's)."""
    return float(scheduler.get_last_lr()[0])
