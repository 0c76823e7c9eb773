"""The best held-out evaluation of a run: for ``keep_best`` and ``early_stopping_patience``.

Online RL curves rise, peak and can fall back (on the JPEG reward AWM at a high learning rate
peaks near round 50 and ends 0.1 lower). As transformers' ``load_best_model_at_end`` and
``EarlyStoppingCallback``: :class:`BestEvaluation` follows one held-out metric (higher is
better, as rewards are), keeps a CPU copy of the weights that scored best when asked to, and
counts the evaluations since that best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from diffalign.sharding import cpu_snapshot, restore_snapshot


@dataclass
class BestEvaluation:
    """The best value of ``metric`` (a key of the evaluation rows, higher is better) so far.

    ``step`` is the round that scored it (None before any evaluation), ``weights`` a whole CPU
    copy of the weights evaluated then (only with ``keep_weights``), ``since`` the number of
    evaluations after it that did not beat it.
    """

    metric: str
    keep_weights: bool = False
    value: float = -math.inf
    step: int | None = None
    weights: list[Tensor] | None = None
    since: int = 0

    def observe(self, step: int, row: dict, weights: list[Tensor]) -> bool:
        """Record the evaluation ``row`` of round ``step``, made with ``weights``; returns
        whether it is a new best. With sharded weights a collective when it is."""
        if self.metric not in row:
            logged = ", ".join(sorted(key for key in row if key.startswith("heldout_")))
            raise KeyError(f"The evaluation logged no {self.metric!r} (it has: {logged}).")
        value = float(row[self.metric])
        if value <= self.value:
            self.since += 1
            return False
        self.value, self.step, self.since = value, step, 0
        if self.keep_weights:
            self.weights = cpu_snapshot(weights)
        return True

    def restore(self, targets: list[list[Tensor]]) -> None:
        """Copy the best weights into each list of ``targets`` (live weights, EMA averages)."""
        if self.weights is None:
            raise RuntimeError(f"No weights were kept for the best {self.metric}.")
        restore_snapshot(targets, self.weights)

    def describe(self) -> str:
        """One line for logs and model cards."""
        return f"round {self.step}, the best {self.metric} ({self.value:.4g})"

    def state_dict(self) -> dict:
        """For checkpoints."""
        return {"metric": self.metric, "value": self.value, "step": self.step,
                "weights": self.weights, "since": self.since}  # fmt: skip

    def load_state_dict(self, state: dict) -> bool:
        """Restore what :meth:`state_dict` returned; returns whether it could. A best of another
        metric, one without the weights this tracker must keep, or none (``{}``: the checkpoint
        did not track a best) is left out, and tracking starts afresh."""
        if state.get("metric") != self.metric or (self.keep_weights and state["weights"] is None):
            return False
        self.value, self.step, self.since = float(state["value"]), state["step"], state["since"]
        self.weights = state["weights"] if self.keep_weights else None
        return True
