"""A stochastic denoising chain with compute accounting, which tree sampling and baselines run on.

A :class:`DenoisingChain` advances latents one stochastic step at a time (DDIM with eta > 0, or
Flow-GRPO's SDE step for a flow-matching schedule), each row at its own position in the chain,
and scores final (or predicted clean) latents with a reward. It counts what
a fair comparison needs: ``nfe``, the UNet rows evaluated (classifier-free guidance doubles the
rows, as it doubles the UNet batch), and ``reward_calls``, the samples scored.

Two chains ship: :class:`PipelineChain` (a Stable Diffusion pipeline, one prompt) and, for tests
with a known answer, :class:`diffalign.pipelines.gaussian_mixture.GaussianMixtureChain`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.pipelines.conditioning import encode_conditioning
from diffalign.pipelines.rollout import decode_latents, draw_noise, guided_noise_prediction
from diffalign.sampling import NoiseSchedule, load_schedule

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

Generators = torch.Generator | list[torch.Generator]
"""One noise stream for a whole batch, or one per row (see :func:`chain_generator`)."""


def chain_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise stream of chain ``index`` under ``seed``.

    Best-of-N, SMC and tree sampling draw their ``k``-th chain from noise, and every step of it,
    from stream ``k``: at one seed they start from the same chains whatever their batch sizes,
    so comparisons between them are paired, and a sample does not change with the batch it was
    drawn in (as diffusers does with a list of generators).
    """
    # A hash, not seed * 2**32 + index: the CPU generator keeps only the low 32 bits of a seed.
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=4).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


def chain_generators(
    seed: int, first: int, count: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """The streams of chains ``first`` to ``first + count - 1`` (see :func:`chain_generator`)."""
    return [chain_generator(seed, index, device) for index in range(first, first + count)]


class DenoisingChain(ABC):
    """``num_steps`` stochastic denoising steps from noise (position 0) to a sample (``num_steps``).

    Subclasses supply :meth:`noise_shape`, :meth:`_predict` (the model's output for a batch at the
    given timesteps) and :meth:`_score`; the step math, the timesteps and the counting live here.
    """

    def __init__(
        self, schedule: NoiseSchedule, timesteps: Tensor, eta: float, rows_per_sample: int
    ):
        if eta <= 0:
            raise ValueError(
                f"Tree sampling and SMC branch the chain, which needs a stochastic sampler: "
                f"eta must be > 0, got {eta} (eta=1 is DDPM-like)."
            )
        self.schedule = schedule
        flow = getattr(schedule, "prediction_type", None) == "flow"  # flow times are fractional
        self.timesteps = timesteps.cpu() if flow else timesteps.long().cpu()
        self.num_steps = len(self.timesteps)
        self.next_timesteps = schedule.following_timesteps(self.timesteps, self.num_steps)
        self.eta = eta
        self.rows_per_sample = rows_per_sample
        self.nfe = 0
        self.reward_calls = 0

    @abstractmethod
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of one latent (without the batch dimension)."""

    @abstractmethod
    def _predict(self, latents: Tensor, timesteps: Tensor) -> Tensor:
        """The model output (as the schedule's prediction type) for each row at its timestep."""

    @abstractmethod
    def _score(self, latents: Tensor) -> Tensor:
        """Reward of each clean latent, shape (B,), float32 on the CPU."""

    def step_cost(self, steps: int = 1) -> int:
        """NFEs that ``steps`` denoising steps of one sample cost."""
        return steps * self.rows_per_sample

    def check_budget(self, budget_nfe: int) -> None:
        """Raise a clear error when ``budget_nfe`` cannot pay for one full chain."""
        full = self.step_cost(self.num_steps)
        if budget_nfe < full:
            raise ValueError(
                f"budget_nfe={budget_nfe} is below one full chain ({full} NFEs: {self.num_steps} "
                f"steps x {self.rows_per_sample} UNet rows, CFG doubles them); raise the budget."
            )

    def initial_noise(self, count: int, generator: Generators) -> Tensor:
        """``count`` draws of the starting noise ``x_T`` (costs no NFE); a list of generators
        draws one row from each."""
        return draw_noise((count, *self.noise_shape()), generator, self.device, self.dtype)

    @torch.no_grad()
    def step(
        self, latents: Tensor, positions: Tensor, generator: Generators
    ) -> tuple[Tensor, Tensor]:
        """Advance each row one step from its chain position (0 = pure noise), its noise drawn
        from ``generator`` (one per row when a list).

        Returns the next latents and the predicted clean latents ``x0`` (what SMC scores).
        """
        positions = positions.long().cpu()
        if positions.min() < 0 or positions.max() >= self.num_steps:
            raise ValueError(f"Chain positions must lie in [0, {self.num_steps}), got {positions}.")
        timesteps = self.timesteps[positions].to(latents.device)
        previous = self.next_timesteps[positions].to(latents.device)
        self.nfe += len(latents) * self.rows_per_sample
        return self._transition(latents, timesteps, previous, generator)

    def _transition(
        self, latents: Tensor, timesteps: Tensor, previous: Tensor, generator: Generators
    ) -> tuple[Tensor, Tensor]:
        """One stochastic step of the model's prediction (DDIM, or Flow-GRPO's SDE step for a
        flow-matching schedule): (next latents, predicted x0)."""
        output = self._predict(latents, timesteps)
        noise = draw_noise(latents.shape, generator, latents.device, latents.dtype)
        out = self.schedule.step(output, timesteps, latents, previous, eta=self.eta, noise=noise)
        return out.prev_sample, out.pred_original_sample.to(latents.dtype)

    @torch.no_grad()
    def score(self, latents: Tensor) -> Tensor:
        """Reward of each clean latent (counted in ``reward_calls``)."""
        self.reward_calls += len(latents)
        return self._score(latents).float().cpu()


class PipelineChain(DenoisingChain):
    """The chain of a Stable Diffusion (SD 1.x/2.x or SDXL) pipeline for one prompt (DDIM; a
    flow-matching UNet keeps its Euler schedule and steps by Flow-GRPO's SDE), with CFG as
    diffusers does it.

    ``reward`` maps (images in [0, 1], prompts) to scores, e.g. a :class:`diffalign.rewards.Reward`.
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        prompt: str,
        reward: Callable[[Tensor, list[str]], Tensor],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        from diffalign.models import as_ddim_scheduler, denoiser_of

        # flow models keep their Euler schedule (stepped by Flow-GRPO's SDE)
        pipeline.scheduler = as_ddim_scheduler(pipeline.scheduler)
        self.pipeline, self.prompt, self.reward = pipeline, prompt, reward
        self.device = pipeline._execution_device
        self.use_cfg = guidance_scale > 1.0
        self.guidance_scale = guidance_scale
        scale = pipeline.vae_scale_factor
        self.denoiser = denoiser_of(pipeline)  # the UNet, or SD3's transformer
        height = height or self.denoiser.config.sample_size * scale
        width = width or self.denoiser.config.sample_size * scale
        self.latent_size = (height // scale, width // scale)
        self.conditioning, self.negative_conditioning = encode_conditioning(
            pipeline, prompt, self.device, 1, self.use_cfg, negative_prompt, height, width
        )
        self.dtype = self.conditioning.embeds.dtype
        pipeline.scheduler.set_timesteps(num_inference_steps, device=self.device)
        super().__init__(
            load_schedule(pipeline.scheduler), pipeline.scheduler.timesteps, eta,
            rows_per_sample=2 if self.use_cfg else 1,
        )  # fmt: skip

    def noise_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, *self.latent_size)

    def _predict(self, latents: Tensor, timesteps: Tensor) -> Tensor:
        rows, negative = len(latents), self.negative_conditioning
        return guided_noise_prediction(
            self.denoiser, latents, timesteps, self.conditioning.expand(rows),
            None if negative is None else negative.expand(rows), self.guidance_scale,
        )  # fmt: skip

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images in [0, 1] (float32)."""
        return decode_latents(self.pipeline, latents)

    def _score(self, latents: Tensor) -> Tensor:
        images = self.decode(latents.to(self.device))
        return self.reward(images, [self.prompt] * len(images))
