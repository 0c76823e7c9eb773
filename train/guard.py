"""The reward-hacking guard: stop a run when a check reward falls too far below its start.

A reward model is exploited before the eye notices: the run's own reward keeps rising while what
it does not measure (prompt fidelity, image quality) falls. With ``heldout_extra_rewards`` naming
check rewards (``tiny_clip``, ``clip_score``, ``pickscore``) and ``max_heldout_drop`` above 0,
every held-out evaluation compares each check with its round-0 value; when one has fallen by
more than that share, the trainer stops and keeps the weights of the last evaluation that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from diffalign.sharding import cpu_snapshot, restore_snapshot


def relative_drop(start: float, now: float) -> float:
    """How far ``now`` fell below ``start``, as a share of ``|start|`` (negative when it rose).

    Rewards are higher-is-better, so the share is taken of the magnitude: a JPEG reward of -1.0 kB
    that becomes -1.1 kB has dropped by 0.1. With ``start == 0`` the plain difference is returned.
    """
    scale = abs(start) if start != 0 else 1.0
    return (start - now) / scale


@dataclass
class GuardTrip:
    """Why the guard stopped a run: the check that fell, its values and the round it passed last."""

    key: str
    start: float
    now: float
    drop: float
    max_drop: float
    step: int
    passed_step: int

    def message(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"reward-hacking guard: {self.key} fell {self.drop:.2%} below its round-0 value "
            f"({self.start:.4g} -> {self.now:.4g}) at round {self.step}, more than "
            f"max_heldout_drop {self.max_drop:.2%}; keeping the weights of round "
            f"{self.passed_step}, the last evaluation that passed"
        )

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return dict(self.__dict__)


@dataclass
class HackingGuard:
    """Watches the held-out check rewards (``heldout_<name>_mean``) of a run.

    ``start`` holds their round-0 values; ``weights`` a whole CPU copy of the weights that were
    evaluated last without tripping the guard, taken at round ``passed_step``.
    """

    keys: list[str]
    max_drop: float
    start: dict[str, float] = field(default_factory=dict)
    weights: list[Tensor] | None = None
    passed_step: int = 0

    def check(self, step: int, scores: dict[str, float]) -> GuardTrip | None:
        """Compare one evaluation's scores with the start (the first call sets it); returns the
        largest fall beyond ``max_drop``, or None when every check passed."""
        for key in self.keys:  # a check added on resume starts where it is first seen
            self.start.setdefault(key, float(scores[key]))
        drops = {key: relative_drop(self.start[key], float(scores[key])) for key in self.keys}
        key = max(drops, key=drops.get)
        if drops[key] <= self.max_drop:
            return None
        return GuardTrip(key, self.start[key], float(scores[key]), drops[key], self.max_drop,
                         step, self.passed_step)  # fmt: skip

    def keep(self, step: int, weights: list[Tensor]) -> None:
        """Remember ``weights`` (whole, copied to the CPU) as the last that passed, at round
        ``step``; with sharded weights a collective, called by every process."""
        self.weights = cpu_snapshot(weights)
        self.passed_step = step

    def restore(self, targets: list[list[Tensor]]) -> None:
        """Copy the kept weights into each list of ``targets`` (live weights, EMA averages)."""
        if self.weights is None:
            raise RuntimeError("The guard has no passing weights to restore.")
        restore_snapshot(targets, self.weights)

    def state_dict(self) -> dict:
        """Start values and kept weights, for checkpoints."""
        return {"start": dict(self.start), "weights": self.weights, "passed_step": self.passed_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.start = {key: float(value) for key, value in state["start"].items()}
        self.weights = state["weights"]
        self.passed_step = int(state["passed_step"])
