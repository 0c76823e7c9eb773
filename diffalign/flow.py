"""The math of one denoising step for flow-matching (rectified-flow) models.

The counterpart of :mod:`diffalign.sampling` for models trained with the flow-matching loss, in
the convention of ``diffusers.FlowMatchEulerDiscreteScheduler`` (Stable Diffusion 3, FLUX, and
UNets trained the same way): ``x_t = (1 - t) * x0 + t * noise`` with ``t`` (the scheduler's
*sigma*) in [0, 1], velocity target ``noise - x0``, and the network called with the timestep
``t * num_train_timesteps``.

:class:`FlowSchedule` exposes the same interface as :class:`~diffalign.sampling.NoiseSchedule`
(``step``, ``following_timesteps``, ``training_point``), so rollouts and trainers handle both
families through one code path. Its stochastic step is the SDE of Flow-GRPO (Liu et al. 2025):
the probability-flow ODE plus a Langevin correction with noise level ``eta``, whose Gaussian
log-prob makes policy-gradient training possible; ``eta = 0`` is the Euler step diffusers takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from diffalign.sampling import (
    DDIMStepOutput,
    Reduction,
    TrainingPoint,
    _broadcast,
    _step_noise,
    gaussian_log_prob,
)

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

FLOW_SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` (a diffusers scheduler) samples a flow-matching model."""
    return type(scheduler).__name__ in FLOW_SCHEDULERS


def _flow_time(t: float | Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if ((t < 0) | (t > 1)).any():
        raise ValueError("Flow-matching time must lie in [0, 1].")
    return _broadcast(t, like)


def flow_interpolate(x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
    """The rectified-flow point ``x_t = (1 - t) * x0 + t * noise`` (``t`` scalar or ``[B]``)."""
    t = _flow_time(t, x0)
    return (1 - t) * x0 + t * noise


def flow_velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching regression target ``noise - x0`` (the velocity ``dx_t/dt``)."""
    return noise - x0


def flow_predict_x0(sample: Tensor, predicted_velocity: Tensor, t: float | Tensor) -> Tensor:
    """The clean sample implied by a velocity prediction at ``x_t``: ``x_t - t * v``."""
    return sample - _flow_time(t, sample) * predicted_velocity


def flow_step(
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduction: Reduction = "mean",
) -> DDIMStepOutput:
    """One step from ``x_sigma`` (``sample``) to ``x_sigma_next`` given the predicted velocity.

    With ``eta == 0`` it is the Euler step ``x + (sigma_next - sigma) * v`` of
    ``FlowMatchEulerDiscreteScheduler``. With ``eta > 0`` it is the reverse SDE whose marginals
    match the ODE's, with diffusion ``g = eta * sqrt(sigma / (1 - sigma))``: the score of
    ``x_sigma`` is ``-(x + (1 - sigma) v) / sigma``, so with ``dt = sigma_next - sigma``

        mean = x + dt * (v + g^2 / (2 sigma) * (x + (1 - sigma) v)),  std = g * sqrt(-dt),

    and the step returns the Gaussian log-prob of its result, as
    :func:`~diffalign.sampling.ddim_step` does (``prev_sample`` evaluates a stored one). At
    ``sigma = 1``, where ``g`` is infinite, ``sigma_next`` takes its place in ``1 - sigma``
    (Flow-GRPO uses the chain's second sigma there, which is the same number).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    sample_f = sample.float()
    v = velocity.float()
    sigma = _flow_time(sigma, sample_f)
    sigma_next = _flow_time(sigma_next, sample_f)
    dt = sigma_next - sigma
    x0 = sample_f - sigma * v
    eps = sample_f + (1 - sigma) * v
    if eta == 0:
        if prev_sample is not None:
            raise ValueError("A deterministic step (eta=0) has no log-prob; use eta > 0.")
        mean = sample_f + dt * v
        return DDIMStepOutput(mean.to(sample.dtype), mean, torch.zeros_like(dt), None, x0, eps)
    below_one = torch.where(sigma < 1, sigma, sigma_next)
    g_squared = eta**2 * sigma / (1 - below_one)
    mean = sample_f + dt * (v + g_squared / (2 * sigma) * eps)
    std = (g_squared * -dt).clamp(min=0) ** 0.5
    if prev_sample is None:
        prev_sample = (mean + std * _step_noise(sample_f, generator, noise)).to(sample.dtype)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduction)
    return DDIMStepOutput(prev_sample, mean, std, log_prob, x0, eps)


@dataclass(frozen=True)
class FlowSchedule:
    """The schedule of a flow-matching model, as ``FlowMatchEulerDiscreteScheduler`` defines it.

    Attributes:
        num_train_timesteps: the timestep scale: the network sees ``sigma * num_train_timesteps``.
        shift: the static timestep shift ``shift * s / (1 + (shift - 1) * s)`` of the training
            sigmas (SD3 uses 3.0).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction_type: ClassVar[str] = "flow"

    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin) -> FlowSchedule:
        """Read a ``FlowMatchEulerDiscreteScheduler``; options whose sigmas depend on more than
        the step count (dynamic shifting, Karras/exponential/beta sigmas, stochastic sampling)
        are refused with the setting to change."""
        config = scheduler.config
        unsupported = [name for name in ("use_dynamic_shifting", "use_karras_sigmas",
                                         "use_exponential_sigmas", "use_beta_sigmas",
                                         "stochastic_sampling", "invert_sigmas")
                       if config.get(name, False)]  # fmt: skip
        if config.get("shift_terminal"):
            unsupported.append("shift_terminal")
        if unsupported:
            raise ValueError(
                f"FlowMatchEulerDiscreteScheduler options {unsupported} are not supported by "
                "diffalign's flow step; build the scheduler with them off (a static `shift` "
                "is supported)."
            )
        return cls(num_train_timesteps=config.num_train_timesteps, shift=float(config.shift))

    def sigma(self, timestep: float | Tensor) -> Tensor:
        """The flow time of network timesteps (a scalar or ``[B]``, as given)."""
        t = torch.as_tensor(timestep).float() / self.num_train_timesteps
        return t.clamp(0, 1)

    def shifted(self, sigma: Tensor) -> Tensor:
        """Apply the static shift to unshifted sigmas."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def following_timesteps(self, timesteps: Tensor, num_inference_steps: int) -> Tensor:
        """The timestep each step of the chain ``timesteps`` lands on (0, clean, after the last)."""
        return torch.cat([timesteps[1:], timesteps.new_zeros(1)])

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        next_timestep: float | Tensor,
        eta: float = 0.0,
        **options,
    ) -> DDIMStepOutput:
        """:func:`flow_step` between two network timesteps; ``options`` are its ``generator``,
        ``noise``, ``prev_sample`` and ``reduction``."""
        sigma, sigma_next = self.sigma(timestep), self.sigma(next_timestep)
        return flow_step(model_output, sigma, sigma_next, sample, eta, **options)

    def training_point(self, x0: Tensor, noise: Tensor, index: Tensor) -> TrainingPoint:
        """The flow-matching regression problem at training indices ``index`` (integers in
        ``[0, num_train_timesteps)``, increasing with noise): index ``i`` is the shifted time
        ``(i + 1) / num_train_timesteps``, as the scheduler's training table."""
        unshifted = (
            torch.as_tensor(index, device=x0.device).float() + 1
        ) / self.num_train_timesteps
        sigma = self.shifted(unshifted)
        return TrainingPoint(
            noisy=flow_interpolate(x0, noise, sigma.to(x0.dtype)),
            timestep=sigma * self.num_train_timesteps,
            target=flow_velocity_target(x0, noise),
            noise_level=sigma,
        )
