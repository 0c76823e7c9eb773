"""The reward contract: ``Reward.forward(images, prompts) -> Tensor[B]``.

Subclasses implement ``score`` on one chunk of already checked inputs. The base class checks the
inputs (rank, channels, range, NaN, prompt count), splits the batch into chunks of
``batch_size``, moves each chunk to the reward's device and dtype, and checks the scores (finite,
one per image). Scores come back as float32 on the images' device. Reward models are frozen and
always in eval mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

_RANGE_TOLERANCE = 1e-3
NONFINITE_POLICIES = ("raise", "drop")


class NonFiniteRewardError(ValueError):
    """A reward produced NaN or infinite scores."""


def check_images(images: torch.Tensor, space: str = "image") -> None:
    """Raise ``ValueError`` unless ``images`` is a finite float batch of the right layout."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"Rewards take a tensor of images, got {type(images).__name__}; convert PIL images "
            "with torchvision.transforms.functional.to_tensor and stack them."
        )
    if images.ndim != 4:
        raise ValueError(
            f"Expected a batch of shape (B, C, H, W), got rank {images.ndim} "
            f"{tuple(images.shape)}; add a batch dimension with images.unsqueeze(0)."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"Expected float images in [0, 1], got dtype {images.dtype}; "
            "divide uint8 images by 255."
        )
    if space == "image" and images.shape[1] != 3:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        raise ValueError(
            f"Expected 3 colour channels in dimension 1, got shape {tuple(images.shape)}{hint}."
        )
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"The images contain NaN or infinite values (batch indices {bad}).")
    if space == "image":
        low, high = images.min().item(), images.max().item()
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"Images must be floats in [0, 1], got values in [{low:.3f}, {high:.3f}]; "
                "convert [-1, 1] images with (x + 1) / 2 and uint8 images with x / 255."
            )


def check_prompts(prompts: str | Sequence[str], batch: int) -> list[str]:
    """One prompt per image (a single string is repeated for every image)."""
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"Got {batch} images but {len(prompts)} prompts; pass one per image.")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"Prompts must be strings, got {bad[0]}.")
    return prompts


class Reward(nn.Module):
    """Base class of every reward: frozen, batched, with checked inputs and outputs.

    Args:
        batch_size: images scored per model call; the scores do not depend on it.
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteRewardError` when a score is
            NaN or infinite; ``"drop"`` logs a warning and returns NaN for those samples so the
            batch keeps its shape, and the caller drops them (``scores.isfinite()``).
    """

    name: str = "reward"
    differentiable: bool = False
    space: str = "image"
    input_size: int | None = None

    def __init__(self, batch_size: int = 32, nonfinite: str = "raise") -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}.")
        self.batch_size = batch_size
        self.nonfinite = nonfinite

    def freeze(self) -> Reward:
        """Make every parameter constant and switch to eval mode (call after building models)."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Reward:
        """Rewards stay in eval mode: dropout would make scores random."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the reward's weights live (CPU for rewards without weights)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype images are cast to before scoring."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of one checked chunk on the reward's device; implemented by subclasses."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """One float32 score per image, on the images' device."""
        check_images(images, self.space)
        prompts = check_prompts(prompts, images.shape[0])
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device, self.dtype)
            chunk_scores = self.score(chunk, prompts[start : start + self.batch_size])
            chunks.append(chunk_scores.reshape(-1).float())
        scores = torch.cat(chunks).to(images.device)
        if scores.shape[0] != images.shape[0]:
            raise RuntimeError(
                f"Reward {self.name!r} returned {scores.shape[0]} scores for "
                f"{images.shape[0]} images."
            )
        return self._handle_nonfinite(scores)

    def _handle_nonfinite(self, scores: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores)
        if finite.all():
            return scores
        bad = (~finite).nonzero().flatten().tolist()
        if self.nonfinite == "raise":
            raise NonFiniteRewardError(
                f"Reward {self.name!r} returned non-finite scores for batch indices {bad}; pass "
                "nonfinite='drop' to mark them NaN and drop those samples instead."
            )
        logger.warning("Reward %r: dropping %d non-finite scores %s.", self.name, len(bad), bad)
        return torch.where(finite, scores, torch.full_like(scores, float("nan")))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"
