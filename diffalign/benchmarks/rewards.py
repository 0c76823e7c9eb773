"""Reward throughput: images per second for every reward, at a small and a large input size.

Each reward scores the same world images (upsampled with nearest-neighbour for the large size)
and captions. Rewards whose weights are not on this machine are reported as such; with
``random_weights=True`` the real architecture is built with random weights instead, which times
the model exactly (speed does not depend on the values) but gives meaningless scores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffalign.rewards import Reward, WeightsNotFoundError, list_rewards, load_reward


def _clip_architecture(text: tuple[int, int, int], vision: tuple[int, int, int],
                       projection: int, act: str) -> dict:  # fmt: skip
    """A CLIP layout from (width, layers, heads) per tower; MLPs are 4x wide, patches 14 px."""

    def tower(width: int, layers: int, heads: int) -> dict:
        return {"hidden_size": width, "intermediate_size": 4 * width,
                "num_hidden_layers": layers, "num_attention_heads": heads}  # fmt: skip

    return {"text": tower(*text), "vision": {**tower(*vision), "patch_size": 14, "image_size": 224},
            "projection_dim": projection, "hidden_act": act}  # fmt: skip


# Published architectures: CLIP ViT-L/14 (OpenAI) and ViT-H/14 (LAION), transformers layout.
_VIT_L14 = _clip_architecture((768, 12, 12), (1024, 24, 16), 768, "quick_gelu")
_VIT_H14 = _clip_architecture((1024, 24, 16), (1280, 32, 16), 1024, "gelu")


def _random_clip(architecture: dict):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.models import build_clip_tokenizer

    act = architecture["hidden_act"]
    config = CLIPConfig(
        text_config={**architecture["text"], "hidden_act": act},
        vision_config={**architecture["vision"], "hidden_act": act},
        projection_dim=architecture["projection_dim"],
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())
    return CLIPModel(config).eval(), processor


def random_weights_reward(name: str, **kwargs) -> Reward:
    """``name``'s real architecture with random weights, for timing only."""
    from diffalign.rewards.aesthetic import Aesthetic, AestheticHead
    from diffalign.rewards.clip import ClipScore, PickScore
    from diffalign.rewards.hps import HPSv2, build_open_clip

    if name == "pickscore":
        model, processor = _random_clip(_VIT_H14)
        return PickScore(model=model, processor=processor, **kwargs)
    if name == "clip_score":
        model, processor = _random_clip(_VIT_L14)
        return ClipScore(model=model, processor=processor, **kwargs)
    if name == "aesthetic":
        model, processor = _random_clip(_VIT_L14)
        return Aesthetic(head=AestheticHead(768), clip=model, processor=processor, **kwargs)
    if name == "hpsv2":
        return HPSv2(model=build_open_clip("ViT-H-14"), **kwargs)
    raise ValueError(f"No random-weights stand-in for {name!r}; it needs no weights.")


def _load(name: str, random_weights: bool, batch_size: int) -> tuple[Reward | None, str]:
    try:
        return load_reward(name, batch_size=batch_size), "real"
    except WeightsNotFoundError:
        if not random_weights:
            return None, "weights not found"
    return random_weights_reward(name, batch_size=batch_size), "random (timing only)"


def _time(reward: Reward, images: torch.Tensor, prompts: list[str], repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            reward(images, prompts)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_rewards_benchmark(
    names: Sequence[str] | None = None,
    sizes: Sequence[int] = (32, 512),
    num_images: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    random_weights: bool = False,
    batch_size: int = 32,
    repeats: int = 2,
) -> dict:
    """Time every reward in ``names`` (default: all registered) on ``num_images`` images per size.

    Returns ``{"rows": [...], "table": str}``; each row has the reward, its weights ("real",
    "random (timing only)" or "weights not found"), and per size the images/s and mean score.
    """
    from diffalign.world.render import generate_pairs

    device = torch.device(device)
    base, prompts = generate_pairs(num_images, seed=0, split="validation")
    rows = []
    for name in names or list_rewards():
        reward, weights = _load(name, random_weights, batch_size)
        row: dict = {"reward": name, "weights": weights}
        if reward is not None:
            reward = reward.to(device=device, dtype=dtype)
            for size in sizes:
                images = F.interpolate(base, size=(size, size), mode="nearest").to(device, dtype)
                reward(images[:2], prompts[:2])  # warm-up
                seconds = _time(reward, images, prompts, repeats)
                row[f"images_per_s_{size}"] = num_images / seconds
                if weights == "real":
                    row[f"mean_score_{size}"] = reward(images, prompts).mean().item()
        rows.append(row)
        del reward
    return {"rows": rows, "table": format_table(rows, sizes)}


def format_table(rows: list[dict], sizes: Sequence[int]) -> str:
    """A markdown table of the benchmark rows."""
    header = "| reward | weights | " + " | ".join(f"images/s at {s} px" for s in sizes) + " |"
    lines = [header, "|" + "---|" * (2 + len(sizes))]
    for row in rows:
        cells = [f"{row[f'images_per_s_{s}']:.1f}" if f"images_per_s_{s}" in row else "-"
                 for s in sizes]  # fmt: skip
        lines.append(f"| {row['reward']} | {row['weights']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
