"""AWM: advantage-weighted matching (Xue et al. 2025).

The policy's own final latents are the data. For each sample, ``num_train_timesteps`` noise levels
are drawn stratified over ``[min_timestep_fraction * T, timestep_fraction * T)`` with fresh noise,
and the pretraining denoising loss (epsilon or v target for Stable-Diffusion UNets) is weighted
by the sample's group-relative advantage (:func:`~diffalign.train.losses.awm_loss`), plus
``beta_kl`` times the squared distance to the reference network (LoRA disabled; a frozen copy
when fine-tuning fully) and ``beta_ema`` times the distance to a slow EMA of the trained weights.
Rollouts need no log-probs, so any ``eta`` works (default 0, the deterministic DDIM sampler).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.ema import EMA
from diffalign.pipelines.conditioning import Conditioning
from diffalign.pipelines.rollout import guided_noise_prediction
from diffalign.train.advantages import group_advantages, prompt_groups
from diffalign.train.config import AWMConfig
from diffalign.train.losses import LossOutput, awm_loss
from diffalign.train.trainer import RoundBatch, Trainer, derive_seed, mean_diagnostics

if TYPE_CHECKING:
    from diffalign.pipelines.rollout import Rollout


def stratified_timesteps(
    count: int, strata: int, upper: int, generator: torch.Generator | None, lower: int = 0
) -> Tensor:
    """(count, strata) integer timesteps: one uniform draw in each of ``strata`` equal bins of
    ``[lower, upper)`` per sample."""
    edges = torch.linspace(lower, upper, strata + 1)
    low, width = edges[:-1], edges[1:] - edges[:-1]
    draws = low + torch.rand(count, strata, generator=generator) * width
    return draws.long().clamp(lower, upper - 1)


class AWMTrainer(Trainer):
    """AWM with group advantages and KL regularisers (see the module docstring)."""

    method = "awm"
    config: AWMConfig

    def __init__(self, config: AWMConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.kl_ema = EMA(self.trainable, decay=0.0, warmup=False) if config.beta_ema > 0 else None

    def compute_advantages(
        self, prompts: list[str], rewards: Tensor, key: str = "reward"
    ) -> Tensor:
        return group_advantages(
            rewards,
            prompts,
            global_std=self.config.global_std,
            std_floor=self.config.advantage_std_floor,
        )

    def extra_states(self) -> dict:
        return {"kl_ema": self.kl_ema.state_dict()} if self.kl_ema is not None else {}

    def load_extra_states(self, states: dict) -> None:
        if self.kl_ema is not None:
            self.kl_ema.load_state_dict(states["kl_ema"])

    def sample_loss(self, x0: Tensor, embeds: Tensor | Conditioning, advantages: Tensor,
                    timesteps: Tensor, noise: Tensor, negative: Tensor | Conditioning | None = None,
                    guidance_scale: float = 1.0) -> LossOutput:  # fmt: skip
        """AWM loss of clean latents ``x0`` noised with ``noise`` to ``timesteps`` (one each),
        conditioned on ``embeds`` (text token states, or a :class:`Conditioning` for SDXL / SD3).

        With ``negative`` embeddings every prediction (policy, reference, EMA) is the guided one,
        ``uncond + guidance_scale * (cond - uncond)``: the network that sampled the rollouts.
        """
        config = self.config
        point = self.schedule.training_point(x0, noise.to(x0.device, x0.dtype), timesteps)

        def predict(unet) -> Tensor:
            return guided_noise_prediction(unet, point.noisy, point.timestep, embeds, negative,
                                           guidance_scale)  # fmt: skip

        reference = ema_prediction = None
        with torch.no_grad(), self.autocast():  # before the policy's forward: the
            if config.beta_kl > 0:  # EMA swap writes the weights in place
                with self.reference() as unet:
                    reference = predict(unet)
            if self.kl_ema is not None:
                with self.kl_ema.swapped():
                    ema_prediction = predict(self.denoiser)
        with self.autocast():
            prediction = predict(self.model)
        return awm_loss(
            prediction.float(), point.target.float(), advantages, point.noise_level, reference,
            ema_prediction, config.beta_kl, config.beta_ema, config.adv_clip_max, config.weighting,
        )  # fmt: skip

    def noise_plan(
        self, rollout: Rollout, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Per sample, ``num_train_timesteps`` stratified timesteps (B, K) and noises (B, K, ...).

        With ``shared_noise`` every sample of a prompt gets the same timesteps and noise (drawn
        from a seed of the step and the prompt, so processes agree): advantages sum to zero over
        a group, so the part of the gradient that depends only on the noise cancels.
        """
        config = self.config
        total = self.schedule.num_train_timesteps
        upper = max(1, int(total * config.timestep_fraction))
        lower = min(int(total * config.min_timestep_fraction), upper - 1)
        strata, shape = config.num_train_timesteps, rollout.latents.shape[2:]
        if not config.shared_noise:
            timesteps = stratified_timesteps(len(rollout), strata, upper, generator, lower)
            return timesteps, torch.randn((len(rollout), strata, *shape), generator=generator)
        timesteps = torch.empty(len(rollout), strata, dtype=torch.long)
        noise = torch.empty(len(rollout), strata, *shape)
        for prompt, index in prompt_groups(rollout.prompts).items():
            shared = torch.Generator().manual_seed(derive_seed(config.seed, step, "awm", prompt))
            timesteps[index] = stratified_timesteps(1, strata, upper, shared, lower)
            noise[index] = torch.randn((1, strata, *shape), generator=shared)
        return timesteps, noise

    def train_on(self, batch: RoundBatch, step: int) -> dict[str, float]:
        config, rollout = self.config, batch.rollout
        generator = torch.Generator().manual_seed(derive_seed(config.seed, step, self.rank, "awm"))
        x0 = rollout.latents[:, -1]
        strata = config.num_train_timesteps
        timesteps, noise = self.noise_plan(rollout, step, generator)
        diagnostics = []
        for group in self.micro_batches(len(rollout), generator):
            parts = len(group) * strata
            for position, index in enumerate(group):
                for k in range(strata):
                    negative = rollout.negative_conditioning(index) if config.train_cfg else None
                    out = self.sample_loss(
                        x0[index], rollout.conditioning(index), batch.advantages[index],
                        timesteps[index, k].to(x0.device), noise[index, k], negative,
                        rollout.guidance_scale,
                    )  # fmt: skip
                    last = position == len(group) - 1 and k == strata - 1
                    self.backward(out.loss / parts, sync=last)
                    diagnostics.append({"loss": out.loss.item(), **out.diagnostics})
            self.optimizer_step()
        if self.kl_ema is not None:  # the paper's "linear" schedule: d = min(cap, 0.001 * step)
            self.kl_ema.decay = min(config.kl_ema_decay, 0.001 * (step + 1))
            self.kl_ema.update()
        return mean_diagnostics(diagnostics)
