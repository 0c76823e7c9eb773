"""JPEG (in)compressibility, the DDPO paper's reward without a model.

The score is the size in kilobytes (1 kB = 1,000 bytes) of the image saved as JPEG at quality 95
after rounding to 8 bits: positive for ``jpeg_incompressibility``, negative for
``jpeg_compressibility``. Images are scored at the size they come in.
"""

from __future__ import annotations

import io

import torch

from diffalign.imaging import to_pil
from diffalign.rewards.base import Reward

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """JPEG size in kB of each image in a float batch in [0, 1] of shape (B, 3, H, W)."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibility(Reward):
    """Positive JPEG size in kB at quality 95: higher for detailed, noisy images."""

    name = "jpeg_incompressibility"
    sign = 1.0

    def __init__(self, quality: int = JPEG_QUALITY, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}.")
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG size in kB at quality 95: higher for flat, simple images."""

    name = "jpeg_compressibility"
    sign = -1.0
