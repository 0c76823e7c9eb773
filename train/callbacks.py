"""Callbacks: code of one's own that a run calls after every round and at its end.

As transformers' ``TrainerCallback``: subclass :class:`TrainerCallback` and override the hooks you
need, or pass a plain function ``(trainer, row) -> bool | None``, which serves as
``on_round_end``. Every process calls them with the same values (rows hold gathered metrics), so
a deterministic callback decides alike everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class TrainerCallback:
    """Hooks into a training run; the defaults do nothing."""

    def on_round_end(self, trainer: Any, row: dict) -> bool | None:
        """After round ``row["step"]`` is logged (``row`` as written to metrics.jsonl, with the
        held-out metrics on evaluation rounds). Return True to stop the run after this round:
        it is checkpointed, so ``--resume`` can go on, and ``final/`` is saved from it."""
        return None

    def on_train_end(self, trainer: Any, final: Path) -> None:
        """After ``final/`` is written (and pushed, with ``push_to_hub``)."""


class _FunctionCallback(TrainerCallback):
    def __init__(self, function: Callable[[Any, dict], bool | None]):
        self.function = function

    def on_round_end(self, trainer: Any, row: dict) -> bool | None:
        return self.function(trainer, row)


def as_callbacks(callbacks: Sequence[TrainerCallback | Callable]) -> list[TrainerCallback]:
    """``callbacks`` as :class:`TrainerCallback` objects (functions become ``on_round_end``)."""
    converted = []
    for callback in callbacks:
        if isinstance(callback, TrainerCallback):
            converted.append(callback)
        elif callable(callback):
            converted.append(_FunctionCallback(callback))
        else:
            raise TypeError(f"A callback must be a TrainerCallback or a function (trainer, row); "
                            f"got {type(callback).__name__}.")  # fmt: skip
    return converted


def any_asks_to_stop(callbacks: list[TrainerCallback], trainer: Any, row: dict) -> bool:
    """Call every callback's ``on_round_end`` (all of them, even after one asks to stop) and
    return whether one did."""
    answers = [callback.on_round_end(trainer, row) for callback in callbacks]
    return any(answer is True for answer in answers)
