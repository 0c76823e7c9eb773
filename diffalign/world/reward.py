"""The ``shapes`` reward: read an image, find its objects, and check them against the caption.

Detection, per image: every pixel gets the nearest palette colour (or none when it is far from all
of them); the background is the most common colour on the border; the objects are the connected
regions of each other colour, large enough to count; each region's shape follows from how much of
its bounding box it fills (square 1, circle 0.75-0.89, triangle ~0.5).

Score, in [0, 1]. The object score is the mean over the caption's phrases of the mean of colour
(an object of that colour exists), shape (one of them has the shape) and count
(1 - |found - asked| / asked, floored at 0). It is then scaled down for what surrounds the objects:
by 0.5 for a wrong background, by 0.5 for a relation that does not hold (the mean centres of the
two phrases' objects in the wrong order), and by 1 / sqrt(1 + n) for n objects the caption does not
mention. A ground-truth image scores exactly 1; partial matches keep partial credit, which gives
reinforcement learning a dense signal, while an image for another caption mostly scores near 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from diffalign.world.grammar import Caption, parse_caption
from diffalign.world.render import BACKGROUND_RGB, DEFAULT_BACKGROUND

_NAMES = list(BACKGROUND_RGB)
_RGB = np.array([BACKGROUND_RGB[name] for name in _NAMES], dtype=np.float32)
_MAX_COLOUR_DISTANCE = 90.0
_MISMATCH_FACTOR = 0.5


@dataclass(frozen=True)
class DetectedObject:
    """A connected region of one colour."""

    colour: str
    shape: str
    area: int
    centre: tuple[float, float]
    fill: float


@dataclass(frozen=True)
class ShapesScore:
    """The reward of one image and its breakdown (``relation`` is NaN for one-phrase captions)."""

    total: float
    colour: float
    shape: float
    count: float
    relation: float
    background: float
    extra: float


def label_colours(image: np.ndarray) -> np.ndarray:
    """Index into the palette (objects and backgrounds) of each pixel, -1 where none is close."""
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    distances = np.sqrt(((pixels - _RGB[None]) ** 2).sum(-1))
    labels = distances.argmin(-1)
    labels[distances.min(-1) > _MAX_COLOUR_DISTANCE] = -1
    return labels.reshape(image.shape[:2])


def classify_shape(fill: float) -> str:
    """Shape from the fraction of the bounding box a region fills."""
    if fill >= 0.93:
        return "square"
    return "circle" if fill >= 0.66 else "triangle"


def background_colour(labels: np.ndarray) -> str | None:
    """The most common colour on the image border (``None`` if no border pixel is recognised)."""
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    border = border[border >= 0]
    if border.size == 0:
        return None
    return _NAMES[np.bincount(border).argmax()]


def detect_objects(image: np.ndarray) -> tuple[str | None, list[DetectedObject]]:
    """The background colour and the objects of an ``(H, W, 3)`` uint8 image."""
    labels = label_colours(image)
    background = background_colour(labels)
    min_area = max(4, round(0.004 * labels.size))
    objects = []
    for index in np.unique(labels):
        name = _NAMES[index] if index >= 0 else None
        if name is None or name in (background, DEFAULT_BACKGROUND):
            continue
        regions, count = ndimage.label(labels == index)
        for region, box in zip(range(1, count + 1), ndimage.find_objects(regions), strict=True):
            area = int((regions[box] == region).sum())
            if area < min_area:
                continue
            height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
            fill = area / (height * width)
            ys, xs = np.nonzero(regions[box] == region)
            centre = (box[1].start + xs.mean() + 0.5, box[0].start + ys.mean() + 0.5)
            objects.append(DetectedObject(name, classify_shape(fill), area, centre, fill))
    return background, objects


def _relation_holds(relation: str, first: list, second: list) -> float:
    if not first or not second:
        return 0.0
    ax, ay = np.mean([o.centre for o in first], axis=0)
    bx, by = np.mean([o.centre for o in second], axis=0)
    holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
    return float(holds[relation])


def score_detection(
    caption: Caption, background: str | None, objects: Sequence[DetectedObject]
) -> ShapesScore:
    """Score detected objects against a parsed caption."""
    colour, shape, count, matched = [], [], [], []
    for phrase in caption.objects:
        same_colour = [o for o in objects if o.colour == phrase.colour]
        exact = [o for o in same_colour if o.shape == phrase.shape]
        colour.append(float(bool(same_colour)))
        shape.append(float(bool(exact)))
        count.append(max(0.0, 1 - abs(len(exact) - phrase.count) / phrase.count))
        matched.append(exact)
    relation = math.nan
    if caption.relation is not None:
        relation = _relation_holds(caption.relation, matched[0], matched[1])
    wanted = caption.background or DEFAULT_BACKGROUND
    background_ok = float(background == wanted)
    extras = len(objects) - sum(len(m) for m in matched)
    extra = 1.0 / (1 + extras)
    total = (np.mean(colour) + np.mean(shape) + np.mean(count)) / 3
    total *= 1.0 if background_ok else _MISMATCH_FACTOR
    total *= 1.0 if caption.relation is None or relation else _MISMATCH_FACTOR
    total *= math.sqrt(extra)
    return ShapesScore(
        float(total), float(np.mean(colour)), float(np.mean(shape)), float(np.mean(count)),
        relation, background_ok, extra,
    )  # fmt: skip


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    if not torch.isfinite(images).all():
        raise ValueError("The images contain NaN or infinite values.")
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise ValueError("Images must be floats in [0, 1]; convert with (x + 1) / 2 or x / 255.")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def score_images(images: torch.Tensor, prompts: Sequence[str]) -> list[ShapesScore]:
    """Score a batch: images float in [0, 1], shape (B, 3, H, W), one caption per image."""
    arrays = _to_uint8(images)
    if len(prompts) != len(arrays):
        raise ValueError(f"Got {len(arrays)} images but {len(prompts)} prompts.")
    return [
        score_detection(parse_caption(prompt), *detect_objects(array))
        for array, prompt in zip(arrays, prompts, strict=True)
    ]


def shapes_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The ``shapes`` reward of each image, a float tensor of shape (B,)."""
    return torch.tensor([s.total for s in score_images(images, prompts)], dtype=torch.float32)


def summarize(scores: Sequence[ShapesScore]) -> dict[str, float]:
    """Mean of every field over ``scores`` (NaN relations ignored)."""
    rows = [asdict(s) for s in scores]
    summary = {}
    for key in rows[0]:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        summary[key] = float(np.mean(values)) if values else math.nan
    return summary
