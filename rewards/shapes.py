"""The shapes world's programmatic reward behind the reward contract.

It detects the objects in each image and checks them against its caption (see
``diffalign.world.reward`` for the rules); scores are in [0, 1] and exactly 1 for a ground-truth
rendering. Prompts must follow the world's caption grammar; any other prompt raises a
``CaptionError`` naming the word it could not read. Not differentiable.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from diffalign.rewards.base import Reward
from diffalign.world.reward import ShapesScore, score_images, shapes_reward


class ShapesReward(Reward):
    """GenEval-like correctness of colour, shape, count, relation and background, in [0, 1]."""

    name = "shapes"
    input_size = 32

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return shapes_reward(images, prompts)

    def breakdown(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each part of the score (colour, shape, count, relation, background, extra) per image."""
        scores = score_images(images, prompts)
        names = [field.name for field in fields(ShapesScore)]
        return {name: torch.tensor([getattr(s, name) for s in scores]) for name in names}
