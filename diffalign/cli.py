"""The ``diffalign`` command line: ``diffalign --help`` lists the commands.

Each command lives in its own module under ``diffalign.commands`` (see that package's doc).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from diffalign import __version__, commands


def discover_commands() -> list[ModuleType]:
    """Every command module in ``diffalign.commands``, sorted by name."""
    modules = [
        importlib.import_module(f"{commands.__name__}.{info.name}")
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(modules, key=lambda module: module.NAME)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per discovered command."""
    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Align diffusion models with rewards and human preferences.",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in discover_commands():
        sub = subparsers.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(command_fn=module.run)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "fix your input": shown as one line, without a traceback."""
    from diffalign.checkpoint import CheckpointError
    from diffalign.config import ConfigError
    from diffalign.lora import LoraLayoutError, LoraTargetError
    from diffalign.models import ModelNotAvailableError, UnsupportedModelError
    from diffalign.rewards import UnknownRewardError
    from diffalign.train.hub import HubUploadError

    return (
        ModelNotAvailableError, ConfigError, CheckpointError, FileNotFoundError, FileExistsError,
        UnknownRewardError, UnsupportedModelError, LoraTargetError, LoraLayoutError,
        HubUploadError,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffalign`` console script and ``python -m diffalign``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command_fn", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.command_fn(args) or 0)
    except _user_errors() as error:
        print(f"diffalign {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
