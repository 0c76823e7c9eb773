"""The branching benchmark: the variance split by hand, and on a toy whose answer is known."""

import json
import math

import pytest
import torch

from diffalign.benchmarks.branching import branch_rewards, variance_split
from diffalign.pipelines.gaussian_mixture import GaussianMixtureChain

from .test_dts import MIXTURE


def in_rare_mode(x):
    return (MIXTURE.nearest_component(x) == 2).float()


def test_variance_split_by_hand():
    split = variance_split(torch.tensor([[0.0, 2.0], [4.0, 6.0]]))
    # within: var([0, 2]) = var([4, 6]) = 2; total: var([0, 2, 4, 6]) = 20 / 3
    assert split["within_std"] == pytest.approx(math.sqrt(2))
    assert split["total_std"] == pytest.approx(math.sqrt(20 / 3))
    assert split["decided_share"] == pytest.approx(1 - 2 / (20 / 3))
    assert split["mean_reward"] == pytest.approx(3.0)
    assert split["mean_best_continuation"] == pytest.approx(4.0)
    assert math.isnan(variance_split(torch.ones(3, 4))["decided_share"])
    with pytest.raises(ValueError, match="continuations >= 2"):
        variance_split(torch.ones(3, 1))


def exact_decided_share(chain, position, samples=200_000):
    """Var(E[r | x_k]) / Var(r) for r = 1[rare mode], from the exact posterior at step k."""
    alpha_bar = chain._alpha_bar(chain.timesteps[position : position + 1])
    x = MIXTURE.noised(alpha_bar.item()).sample(samples, torch.Generator().manual_seed(1))[0]
    posterior = MIXTURE.log_responsibilities(x, alpha_bar.expand(samples))[0].exp()[:, 2]
    weight = MIXTURE.weights[2].item()
    return (posterior.var() / (weight * (1 - weight))).item()


def test_decided_share_matches_the_exact_answer_on_a_mixture():
    chain = GaussianMixtureChain(MIXTURE, in_rare_mode, num_steps=5, exact=True)
    rewards = branch_rewards(chain, [1, 2, 3, 4], prefixes=2000, continuations=8, seed=0)
    measured = [variance_split(rewards[k])["decided_share"] for k in (1, 2, 3, 4)]
    exact = [exact_decided_share(chain, k) for k in (1, 2, 3, 4)]
    assert exact[0] < 0.3 and exact[-1] > 0.9  # the toy spans the range
    for got, want in zip(measured, exact, strict=True):
        assert got == pytest.approx(want, abs=0.06)  # seeds 0-3 land within 0.03
    # every continuation of the toy costs the steps it runs, and the prefixes are shared
    prefix_steps = 2000 * 4
    continuation_steps = 2000 * 8 * (4 + 3 + 2 + 1)
    assert chain.nfe == prefix_steps + continuation_steps == chain.denoiser_rows


def test_branch_steps_outside_the_chain_are_refused():
    chain = GaussianMixtureChain(MIXTURE, in_rare_mode, num_steps=5, exact=True)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        branch_rewards(chain, [0, 5])
    with pytest.raises(ValueError, match="at least 2 prefixes"):
        branch_rewards(chain, [1], prefixes=1)


def test_bench_branching_on_the_shipped_model_writes_the_split_per_step(tmp_path, capsys):
    from diffalign.cli import main

    args = ["bench", "branching", "--num-prompts", "2", "--steps", "4", "--branch-steps",
            "0,3", "--prefixes", "2", "--continuations", "3", "--quiet",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert list(results["by_branch_step"]) == ["0", "3"]
    assert len(results["per_prompt"]) == 2 and results["settings"]["continuations"] == 3
    row = results["by_branch_step"]["3"]
    assert row["nfe_per_continuation"] == 2  # one step left, CFG doubles the rows
    assert 0 <= row["mean_reward"] <= row["mean_best_continuation"] <= 1
    assert "decided share" in capsys.readouterr().out


def test_bench_branching_rejects_bad_branch_steps(tmp_path):
    from diffalign.cli import main

    args = ["bench", "branching", "--num-prompts", "1", "--steps", "4", "--branch-steps", "4",
            "--quiet", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit, match=r"must lie in \[0, 4\)"):
        main(args)
