"""Images at the boundaries: float tensors in [0, 1] to PNG files and grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) float tensor in [0, 1] as an RGB PIL image."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"Expected an image of shape (3, H, W), got {tuple(image.shape)}.")
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy())


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile a (B, 3, H, W) batch into one image, ``columns`` wide (default: near square)."""
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = Image.new(
        "RGB",
        (columns * (width + padding) + padding, rows * (height + padding) + padding),
        "white",
    )
    for index in range(count):
        row, column = divmod(index, columns)
        position = (padding + column * (width + padding), padding + row * (height + padding))
        grid.paste(to_pil(images[index]), position)
    return grid


def save_images(
    images: torch.Tensor, folder: Path, names: Sequence[str] | None = None
) -> list[Path]:
    """Save each image of a (B, 3, H, W) batch as PNG in ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{index:04d}.png" for index in range(len(images))]
    paths = []
    for image, name in zip(images, names, strict=True):
        path = folder / name
        to_pil(image).save(path)
        paths.append(path)
    return paths
