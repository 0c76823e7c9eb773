"""Tree sampling and its baselines on a diffusion whose answer is known exactly.

The toy is a 1-D Gaussian mixture (modes -2, 0, 2 with weights .45, .45, .1) sampled by the exact
reverse kernel, so the chain's output distribution and its reward-tilted version are closed-form.
"""

import math

import pytest
import torch

from diffalign.pipelines.baselines import best_of_n, smc
from diffalign.pipelines.gaussian_mixture import GaussianMixture, GaussianMixtureChain
from diffalign.pipelines.tree import (
    DiffusionTree,
    TreeFullError,
    TreeSampler,
    TreeSettings,
    soft_value,
    tree_search,
    widening_cap,
)

from .conftest import requires_cuda

MIXTURE = GaussianMixture(
    torch.tensor([0.45, 0.45, 0.1]), torch.tensor([[-2.0], [0.0], [2.0]]), torch.tensor([0.3] * 3)
)


def linear_reward(x):
    return x[:, 0]


def peak_at_two(x):
    return -((x[:, 0] - 2) ** 2)


def _chain(reward=linear_reward, steps=5, exact=True):
    return GaussianMixtureChain(MIXTURE, reward, num_steps=steps, exact=exact)


def _mode_frequencies(latents, weights=None):
    modes = MIXTURE.nearest_component(latents)
    weights = torch.ones(len(modes), dtype=torch.float64) if weights is None else weights
    counts = torch.zeros(3, dtype=torch.float64).index_add_(0, modes, weights.double())
    return counts / counts.sum()


def _total_variation(p, q):
    return 0.5 * (p - q.double()).abs().sum().item()


def _dts_output(rollouts, seed, inverse_temperature=1.0, uniform_selection=1.0):
    """DTS's exact output distribution over modes for one tree (no sampling noise)."""
    chain = _chain()
    settings = TreeSettings(inverse_temperature=inverse_temperature, rollouts_per_batch=4,
                            uniform_selection=uniform_selection)  # fmt: skip
    sampler = TreeSampler(chain, settings, seed)
    sampler.run(rollouts * chain.num_steps)
    distribution = sampler.leaf_distribution()
    latents = torch.stack([sampler.tree.latents[i] for i in distribution])
    return _mode_frequencies(latents, torch.tensor(list(distribution.values())))


def test_exact_chain_samples_the_mixture():
    chain = _chain(steps=3)
    generator = torch.Generator().manual_seed(0)
    latents = chain.initial_noise(4000, generator)
    for position in range(chain.num_steps):
        latents, _ = chain.step(latents, torch.full((4000,), position), generator)
    assert _total_variation(_mode_frequencies(latents), MIXTURE.weights) < 0.03
    assert chain.nfe == chain.denoiser_rows == 3 * 4000


def test_tilted_mixture_matches_importance_weighting():
    generator = torch.Generator().manual_seed(0)
    samples, _ = MIXTURE.sample(200_000, generator)
    weights = torch.exp(samples[:, 0].double())
    expected = MIXTURE.tilted(torch.tensor([1.0]), 1.0).weights
    assert _total_variation(_mode_frequencies(samples, weights), expected) < 0.01
    torch.testing.assert_close(expected, torch.tensor([0.0487, 0.3601, 0.5912]), atol=1e-3, rtol=0)


def test_dts_converges_to_the_tilted_target_as_rollouts_grow():
    target = _chain().output_distribution().tilted(torch.tensor([1.0]), 1.0).weights
    per_tree, pooled = [], []
    for rollouts in (16, 64, 256):
        outputs = [_dts_output(rollouts, seed) for seed in range(8)]
        per_tree.append(sum(_total_variation(o, target) for o in outputs) / len(outputs))
        pooled.append(_total_variation(sum(outputs) / len(outputs), target))
    assert per_tree[0] > per_tree[1] > per_tree[2]  # measured 0.23, 0.10, 0.06
    assert per_tree[2] < 0.1
    assert pooled[2] < 0.04  # the bias after 256 rollouts: measured 0.031 here, 0.009 over 64 trees


def test_lambda_zero_gives_back_the_base_sampler():
    base = _chain().output_distribution().weights
    # 32 trees: over 8 the pooled distance is itself noisy (0.01 to 0.06 between seed groups)
    outputs = [_dts_output(64, seed, inverse_temperature=0.0) for seed in range(32)]
    assert _total_variation(sum(outputs) / len(outputs), base) < 0.04  # measured 0.023


def test_growing_the_tree_by_boltzmann_weights_is_biased():
    """Why ``uniform_selection`` defaults to 1 (see the module docstring of the tree)."""
    target = _chain().output_distribution().tilted(torch.tensor([1.0]), 1.0).weights

    def pooled(share):
        outputs = [_dts_output(64, seed, uniform_selection=share) for seed in range(8)]
        return _total_variation(sum(outputs) / len(outputs), target)

    assert pooled(0.0) > pooled(1.0) + 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dts_star_finds_the_reward_maximum(seed):
    chain = _chain(peak_at_two, steps=10)
    settings = TreeSettings(mode="search", inverse_temperature=10.0)
    result = tree_search(chain, 640, settings, num_samples=2, seed=seed)
    assert abs(result.latents[0, 0].item() - 2.0) < 0.15  # the maximiser x = 2 (10% base mass)
    assert result.rewards[0] >= result.rewards[1]
    assert result.stats.best_reward[-1] == pytest.approx(result.rewards[0].item())


def _samplers():
    return {
        "dts": lambda c, b: tree_search(c, b, TreeSettings(rollouts_per_batch=3), seed=1),
        "dts-star": lambda c, b: tree_search(c, b, TreeSettings(mode="search"), seed=1),
        "best-of-n": lambda c, b: best_of_n(c, b // c.num_steps, batch_size=4),
        "smc": lambda c, b: smc(c, b // c.num_steps, resample_every=2),
    }


@pytest.mark.parametrize("name", list(_samplers()))
@pytest.mark.parametrize("budget", [40, 97])
def test_nfe_accounting_counts_every_denoiser_row_and_stays_in_budget(name, budget):
    chain = _chain(steps=8, exact=False)
    result = _samplers()[name](chain, budget)
    assert result.stats.nfe == chain.nfe == chain.denoiser_rows
    assert 8 <= result.stats.nfe <= budget
    assert result.stats.reward_calls == chain.reward_calls
    assert result.stats.nfe_at == sorted(result.stats.nfe_at)
    assert result.stats.nfe_at[-1] <= result.stats.nfe
    assert result.stats.best_reward == sorted(result.stats.best_reward)


def test_chains_are_the_same_whatever_batch_they_are_drawn_in():
    # Chain k draws its noise from stream k: best-of-N's samples do not depend on its batch
    # size, and a tree's first rollouts (before it has values to branch on) are its chains.
    def best_of(count, batch_size, seed=5):
        result = best_of_n(_chain(steps=6, exact=False), count, batch_size, count, seed)
        return result.latents[:, 0].sort().values

    assert torch.equal(best_of(6, 1), best_of(6, 4))
    assert not torch.allclose(best_of(6, 4), best_of(6, 4, seed=6))
    sampler = TreeSampler(_chain(steps=6, exact=False),
                          TreeSettings(mode="search", rollouts_per_batch=3), seed=5)  # fmt: skip
    sampler.run(3 * 6)
    first = torch.stack([sampler.tree.latents[leaf][0] for leaf in sampler.tree.reward])
    assert torch.equal(first.sort().values, best_of(3, 2))


def test_tree_rollouts_reuse_prefixes_so_they_finish_more_samples_than_best_of_n():
    chain = _chain(steps=8, exact=False)
    stats = tree_search(chain, 400, TreeSettings(), seed=0).stats
    assert stats.samples > 400 // 8
    assert stats.tree_nodes > stats.samples


def test_random_expansion_branches_deeper_so_rollouts_are_cheaper():
    def samples(expansion):
        settings = TreeSettings(mode="search", expansion=expansion)
        runs = [tree_search(_chain(steps=10, exact=False), 600, settings, seed=seed)
                for seed in range(3)]  # fmt: skip
        return sum(run.stats.samples for run in runs)

    assert samples("random") > 1.1 * samples("shallowest")  # measured 258 vs 227


def test_branch_step_grows_the_tree_only_at_the_root_and_at_that_step():
    chain = _chain(peak_at_two, steps=10, exact=False)
    sampler = TreeSampler(chain, TreeSettings(mode="search", branch_step=6), seed=0)
    stats = sampler.run(800)
    tree = sampler.tree
    branching = {tree.position[n] for n in range(len(tree)) if len(tree.children[n]) > 1}
    assert branching == {-1, 6}  # the root (fresh chains) and the arms
    arms = [n for n in range(len(tree)) if tree.position[n] == 6]
    assert max(len(tree.children[n]) for n in arms) > 2  # arms are not held by the widening cap
    assert stats.nfe <= 800 and stats.samples > 800 // 10  # continuations cost 4 steps, not 10
    best = sampler.results(1)[0]
    assert abs(best[0, 0].item() - 2.0) < 0.15  # still finds the maximiser x = 2


def test_a_fixed_root_width_makes_branch_step_a_bandit_over_that_many_chains():
    settings = TreeSettings(mode="search", branch_step=6, widening_c=8, widening_alpha=0,
                            expansion="shallowest", inverse_temperature=0,
                            rollouts_per_batch=1)  # fmt: skip
    sampler = TreeSampler(_chain(peak_at_two, steps=10, exact=False), settings, seed=0)
    stats = sampler.run(800)
    tree = sampler.tree
    assert len(tree.children[0]) == 8  # the arms: 8 chains, drawn before any continuation
    assert stats.nfe_at[:8] == [10 * i for i in range(1, 9)]
    assert stats.samples > 8 + (800 - 80) // 4 - 1  # then only 4-step continuations
    arm_visits = [tree.visits[c] for c in tree.children[0]]
    assert max(arm_visits) > 3 * min(arm_visits)  # UCB spends unevenly on the arms


def test_soft_value_and_widening_by_hand():
    assert soft_value([0.0, 2.0], 0.0) == 1.0
    assert soft_value([0.0, 2.0], 1.0) == pytest.approx(math.log((1 + math.e**2) / 2))
    assert soft_value([0.0, 2.0], 1e4) == pytest.approx(2.0 - math.log(2) / 1e4)
    assert [widening_cap(n, 1.0, 0.5) for n in (0, 1, 2, 4, 5)] == [1, 1, 2, 2, 3]


def test_node_cap_warns_or_raises():
    with pytest.warns(UserWarning, match="max_nodes"):
        result = tree_search(_chain(), 200, TreeSettings(max_nodes=30))
    assert result.stats.stopped == "max_nodes" and result.stats.tree_nodes <= 30
    with pytest.raises(TreeFullError, match="max_nodes"):
        tree_search(_chain(), 200, TreeSettings(max_nodes=3))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="eta must be > 0"):
        GaussianMixtureChain(MIXTURE, linear_reward, eta=0.0)
    with pytest.raises(ValueError, match="below one full chain"):
        tree_search(_chain(), 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        TreeSettings(mode="greedy")
    with pytest.raises(ValueError, match="expansion must be one of"):
        TreeSettings(expansion="deepest")
    with pytest.raises(ValueError, match="branch_step is a chain position"):
        TreeSettings(branch_step=-1)
    with pytest.raises(ValueError, match="outside the chain"):
        TreeSampler(_chain(steps=5), TreeSettings(branch_step=5))
    with pytest.raises(ValueError, match="uniform_selection"):
        TreeSettings(uniform_selection=2.0)
    with pytest.raises(ValueError, match="potential must be one of"):
        smc(_chain(), 4, potential="min")
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n(_chain(), 0)


def test_tree_keeps_latents_on_its_storage_device():
    tree = DiffusionTree("cpu")
    latent = torch.randn(4, 2, 2)
    node = tree.add(0, latent)
    assert tree.latents[node].device.type == "cpu" and not tree.latents[node].is_pinned()
    assert torch.equal(tree.latent(node, "cpu"), latent)
    assert tree.position[node] == 0 and tree.children[0] == [node]


@requires_cuda
def test_gpu_latents_stored_on_the_cpu_are_pinned_and_come_back_intact():
    tree = DiffusionTree("cpu")
    latent = torch.randn(4, 8, 8, device="cuda")
    node = tree.add(0, latent)
    assert tree.latents[node].device.type == "cpu" and tree.latents[node].is_pinned()
    assert torch.equal(tree.latent(node, "cuda"), latent)
