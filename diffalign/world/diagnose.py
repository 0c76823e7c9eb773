"""What a shapes-world model can express at all, whatever it is fine-tuned to do.

Two limits sit outside the denoiser that RL fine-tunes:

- the VAE: perfect renderings of the prompts, encoded and decoded again, score what the
  decoder lets through. Scoring them once more with the relation flipped in every other
  two-phrase image gives the ceiling of a model that places the two phrases at chance;
- the text encoder: how far the token states move when only the relation word changes,
  against the change of one colour word. A relation the encoder barely hears is one the
  UNet cannot follow from the text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from diffalign.world.evaluate import evaluate_prompts
from diffalign.world.grammar import COLOURS, Caption, ObjectPhrase, flip_relation, parse_caption
from diffalign.world.pretrain import encode_text, reconstruct
from diffalign.world.render import render, to_tensor


def render_prompts(prompts: Sequence[str], samples_per_prompt: int, seed: int = 0,
                   relations_at_chance: bool = False) -> torch.Tensor:  # fmt: skip
    """Renderings (len(prompts) * samples_per_prompt, 3, H, W) in [0, 1], prompt-major order.
    With ``relations_at_chance``, every other rendering of a two-phrase prompt shows the
    opposite relation."""
    rng = random.Random(seed)
    arrays = []
    for prompt in prompts:
        caption = parse_caption(prompt)
        for index in range(samples_per_prompt):
            flipped = relations_at_chance and index % 2 == 1
            arrays.append(render(flip_relation(caption) if flipped else caption, rng))
    return to_tensor(arrays)


def reward_ceiling(vae, prompts: Sequence[str], samples_per_prompt: int = 4, seed: int = 0,
                   batch_size: int = 128) -> dict[str, float]:  # fmt: skip
    """Mean ``shapes`` reward of perfect renderings, raw and through ``vae``, with the relations
    exact and at chance."""
    results = {}
    for name, at_chance in (("exact", False), ("relations_at_chance", True)):
        images = render_prompts(prompts, samples_per_prompt, seed, at_chance)
        decoded = torch.cat([reconstruct(vae, batch) for batch in images.split(batch_size)])
        decoded = ((decoded + 1) / 2).clamp(0, 1)
        for stage, batch in (("renderings", images), ("through_vae", decoded)):
            summary = evaluate_prompts(batch, prompts, samples_per_prompt)
            results[f"{stage}_{name}"] = summary["shapes_mean"]
    return results


def _other_colour(caption: Caption) -> Caption:
    """``caption`` with its first phrase in a colour no other part of it uses."""
    used = {p.colour for p in caption.objects} | {caption.background}
    colour = next(c for c in COLOURS if c not in used)
    first = caption.objects[0]
    objects = (ObjectPhrase(first.count, colour, first.shape), *caption.objects[1:])
    return Caption(objects, caption.relation, caption.background)


def _relative_change(tokenizer, text_encoder, texts: list[str], others: list[str]) -> float:
    """Mean over pairs of ||states(a) - states(b)|| / ||states(a)||, over the caption's tokens
    (start to end-of-text; the padding after it is left out)."""
    with torch.no_grad():
        states = encode_text(tokenizer, text_encoder, texts + others)
    first, second = states.split(len(texts))
    changes = []
    for index, text in enumerate(texts):
        length = len(tokenizer(text).input_ids)
        a, b = first[index, :length], second[index, :length]
        changes.append(((a - b).norm() / a.norm()).item())
    return float(np.mean(changes))


def relation_sensitivity(tokenizer, text_encoder, prompts: Sequence[str]) -> dict[str, float]:
    """How much the text encoding of the two-phrase ``prompts`` changes when only the relation is
    flipped, and when only the first phrase's colour changes."""
    captions = [c for c in map(parse_caption, prompts) if c.relation is not None]
    if not captions:
        raise ValueError("relation_sensitivity needs prompts with two phrases and a relation.")
    texts = [str(c) for c in captions]
    flipped = [str(flip_relation(c)) for c in captions]
    recoloured = [str(_other_colour(c)) for c in captions]
    return {
        "relation_flip_change": _relative_change(tokenizer, text_encoder, texts, flipped),
        "colour_change": _relative_change(tokenizer, text_encoder, texts, recoloured),
        "num_prompts": len(texts),
    }
