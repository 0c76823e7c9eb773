"""What a shapes-world model can express at all, whatever it is fine-tuned to do.

Two limits sit outside the denoiser that RL fine-tunes:

- the VAE: perfect renderings of the prompts, encoded and decoded again, score what the
  decoder lets through. Scoring them once more with the relation flipped in every other
  two-phrase image gives the ceiling of a model that places the two phrases at chance;
- the text encoder: how far the token states move when only the relation word changes,
  against the change of one colour word. A relation the encoder barely hears is one the
  UNet cannot follow from the text.

And one inside it: how much the denoiser's loss on renderings grows when the caption's relation
is flipped, against one colour word. A denoiser whose loss does not grow ignores the relation,
whatever the text encoder tells it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffalign.sampling import NoiseSchedule, add_noise, prediction_target
from diffalign.world.evaluate import evaluate_prompts
from diffalign.world.grammar import COLOURS, Caption, ObjectPhrase, flip_relation, parse_caption
from diffalign.world.pretrain import encode_text, reconstruct
from diffalign.world.render import render, to_tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline
    from torch import nn
    from transformers import PreTrainedTokenizerBase


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


def reward_ceiling(vae: AutoencoderKL, prompts: Sequence[str], samples_per_prompt: int = 4,
                   seed: int = 0, batch_size: int = 128) -> dict[str, float]:  # fmt: skip
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


def _caption_variants(prompts: Sequence[str], caller: str) -> tuple[list[str], ...]:
    """The two-phrase ``prompts`` as they are, with the relation flipped, and recoloured."""
    captions = [c for c in map(parse_caption, prompts) if c.relation is not None]
    if not captions:
        raise ValueError(f"{caller} needs prompts with two phrases and a relation.")
    return (
        [str(c) for c in captions],
        [str(flip_relation(c)) for c in captions],
        [str(_other_colour(c)) for c in captions],
    )


def relation_sensitivity(
    tokenizer: PreTrainedTokenizerBase, text_encoder: nn.Module, prompts: Sequence[str]
) -> dict[str, float]:
    """How much the text encoding of the two-phrase ``prompts`` changes when only the relation is
    flipped, and when only the first phrase's colour changes."""
    texts, flipped, recoloured = _caption_variants(prompts, "relation_sensitivity")
    return {
        "relation_flip_change": _relative_change(tokenizer, text_encoder, texts, flipped),
        "colour_change": _relative_change(tokenizer, text_encoder, texts, recoloured),
        "num_prompts": len(texts),
    }


def _per_sample_losses(pipeline, noisy, timesteps, target, texts) -> torch.Tensor:
    states = encode_text(pipeline.tokenizer, pipeline.text_encoder, texts)
    prediction = pipeline.unet(noisy, timesteps, states).sample
    return (prediction - target).pow(2).flatten(1).mean(1)


def denoiser_sensitivity(pipeline: DiffusionPipeline, prompts: Sequence[str],
                         samples_per_prompt: int = 4, seed: int = 0,
                         batch_size: int = 128) -> dict[str, float]:  # fmt: skip
    """How much the denoising loss on perfect renderings of the two-phrase ``prompts`` grows when
    the caption's relation is flipped, and when its first colour changes (same latents, noise
    and timesteps for the three captions; timesteps stratified over the training schedule; the
    target is the scheduler's ``prediction_type``).

    Returns the mean loss under the true captions, each increase with its standard error, and
    the number of images. An increase of zero means the denoiser ignores that part of the text.
    """
    variants = _caption_variants(prompts, "denoiser_sensitivity")
    images = render_prompts(variants[0], samples_per_prompt, seed)
    texts = [[text for text in variant for _ in range(samples_per_prompt)] for variant in variants]
    schedule = NoiseSchedule.from_scheduler(pipeline.scheduler)
    vae = pipeline.vae
    generator = torch.Generator().manual_seed(seed)
    count = len(images)
    # One timestep per stratum of the schedule, shuffled so that no prompt gets only low noise.
    strata = torch.randperm(count, generator=generator) + torch.rand(count, generator=generator)
    all_timesteps = (strata / count * schedule.num_train_timesteps).long()
    losses = [[], [], []]
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = images[start : start + batch_size] * 2 - 1
            latents = vae.encode(batch).latent_dist.mode() * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = all_timesteps[start : start + batch_size]
            alpha_bar = schedule.alpha_bar(timesteps, latents)
            noisy = add_noise(latents, noise, alpha_bar)
            target = prediction_target(latents, noise, alpha_bar, schedule.prediction_type)
            for kept, variant in zip(losses, texts, strict=True):
                chunk = variant[start : start + batch_size]
                kept.append(_per_sample_losses(pipeline, noisy, timesteps, target, chunk))
    true, flipped, recoloured = (torch.cat(kept) for kept in losses)

    def increase(other: torch.Tensor) -> tuple[float, float]:
        difference = other - true
        return difference.mean().item(), (difference.std() / len(difference) ** 0.5).item()

    (relation, relation_error), (colour, colour_error) = increase(flipped), increase(recoloured)
    return {
        "loss": true.mean().item(),
        "relation_flip_loss_increase": relation,
        "relation_flip_loss_increase_stderr": relation_error,
        "colour_change_loss_increase": colour,
        "colour_change_loss_increase_stderr": colour_error,
        "num_images": len(true),
    }
