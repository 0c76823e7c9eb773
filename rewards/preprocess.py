"""Differentiable image preprocessing that follows each reward model's own processor.

Reward models were trained on images resized and normalised by a particular processor: the
transformers ``CLIPImageProcessor`` (shortest edge to N with PIL bicubic, centre crop, CLIP mean and
std) or open_clip's transforms (HPSv2: longest edge to N, zero padding). ``ImageTransform`` does the
same on float tensors so that gradients reach the input images. Bicubic resizing runs with
``antialias=True``, which makes PyTorch use the same filter as PIL (a = -0.5, widened when
shrinking); the tests check the result against the real processors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, ProcessorMixin

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImageTransform:
    """Resize, crop or pad, and normalise images in [0, 1] of shape (B, 3, H, W).

    Args:
        size: target of the resize: the shortest edge (``mode="shortest"``), the longest edge
            (``mode="longest_pad"``), or both sides (``mode="square"``).
        crop: centre-crop size after a shortest-edge resize (defaults to ``size``).
        mode: ``"shortest"`` (transformers CLIP), ``"longest_pad"`` (open_clip's resize-max-size
            with zero padding, as HPSv2 evaluates) or ``"square"``.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        mean, std: per-channel normalisation.
    """

    size: int
    crop: int | None = None
    mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_clip_processor(cls, processor: ProcessorMixin | BaseImageProcessor) -> ImageTransform:
        """The transform a transformers ``CLIPImageProcessor`` (or a ``CLIPProcessor``) applies."""
        image_processor = getattr(processor, "image_processor", processor)
        size = image_processor.size
        if "shortest_edge" in size:
            target, mode = size["shortest_edge"], "shortest"
        else:
            target, mode = size["height"], "square"
        crop = image_processor.crop_size["height"] if image_processor.do_center_crop else None
        resample = getattr(image_processor, "resample", 3)
        return cls(
            size=target, crop=crop, mode=mode,
            interpolation=_PIL_RESAMPLE.get(int(resample), "bicubic"),
            mean=tuple(image_processor.image_mean), std=tuple(image_processor.image_std),
        )  # fmt: skip

    def _resize(self, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if (height, width) == tuple(images.shape[-2:]):
            return images
        smooth = self.interpolation in ("bicubic", "bilinear")
        return F.interpolate(
            images, size=(height, width), mode=self.interpolation,
            antialias=smooth, **({"align_corners": False} if smooth else {}),
        )  # fmt: skip

    def _shortest(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_long = int(self.size * long / short)
        size = (self.size, new_long) if height <= width else (new_long, self.size)
        images = self._resize(images, *size)
        crop = self.crop or self.size
        top = (images.shape[-2] - crop) // 2
        left = (images.shape[-1] - crop) // 2
        return images[..., top : top + crop, left : left + crop]

    def _longest_pad(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = self.size / max(height, width)
        new_height, new_width = round(height * scale), round(width * scale)
        images = self._resize(images, new_height, new_width)
        pad_h, pad_w = self.size - new_height, self.size - new_width
        return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the model's normalised input."""
        if self.mode == "shortest":
            images = self._shortest(images)
        elif self.mode == "longest_pad":
            images = self._longest_pad(images)
        elif self.mode == "square":
            images = self._resize(images, self.size, self.size)
        else:
            raise ValueError(f"Unknown resize mode {self.mode!r}.")
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std
