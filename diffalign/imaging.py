"""Images at the boundaries: float tensors in [0, 1] to PNG files and grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

GRID_MAX_IMAGES = 64  # a grid.png of a large run shows its first prompts, not every image


class GridCollector:
    """The first images of a stream of batches for a grid: as many whole prompts' images as
    fit in ``limit`` (at least one prompt's), copied out so the batches can be let go; a grid
    holds one size, so batches of another size than the first are passed over."""

    def __init__(self, images_per_prompt: int, limit: int = GRID_MAX_IMAGES) -> None:
        self.capacity = max(images_per_prompt, limit // images_per_prompt * images_per_prompt)
        self._parts: list[torch.Tensor] = []
        self._count = 0

    def add(self, images: torch.Tensor) -> None:
        """Keep the images of this batch that still fit."""
        if self._parts and images.shape[1:] != self._parts[0].shape[1:]:
            return
        kept = images[: self.capacity - self._count]
        if len(kept):
            self._parts.append(kept.detach().cpu().clone())
            self._count += len(kept)

    def images(self) -> torch.Tensor:
        """The images kept, in order."""
        if not self._parts:
            raise ValueError("No images were added to the grid.")
        return torch.cat(self._parts)


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


def numbered_names(start: int, count: int, total: int) -> list[str]:
    """PNG names for images ``start`` .. ``start + count - 1`` of ``total``: zero-padded to four
    digits or as many as ``total`` needs, so that name order is image order."""
    width = max(4, len(str(total - 1)))
    return [f"{index:0{width}d}.png" for index in range(start, start + count)]


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


def side_by_side(
    grids: Sequence[tuple[str, torch.Tensor]],
    columns: int | None = None,
    gap: int = 8,
    scale: int = 1,
) -> Image.Image:
    """Image batches tiled as grids (``make_grid``, enlarged ``scale`` times without smoothing)
    and placed left to right, each under a caption, e.g. ``[("base", a), ("aligned", b)]``."""
    from PIL import ImageDraw

    tiles = []
    for name, images in grids:
        tile = make_grid(images, columns)
        tiles.append((name, tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)))
    caption = 14
    width = sum(tile.width for _, tile in tiles) + gap * (len(tiles) - 1)
    height = max(tile.height for _, tile in tiles) + caption
    canvas = Image.new("RGB", (width, height), "white")
    draw, left = ImageDraw.Draw(canvas), 0
    for name, tile in tiles:
        draw.text((left + 2, 1), name, fill="black")
        canvas.paste(tile, (left, caption))
        left += tile.width + gap
    return canvas
