"""Best-of-N and sequential Monte Carlo on the same chain and accounting as tree sampling.

- :func:`best_of_n`: ``n`` independent chains, scored at the end; the best ones are returned.
- :func:`smc`: ``particles`` chains advanced together; every ``resample_every`` steps each
  particle's predicted clean latent is scored and the particles are resampled (systematic) by a
  potential, as in FK steering (Singhal et al. 2025): ``"max"`` weighs by ``exp(lambda * best
  reward seen on the particle's path)``, ``"diff"`` by ``exp(lambda * (r_now - r_before))``, whose
  product telescopes to the final tilt ``exp(lambda r)``. Intermediate scores count as reward calls.

Both record the best reward after each finished sample against the NFEs spent, like DTS, so
curves of reward against compute line up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffalign.pipelines.chain import DenoisingChain, Generators, chain_generators
from diffalign.pipelines.tree import SearchResult, SearchStats

SMC_POTENTIALS = ("max", "diff")


def _top(latents: Tensor, rewards: Tensor, count: int) -> tuple[Tensor, Tensor]:
    order = torch.argsort(rewards, descending=True)
    picks = order[torch.arange(count) % len(order)]
    return latents[picks.to(latents.device)], rewards[picks]


def finish_chains(
    chain: DenoisingChain, latents: Tensor, generator: Generators, start: int = 0
) -> Tensor:
    """Run ``latents``, all at chain position ``start`` (0 = noise), to the end of the chain."""
    for position in range(start, chain.num_steps):
        latents, _ = chain.step(latents, torch.full((len(latents),), position), generator)
    return latents


def best_of_n(
    chain: DenoisingChain, n: int, batch_size: int = 16, num_samples: int = 1, seed: int = 0
) -> SearchResult:
    """Sample ``n`` chains (``batch_size`` at a time) and keep the ``num_samples`` best.

    Chain ``k`` draws from its own noise stream (:func:`chain_generator`), so the samples do not
    depend on ``batch_size``.
    """
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}.")
    device = getattr(chain, "device", "cpu")
    stats = SearchStats("best-of-n")
    start = chain.nfe
    finals, rewards = [], []
    for first in range(0, n, batch_size):
        count = min(batch_size, n - first)
        generators = chain_generators(seed, first, count, device)
        final = finish_chains(chain, chain.initial_noise(count, generators), generators)
        scores = chain.score(final)
        cost_each = chain.step_cost(chain.num_steps)
        done = chain.nfe - start - count * cost_each
        for i, reward in enumerate(scores.tolist()):
            stats.record(reward, done + (i + 1) * cost_each)
        finals.append(final.cpu())
        rewards.append(scores)
    stats.nfe, stats.reward_calls = chain.nfe - start, n
    latents, top_rewards = _top(torch.cat(finals), torch.cat(rewards), num_samples)
    return SearchResult(latents, top_rewards, stats)


def systematic_resample(weights: Tensor, generator: torch.Generator) -> Tensor:
    """Indices drawn by systematic resampling from normalised ``weights`` (low variance)."""
    count = len(weights)
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    points = (torch.arange(count, dtype=torch.float64) + offset) / count
    cumulative = weights.double().cumsum(0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, points).clamp(max=count - 1)


def smc(
    chain: DenoisingChain,
    particles: int,
    inverse_temperature: float = 10.0,
    potential: str = "max",
    resample_every: int = 5,
    num_samples: int = 1,
    seed: int = 0,
) -> SearchResult:
    """FK-steering SMC with ``particles`` particles (see the module docstring)."""
    if potential not in SMC_POTENTIALS:
        raise ValueError(f"potential must be one of {SMC_POTENTIALS}, got {potential!r}.")
    if particles < 1 or resample_every < 1:
        raise ValueError("smc needs particles >= 1 and resample_every >= 1.")
    # particle slot k draws from chain k's stream: the particles start as best-of-N's chains
    generator = chain_generators(seed, 0, particles, getattr(chain, "device", "cpu"))
    rng = torch.Generator().manual_seed(seed + 1)
    stats = SearchStats("smc")
    start_nfe, start_calls = chain.nfe, chain.reward_calls
    latents = chain.initial_noise(particles, generator)
    previous = torch.zeros(particles, dtype=torch.float64)
    best_seen = torch.full((particles,), -math.inf, dtype=torch.float64)
    for position in range(chain.num_steps):
        latents, predicted = chain.step(latents, torch.full((particles,), position), generator)
        last = position == chain.num_steps - 1
        if last or (position + 1) % resample_every:
            continue
        scores = chain.score(predicted).double()
        best_seen = torch.maximum(best_seen, scores)
        log_weights = inverse_temperature * (best_seen if potential == "max" else scores - previous)
        picks = systematic_resample(torch.softmax(log_weights, 0), rng)
        latents, previous, best_seen = (
            latents[picks.to(latents.device)],
            scores[picks],
            best_seen[picks],
        )
    final = chain.score(latents)
    spent = chain.nfe - start_nfe
    for reward in final.tolist():
        stats.record(reward, spent)
    stats.nfe, stats.reward_calls = spent, chain.reward_calls - start_calls
    top_latents, top_rewards = _top(latents.cpu(), final, num_samples)
    return SearchResult(top_latents, top_rewards, stats)
