"""DDPO: PPO-clip on the stochastic DDIM chain (Black et al. 2023).

Each round's rollouts are replayed for ``num_inner_epochs``: samples are shuffled, and every sample
gets its own shuffled order of denoising steps, of which the first ``timestep_fraction`` are
trained. For each micro-batch, the log-probs of the stored transitions are recomputed under the
current policy (with CFG when ``train_cfg``) and :func:`~diffalign.train.losses.ddpo_loss` is
accumulated over the trained steps before one optimizer step. With ``beta_kl > 0`` each trained
step also pays ``beta_kl`` times its KL to the reference policy (the adapter-disabled network,
or the starting weights under full fine-tuning) at the same point, as Flow-GRPO does. With
``sde_window = k > 0`` a round's chains are stochastic only on ``k`` consecutive steps at a
random place (the same for the round) and deterministic elsewhere, and only those steps are
trained: Flow-GRPO-Fast's way of spending the update on a few steps (reconstructed, not its
code: where it places the window may differ).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.pipelines.rollout import Rollout, guided_noise_prediction
from diffalign.sampling import DDIMStepOutput
from diffalign.train.advantages import PerPromptStatTracker
from diffalign.train.config import DDPOConfig
from diffalign.train.losses import LossOutput, ddpo_loss, step_kl
from diffalign.train.trainer import RoundBatch, Trainer, derive_seed, mean_diagnostics

if TYPE_CHECKING:
    from torch import nn


class DDPOTrainer(Trainer):
    """DDPO with per-prompt advantage normalisation (see the module docstring)."""

    method = "ddpo"
    config: DDPOConfig

    def __init__(self, config: DDPOConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.component_trackers = {  # reward_balance: advantages tracks each component's own
            name: PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
            for name in (self.reward_parts if config.reward_balance == "advantages" else [])
        }

    def compute_advantages(
        self, prompts: list[str], rewards: Tensor, key: str = "reward"
    ) -> Tensor:
        if self.config.per_prompt_stat_tracking:
            tracker = self.tracker if key == "reward" else self.component_trackers[key]
            return tracker.update(prompts, rewards)
        values = rewards.float()
        return (values - values.mean()) / (values.std(unbiased=False) + 1e-6)

    def extra_states(self) -> dict:
        components = {name: t.state_dict() for name, t in self.component_trackers.items()}
        return {"tracker": self.tracker.state_dict(), "component_trackers": components}

    def load_extra_states(self, states: dict) -> None:
        self.tracker.load_state_dict(states["tracker"])
        for name, state in states.get("component_trackers", {}).items():
            if name in self.component_trackers:
                self.component_trackers[name].load_state_dict(state)

    def transition_log_probs(self, rollout: Rollout, index: Tensor, steps: Tensor) -> Tensor:
        """Log-probs under the current policy of the stored transitions of samples ``index`` at
        their chain positions ``steps`` (one per sample), with CFG when ``train_cfg``."""
        return self.transition(self.model, rollout, index, steps).log_prob

    def transition(
        self, model: nn.Module, rollout: Rollout, index: Tensor, steps: Tensor
    ) -> DDIMStepOutput:
        """``model``'s step (mean, std and the stored transition's log-prob) at the chain
        positions ``steps`` of samples ``index``."""
        rows = torch.arange(len(index))
        chain = rollout.latents[index]
        latents, next_latents = chain[rows, steps], chain[rows, steps + 1]
        # the UNet embeds (B,) timesteps on their own device: keep them with the latents
        timesteps = rollout.timesteps.to(latents.device)[steps.to(latents.device)]
        negative = rollout.negative_conditioning(index) if self.config.train_cfg else None
        with self.autocast():
            noise_pred = guided_noise_prediction(model, latents, timesteps,
                                                 rollout.conditioning(index), negative,
                                                 rollout.guidance_scale)  # fmt: skip
        landing = self.schedule.following_timesteps(rollout.timesteps, rollout.num_inference_steps)
        next_timesteps = landing.to(latents.device)[steps.to(latents.device)]
        return self.schedule.step(noise_pred, timesteps, latents, next_timesteps, rollout.eta,
                                  prev_sample=next_latents)  # fmt: skip

    def rollout_options(self, step: int) -> dict:
        """Round ``step``'s stochastic window (``sde_window`` > 0), drawn from the run's seed."""
        window, steps = self.config.sde_window, self.config.num_inference_steps
        if window == 0:
            return {}
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, step, "window"))
        start = int(torch.randint(0, steps - window + 1, (1,), generator=generator))
        return {"stochastic_steps": range(start, start + window)}

    def chain_step_weights(self, rollout: Rollout) -> Tensor:
        """The loss weight of each chain step (T,): 1 with ``step_weighting="uniform"``; with
        ``"noise"`` the step's noise level over its mean along the chain.

        A step's log-prob gradient scales as 1 / std (its Gaussian's score), so unweighted the
        last, nearly deterministic steps (std 0.03 against 0.2-1 before them on the shipped model)
        dominate an update although the early ones set the layout; weighting by std evens that
        out (TempFlow-GRPO's noise-aware weighting)."""
        count = len(rollout.timesteps)
        if self.config.step_weighting == "uniform":
            return torch.ones(count)
        landing = self.schedule.following_timesteps(rollout.timesteps, rollout.num_inference_steps)
        zeros = torch.zeros(count, 1, 1, 1)  # a step's std depends on the schedule alone
        std = self.schedule.step(zeros, rollout.timesteps.cpu(), zeros, landing.cpu(), rollout.eta,
                                 prev_sample=zeros).std  # fmt: skip
        std = torch.as_tensor(std, dtype=torch.float32).expand(count, 1, 1, 1).flatten()
        return std / std.mean()

    def step_loss(self, rollout: Rollout, advantages: Tensor, index: Tensor, steps: Tensor,
                  step_weights: Tensor | None = None) -> LossOutput:  # fmt: skip
        """The PPO loss of samples ``index`` at their chain positions ``steps`` (one per sample),
        each weighted by ``step_weights[step]`` (default 1)."""
        reference_mean = None
        if self.config.beta_kl > 0:  # before the policy's forward, as AWM's reference
            with torch.no_grad(), self.reference() as reference:
                reference_mean = self.transition(reference, rollout, index, steps).mean
        step = self.transition(self.model, rollout, index, steps)
        kl = None if reference_mean is None else step_kl(step.mean, reference_mean, step.std)
        weights = None if step_weights is None else step_weights[steps].to(step.log_prob.device)
        return ddpo_loss(step.log_prob, rollout.log_probs[index, steps], advantages[index],
                         self.config.clip_range, self.config.adv_clip_max, weights, kl,
                         self.config.beta_kl)  # fmt: skip

    def train_on(self, batch: RoundBatch, step: int) -> dict[str, float]:
        config, rollout = self.config, batch.rollout
        generator = torch.Generator().manual_seed(derive_seed(config.seed, step, self.rank, "ppo"))
        count = len(rollout)
        positions = torch.tensor(rollout.stochastic_steps or range(len(rollout.timesteps)))
        trained_steps = max(1, int(len(positions) * config.timestep_fraction))
        step_weights = self.chain_step_weights(rollout)
        diagnostics = []
        for _ in range(config.num_inner_epochs):
            orders = torch.stack([positions[torch.randperm(len(positions), generator=generator)]
                                  for _ in range(count)])  # fmt: skip
            for group in self.micro_batches(count, generator):
                parts = len(group) * trained_steps
                for position, index in enumerate(group):
                    for j in range(trained_steps):
                        out: LossOutput = self.step_loss(
                            rollout, batch.advantages, index, orders[index, j], step_weights
                        )
                        last = position == len(group) - 1 and j == trained_steps - 1
                        self.backward(out.loss / parts, sync=last)
                        diagnostics.append({"loss": out.loss.item(), **out.diagnostics})
                self.optimizer_step()
        return mean_diagnostics(diagnostics)
