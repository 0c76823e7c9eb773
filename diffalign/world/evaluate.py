"""Measure a text-to-image model on the shapes world with the ``shapes`` reward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from diffalign.world.grammar import parse_caption
from diffalign.world.render import sample_captions
from diffalign.world.reward import ShapesScore, score_images, summarize

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def heldout_prompts(count: int = 200, seed: int = 0, split: str = "heldout") -> list[str]:
    """``count`` distinct captions of ``split`` (default: held-out combinations, never seen in
    training; use ``"validation"`` to tune sampling settings without touching the held-out set)."""
    prompts: list[str] = []
    for caption in sample_captions(count * 4, seed=seed, split=split):
        text = str(caption)
        if text not in prompts:
            prompts.append(text)
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"Could not draw {count} distinct held-out prompts.")


def generate(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    samples_per_prompt: int = 4,
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 16,
    quiet: bool = False,
    negative_prompt: str | None = None,
    **call_kwargs: Any,
) -> torch.Tensor:
    """Images (len(prompts) * samples_per_prompt, 3, H, W) in [0, 1], prompt-major order
    (``negative_prompt``: CFG's, else diffusers' default), ``batch_size`` images a call, which
    does not change the images beyond float rounding (see :func:`generate_batches`);
    ``call_kwargs`` (``eta``, ``height``, ``width``) go to each call.

    ``pipeline`` is a ``StableDiffusionPipeline`` or, for flow-matching models, a
    :class:`~diffalign.pipelines.rollout.RolloutPipeline` (sampled deterministically, ``eta=0``).
    :func:`generate_batches` gives the same images a call at a time.
    """
    batches = generate_batches(pipeline, prompts, samples_per_prompt, batch_size, seed, quiet,
                               num_inference_steps=steps, guidance_scale=guidance_scale,
                               negative_prompt=negative_prompt, **call_kwargs)  # fmt: skip
    return torch.cat([images for images, _ in batches])


def generate_batches(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    samples_per_prompt: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    quiet: bool = False,
    **call_kwargs: Any,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """:func:`generate`'s images ``batch_size`` a pipeline call (on the CPU; a prompt's images
    may span calls), each batch with the prompt of each image, so that a caller can score or
    save them and let them go; ``call_kwargs`` (``num_inference_steps``, ``guidance_scale``,
    ``negative_prompt``, ``eta``, ``height``, ``width``) go to each call.

    At ``eta`` 0 one seeded generator runs through the calls (only the starting noise is
    random). At ``eta`` > 0 every step draws noise too, so image ``i`` draws all of its noise
    from its own stream (:func:`~diffalign.pipelines.chain.chain_generator` of ``seed`` and
    ``i``): either way the batch size changes the images only by float rounding.
    """
    from diffalign.pipelines.chain import chain_generators
    from diffalign.pipelines.rollout import sample_images

    shared = torch.Generator().manual_seed(seed)
    stochastic = call_kwargs.get("eta", 0.0) > 0
    # each image its own prompt row: the same latents as num_images_per_prompt draws, in order
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    for start in tqdm(range(0, len(repeated), batch_size), desc="sampling", disable=quiet):
        chunk = repeated[start : start + batch_size]
        generator = chain_generators(seed, start, len(chunk)) if stochastic else shared
        images = sample_images(pipeline, chunk, num_images_per_prompt=1, generator=generator,
                               **call_kwargs)  # fmt: skip
        yield images.cpu(), chunk


def evaluate_prompts(images: torch.Tensor, prompts: Sequence[str], samples_per_prompt: int) -> dict:
    """Shapes-reward summary over all prompts, one-phrase prompts and two-phrase prompts."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    scores = score_images(images, repeated)
    phrases = [len(parse_caption(p).objects) for p in repeated]
    single = [s for s, n in zip(scores, phrases, strict=True) if n == 1]
    pairs = [s for s, n in zip(scores, phrases, strict=True) if n == 2]
    overall = summarize(scores)
    return {
        **composition(pairs),
        "shapes_mean": overall["total"],
        "shapes_mean_single_object": summarize(single)["total"] if single else None,
        "shapes_mean_two_objects": summarize(pairs)["total"] if pairs else None,
        "breakdown": {k: v for k, v in overall.items() if k != "total"},
        "fraction_perfect": sum(s.total == 1.0 for s in scores) / len(scores),
        "num_prompts": len(prompts),
        "num_single_object_prompts": len(single) // samples_per_prompt,
        "samples_per_prompt": samples_per_prompt,
    }


def composition(pair_scores: Sequence[ShapesScore]) -> dict:
    """Two-phrase images: the share where both phrases' objects (colour and shape) are found,
    and among those, the share where the relation holds (0.5 is chance)."""
    found = [s for s in pair_scores if s.shape == 1.0]
    return {
        "two_phrase_objects_found": len(found) / len(pair_scores) if pair_scores else None,
        "relation_given_objects_found": (
            sum(s.relation for s in found) / len(found) if found else None
        ),
    }


def render_prompts(prompts: Sequence[str], seed: int = 0, image_size: int = 32) -> torch.Tensor:
    """Real images of the world for ``prompts``: one fresh rendering per prompt (in order), the
    reference set for FID on the shapes world."""
    import random

    from diffalign.world.render import render, to_tensor

    rng = random.Random(seed)
    return to_tensor([render(parse_caption(p), rng, image_size) for p in prompts])
