"""Your own reward: a Python function or ``Reward`` class, passed as an object or by reference.

A reference names where it lives and what it is called, ``FILE.py:NAME`` or ``package.module:NAME``,
so a command line or a YAML recipe can use it like a registered name::

    diffalign train awm --recipe tiny-shapes --set reward=my_rewards.py:brightness --out DIR

where ``my_rewards.py`` holds ``def brightness(images, prompts): return images.mean((1, 2, 3))``.
A function gets float images in [0, 1] of shape (B, 3, H, W) and B prompts, already checked, and
returns B numbers (a tensor, a list or an array); a ``Reward`` subclass is built with the keyword
arguments; a ``Reward`` instance is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from diffalign.rewards.base import Reward


class FunctionReward(Reward):
    """A plain function ``fn(images, prompts) -> scores`` behind the reward contract.

    Inputs are checked, chunked by ``batch_size`` and moved as for every reward; the function
    sees images on the CPU (the reward has no weights) and must return one number per image.
    """

    def __init__(
        self,
        fn: Callable,
        name: str | None = None,
        batch_size: int = 32,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(batch_size=batch_size, nonfinite=nonfinite)
        if not callable(fn):
            raise TypeError(f"A function reward needs a callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = torch.as_tensor(self.fn(images, prompts), dtype=torch.float32)
        if scores.shape != (images.shape[0],):
            raise ValueError(
                f"Reward function {self.name!r} returned scores of shape {tuple(scores.shape)} "
                f"for {images.shape[0]} images; return one number per image (a list, or a "
                f"tensor of shape ({images.shape[0]},))."
            )
        return scores


def is_reward_reference(spec: object) -> bool:
    """Whether ``spec`` is a ``WHERE:NAME`` reference rather than a name or weighted sum."""
    return isinstance(spec, str) and ":" in spec


def reward_label(spec: str) -> str:
    """How logs name a reward: a reference by its ``NAME``, anything else as written."""
    return spec.rpartition(":")[2] if is_reward_reference(spec) else spec


def load_reward_reference(reference: str, **kwargs) -> Reward:
    """The reward that ``FILE.py:NAME`` or ``module:NAME`` names (see the module docstring).

    Raises:
        ValueError: the reference is malformed, its file or module cannot be found, or it does
            not define ``NAME``.
        TypeError: ``NAME`` is neither a function nor a ``Reward``.
    """
    location, _, attribute = reference.strip().rpartition(":")
    if not location or not attribute.isidentifier():
        raise ValueError(
            f"Cannot read the reward reference {reference!r}; write FILE.py:NAME or "
            "package.module:NAME."
        )
    module = _import(location)
    if not hasattr(module, attribute):
        defined = sorted(
            name for name, value in vars(module).items()
            if callable(value) and not name.startswith("_")
        )  # fmt: skip
        raise ValueError(
            f"{location} defines no {attribute!r}; its functions and classes: "
            f"{', '.join(defined) or 'none'}."
        )
    return reward_from_object(getattr(module, attribute), name=attribute, **kwargs)


def reward_from_object(target: object, name: str | None = None, **kwargs) -> Reward:
    """A ``Reward`` instance as it is, a ``Reward`` subclass built with ``kwargs``, or a function
    behind :class:`FunctionReward` (called ``name``)."""
    if isinstance(target, Reward):
        return target
    if isinstance(target, type) and issubclass(target, Reward):
        return target(**kwargs)
    if callable(target) and not isinstance(target, type):
        return FunctionReward(target, name=name, **kwargs)
    raise TypeError(
        f"{name or target!r} is a {type(target).__name__}; a reward reference must name a "
        "function (images, prompts) -> scores, a Reward subclass or a Reward instance (as must "
        "an object passed as the reward)."
    )


def _import(location: str) -> ModuleType:
    """A module from a file path (``.py``) or an importable dotted name."""
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise ValueError(f"No reward file {path} (relative paths start from {Path.cwd()}).")
        name = f"diffalign_user_reward_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # classes and dataclasses in the file look themselves up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"Cannot import {location!r} for a reward ({error}); pass a file path ending in .py, "
            "or a module on the Python path."
        ) from error
