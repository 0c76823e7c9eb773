"""``diffalign compare``: sample efficiency of training runs on their held-out reward.

``diffalign compare REFERENCE_RUN RUN [RUN ...] [--window 3] --out DIR`` reads each run's
``metrics.jsonl``, smooths the held-out curves over ``--window`` evaluations, and reports how many
sampled images each run needs to reach the reference's final held-out reward (and the ratio).
Writes ``DIR/metrics.json`` and ``DIR/heldout_vs_images.png``.
"""

from __future__ import annotations

import argparse

from diffalign.commands._common import add_out_argument, write_metrics

NAME = "compare"
HELP = "images each training run needs to reach a reference run's final held-out reward"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Run folders, the smoothing window and ``--out``."""
    parser.add_argument("reference", help="run folder whose final held-out reward is the target")
    parser.add_argument("runs", nargs="+", help="run folders to measure against it")
    parser.add_argument(
        "--window", type=int, default=3, help="evaluations in the trailing moving average"
    )
    add_out_argument(parser)


def _peak_columns(peak: dict) -> str:
    return (f"{peak['best']:7.3f} {peak['images_at_best']:>9d} "
            f"{peak['fall_after_best']:>10.3f}")  # fmt: skip


def format_comparison(result: dict) -> str:
    """A plain-text table of the comparison (best: the best single evaluation, at the images
    sampled by then; fall: the largest drop below it afterwards)."""
    reference = result["reference"]
    lines = [
        f"target: {result['target']:.3f} = final held-out reward of {reference} "
        f"(mean of its last {result['window']} evaluations) after {result['reference_images']} "
        "images",
        f"{'run':24s} {'images to reach':>16s} {'ratio':>7s} {'final':>7s} {'best':>7s} "
        f"{'at images':>9s} {'fall after':>10s}",
        f"{reference:24s} {'(reference)':>16s} {'':>7s} {result['target']:7.3f} "
        + _peak_columns(result["reference_peak"]),
    ]
    for name, row in result["runs"].items():
        reached = "never" if row["images_to_reach"] is None else str(row["images_to_reach"])
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"{name:24s} {reached:>16s} {ratio:>7s} {row['final_smoothed']:7.3f} "
                     + _peak_columns(row))  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Compare the runs, print the table, write metrics.json and the plot."""
    from diffalign.plots import plot_curves
    from diffalign.train.compare import compare_sample_efficiency, read_heldout_curve

    try:
        reference = read_heldout_curve(args.reference)
        others = [read_heldout_curve(run) for run in args.runs]
        result = compare_sample_efficiency(reference, others, args.window)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: diffalign compare: {error}") from None
    curves = {c.name: (c.images, c.smoothed(args.window)) for c in [reference, *others]}
    plot_curves(curves, args.out / "heldout_vs_images.png", "images sampled",
                f"held-out reward (moving average of {args.window})")  # fmt: skip
    print(format_comparison(result))
    path = write_metrics(args.out, "compare", result)
    print(f"\nwrote {path}")
    return 0
