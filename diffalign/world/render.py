"""Render shapes-world captions to images, and the deterministic train / validation / held-out data.

Objects are drawn crisp (no anti-aliasing) in a fixed palette on a background that is mid-grey when
the caption names none, so that every caption colour shows. Objects never overlap and keep a gap of
at least two pixels; a relation puts each phrase's objects in its own half of the image
("A left of B": A in the left half, B in the right half).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from diffalign.world.grammar import SPLITS, Caption, random_caption

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
DEFAULT_BACKGROUND = "grey"
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {**PALETTE, DEFAULT_BACKGROUND: (128, 128, 128)}
_GAP = 2


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: its colour, shape and bounding box ``(x0, y0, size)``."""

    colour: str
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the bounding-box centre."""
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """A boolean ``size x size`` mask of a circle, square or upward triangle."""
    centres = np.arange(size) + 0.5
    x, y = np.meshgrid(centres, centres)
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - size / 2) ** 2 + (y - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex at the top centre, base along the bottom row
        return np.abs(x - size / 2) <= (y / size) * (size / 2)
    raise ValueError(f"Unknown shape {shape!r}.")


def split_of(caption: Caption) -> str:
    """The data split a caption belongs to, fixed by a hash of its combination key:
    10% of combinations are held out, 5% are validation, the rest train."""
    digest = hashlib.sha256(repr(caption.combination_key()).encode()).digest()
    bucket = digest[0] % 20
    return "heldout" if bucket < 2 else "validation" if bucket == 2 else "train"


def _regions(caption: Caption, size: int) -> list[tuple[int, int, int, int]]:
    """(x_min, y_min, x_max, y_max) per phrase, exclusive maxima."""
    full, half = (0, 0, size, size), size // 2
    if caption.relation is None:
        return [full]
    left, right = (0, 0, half, size), (half, 0, size, size)
    top, bottom = (0, 0, size, half), (0, half, size, size)
    return {
        "left of": [left, right],
        "right of": [right, left],
        "above": [top, bottom],
        "below": [bottom, top],
    }[caption.relation]


def _object_size(num_objects: int, image_size: int, rng: random.Random) -> int:
    base = image_size * {1: 0.38, 2: 0.30}.get(num_objects, 0.24)
    return max(5, round(base) + rng.randint(-1, 1))


def _overlaps(box: tuple[int, int, int], placed: list[PlacedObject]) -> bool:
    x0, y0, s = box
    return any(
        x0 < p.x0 + p.size + _GAP
        and p.x0 < x0 + s + _GAP
        and y0 < p.y0 + p.size + _GAP
        and p.y0 < y0 + s + _GAP
        for p in placed
    )


def _place(region, size, placed, rng, image_size) -> tuple[int, int] | None:
    x_min, y_min, x_max, y_max = region
    x_min, y_min = max(x_min, 1), max(y_min, 1)
    x_max, y_max = min(x_max, image_size - 1), min(y_max, image_size - 1)
    if x_max - x_min < size or y_max - y_min < size:
        return None
    for _ in range(200):
        x0 = rng.randint(x_min, x_max - size)
        y0 = rng.randint(y_min, y_max - size)
        if not _overlaps((x0, y0, size), placed):
            return x0, y0
    return None


def layout(caption: Caption, rng: random.Random, image_size: int = 32) -> list[PlacedObject]:
    """Positions and sizes for every object of ``caption`` (shrinking objects until they fit)."""
    size = _object_size(caption.num_objects, image_size, rng)
    while size >= 4:
        placed: list[PlacedObject] = []
        for phrase, region in zip(caption.objects, _regions(caption, image_size), strict=True):
            for _ in range(phrase.count):
                spot = _place(region, size, placed, rng, image_size)
                if spot is None:
                    break
                placed.append(PlacedObject(phrase.colour, phrase.shape, *spot, size))
        if len(placed) == caption.num_objects:
            return placed
        size -= 1
    raise RuntimeError(f"Cannot lay out {caption} at {image_size}px.")


def render(caption: Caption, rng: random.Random, image_size: int = 32) -> np.ndarray:
    """Draw ``caption`` as an ``(image_size, image_size, 3)`` uint8 RGB array."""
    background = BACKGROUND_RGB[caption.background or DEFAULT_BACKGROUND]
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = background
    for obj in layout(caption, rng, image_size):
        mask = shape_mask(obj.shape, obj.size)
        window = image[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size]
        window[mask] = PALETTE[obj.colour]
    return image


def sample_captions(count: int, seed: int, split: str | None = "train") -> list[Caption]:
    """``count`` random captions of ``split`` (all splits when ``None``), deterministic by seed."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {SPLITS}.")
    rng, captions = random.Random(seed), []
    while len(captions) < count:
        caption = random_caption(rng)
        if split is None or split_of(caption) == split:
            captions.append(caption)
    return captions


def to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 renderings as one float batch (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def generate_pairs(
    count: int, seed: int, split: str | None = "train", image_size: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """``count`` (image, caption) pairs: images float in [0, 1], shape (count, 3, H, W)."""
    captions = sample_captions(count, seed, split)
    rng = random.Random(seed + 1)
    images = to_tensor([render(c, rng, image_size) for c in captions])
    return images, [str(c) for c in captions]
