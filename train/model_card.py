"""The model card (``final/README.md``) of a training run: what was trained, how, and how it did.

The front matter follows the Hugging Face Hub's model-card metadata (``library_name``,
``base_model``, ``tags``), so the folder can be uploaded as it is.
"""

from __future__ import annotations

from diffalign.train.best import BestEvaluation
from diffalign.train.config import TrainConfig
from diffalign.train.guard import GuardTrip

METHOD_NAMES = {"ddpo": "DDPO (PPO on the denoising chain)", "awm": "AWM (advantage-weighted "
                "matching)"}  # fmt: skip


def heldout_changes(rows: list[dict], upto_step: int) -> list[tuple[str, float, float]]:
    """``(key, first, final)`` of every held-out mean in ``rows`` (metrics.jsonl lines): its
    round-0 value and its last one up to round ``upto_step``."""
    kept = [row for row in rows if row["step"] <= upto_step]
    logged = {key for row in kept for key in row}
    keys = sorted(k for k in logged if k.startswith("heldout_") and k.endswith("_mean"))
    changes = []
    for key in keys:
        values = [row[key] for row in kept if key in row]
        changes.append((key, values[0], values[-1]))
    return changes


def model_card(method: str, config: TrainConfig, rows: list[dict], trip: GuardTrip | None,
               flow: bool = False, repo_id: str | None = None,
               best: BestEvaluation | None = None,
               pipeline_class: str = "StableDiffusionPipeline",
               load_kwargs: str = "") -> str:  # fmt: skip
    """The card's markdown for a run of ``method`` with ``config`` that logged ``rows`` (stopped
    by the guard's ``trip``, if any; ``flow``: a UNet trained by flow matching, which diffusers'
    own SD pipeline cannot sample; ``repo_id``: the Hub repository it is pushed to, which the
    loading example then names; ``best``: the best evaluation, when the model holds its weights,
    ``keep_best``; ``pipeline_class``: the diffusers class that loads the folder, with
    ``load_kwargs`` after the folder, such as ``", text_encoder_3=None"``)."""
    last = rows[-1] if rows else {"step": 0, "samples_seen": 0}
    kept_step = trip.passed_step if trip is not None else last["step"]
    if best is not None:
        kept_step = best.step
    adapter = f"{_lora_rank(config)}, merged" if config.use_lora else "full fine-tuning"
    if config.use_lora and config.init_lora:
        adapter = f"{_lora_rank(config)} started from `{config.init_lora}`, merged"
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {config.model}",
        f"tags: [diffalign, {method}, text-to-image, stable-diffusion, reward-fine-tuning]",
        "---",
        "",
        f"# {method.upper()} fine-tune of {config.model}",
        "",
        f"Trained with diffalign by {METHOD_NAMES.get(method, method)} on the reward "
        f"`{config.reward}`: {last['step']} rounds, {last['samples_seen']} sampled images "
        f"({config.prompts_per_step} prompts x {config.samples_per_prompt} images a round, "
        f"prompts from `{config.prompts}`), {adapter}, learning rate {config.learning_rate:g}, "
        f"seed {config.seed}. Sample it with {config.num_inference_steps} steps at CFG "
        f"{config.guidance_scale:g}{_negative(config)}, as it was trained and evaluated.",
        "",
    ]
    if trip is not None:
        lines += [f"Stopped early by the {trip.message()}.", ""]
    if best is not None:
        lines += [f"This model holds the weights of {best.describe()} among the run's held-out "
                  "evaluations (`keep_best`).", ""]  # fmt: skip
    changes = heldout_changes(rows, kept_step)
    if changes:
        lines += [
            f"Held-out evaluation (`{config.heldout_prompts}`, {config.num_heldout_prompts} "
            f"prompts x {config.heldout_samples_per_prompt} images, deterministic DDIM):",
            "",
            f"| metric | round 0 | this model (round {kept_step}) |",
            "|---|---|---|",
            *(f"| {key} | {first:.4g} | {final:.4g} |" for key, first, final in changes),
            "",
        ]
    folder = f'"{repo_id}"' if repo_id else '"path/to/this/folder"'
    if flow:
        load = ["from diffalign.pipelines.rollout import RolloutPipeline", "",
                f"pipe = RolloutPipeline.from_pretrained({folder})",
                "images = pipe(prompts, eta=0.0).images  # Euler steps"]  # fmt: skip
    else:
        load = [f"from diffusers import {pipeline_class}", "",
                f"pipe = {pipeline_class}.from_pretrained({folder}{load_kwargs})"]  # fmt: skip
    kohya = "; `kohya_lora.safetensors`, the same adapter for A1111 / ComfyUI"
    if pipeline_class.startswith("StableDiffusion3"):  # an SD3 adapter: diffusers' format only
        kohya = ""
    lines += ["```python", *load, "```", "",
              "The run's settings are in `training.json`; the LoRA adapter alone, when trained "
              f"with LoRA, in {'this repository' if repo_id else 'the run folder'}'s `lora/` "
              f"(`pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`{kohya}).",
              ""]  # fmt: skip
    return "\n".join(lines)


def _negative(config: TrainConfig) -> str:
    """The card's words for the run's negative prompt (none when it had diffusers' default)."""
    return (
        ""
        if config.negative_prompt is None
        else f" with the negative prompt {config.negative_prompt!r}"
    )


def _lora_rank(config: TrainConfig) -> str:
    """The adapter's rank for the card (``LoRA rank 16``), with the span when some layers have
    other ranks."""
    ranks = sorted({config.lora_rank, *config.lora_rank_pattern.values()})
    by_layer = f" ({ranks[0]} to {ranks[-1]} by layer)" if len(ranks) > 1 else ""
    return f"LoRA rank {config.lora_rank}{by_layer}"
