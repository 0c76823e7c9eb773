"""Exponential moving average of a model's parameters (for sampling quality and KL-EMA terms)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from diffalign.sharding import copy_into


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every trainable parameter.

    ``decay`` may warm up: with ``warmup=True`` the effective decay at update ``n`` is
    ``min(decay, (1 + n) / (10 + n))``, so early averages are not dominated by the random init.
    """

    def __init__(
        self, parameters: Iterable[nn.Parameter], decay: float = 0.999, warmup: bool = True
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.parameters = [p for p in parameters if p.requires_grad]
        # float32 averages even of bf16 weights (DeepSpeed's bf16 mode), whose rounding would
        # swallow updates of (1 - decay) * difference
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.parameters]
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the averages one step toward the current parameters."""
        decay = self.current_decay()
        for shadow, parameter in zip(self.shadow, self.parameters, strict=True):
            shadow.lerp_(parameter.detach().to(shadow.dtype), 1 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the live parameters with their averages."""
        for shadow, parameter in zip(self.shadow, self.parameters, strict=True):
            parameter.copy_(shadow)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Run the model with the averaged weights inside the block, then restore the live ones."""
        live = [p.detach().clone() for p in self.parameters]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, saved in zip(self.parameters, live, strict=True):
                    parameter.copy_(saved)

    def state_dict(self) -> dict:
        """The averages and the update count, for checkpoints."""
        return {"shadow": list(self.shadow), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            copy_into(shadow, saved)  # saved whole; the shadow may be a shard (FSDP2)
        self.updates, self.decay = int(state["updates"]), float(state["decay"])
