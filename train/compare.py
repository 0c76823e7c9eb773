"""Sample efficiency between training runs: how many sampled images each run needs to reach a
held-out reward.

A run's held-out curve is read from its ``metrics.jsonl`` (the rows with ``heldout_reward_mean``,
against ``samples_seen``). Single evaluations are noisy, so curves are compared after a trailing
moving average over ``window`` evaluations. The reference run's target is its smoothed final
value; another run "reaches" it at the first evaluation where its smoothed curve is at least the
target, and the ratio is the reference's images over that run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from diffalign.train.run_folder import read_rows

HELDOUT_KEY = "heldout_reward_mean"


@dataclass
class HeldoutCurve:
    """Held-out reward against images sampled so far, one point per evaluation."""

    name: str
    images: list[int]
    rewards: list[float]

    def smoothed(self, window: int) -> list[float]:
        """Trailing moving average over up to ``window`` evaluations."""
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}.")
        return [
            sum(self.rewards[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(self.rewards))
        ]

    def images_to_reach(self, target: float, window: int) -> int | None:
        """Images sampled when the smoothed curve first reaches ``target`` (None: never)."""
        for images, value in zip(self.images, self.smoothed(window), strict=True):
            if value >= target:
                return images
        return None

    def peak(self) -> dict:
        """The best single evaluation (the first, on a tie), the images sampled by then, and the
        largest fall below it afterwards (0 when nothing after it scores lower): the numbers that
        tell a run that peaks and falls back from one that holds."""
        best_index = max(range(len(self.rewards)), key=lambda i: (self.rewards[i], -i))
        best, after = self.rewards[best_index], self.rewards[best_index + 1 :]
        return {
            "best": best,
            "images_at_best": self.images[best_index],
            "fall_after_best": best - min(after) if after else 0.0,
        }


def read_heldout_curve(run: str | Path) -> HeldoutCurve:
    """The held-out curve of a run folder (or its ``metrics.jsonl``); for a step logged twice
    (a resumed run redoes the rounds after its last checkpoint) the last row counts."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"No metrics.jsonl at {path}; pass a `diffalign train` run folder.")
    by_step: dict[int, tuple[int, float]] = {}
    for row in read_rows(path):
        if row.get(HELDOUT_KEY) is not None and not math.isnan(row[HELDOUT_KEY]):
            by_step[row["step"]] = (int(row.get("samples_seen", 0)), float(row[HELDOUT_KEY]))
    if len(by_step) < 2:
        raise ValueError(
            f"{path} has {len(by_step)} held-out evaluation(s); a curve needs at least two "
            "(train with eval_every below max_steps)."
        )
    points = [by_step[step] for step in sorted(by_step)]
    return HeldoutCurve(str(run), [p[0] for p in points], [p[1] for p in points])


def compare_sample_efficiency(
    reference: HeldoutCurve, others: list[HeldoutCurve], window: int = 3
) -> dict:
    """For each run in ``others``: the images it needs to reach the reference's smoothed final
    held-out reward, the ratio (reference images / its images; above 1: more efficient), and its
    :meth:`HeldoutCurve.peak` (the reference's too).
    The ratio is None when the run never reaches the target, or reaches it before sampling
    anything (its untrained model already scores that much)."""
    target = reference.smoothed(window)[-1]
    reference_images = reference.images[-1]
    runs = {}
    for curve in others:
        reached = curve.images_to_reach(target, window)
        runs[curve.name] = {
            "images_to_reach": reached,
            "ratio": reference_images / reached if reached else None,
            "final_smoothed": curve.smoothed(window)[-1],
            "images_total": curve.images[-1],
            **curve.peak(),
        }
    return {
        "reference": reference.name,
        "target": target,
        "reference_images": reference_images,
        "reference_peak": reference.peak(),
        "window": window,
        "runs": runs,
    }
