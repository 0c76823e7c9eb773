"""A tiny CLIP for the shapes world, trained contrastively on its image-caption pairs.

It is a standard transformers ``CLIPModel`` with a ``CLIPProcessor`` (the real CLIP tokenizer and
CLIP's image normalisation), saved with ``save_pretrained``, so the PickScore / CLIP-score reward
adapters and CLIP-feature metrics load it exactly as they load the real models.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.config import BaseConfig, ConfigError
from diffalign.files import atomic_write_text
from diffalign.models import save_clip_tokenizer
from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from diffalign.world.render import generate_pairs

if TYPE_CHECKING:
    from torch import nn
    from transformers import CLIPModel, CLIPProcessor, PreTrainedTokenizerBase


@dataclass
class WorldClipConfig(BaseConfig):
    """Settings of ``diffalign world pretrain-clip`` (defaults made the shipped tiny CLIP)."""

    seed: int = 0
    image_size: int = 32
    steps: int = field(default=1500, metadata={"help": "Contrastive training steps."})
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    text_hidden_size: int = 12
    vision_hidden_size: int = 64
    projection_dim: int = 32
    patch_size: int = 4

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError("image_size must be a multiple of patch_size.")
        if self.steps < 1 or self.batch_size < 2:
            raise ConfigError("steps must be >= 1 and batch_size >= 2 (contrastive pairs).")


def build_clip(config: WorldClipConfig) -> CLIPModel:
    """A randomly initialised tiny ``CLIPModel`` over the full CLIP vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(config.seed)
    text = {
        "vocab_size": 49408, "hidden_size": config.text_hidden_size,
        "intermediate_size": 4 * config.text_hidden_size, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 77,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }  # fmt: skip
    vision = {
        "hidden_size": config.vision_hidden_size,
        "intermediate_size": 2 * config.vision_hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
    }
    clip_config = CLIPConfig(text_config=text, vision_config=vision,
                             projection_dim=config.projection_dim)  # fmt: skip
    return CLIPModel(clip_config)


def build_processor(image_size: int = 32) -> CLIPProcessor:
    """A ``CLIPProcessor``: the real CLIP tokenizer and CLIP's normalisation at ``image_size``."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from diffalign.models import build_clip_tokenizer

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
    )  # fmt: skip
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


def normalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP's normalisation of images in [0, 1] that are already at the model's size."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _embed(model, tokenizer, images: torch.Tensor, captions: list[str]):
    ids = tokenizer(captions, padding=True, return_tensors="pt")
    image_features = model.get_image_features(pixel_values=normalize(images))
    text_features = model.get_text_features(**ids)
    image_features = getattr(image_features, "pooler_output", image_features)
    text_features = getattr(text_features, "pooler_output", text_features)
    return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched, L2-normalised embeddings."""
    logits = logit_scale.exp() * image @ text.T
    targets = torch.arange(len(image))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                       num_queries: int = 512, candidates: int = 16, seed: int = 1234,
                       split: str = "heldout") -> float:  # fmt: skip
    """Caption-to-image top-1 accuracy among ``candidates`` images (one right, the rest random)."""
    images, captions = generate_pairs(num_queries * candidates // 4, seed=seed, split=split)
    image_emb, text_emb = _embed(model.eval(), tokenizer, images, captions)
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for query in range(num_queries):
        index = query % len(captions)
        others = torch.randperm(len(captions), generator=generator)
        others = others[others != index][: candidates - 1]
        pool = torch.cat([torch.tensor([index]), others])
        scores = image_emb[pool] @ text_emb[index]
        hits += int(scores.argmax().item() == 0)
    return hits / num_queries


def pretrain_clip(
    config: WorldClipConfig, out: Path, quiet: bool = False
) -> tuple[CLIPModel, dict]:
    """Train the tiny CLIP and save model + processor to ``out``; returns (model, record)."""
    model, processor = build_clip(config), build_processor(config.image_size)
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.1)
    warmup, total = config.warmup_steps, config.steps

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start, losses = time.time(), []
    model.train()
    for step in tqdm(range(config.steps), desc="tiny clip", disable=quiet):
        images, captions = generate_pairs(config.batch_size, seed=config.seed * 1_000_003 + step,
                                          split="train", image_size=config.image_size)  # fmt: skip
        image_emb, text_emb = _embed(model, tokenizer, images, captions)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    record = {
        "config": config.to_dict(),
        "seconds": time.time() - start,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_retrieval_top1_of_16": retrieval_accuracy(model, tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    save_clip_tokenizer(tokenizer, out)
    atomic_write_text(out / "training.json", json.dumps(record, indent=1))
    return model, record
