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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from diffalign.flow import is_flow_scheduler
from diffalign.models import as_ddim_scheduler
from diffalign.sampling import load_schedule


@dataclass
class Rollout:
    """A batch of sampled denoising chains.

    Attributes:
        prompts: one prompt per sample.
        images: decoded images in [0, 1], (B, 3, H, W), float32 (None when not decoded).
        latents: (B, T + 1, C, h, w): the starting noise first, the final latent last.
        timesteps: (T,) the timestep of each step (the chain goes from ``latents[:, i]`` at
            ``timesteps[i]`` to ``latents[:, i + 1]``).
        log_probs: (B, T) float32 log-prob of each step (mean over latent dims), or None at eta 0.
        prompt_embeds: (B, L, D) text conditioning.
        negative_prompt_embeds: (B, L, D) unconditional embeddings, or None without CFG.
        guidance_scale, eta, num_inference_steps: how the chain was sampled.
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

    def __len__(self) -> int:
        return self.latents.shape[0]

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


def draw_noise(shape, generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor`` draws it (lists: per sample)."""
    if isinstance(generator, list):
        rows = [draw_noise((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(rows)
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def guided_noise_prediction(
    unet,
    latents: Tensor,
    timestep: Tensor | int,
    prompt_embeds: Tensor,
    negative_prompt_embeds: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """The UNet's output with classifier-free guidance as diffusers applies it (one UNet batch).

    ``timestep`` is one value for the batch or one per sample (shape (B,)).
    """
    if negative_prompt_embeds is None:
        return unet(latents, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    if isinstance(timestep, Tensor) and timestep.ndim == 1 and timestep.numel() > 1:
        timestep = torch.cat([timestep, timestep])
    both = unet(
        torch.cat([latents, latents]), timestep,
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        return_dict=False,
    )[0]  # fmt: skip
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class RolloutPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose call returns a :class:`Rollout` (see the module doc)."""

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
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        decode: bool = True,
    ) -> Rollout:
        """Sample ``num_images_per_prompt`` chains per prompt with the DDIM step at ``eta``.

        Arguments follow ``StableDiffusionPipeline.__call__``; ``eta`` defaults to 1 (DDPO) and
        ``decode=False`` skips the VAE (``images`` is then None). Another scheduler (SD1.5 ships
        PNDM) is replaced by a ``DDIMScheduler`` with the same config; a flow-matching one is
        kept (see the module doc). The progress bar follows the pipeline's
        ``set_progress_bar_config``.
        """
        self.scheduler = as_ddim_scheduler(self.scheduler)  # e.g. SD1.5's PNDM
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds,
                          negative_prompt_embeds)  # fmt: skip
        if isinstance(prompt, str):
            prompt = [prompt]
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        use_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, use_cfg, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        )  # fmt: skip
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        schedule = load_schedule(self.scheduler)
        landing = schedule.following_timesteps(timesteps, num_inference_steps)
        sample = self.prepare_latents(
            batch * num_images_per_prompt, self.unet.config.in_channels, height, width,
            prompt_embeds.dtype, device, generator, latents,
        )  # fmt: skip
        chain, log_probs = [sample], []
        for t, t_next in zip(self.progress_bar(timesteps), landing, strict=True):
            noise_pred = guided_noise_prediction(
                self.unet, sample, t, prompt_embeds,
                negative_prompt_embeds if use_cfg else None, guidance_scale,
            )  # fmt: skip
            noise = draw_noise(sample.shape, generator, device, sample.dtype) if eta > 0 else None
            step = schedule.step(noise_pred, t, sample, t_next, eta=eta, noise=noise)
            sample = step.prev_sample
            chain.append(sample)
            if step.log_prob is not None:
                log_probs.append(step.log_prob.float())
        prompts = [p for p in (prompt or [""] * batch) for _ in range(num_images_per_prompt)]
        return Rollout(
            prompts=prompts,
            images=self.decode_to_images(sample) if decode else None,
            latents=torch.stack(chain, dim=1),
            timesteps=timesteps.clone(),
            log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds if use_cfg else None,
            guidance_scale=guidance_scale,
            eta=eta,
            num_inference_steps=num_inference_steps,
        )


def plain_sampling_pipeline(pipeline: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """``pipeline`` itself, or for a flow-matching model a :class:`RolloutPipeline` over the same
    components: diffusers' ``StableDiffusionPipeline`` cannot step a flow scheduler (it lacks
    ``scale_model_input``), the rollout pipeline can. Set its progress bar after this call."""
    if not is_flow_scheduler(pipeline.scheduler) or isinstance(pipeline, RolloutPipeline):
        return pipeline
    return RolloutPipeline(**pipeline.components, requires_safety_checker=False)


def sample_images(pipeline: StableDiffusionPipeline, prompt: str | list[str], *,
                  eta: float = 0.0, **call_kwargs) -> Tensor:  # fmt: skip
    """Images (N, 3, H, W) in [0, 1] from a ``StableDiffusionPipeline`` or a
    :class:`RolloutPipeline` (flow models), called with ``call_kwargs`` (steps, guidance scale,
    generator, ...) and DDIM's ``eta`` (on a flow model: Euler at 0, else the SDE's noise level)."""
    if isinstance(pipeline, RolloutPipeline):
        return pipeline(prompt, eta=eta, **call_kwargs).images
    return pipeline(prompt, eta=eta, output_type="pt", **call_kwargs).images
