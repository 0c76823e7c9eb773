"""``diffalign quickstart``: the whole user story on the embedded shapes world, in minutes.

Evaluates the shipped tiny model on held-out prompts, fine-tunes it with AWM on the ``shapes``
reward, samples the aligned model with DTS* and best-of-N at one NFE budget, evaluates all four
(shapes reward, tiny-clip score, FID on tiny-clip features against the world's renderings, win-rates
against the base) and writes ``OUT/metrics.json``, ``OUT/report.md`` and ``OUT/report.html`` with
the table, the training curve, the reward-vs-NFE curves and a before/after grid. Offline, on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.commands._common import quiet_libraries

NAME = "quickstart"
HELP = "align the shipped tiny model, search, evaluate and write a report (minutes, CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the quickstart's options (defaults: the README's run)."""
    from diffalign.quickstart import QuickstartSettings

    defaults = QuickstartSettings()
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                        help="output folder (default: runs/quickstart)")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                        help="held-out prompts evaluated")  # fmt: skip
    parser.add_argument("--awm-rounds", type=int, default=defaults.awm_rounds)
    parser.add_argument("--search-chains", type=int, default=defaults.search_chains,
                        help="search budget per prompt, in full chains")  # fmt: skip
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                        help="CFG for training, evaluation and search (default: 1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the quickstart with the command line's settings."""
    from diffalign.quickstart import QuickstartSettings, run_quickstart

    for name in ("num_prompts", "awm_rounds", "search_chains"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1.")
    quiet_libraries()
    settings = QuickstartSettings(num_prompts=args.num_prompts, awm_rounds=args.awm_rounds,
                                  search_chains=args.search_chains, seed=args.seed,
                                  guidance_scale=args.guidance_scale)  # fmt: skip
    run_quickstart(args.out, settings, progress=not args.quiet)
    return 0
