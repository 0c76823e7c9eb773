"""The methods' loss functions: pure (tensors in, a loss and diagnostics out), tested by hand.

- :func:`ddpo_loss`: PPO-clip on per-step log-prob ratios (DDPO, Black et al. 2023).
- :func:`awm_loss`: advantage-weighted denoising loss with KL to a reference and to an EMA copy
  (AWM, Xue et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

AWM_WEIGHTINGS = ("uniform", "ghuber")
_GHUBER_DELTA = 1e-10


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached scalar diagnostics to log."""

    loss: Tensor
    diagnostics: dict[str, float]


def ddpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    step_weights: Tensor | None = None,
    kl: Tensor | None = None,
    beta_kl: float = 0.0,
) -> LossOutput:
    """PPO-clip loss for one denoising step of a batch (all tensors of shape (B,)).

    ``L = mean(w * max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)))`` with ``rho = exp(logp -
    logp_old)``, ``A`` clipped to ``[-adv_clip_max, adv_clip_max]`` and ``w`` the
    ``step_weights`` of each sample's step (default 1), plus ``beta_kl * mean(kl)`` when each
    sample's KL to the reference policy is given (:func:`step_kl`; Flow-GRPO's regulariser).
    Diagnostics: ``approx_kl = mean((logp - logp_old)^2) / 2``, ``clipfrac`` (share of ratios
    outside the range), the mean ratio, and ``kl`` when given.
    """
    weights = torch.ones_like(advantages) if step_weights is None else step_weights
    if not log_probs.shape == old_log_probs.shape == advantages.shape == weights.shape:
        raise ValueError(
            f"Shapes differ: log_probs {tuple(log_probs.shape)}, old_log_probs "
            f"{tuple(old_log_probs.shape)}, advantages {tuple(advantages.shape)}, step_weights "
            f"{tuple(weights.shape)}."
        )
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    difference = log_probs - old_log_probs
    ratio = torch.exp(difference)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = (weights * torch.maximum(unclipped, clipped)).mean()
    diagnostics = {
        "approx_kl": 0.5 * difference.detach().pow(2).mean().item(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean().item(),
        "ratio_mean": ratio.detach().mean().item(),
    }
    if kl is not None:
        if kl.shape != advantages.shape:
            raise ValueError(f"kl has shape {tuple(kl.shape)}, the advantages "
                             f"{tuple(advantages.shape)}.")  # fmt: skip
        loss = loss + beta_kl * kl.mean()
        diagnostics["kl"] = kl.detach().mean().item()
    return LossOutput(loss, diagnostics)


def step_kl(mean: Tensor, reference_mean: Tensor, std: Tensor | float) -> Tensor:
    """Each sample's KL divergence, per latent dimension, between a step's Gaussian and the
    reference policy's at the same point: both ``N(., std^2)``, so ``mean((mu - mu_ref)^2) /
    (2 std^2)`` over the non-batch dimensions (the per-dimension convention of DDPO's log-probs;
    Flow-GRPO's KL term). ``std`` is a number or broadcasts against ``mean``."""
    std = torch.as_tensor(std, device=mean.device).float()
    if (std <= 0).any():
        raise ValueError("The KL of a step needs std > 0: use eta > 0 (a stochastic step).")
    per_dim = (mean.float() - reference_mean.float()) ** 2 / (2 * std**2)
    return per_dim.flatten(1).mean(1)


def _per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction.double() - target.double()).pow(2).flatten(1).mean(1)


def awm_loss(
    prediction: Tensor,
    target: Tensor,
    advantages: Tensor,
    time_fraction: Tensor | None = None,
    reference_prediction: Tensor | None = None,
    ema_prediction: Tensor | None = None,
    beta_kl: float = 0.0,
    beta_ema: float = 0.0,
    adv_clip_max: float = 5.0,
    weighting: str = "uniform",
    ghuber_power: float = 0.25,
) -> LossOutput:
    """Advantage-weighted matching loss for a batch of (sample, noise level) pairs.

    ``m`` is the per-sample mean squared error between the network's ``prediction`` (epsilon, v
    or flow velocity) and the pretraining ``target`` at fresh noise. The policy's "log-prob" is
    ``-m`` (``weighting="uniform"``) or, as in the AWM code, ``-((m + d)^p - d^p) * t / p``
    (``"ghuber"``, ``t = time_fraction`` in [0, 1], ``d = 1e-10``). The policy loss is
    ``mean(-A' * exp(logp - sg(logp)))`` with ``A' = clip(A, +-c) / c``: on-policy its value is
    ``-mean(A')`` and its gradient ``-mean(A' * grad logp)``, so high-advantage samples are
    denoised better and low-advantage ones worse. Added: ``beta_kl * mean((pred - ref)^2)``
    (reference = the adapter-disabled network) and ``beta_ema * mean((pred - ema)^2)``.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}.")
    if prediction.shape != target.shape or advantages.shape != prediction.shape[:1]:
        raise ValueError(
            f"Expected prediction and target of one shape and one advantage per sample; got "
            f"{tuple(prediction.shape)}, {tuple(target.shape)}, {tuple(advantages.shape)}."
        )
    mse = _per_sample_mse(prediction, target)
    if weighting == "uniform":
        log_prob = -mse
    else:
        if time_fraction is None:
            raise ValueError("weighting='ghuber' needs time_fraction (t in [0, 1] per sample).")
        power = ghuber_power
        log_prob = -((mse + _GHUBER_DELTA) ** power - _GHUBER_DELTA**power) * time_fraction / power
    scaled = advantages.double().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max
    ratio = torch.exp(log_prob - log_prob.detach())
    policy = (-scaled * ratio).mean()
    loss = policy
    diagnostics = {"policy_loss": policy.item(), "mse": mse.detach().mean().item()}
    if reference_prediction is not None:
        kl = _per_sample_mse(prediction, reference_prediction.detach()).mean()
        loss = loss + beta_kl * kl
        diagnostics["kl"] = kl.item()
    if ema_prediction is not None:
        ema = _per_sample_mse(prediction, ema_prediction.detach()).mean()
        loss = loss + beta_ema * ema
        diagnostics["ema_kl"] = ema.item()
    return LossOutput(loss.float(), diagnostics)
