"""``diffalign train``: fine-tune a diffusion model online with a reward (DDPO or AWM).

``diffalign train METHOD --recipe NAME|FILE.yaml [--set key=value ...] --out DIR [--resume]``

Recipes ship with the package (``--recipe list`` prints them): ``tiny-shapes`` and ``tiny-jpeg``
run on the shipped tiny model on a CPU; ``sd15-aesthetic``, ``sd15-pickscore`` and
``sd15-compressibility`` are the papers' Stable Diffusion 1.5 settings and need real weights.
The run folder gets ``metrics.jsonl`` (one line per round), ``config.yaml``, ``checkpoints/``,
``samples/`` (held-out grids), ``final/`` (a pipeline ``--model DIR/final`` loads), ``lora/`` and
``reward_curve.png``. ``--resume`` continues from the latest checkpoint in ``--out``;
``--resume-from DIR/checkpoints/checkpoint-N`` starts a new run in ``--out`` from another run's
checkpoint. Without ``--recipe`` both go on with the settings they resume (``--out``'s
``config.yaml``, the checkpoint's), ``--set`` applied on top.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from diffalign.commands._common import add_out_argument, add_set_argument, quiet_libraries

NAME = "train"
HELP = "fine-tune with DDPO or AWM on a reward (recipes: tiny-shapes, tiny-jpeg, sd15-*)"
RECIPES = Path(str(resources.files("diffalign.train"))) / "recipes"


def _methods() -> dict:
    from diffalign.train.awm import AWMTrainer
    from diffalign.train.config import AWMConfig, DDPOConfig
    from diffalign.train.ddpo import DDPOTrainer

    return {"ddpo": (DDPOConfig, DDPOTrainer), "awm": (AWMConfig, AWMTrainer)}


def recipe_names(method: str) -> list[str]:
    """The recipes shipped for ``method``."""
    return sorted(p.stem for p in (RECIPES / method).glob("*.yaml"))


def recipe_path(method: str, recipe: str) -> Path:
    """A shipped recipe's file, or ``recipe`` itself when it is a YAML file."""
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file {path} does not exist.")
        return path
    shipped = RECIPES / method / f"{recipe}.yaml"
    if not shipped.is_file():
        raise FileNotFoundError(
            f"No {method} recipe {recipe!r}; shipped: {', '.join(recipe_names(method))}, or pass "
            "a YAML file."
        )
    return shipped


def _resumed_settings(args: argparse.Namespace) -> dict:
    """The settings a run without ``--recipe`` starts from: those of the run it resumes (its
    ``config.yaml``, or the ``--resume-from`` checkpoint's), else none (the paper defaults)."""
    import yaml

    from diffalign.checkpoint import latest_checkpoint, read_manifest
    from diffalign.train.run_folder import refuse_other_method

    checkpoint = args.resume_from
    if args.resume and checkpoint is None:
        checkpoint = latest_checkpoint(args.out / "checkpoints")
    manifest = read_manifest(checkpoint) if checkpoint is not None else {}
    if manifest:  # another method's settings would fail as unknown keys
        refuse_other_method(checkpoint, manifest.get("kind"), args.method)
    if args.resume_from is not None:
        return manifest["config"]
    saved = args.out / "config.yaml"
    if args.resume and saved.is_file():
        return yaml.safe_load(saved.read_text()) or {}
    return {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one subcommand per method."""
    sub = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for method, text in (("ddpo", "PPO on the denoising chain (Black et al. 2023)"),
                         ("awm", "advantage-weighted matching (Xue et al. 2025)")):  # fmt: skip
        command = sub.add_parser(method, help=text, description=text)
        command.add_argument("--recipe", default=None,
                             help=f"shipped name ({', '.join(recipe_names(method))}), a YAML "
                                  "file, or 'list'; default: the settings of the run resumed, "
                                  "else the paper defaults")  # fmt: skip
        add_set_argument(command, "config")
        resuming = command.add_mutually_exclusive_group()
        resuming.add_argument("--resume", action="store_true",
                              help="continue from the latest checkpoint in --out")  # fmt: skip
        resuming.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT",
                              help="start a new run in --out from another run's checkpoint "
                                   "folder (RUN/checkpoints/checkpoint-N), e.g. one before a "
                                   "reward was hacked; that run stays as it is")  # fmt: skip
        run_folder = "run folder: metrics.jsonl, checkpoints/, samples/, final/"
        add_out_argument(command, required=False, help=run_folder)


def run(args: argparse.Namespace) -> int:
    """Build the config and the trainer, then train."""
    if args.recipe == "list":
        for name in recipe_names(args.method):
            first = (RECIPES / args.method / f"{name}.yaml").read_text().splitlines()[0]
            print(f"{name:24s} {first.lstrip('# ')}")
        return 0
    if args.out is None:
        raise SystemExit(f"error: diffalign train {args.method}: --out DIR is required.")
    config_cls, trainer_cls = _methods()[args.method]
    if args.recipe is None:
        config = config_cls.from_dict(_resumed_settings(args), args.set)
    else:
        config = config_cls.from_yaml(recipe_path(args.method, args.recipe), args.set)
    quiet_libraries()
    trainer = trainer_cls(config, args.out)
    final = trainer.train(resume=args.resume, resume_from=args.resume_from)
    if trainer.accelerator.is_main_process:  # once, not once per launched process
        print(f"final pipeline: {final}\nmetrics: {trainer.metrics_path}")
        if trainer.hub_url:
            print(f"on the Hub: {trainer.hub_url}")
    return 0
