"""Figures for runs and reports: matplotlib on the headless Agg backend, one function per figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.0, 3.6), dpi=120)
    return plt, figure, axes


def _save(plt, figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_reward_curve(
    rows: Sequence[Mapping[str, float]],
    path: str | Path,
    x: str = "samples_seen",
    title: str = "reward during training",
) -> Path:
    """Training reward (mean of each round) and held-out reward (where evaluated) against ``x``."""
    plt, figure, axes = _figure()
    for key, style, label in (("reward_mean", "-", "train (rollouts)"),
                              ("heldout_reward_mean", "o-", "held-out")):  # fmt: skip
        points = [(row[x], row[key]) for row in rows if key in row and x in row]
        points = [(a, b) for a, b in points if b is not None and not math.isnan(b)]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label, markersize=4)
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel("reward")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """Several named (x, y) curves on one axis, e.g. mean reward against NFE per sampler."""
    plt, figure, axes = _figure()
    for name, (xs, ys) in curves.items():
        axes.plot(xs, ys, "o-", label=name, markersize=4)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)
