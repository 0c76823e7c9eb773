"""Advantages from rewards: DDPO's per-prompt stat tracker and GRPO/AWM-style group advantages."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor


def prompt_groups(prompts: Sequence[str]) -> dict[str, Tensor]:
    """The indices of each distinct prompt, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    return {prompt: torch.tensor(indices) for prompt, indices in groups.items()}


def _rewards_by_prompt(rewards: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """``rewards`` as float64 on the CPU, with :func:`prompt_groups` of ``prompts`` (one each)."""
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"Got {len(prompts)} prompts for {rewards.shape[0]} rewards.")
    return rewards.detach().double().cpu(), prompt_groups(prompts)


def mean_group_std(rewards: Tensor, prompts: Sequence[str]) -> float:
    """The mean over prompts of the std of each prompt's rewards (population std).

    It falls towards 0 when the reward stops telling a prompt's samples apart (a collapsed
    policy, or a saturated reward): the advantages are then mostly noise.
    """
    values, groups = _rewards_by_prompt(rewards, prompts)
    spreads = [values[index].std(unbiased=False) for index in groups.values()]
    return float(torch.stack(spreads).mean())


class PerPromptStatTracker:
    """Normalise each reward by the running statistics of its own prompt (DDPO).

    Every prompt keeps its last ``buffer_size`` rewards across batches. Once a prompt has at least
    ``min_count`` of them, its samples get ``(r - mean) / (std + eps)`` over that buffer; before
    that they are normalised with the whole batch's mean and std.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1.")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Add ``rewards`` to their prompts' buffers and return the advantages (same shape)."""
        values, groups = _rewards_by_prompt(rewards, prompts)
        advantages = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        for prompt, index in groups.items():
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[index].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                stored = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = stored.mean(), stored.std(unbiased=False)
            advantages[index] = (values[index] - mean) / (std + self.eps)
        return advantages.to(rewards.device, torch.float32)

    def state_dict(self) -> dict:
        """The buffers, for checkpoints (runs resume with the same advantages)."""
        return {"buffers": {prompt: list(values) for prompt, values in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers saved by :meth:`state_dict`."""
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }


def group_advantages(
    rewards: Tensor,
    prompts: Sequence[str],
    global_std: bool = True,
    eps: float = 1e-4,
    std_floor: float = 0.0,
) -> Tensor:
    """Reward minus its prompt group's mean, over the global (or the group's) std + ``eps``.

    This is the Flow-GRPO / AWM normalisation: every prompt is sampled as a group in the same
    batch; with ``global_std`` the scale is the whole batch's std. A ``std_floor`` (in reward
    units) divides by ``max(std, std_floor)`` instead: once the samples' rewards grow alike, their
    differences are mostly noise, and the floor stops it from being magnified to unit scale.
    """
    values, groups = _rewards_by_prompt(rewards, prompts)
    advantages = torch.empty_like(values)
    batch_std = float(values.std(unbiased=False))
    for index in groups.values():
        group = values[index]
        std = batch_std if global_std else float(group.std(unbiased=False))
        advantages[index] = (group - group.mean()) / (max(std, std_floor) + eps)
    return advantages.to(rewards.device, torch.float32)
