"""Rollouts for online RL: Stable Diffusion sampling that keeps what a trainer learns from.

``RolloutPipeline`` subclasses diffusers' ``StableDiffusionPipeline`` (so ``from_pretrained``,
``save_pretrained``, LoRA loading and ``.to()`` work as usual) and samples with the stochastic DDIM
step of :mod:`diffalign.sampling`. Its call returns a :class:`Rollout`: the latent after every
step, the timesteps, each step's log-prob under the sampling policy (free: the step's Gaussian is
already computed), the prompt embeddings and the decoded images. With ``eta=0`` its images equal
``StableDiffusionPipeline`` with a ``DDIMScheduler`` under the same seed.

A UNet trained with flow matching (its scheduler a ``FlowMatchEulerDiscreteScheduler``) keeps its
scheduler and samples with the flow step of :mod:`diffalign.flow` instead: Euler at ``eta=0``,
Flow-GRPO's SDE with log-probs at ``eta > 0``.

``SDXLRolloutPipeline`` does the same for SDXL (subclassing ``StableDiffusionXLPipeline``); its
rollouts also carry SDXL's added conditioning (:mod:`diffalign.pipelines.conditioning`), which the
trainers pass back to the UNet. ``SD3RolloutPipeline`` does it for Stable Diffusion 3 / 3.5
(subclassing ``StableDiffusion3Pipeline``): a flow-matching MMDiT transformer, sampled with the
flow step like a flow-matching UNet, its rollouts carrying SD3's pooled embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import Tensor

from diffalign.flow import is_flow_scheduler
from diffalign.models import as_ddim_scheduler, denoiser_of, family_counterpart, pipeline_family
from diffalign.pipelines.conditioning import (
    Conditioning,
    as_conditioning,
    encode_conditioning,
    negative_prompts,
)
from diffalign.sampling import load_schedule

if TYPE_CHECKING:
    from torch import nn

    from diffalign.pipelines.chain import Generators


@dataclass
class Rollout:
    """A batch of sampled denoising chains.

    Attributes:
        prompts: one prompt per sample.
        images: decoded images in [0, 1], (B, 3, H, W), float32 (None when not decoded).
        latents: (B, T + 1, C, h, w): the starting noise first, the final latent last.
        timesteps: (T,) the timestep of each step (the chain goes from ``latents[:, i]`` at
            ``timesteps[i]`` to ``latents[:, i + 1]``).
        log_probs: (B, T) float32 log-prob of each step (mean over latent dims), or None at eta 0;
            NaN at the steps taken deterministically (see ``stochastic_steps``).
        prompt_embeds: (B, L, D) text conditioning.
        negative_prompt_embeds: (B, L, D) unconditional embeddings, or None without CFG.
        guidance_scale, eta, num_inference_steps: how the chain was sampled.
        pooled_prompt_embeds, negative_pooled_prompt_embeds, add_time_ids: SDXL's added
            conditioning, (B, P), (B, P) or None without CFG, and (B, 6); None for SD 1.x/2.x.
            SD3's rollouts carry the pooled embeddings without time ids.
        stochastic_steps: the chain positions sampled at ``eta`` (the others at eta 0), or None
            for all of them.
    """

    prompts: list[str]
    images: Tensor | None
    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor | None
    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None
    guidance_scale: float
    eta: float
    num_inference_steps: int
    pooled_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None
    stochastic_steps: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def conditioning(self, index: Tensor | Sequence[int] | slice = slice(None)) -> Conditioning:
        """The denoiser's conditioning of the samples at ``index`` (all by default)."""
        whole = Conditioning(self.prompt_embeds, self.pooled_prompt_embeds, self.add_time_ids)
        return whole.select(index)

    def negative_conditioning(
        self, index: Tensor | Sequence[int] | slice = slice(None)
    ) -> Conditioning | None:
        """The unconditional (CFG) conditioning of the samples at ``index``; None without CFG."""
        if self.negative_prompt_embeds is None:
            return None
        whole = Conditioning(
            self.negative_prompt_embeds, self.negative_pooled_prompt_embeds, self.add_time_ids
        )
        return whole.select(index)

    def select(self, index: Tensor | Sequence[int] | slice) -> Rollout:
        """The samples at ``index`` (a slice, indices or a boolean mask), as a new ``Rollout``."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device="cpu")
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "prompts":
                value = value[index] if isinstance(index, slice) else [value[i] for i in index]
            elif isinstance(value, Tensor) and item.name != "timesteps":
                value = value[index.to(value.device) if isinstance(index, Tensor) else index]
            values[item.name] = value
        return Rollout(**values)

    @staticmethod
    def concat(rollouts: Sequence[Rollout]) -> Rollout:
        """Join rollouts sampled with the same settings along the batch."""
        first = rollouts[0]
        values = {}
        for item in fields(first):
            parts = [getattr(r, item.name) for r in rollouts]
            if item.name == "prompts":
                values[item.name] = [p for part in parts for p in part]
            elif item.name == "timesteps" or not isinstance(parts[0], Tensor):
                values[item.name] = parts[0]
            else:
                values[item.name] = torch.cat(parts)
        return Rollout(**values)


def draw_noise(
    shape: tuple[int, ...], generator: Generators | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor`` draws it (lists: per sample)."""
    if isinstance(generator, list):
        rows = [draw_noise((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(rows)
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def guided_noise_prediction(
    unet: nn.Module,
    latents: Tensor,
    timestep: Tensor | int,
    prompt_embeds: Tensor | Conditioning,
    negative_prompt_embeds: Tensor | Conditioning | None,
    guidance_scale: float,
) -> Tensor:
    """The denoiser's output with classifier-free guidance as diffusers applies it (one batch).

    ``unet`` is the UNet, or SD3's transformer. ``timestep`` is one value for the batch or one
    per sample (shape (B,)). The conditioning is text token states (SD 1.x/2.x) or a
    :class:`Conditioning` (SDXL's and SD3's added conditioning too).
    """
    conditioning = as_conditioning(prompt_embeds)
    if negative_prompt_embeds is None:
        return conditioning.predict(unet, latents, timestep)
    if isinstance(timestep, Tensor) and timestep.ndim == 1 and timestep.numel() > 1:
        timestep = torch.cat([timestep, timestep])
    both = Conditioning.cat([as_conditioning(negative_prompt_embeds), conditioning])
    uncond, cond = both.predict(unet, torch.cat([latents, latents]), timestep).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def decode_latents(pipeline: DiffusionPipeline, latents: Tensor) -> Tensor:
    """``pipeline``'s VAE decoding of ``latents`` to images in [0, 1] (float32), undoing the
    latent space's scaling and (SD3) shift. An SDXL pipeline's float16 VAE that asks for it
    (``force_upcast``: SDXL's overflows in float16) decodes in float32, as diffusers' SDXL
    pipeline does."""
    vae = pipeline.vae
    upcast = (pipeline_family(pipeline) == "sdxl" and vae.dtype == torch.float16
              and vae.config.force_upcast)  # fmt: skip
    if upcast:
        vae.to(torch.float32)
    try:
        scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        scaled = scaled + (vae.config.get("shift_factor") or 0.0)
        decoded = vae.decode(scaled, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


class _RolloutSampling:
    """The sampling loop of the rollout pipelines, mixed in before diffusers' SD, SDXL or SD3
    pipeline class (which supplies the components, ``encode_prompt`` and ``check_inputs``)."""

    default_guidance_scale = 7.5
    latents_dtype: torch.dtype | None = None
    """The dtype of the sampled chain; None: the text embeddings' (diffusers' choice). A trainer
    whose text encoders run in half precision sets float32, which its log-probs need."""
    text_encoder_device: torch.device | None = None
    """Where prompts are encoded; None: where the pipeline runs. A trainer that keeps the text
    encoders on the CPU (``offload_text_encoders``) sets it."""
    chain_denoiser: nn.Module | None = None
    """The module the chain calls in place of the pipeline's UNet (or transformer): a compiled
    wrapper of it, sharing its weights (``torch.compile(pipeline.unet)``). None: the denoiser
    itself. A trainer under accelerate's dynamo setting sets it."""

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device,
                        generator, latents=None):  # fmt: skip
        """diffusers' starting noise; flow schedulers (no ``init_noise_sigma``) start at unit
        noise, drawn the same way."""
        if not is_flow_scheduler(self.scheduler):
            return super().prepare_latents(batch_size, num_channels_latents, height, width, dtype,
                                           device, generator, latents)  # fmt: skip
        if latents is not None:
            return latents.to(device)
        scale = self.vae_scale_factor
        shape = (batch_size, num_channels_latents, height // scale, width // scale)
        return draw_noise(shape, generator, device, dtype)

    def decode_to_images(self, latents: Tensor) -> Tensor:
        """Latents → images in [0, 1] (float32), as diffusers' ``output_type="pt"`` gives."""
        return decode_latents(self, latents)

    def _default_size(self) -> int:
        return denoiser_of(self).config.sample_size * self.vae_scale_factor

    def _check_call(self, prompt, height, width, negative_prompt, prompt_embeds,
                    negative_prompt_embeds, pooled: dict) -> None:  # fmt: skip
        """diffusers' input checks for this pipeline's kind (SD, SDXL or SD3)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        eta: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        decode: bool = True,
        stochastic_steps: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample ``num_images_per_prompt`` chains per prompt with the DDIM step at ``eta``.

        Arguments follow diffusers' ``StableDiffusionPipeline.__call__`` (SDXL and SD3: those
        of their pipelines, ``prompt`` feeding every text encoder, with the pooled embeddings);
        ``guidance_scale`` defaults to diffusers' (7.5, SDXL 5.0, SD3 7.0), ``eta`` to 1
        (DDPO), and ``decode=False`` skips the VAE (``images`` is then None). Another scheduler
        (SD1.5 ships PNDM, SDXL Euler) is replaced by a ``DDIMScheduler`` with the same config;
        a flow-matching one is kept (see the module doc). ``stochastic_steps`` (chain
        positions, 0 first) samples only those steps at ``eta`` and the others deterministically
        (eta 0), as Flow-GRPO-Fast confines its SDE to a few steps: their log-probs are NaN. The
        progress bar follows the pipeline's ``set_progress_bar_config``.
        """
        height, width = height or self._default_size(), width or self._default_size()
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        pooled = {"pooled_prompt_embeds": pooled_prompt_embeds,
                  "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}  # fmt: skip
        self._check_call(prompt, height, width, negative_prompt, prompt_embeds,
                         negative_prompt_embeds, pooled)  # fmt: skip
        self.scheduler = as_ddim_scheduler(self.scheduler)  # e.g. SD1.5's PNDM, SDXL's Euler
        if isinstance(prompt, str):
            prompt = [prompt]
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        use_cfg = guidance_scale > 1.0
        conditioning, negative = encode_conditioning(
            self, prompt, device, num_images_per_prompt, use_cfg, negative_prompt, height, width,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **pooled,
        )  # fmt: skip
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        sample = self.prepare_latents(
            batch * num_images_per_prompt, denoiser_of(self).config.in_channels, height, width,
            self.latents_dtype or conditioning.embeds.dtype, device, generator, latents,
        )  # fmt: skip
        steps = None if stochastic_steps is None else tuple(sorted(set(stochastic_steps)))
        if steps is not None and (not steps or steps[0] < 0 or steps[-1] >= len(timesteps)):
            raise ValueError(f"stochastic_steps must be chain positions in [0, {len(timesteps)}) "
                             f"(at least one), got {stochastic_steps!r}.")  # fmt: skip
        etas = [eta if steps is None or i in steps else 0.0 for i in range(len(timesteps))]
        chain, log_probs = self._denoise(sample, timesteps, conditioning, negative,
                                         guidance_scale, etas, generator)  # fmt: skip
        prompts = [p for p in (prompt or [""] * batch) for _ in range(num_images_per_prompt)]
        return Rollout(
            prompts=prompts,
            images=self.decode_to_images(chain[:, -1]) if decode else None,
            latents=chain,
            timesteps=timesteps.clone(),
            log_probs=log_probs,
            prompt_embeds=conditioning.embeds,
            negative_prompt_embeds=None if negative is None else negative.embeds,
            guidance_scale=guidance_scale,
            eta=eta,
            num_inference_steps=num_inference_steps,
            pooled_prompt_embeds=conditioning.pooled,
            negative_pooled_prompt_embeds=None if negative is None else negative.pooled,
            add_time_ids=conditioning.time_ids,
            stochastic_steps=steps,
        )

    def _denoise(self, sample: Tensor, timesteps: Tensor, conditioning: Conditioning,
                 negative: Conditioning | None, guidance_scale: float, etas: list[float],
                 generator) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """The chain from ``sample`` over ``timesteps``, step ``i`` at ``etas[i]``: latents
        (B, T + 1, ...) and each step's log-prob (B, T), NaN at deterministic steps (None when
        every step is)."""
        schedule = load_schedule(self.scheduler)
        landing = schedule.following_timesteps(timesteps, len(timesteps))
        chain, log_probs = [sample], []
        denoiser = denoiser_of(self) if self.chain_denoiser is None else self.chain_denoiser
        for t, t_next, eta in zip(self.progress_bar(timesteps), landing, etas, strict=True):
            noise_pred = guided_noise_prediction(
                denoiser, sample, t, conditioning, negative, guidance_scale
            )
            noise = None
            if eta > 0:
                noise = draw_noise(sample.shape, generator, sample.device, sample.dtype)
            step = schedule.step(noise_pred, t, sample, t_next, eta=eta, noise=noise)
            sample = step.prev_sample
            chain.append(sample)
            if step.log_prob is None:  # a deterministic step
                log_probs.append(torch.full((len(sample),), float("nan"), device=sample.device))
            else:
                log_probs.append(step.log_prob.float())
        if all(eta == 0 for eta in etas):
            return torch.stack(chain, dim=1), None
        return torch.stack(chain, dim=1), torch.stack(log_probs, dim=1)


class RolloutPipeline(_RolloutSampling, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose call returns a :class:`Rollout` (see the module doc)."""

    def _check_call(self, prompt, height, width, negative_prompt, prompt_embeds,
                    negative_prompt_embeds, pooled: dict) -> None:  # fmt: skip
        if any(value is not None for value in pooled.values()):
            raise ValueError(
                "pooled_prompt_embeds are SDXL's added conditioning; this is an SD 1.x/2.x "
                "pipeline, whose UNet takes the text states (prompt_embeds) alone."
            )
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds,
                          negative_prompt_embeds)  # fmt: skip


class SDXLRolloutPipeline(_RolloutSampling, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` whose call returns a :class:`Rollout` with SDXL's added
    conditioning (pooled embeddings and time ids); otherwise as :class:`RolloutPipeline`. A
    float16 VAE decodes in float32, as diffusers' SDXL pipeline does."""

    default_guidance_scale = 5.0

    def _check_call(self, prompt, height, width, negative_prompt, prompt_embeds,
                    negative_prompt_embeds, pooled: dict) -> None:  # fmt: skip
        self.check_inputs(prompt, None, height, width, None, negative_prompt, None, prompt_embeds,
                          negative_prompt_embeds, pooled["pooled_prompt_embeds"],
                          pooled["negative_pooled_prompt_embeds"])  # fmt: skip


class SD3RolloutPipeline(_RolloutSampling, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose call returns a :class:`Rollout` with SD3's pooled
    embeddings; otherwise as :class:`RolloutPipeline`, its flow-matching scheduler stepped by
    :mod:`diffalign.flow` (Euler at ``eta=0``, as diffusers samples SD3; Flow-GRPO's SDE with
    log-probs at ``eta > 0``). A T5 encoder is optional, as in diffusers (zeros in its place)."""

    default_guidance_scale = 7.0

    def _check_call(self, prompt, height, width, negative_prompt, prompt_embeds,
                    negative_prompt_embeds, pooled: dict) -> None:  # fmt: skip
        self.check_inputs(prompt, None, None, height, width, negative_prompt, None, None,
                          prompt_embeds, negative_prompt_embeds, pooled["pooled_prompt_embeds"],
                          pooled["negative_pooled_prompt_embeds"])  # fmt: skip


# their counterparts for SDXL and SD3 folders (models.family_counterpart, load_pipeline)
RolloutPipeline.sdxl_pipeline_class = SDXLRolloutPipeline
RolloutPipeline.sd3_pipeline_class = SD3RolloutPipeline


def over_components(
    pipeline: DiffusionPipeline, sd_class: type[DiffusionPipeline], **components
) -> DiffusionPipeline:
    """A ``sd_class`` pipeline (its SDXL or SD3 counterpart,
    :func:`diffalign.models.family_counterpart`, when ``pipeline`` is SDXL or SD3) over
    ``pipeline``'s components, any of them replaced by ``components``."""
    components = {**pipeline.components, **components}
    family = pipeline_family(pipeline)
    counterpart = family_counterpart(sd_class, family)
    if counterpart is None:
        raise ValueError(f"{sd_class.__name__} has no counterpart for {family} pipelines.")
    if family == "sdxl":
        zeros = pipeline.config.force_zeros_for_empty_prompt
        return counterpart(**components, force_zeros_for_empty_prompt=zeros)
    if family == "sd3":
        return counterpart(**components)
    return sd_class(**components, requires_safety_checker=False)


def plain_pipeline(
    pipeline: DiffusionPipeline, **components
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline:
    """diffusers' own ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
    ``StableDiffusion3Pipeline`` (whichever ``pipeline`` is, or extends) over ``pipeline``'s
    components, any of them replaced by ``components``: what ``final/`` folders are saved as, so
    that diffusers loads them without diffalign."""
    return over_components(pipeline, StableDiffusionPipeline, **components)


def rollout_pipeline(
    pipeline: DiffusionPipeline,
) -> RolloutPipeline | SDXLRolloutPipeline | SD3RolloutPipeline:
    """``pipeline`` itself when it is a rollout pipeline, else the rollout pipeline (SD, SDXL or
    SD3) over its components."""
    if isinstance(pipeline, _RolloutSampling):
        return pipeline
    return over_components(pipeline, RolloutPipeline)


def plain_sampling_pipeline(pipeline: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """``pipeline`` itself, or for a flow-matching model a rollout pipeline over the same
    components: diffusers' ``StableDiffusionPipeline`` cannot step a flow scheduler (it lacks
    ``scale_model_input``), the rollout pipeline can. Set its progress bar after this call."""
    if not is_flow_scheduler(pipeline.scheduler):
        return pipeline
    return rollout_pipeline(pipeline)


def sample_images(pipeline: StableDiffusionPipeline, prompt: str | list[str], *,
                  eta: float = 0.0, **call_kwargs) -> Tensor:  # fmt: skip
    """Images (N, 3, H, W) in [0, 1] from a ``StableDiffusionPipeline`` or a
    :class:`RolloutPipeline` (flow models), called with ``call_kwargs`` (steps, guidance scale,
    generator, ...) and DDIM's ``eta`` (on a flow model: Euler at 0, else the SDE's noise level)."""
    if isinstance(pipeline, _RolloutSampling):
        return pipeline(prompt, eta=eta, **call_kwargs).images
    if "negative_prompt" in call_kwargs:
        call_kwargs["negative_prompt"] = negative_prompts(prompt, call_kwargs["negative_prompt"])
    return pipeline(prompt, eta=eta, output_type="pt", **call_kwargs).images
