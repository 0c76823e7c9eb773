"""The reward registry: rewards by name, and weighted sums of them.

``load_reward`` accepts a registered name (``"pickscore"``), a weighted-sum string
(``"pickscore+0.2*aesthetic"``, ``"shapes-0.1*jpeg_incompressibility"``), a mapping of names to
weights (``{"pickscore": 1.0, "aesthetic": 0.2}``), a ``Reward`` instance (returned as is), a
plain function ``(images, prompts) -> scores``, or a reference to your own function or class,
``FILE.py:NAME`` or ``package.module:NAME`` (see :mod:`diffalign.rewards.function`).
Keyword arguments go to a single reward; for a sum, pass each component's arguments under its
name: ``load_reward("pickscore+aesthetic", pickscore={"path": ...}, aesthetic={...})``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffalign.rewards.base import Reward
from diffalign.rewards.function import (
    is_reward_reference,
    load_reward_reference,
    reward_from_object,
)


class UnknownRewardError(KeyError):
    """A reward name that is not registered (the message lists the closest names)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class RewardInfo:
    """A registry entry: how to build the reward and what it needs."""

    name: str
    factory: Callable[..., Reward]
    description: str
    model: str
    weights: str
    differentiable: bool


_REGISTRY: dict[str, RewardInfo] = {}
_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?(?:e-?\d+)?)\s*\*\s*)?([A-Za-z_][\w]*)\s*")


def register_reward(
    name: str,
    factory: Callable[..., Reward],
    description: str,
    model: str = "-",
    weights: str = "-",
    differentiable: bool = False,
) -> None:
    """Add a reward under ``name`` (a later registration of the same name replaces it)."""
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ValueError(f"Reward names are identifiers (letters, digits, _), got {name!r}.")
    _REGISTRY[name] = RewardInfo(name, factory, description, model, weights, differentiable)


def list_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def reward_info(name: str) -> RewardInfo:
    """The registry entry of ``name``, or an ``UnknownRewardError`` suggesting close names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownRewardError(
            f"Unknown reward {name!r}.{hint} Available: {', '.join(list_rewards())}."
        )
    return _REGISTRY[name]


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"a+0.2*b-c"`` → ``{"a": 1.0, "b": 0.2, "c": -1.0}``; repeated names add up."""
    weights: dict[str, float] = {}
    position = 0
    text = spec.strip()
    while position < len(text):
        match = _TERM.match(text, position)
        if not match or match.end() == position or (position and not match.group(1)):
            raise ValueError(
                f"Cannot read the reward spec {spec!r} at {text[position:]!r}; write terms like "
                "'pickscore+0.2*aesthetic'."
            )
        sign, coefficient, name = match.groups()
        value = float(coefficient) if coefficient else 1.0
        weights[name] = weights.get(name, 0.0) + (-value if sign == "-" else value)
        position = match.end()
    if not weights:
        raise ValueError("The reward spec is empty.")
    return weights


class WeightedReward(Reward):
    """A weighted sum of rewards; ``breakdown`` gives each component's unweighted scores."""

    name = "weighted"

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.rewards = nn.ModuleDict(dict(rewards))
        self.weights = dict(weights)
        self.name = "+".join(f"{w:g}*{n}" for n, w in self.weights.items())
        self.differentiable = all(r.differentiable for r in self.rewards.values())
        spaces = {r.space for r in self.rewards.values()}
        if len(spaces) > 1:
            raise ValueError(f"Cannot add rewards on different inputs ({sorted(spaces)}).")
        self.space = spaces.pop()

    def breakdown(
        self, images: torch.Tensor, prompts: str | Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Each component's own scores, by name."""
        return {name: reward(images, prompts) for name, reward in self.rewards.items()}

    def combine(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the components' scores (from :meth:`breakdown`)."""
        return sum(self.weights[name] * scores for name, scores in parts.items())

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.combine(self.breakdown(images, prompts))  # each component checks the inputs


def reward_components(reward: Reward) -> list[str]:
    """The component names of a weighted sum of two or more rewards; [] for any other reward."""
    if isinstance(reward, WeightedReward) and len(reward.weights) > 1:
        return list(reward.weights)
    return []


def load_reward(spec: str | Mapping[str, float] | Reward | Callable, **kwargs) -> Reward:
    """Build a reward from a name, a weighted-sum string or mapping, a function or a
    ``WHERE:NAME`` reference (see the module docstring).

    Raises:
        UnknownRewardError: an unknown name (a ``KeyError``; lists the closest names).
        WeightsNotFoundError: the reward's weights are missing (with how to supply them).
    """
    if is_reward_reference(spec):
        return load_reward_reference(spec, **kwargs)
    if not isinstance(spec, (str, Mapping)):
        return reward_from_object(spec, **kwargs)
    weights = dict(spec) if isinstance(spec, Mapping) else parse_reward_spec(spec)
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return reward_info(next(iter(weights))).factory(**kwargs)
    for name in weights:
        reward_info(name)
    unknown = set(kwargs) - set(weights)
    if unknown:
        raise TypeError(
            f"For a weighted reward, pass arguments per component (e.g. {next(iter(weights))}="
            f"{{'path': ...}}); got {sorted(unknown)}, which name no component."
        )
    rewards = {name: reward_info(name).factory(**kwargs.get(name, {})) for name in weights}
    return WeightedReward(rewards, weights)
