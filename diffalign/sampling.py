"""The math of one denoising step, shared by every sampler and trainer in diffalign.

Everything here is a pure tensor function: no pipeline state, no model calls. The formulas follow
the DDIM paper (Song et al. 2021, eqs. 12 and 16) in the notation of ``diffusers.DDIMScheduler``:
``alpha_bar`` is the cumulative product of alphas at a timestep, ``x0`` the clean sample and
``eps`` the noise, so that ``x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps``.

Timesteps may be Python ints (one timestep for the whole batch) or integer tensors of shape ``[B]``
(one per sample, as trainers that shuffle timesteps per sample need). A negative timestep means
"past the end of the chain" and uses the schedule's ``final_alpha_cumprod``, as diffusers does.

Flow-matching models (``x_t = (1 - t) * x0 + t * noise``, Stable Diffusion 3, FLUX) have the same
interface in :mod:`diffalign.flow`; :func:`load_schedule` picks the right one for a scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from diffalign.flow import FlowSchedule

PredictionType = Literal["epsilon", "v_prediction", "sample"]
Reduction = Literal["mean", "sum", "none"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class NoiseSchedule:
    """The quantities of a discrete diffusion schedule that the step math needs.

    Attributes:
        alphas_cumprod: ``alpha_bar`` for every training timestep, shape ``[num_train_timesteps]``.
        final_alpha_cumprod: ``alpha_bar`` used for the step past timestep 0 (diffusers'
            ``set_alpha_to_one`` option decides whether it is 1 or ``alphas_cumprod[0]``).
        prediction_type: what the network predicts: ``"epsilon"``, ``"v_prediction"`` or
            ``"sample"``.
        clip_sample_range: when set, the predicted ``x0`` is clamped to ``[-range, range]``.
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: Tensor
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin) -> NoiseSchedule:
        """Read the schedule of a diffusers DDIM/DDPM-style scheduler (anything with
        ``alphas_cumprod`` and a ``prediction_type`` config entry)."""
        config = scheduler.config
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod: it is not a DDIM/DDPM-family "
                "scheduler. Flow-matching schedulers are read by diffalign.sampling.load_schedule "
                "(rollouts, DDPO and AWM support them); this sampler needs a DDIM-family one."
            )
        if getattr(config, "thresholding", False):
            raise ValueError(
                "Dynamic thresholding is not supported by diffalign.sampling; build the scheduler "
                "with thresholding=False (Stable Diffusion checkpoints do)."
            )
        final = getattr(scheduler, "final_alpha_cumprod", None)
        if final is None:
            final = torch.tensor(1.0)
        clip = config.clip_sample_range if getattr(config, "clip_sample", False) else None
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod,
            final_alpha_cumprod=torch.as_tensor(final),
            prediction_type=config.prediction_type,
            clip_sample_range=clip,
        )

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training chain (1000 for Stable Diffusion)."""
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, timestep: int | Tensor, like: Tensor) -> Tensor:
        """``alpha_bar`` at ``timestep`` as float32, shaped to broadcast against ``like``.

        A scalar timestep gives a 0-d tensor; a ``[B]`` tensor gives ``[B, 1, ..., 1]``.
        """
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device).long()
        if (t >= self.num_train_timesteps).any():
            raise ValueError(
                f"timestep {t.tolist()} is outside the schedule "
                f"(0..{self.num_train_timesteps - 1})."
            )
        table = self.alphas_cumprod.float()
        final = self.final_alpha_cumprod.to(table)
        values = torch.where(t >= 0, table[t.clamp(min=0)], final)
        return _broadcast(values.to(like.device), like)

    def previous_timestep(self, timestep: int | Tensor, num_inference_steps: int) -> int | Tensor:
        """The timestep one DDIM step later in sampling, as ``diffusers.DDIMScheduler`` computes
        it (``t - num_train_timesteps // num_inference_steps``; negative past the end)."""
        return timestep - self.num_train_timesteps // num_inference_steps

    def following_timesteps(self, timesteps: Tensor, num_inference_steps: int) -> Tensor:
        """The timestep each step of the chain ``timesteps`` lands on (as :meth:`step` takes)."""
        return self.previous_timestep(timesteps, num_inference_steps)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        next_timestep: int | Tensor,
        eta: float = 0.0,
        **options,
    ) -> DDIMStepOutput:
        """:func:`ddim_step` on this schedule; ``options`` are its ``generator``, ``noise``,
        ``prev_sample`` and ``reduction`` (the interface :class:`~diffalign.flow.FlowSchedule`
        shares)."""
        return ddim_step(model_output, timestep, sample, self, next_timestep, eta, **options)

    def training_point(self, x0: Tensor, noise: Tensor, index: Tensor) -> TrainingPoint:
        """The denoising regression problem at integer training timesteps ``index``."""
        alpha_bar = self.alpha_bar(index, x0)
        timestep = torch.as_tensor(index, device=x0.device)
        return TrainingPoint(
            noisy=add_noise(x0, noise, alpha_bar),
            timestep=timestep,
            target=prediction_target(x0, noise, alpha_bar, self.prediction_type),
            noise_level=timestep.float() / self.num_train_timesteps,
        )


@dataclass
class TrainingPoint:
    """One denoising-loss problem: the network sees ``noisy`` at ``timestep`` and should output
    ``target``; ``noise_level`` in [0, 1] says how noisy (the fraction of the chain for DDPM-style
    schedules, the flow time for flow models), for loss weightings that depend on it."""

    noisy: Tensor
    timestep: Tensor
    target: Tensor
    noise_level: Tensor


def load_schedule(scheduler: SchedulerMixin) -> NoiseSchedule | FlowSchedule:
    """The step math of a diffusers scheduler: a :class:`~diffalign.flow.FlowSchedule` for
    flow-matching schedulers, else a :class:`NoiseSchedule`. Both offer ``step``,
    ``following_timesteps`` and ``training_point``."""
    from diffalign.flow import FlowSchedule, is_flow_scheduler

    if is_flow_scheduler(scheduler):
        return FlowSchedule.from_scheduler(scheduler)
    return NoiseSchedule.from_scheduler(scheduler)


@dataclass
class DDIMStepOutput:
    """Result of one DDIM step.

    Attributes:
        prev_sample: the next (less noisy) latent ``x_{t-1}``.
        mean: the Gaussian mean the step samples around.
        std: the step's standard deviation ``eta * sigma_t`` (0 when deterministic).
        log_prob: log-density of ``prev_sample`` under ``N(mean, std^2)``, reduced over the
            non-batch dimensions (``None`` when ``eta == 0``: a deterministic step has no density).
        pred_original_sample: the predicted clean sample ``x0`` (after clipping, if any).
        pred_epsilon: the predicted noise.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None
    pred_original_sample: Tensor
    pred_epsilon: Tensor


def check_prediction_type(prediction_type: str) -> None:
    """Raise a clear error for an unknown prediction type."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}."
        )


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[]`` or ``[B]`` tensor so that it broadcasts over ``like``'s trailing dims."""
    if values.ndim == 0:
        return values
    if values.ndim != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(
            f"Per-sample timesteps must have shape [batch]={like.shape[0]}, "
            f"got {tuple(values.shape)}."
        )
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def split_prediction(
    model_output: Tensor, sample: Tensor, alpha_bar: Tensor, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """Convert a network output at ``x_t`` into ``(x0, eps)``, whatever the network predicts."""
    check_prediction_type(prediction_type)
    beta_bar = 1 - alpha_bar
    if prediction_type == "epsilon":
        x0 = (sample - beta_bar**0.5 * model_output) / alpha_bar**0.5
        return x0, model_output
    if prediction_type == "sample":
        eps = (sample - alpha_bar**0.5 * model_output) / beta_bar**0.5
        return model_output, eps
    x0 = alpha_bar**0.5 * sample - beta_bar**0.5 * model_output
    eps = alpha_bar**0.5 * model_output + beta_bar**0.5 * sample
    return x0, eps


def velocity(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The v-prediction target ``sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0``."""
    return alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


def prediction_target(
    x0: Tensor, eps: Tensor, alpha_bar: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """What a network of ``prediction_type`` should output at ``x_t = add_noise(x0, eps)``.

    This is the regression target of the standard denoising loss.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return velocity(x0, eps, alpha_bar)


def add_noise(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The forward process: ``sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps``."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps


def ddim_variance(alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> Tensor:
    """``sigma_t^2`` of DDIM eq. 16: ``(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)


def gaussian_log_prob(
    value: Tensor, mean: Tensor, std: Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """Log-density of ``value`` under the isotropic Gaussian ``N(mean, std^2)``, in float32.

    ``reduction`` says how the per-dimension terms are combined over every dimension but the
    first: ``"mean"`` (the DDPO convention: per-dimension log-probs stay O(1), so the importance
    ratios of PPO stay well scaled), ``"sum"`` (the true joint log-density) or ``"none"``.
    """
    value, mean = value.float(), mean.float()
    std = torch.as_tensor(std, device=value.device).float()
    if (std <= 0).any():
        raise ValueError("The log-prob of a step needs std > 0: use eta > 0 (a stochastic step).")
    per_dim = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    if reduction == "none":
        return per_dim
    dims = tuple(range(1, per_dim.ndim))
    if reduction == "mean":
        return per_dim.mean(dim=dims)
    if reduction == "sum":
        return per_dim.sum(dim=dims)
    raise ValueError(f"Unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'.")


def _step_noise(like: Tensor, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
    if noise is not None and generator is not None:
        raise ValueError("Pass either `noise` or `generator`, not both.")
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(like.shape)}.")
        return noise
    device = generator.device if generator is not None else like.device
    draw = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return draw.to(like.device)


def ddim_step(
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    schedule: NoiseSchedule,
    prev_timestep: int | Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduction: Reduction = "mean",
) -> DDIMStepOutput:
    """One DDIM step from ``x_t`` (``sample`` at ``timestep``) to ``x_{prev_timestep}``.

    With ``eta == 0`` the step is deterministic and equals ``diffusers.DDIMScheduler.step``. With
    ``eta > 0`` it samples ``mean + std * noise`` (``eta = 1`` is DDPM-like) and also returns the
    Gaussian log-prob of the result. Pass ``prev_sample`` to evaluate the log-prob of a latent that
    was sampled earlier (e.g. under an older policy) instead of drawing a new one; gradients then
    flow through the mean (i.e. through ``model_output``), never through ``prev_sample``.

    The coefficients are computed in float32 (or wider); ``prev_sample`` comes back in
    ``sample``'s dtype, so half-precision sampling loops keep their dtype, and its log-prob is
    evaluated on that stored value, so recomputing it later from the stored latent matches.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    alpha_t = schedule.alpha_bar(timestep, sample)
    alpha_prev = schedule.alpha_bar(prev_timestep, sample)
    x0, eps = split_prediction(model_output, sample, alpha_t, schedule.prediction_type)
    if schedule.clip_sample_range is not None:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    std = eta * ddim_variance(alpha_t, alpha_prev) ** 0.5
    # At alpha_t = 0 (zero terminal SNR) with eta = 1, std^2 equals 1 - alpha_prev up to rounding,
    # which could make the square root's argument slightly negative.
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2).clamp(min=0) ** 0.5 * eps
    if eta == 0:
        if prev_sample is not None:
            raise ValueError("A deterministic step (eta=0) has no log-prob; use eta > 0.")
        return DDIMStepOutput(mean.to(sample.dtype), mean, std, None, x0, eps)
    if prev_sample is None:
        draw = mean + std * _step_noise(model_output, generator, noise)
        prev_sample = draw.to(sample.dtype)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduction)
    return DDIMStepOutput(prev_sample, mean, std, log_prob, x0, eps)


def ddim_step_log_prob(
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    schedule: NoiseSchedule,
    prev_timestep: int | Tensor,
    eta: float,
    reduction: Reduction = "mean",
) -> Tensor:
    """Log-prob of a given ``prev_sample`` under the stochastic DDIM step from ``sample``.

    This is what policy-gradient trainers evaluate for the current policy on stored rollouts.
    """
    out = ddim_step(
        model_output,
        timestep,
        sample,
        schedule,
        prev_timestep,
        eta,
        prev_sample=prev_sample,
        reduction=reduction,
    )
    return out.log_prob


def ddim_inversion_step(
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    next_timestep: int | Tensor,
    schedule: NoiseSchedule,
) -> Tensor:
    """One deterministic DDIM inversion step: from ``x_t`` to the noisier ``x_{next_timestep}``.

    ``model_output`` is the network evaluated at ``(sample, timestep)``; the step re-noises the
    predicted ``x0`` with the predicted noise. ``timestep`` may be negative for the clean start
    (it then uses ``final_alpha_cumprod``). Inversion is exact in the limit of small steps; with
    few steps it drifts, which is why preference methods that invert (InPO) use it carefully.
    """
    alpha_t = schedule.alpha_bar(timestep, sample)
    alpha_next = schedule.alpha_bar(next_timestep, sample)
    x0, eps = split_prediction(model_output, sample, alpha_t, schedule.prediction_type)
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps
