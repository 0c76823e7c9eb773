"""A diffusion whose answers are known exactly: Gaussian-mixture data with its exact denoiser.

Under the variance-preserving forward process ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (``a`` =
``alpha_bar(t)``), a mixture of isotropic Gaussians ``sum_k w_k N(mu_k, s_k^2 I)`` stays a mixture,
with means ``sqrt(a) mu_k`` and variances ``a s_k^2 + 1 - a``. Its score is available in closed
form, hence the exact noise prediction ``eps = -sqrt(1 - a) * grad log p_t(x)``.

With a linear reward ``r(x) = c . x`` the reward-tilted target ``p(x) exp(lambda r(x))`` is again a
mixture, with weights ``w_k exp(lambda c.mu_k + lambda^2 s_k^2 |c|^2 / 2)`` (normalised) and means
``mu_k + lambda s_k^2 c``: :meth:`GaussianMixture.tilted` computes it, so tests can check that tree
sampling converges to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.pipelines.chain import DenoisingChain, Generators
from diffalign.sampling import NoiseSchedule


@dataclass(frozen=True)
class GaussianMixture:
    """Weights (K,), means (K, D) and standard deviations (K,) of an isotropic mixture."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    def __post_init__(self) -> None:
        k = self.weights.shape[0]
        if self.means.ndim != 2 or self.means.shape[0] != k or self.stds.shape != (k,):
            raise ValueError("Expected weights (K,), means (K, D) and stds (K,).")
        if (self.weights < 0).any() or not math.isclose(self.weights.sum().item(), 1, rel_tol=1e-5):
            raise ValueError("Mixture weights must be non-negative and sum to 1.")

    @property
    def dim(self) -> int:
        """Dimension of the data."""
        return self.means.shape[1]

    def log_responsibilities(self, x: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log posterior component weights (B, K), component means (B?, K, D) and variances of
        the noised mixture at ``alpha_bar`` (one per row)."""
        a = alpha_bar.reshape(-1, 1, 1).double()
        means = a.sqrt() * self.means.double()[None]  # (B, K, D)
        variances = a[..., 0] * self.stds.double()[None] ** 2 + 1 - a[..., 0]  # (B, K)
        sq = ((x.double()[:, None] - means) ** 2).sum(-1)
        log_density = -0.5 * sq / variances - 0.5 * self.dim * variances.log()
        log_post = self.weights.double().log()[None] + log_density
        return log_post - log_post.logsumexp(1, keepdim=True), means, variances

    def noise_prediction(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """The exact ``eps`` prediction at noise level ``alpha_bar`` (one per row)."""
        log_post, means, variances = self.log_responsibilities(x, alpha_bar)
        score = (log_post.exp()[..., None] * (means - x.double()[:, None])
                 / variances[..., None]).sum(1)  # fmt: skip
        return (-(1 - alpha_bar.double()).sqrt()[:, None] * score).to(x.dtype)

    def sample(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``count`` samples and the component each came from."""
        components = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        noise = torch.randn(count, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[components] + self.stds[components, None] * noise, components

    def nearest_component(self, x: Tensor) -> Tensor:
        """Index of the component whose mean is closest to each row of ``x``."""
        return torch.cdist(x.double(), self.means.double()).argmin(1)

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The distribution of ``sqrt(a) x0 + sqrt(1 - a) eps`` for ``x0`` from this mixture."""
        a = float(alpha_bar)
        stds = (a * self.stds.double() ** 2 + 1 - a).sqrt()
        return GaussianMixture(self.weights, math.sqrt(a) * self.means, stds.to(self.stds.dtype))

    def tilted(self, direction: Tensor, inverse_temperature: float) -> GaussianMixture:
        """The mixture proportional to ``p(x) exp(lambda * direction . x)`` (exact)."""
        c, lam = direction.double(), inverse_temperature
        variances = self.stds.double() ** 2
        log_w = (self.weights.double().log() + lam * (self.means.double() @ c)
                 + 0.5 * lam**2 * variances * (c @ c))  # fmt: skip
        means = self.means.double() + lam * variances[:, None] * c[None]
        weights = (log_w - log_w.logsumexp(0)).exp()
        return GaussianMixture(weights.float(), means.float(), self.stds)


def default_schedule(num_train_timesteps: int = 1000) -> NoiseSchedule:
    """The DDPM linear schedule (alpha_bar ~ 1e-4 at the first sampled step, so ``x_T ~ N(0, I)``
    is the right start to within 1%); the last step ends at alpha_bar(0) = 0.9999, as SD does."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear",
        beta_start=1e-4, beta_end=0.02, set_alpha_to_one=False, clip_sample=False,
    )  # fmt: skip
    return NoiseSchedule.from_scheduler(scheduler)


class GaussianMixtureChain(DenoisingChain):
    """The denoising chain of a Gaussian mixture, with reward ``reward(x) -> (B,)``.

    By default each step is the stochastic DDIM step of the exact denoiser, whose discretisation
    error makes the chain's output differ (a little) from the mixture. With ``exact=True`` each
    step instead samples the true reverse kernel ``q(x_prev | x_t)`` (the component posterior,
    then the Gaussian conditional), so the chain's output follows :meth:`output_distribution`
    exactly, whatever the number of steps: the reference tests compare samplers against.
    ``denoiser_rows`` counts the rows the denoiser actually evaluated, independently of the
    chain's own ``nfe`` bookkeeping (tests compare the two).
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        reward: Callable[[Tensor], Tensor],
        num_steps: int = 20,
        eta: float = 1.0,
        schedule: NoiseSchedule | None = None,
        exact: bool = False,
    ) -> None:
        if exact and eta != 1.0:
            raise ValueError(
                "exact=True samples the true reverse kernel, which is the eta=1 chain."
            )
        schedule = schedule or default_schedule()
        stride = schedule.num_train_timesteps // num_steps
        timesteps = torch.arange(num_steps - 1, -1, -1) * stride + 1  # SD's steps_offset=1
        super().__init__(schedule, timesteps, eta, rows_per_sample=1)
        self.mixture, self.reward, self.exact = mixture, reward, exact
        self.device, self.dtype = torch.device("cpu"), torch.float64
        self.denoiser_rows = 0

    def noise_shape(self) -> tuple[int, ...]:
        return (self.mixture.dim,)

    def _alpha_bar(self, timesteps: Tensor) -> Tensor:
        table = self.schedule.alphas_cumprod.double()
        final = self.schedule.final_alpha_cumprod.double()
        return torch.where(timesteps >= 0, table[timesteps.clamp(min=0)], final)

    def output_distribution(self) -> GaussianMixture:
        """What the chain's last step produces under ``exact=True``: the mixture noised to the
        schedule's final ``alpha_bar`` (0.9999 for SD's schedule)."""
        return self.mixture.noised(self.schedule.final_alpha_cumprod.item())

    def _predict(self, latents: Tensor, timesteps: Tensor) -> Tensor:
        self.denoiser_rows += len(latents)
        return self.mixture.noise_prediction(latents, self._alpha_bar(timesteps))

    def _transition(
        self, latents: Tensor, timesteps: Tensor, previous: Tensor, generator: Generators
    ) -> tuple[Tensor, Tensor]:
        if not self.exact:
            return super()._transition(latents, timesteps, previous, generator)
        if isinstance(generator, list):  # one stream per row: step the rows one at a time
            rows = [
                self._transition(latents[i : i + 1], timesteps[i : i + 1], previous[i : i + 1], g)
                for i, g in enumerate(generator)
            ]
            return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        self.denoiser_rows += len(latents)
        a_t, a_prev = self._alpha_bar(timesteps), self._alpha_bar(previous)
        mix = self.mixture
        log_post, _, _ = mix.log_responsibilities(latents, a_t)
        component = torch.multinomial(log_post.exp(), 1, generator=generator)[:, 0]
        # Given the component, x_prev ~ N(sqrt(a_prev) mu, v_prev) and
        # x_t | x_prev ~ N(sqrt(a) x_prev, 1 - a) with a = a_t / a_prev: a Gaussian posterior.
        a_step = (a_t / a_prev)[:, None]
        v_prev = (a_prev * mix.stds.double()[component] ** 2 + 1 - a_prev)[:, None]
        precision = 1 / v_prev + a_step / (1 - a_step)
        mean = (a_prev.sqrt()[:, None] * mix.means.double()[component] / v_prev
                + a_step.sqrt() * latents.double() / (1 - a_step)) / precision  # fmt: skip
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float64)
        x_prev = mean + noise / precision.sqrt()
        eps = mix.noise_prediction(latents, a_t).double()
        x0 = (latents.double() - (1 - a_t).sqrt()[:, None] * eps) / a_t.sqrt()[:, None]
        return x_prev.to(latents.dtype), x0.to(latents.dtype)

    def _score(self, latents: Tensor) -> Tensor:
        return self.reward(latents)
