"""Reward against compute for best-of-N, SMC, DTS and DTS*, on the same prompts and accounting.

For each held-out prompt, one chain (``PipelineChain``: the model, the reward, stochastic DDIM,
eta = 1 unless set) is searched by every sampler. Budgets are in NFEs and quoted in
chain-equivalents (one chain = steps x UNet rows per sample):

- best-of-N and DTS* are anytime: one run of ``n`` chain-equivalents gives the best reward found
  within every smaller budget (``SearchStats.best_within``);
- SMC and DTS are not: they run once per budget in ``budgets``; the reward of the image each
  returns is recorded. ``curves=False`` leaves them out (the ratio needs only the anytime two, at
  about a third of the compute), e.g. to choose the tree's settings on validation prompts.

``nfe_ratio_dts_star_vs_best_of_n`` is best-of-N's budget at N = ``n`` divided by the smallest
budget at which DTS*'s mean best reward over the prompts reaches best-of-N's (None when DTS*
does not reach it within the same budget). Wall time and NFE/s per sampler show the tree's
bookkeeping overhead next to plain batched sampling.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from diffalign.pipelines.tree import TreeSettings
    from diffalign.rewards import Reward

ANYTIME = ("best-of-n", "dts-star")
TIMED = ("best-of-n", "dts-star")  # tree_vs_batched_speed: the tree against batched chains
PER_BUDGET = ("smc", "dts")


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(column) / len(column) for column in zip(*rows, strict=True)]


def _matching_budget(curve: list[float], target: float) -> int | None:
    """The first chain-equivalent budget (1-based) at which ``curve`` reaches ``target``."""
    for budget, value in enumerate(curve, start=1):
        if value >= target - 1e-9:
            return budget
    return None


def run_dts_benchmark(
    pipeline: DiffusionPipeline,
    reward: Reward,
    prompts: list[str],
    steps: int = 20,
    guidance_scale: float = 3.0,
    n: int = 32,
    budgets: tuple[int, ...] = (2, 4, 8, 16, 32),
    inverse_temperature: float = 10.0,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    tree: TreeSettings | None = None,
    curves: bool = True,
    eta: float = 1.0,
) -> dict:
    """Run every sampler on every prompt; curves, the NFE ratio and speeds (see module doc).

    ``tree`` sets DTS's and DTS*'s knobs (exploration, widening, expansion; default
    ``TreeSettings(rollouts_per_batch=batch_size)``); ``curves=False`` runs best-of-N and DTS*
    only. ``eta`` is the DDIM chain's (every sampler searches the same chain).
    """
    from diffalign.pipelines.chain import PipelineChain
    from diffalign.pipelines.dts import SearchOptions

    per_budget_samplers = PER_BUDGET if curves else ()
    anytime = {name: [] for name in ANYTIME}
    per_budget = {name: [] for name in per_budget_samplers}
    timing = {name: [0.0, 0] for name in ANYTIME + per_budget_samplers}  # seconds, NFEs

    def options(sampler: str, budget: int) -> SearchOptions:
        return SearchOptions(sampler, budget, inverse_temperature, tree=tree,
                             batch_size=batch_size)  # fmt: skip

    for index, prompt in enumerate(tqdm(prompts, desc="bench dts", disable=not progress)):
        chain = PipelineChain(pipeline, prompt, reward, steps, guidance_scale, eta=eta)
        full = chain.step_cost(chain.num_steps)
        for sampler in ANYTIME:
            stats = _timed_search(chain, options(sampler, n * full), seed + index,
                                  timing[sampler]).stats  # fmt: skip
            anytime[sampler].append([stats.best_within(b * full) for b in range(1, n + 1)])
        for sampler in per_budget_samplers:
            rewards = []
            for b in budgets:
                result = _timed_search(chain, options(sampler, b * full), seed + index,
                                       timing[sampler])  # fmt: skip
                rewards.append(result.rewards[0].item())
            per_budget[sampler].append(rewards)
    seconds = {name: t[0] for name, t in timing.items()}
    nfe = {name: t[1] for name, t in timing.items()}
    return _summarise(anytime, per_budget, seconds, nfe, n, budgets, full, len(prompts))


def _timed_search(chain, options, seed: int, timing: list):
    """``run_search`` that adds its seconds and NFEs to ``timing``."""
    from diffalign.pipelines.dts import run_search

    start, before = time.perf_counter(), chain.nfe
    result = run_search(chain, options, 1, seed)
    timing[0] += time.perf_counter() - start
    timing[1] += chain.nfe - before
    return result


def _summarise(anytime, per_budget, seconds, nfe, n, budgets, full, num_prompts) -> dict:
    curves = {name: _mean(rows) for name, rows in anytime.items()}
    target = curves["best-of-n"][n - 1]
    needed = _matching_budget(curves["dts-star"], target)
    results = {
        "nfe_ratio_dts_star_vs_best_of_n": None if needed is None else n / needed,
        "best_of_n_reward": target,
        "best_of_n_nfe": n * full,
        "dts_star_nfe_to_match": None if needed is None else needed * full,
        "dts_star_reward_at_same_nfe": curves["dts-star"][n - 1],
        "nfe_per_chain": full,
        "budget_nfe": [b * full for b in budgets],
        "num_prompts": num_prompts,
        "curves": {
            name: {"nfe": [b * full for b in range(1, n + 1)], "mean_reward": curve}
            for name, curve in curves.items()
        },  # fmt: skip
        "nfe_per_second": {name: nfe[name] / seconds[name] for name in seconds if seconds[name]},
    }
    for name, rows in per_budget.items():
        results["curves"][name] = {"nfe": [b * full for b in budgets], "mean_reward": _mean(rows)}
    speed = results["nfe_per_second"]
    results["tree_overhead"] = 1 - speed["dts-star"] / speed["best-of-n"]
    return results


def plot_dts_curves(results: dict, path: str | Path) -> Path:
    """Mean reward against NFEs, one line per sampler."""
    from diffalign.plots import plot_curves

    curves = {name: (c["nfe"], c["mean_reward"]) for name, c in results["curves"].items()}
    return plot_curves(curves, path, "NFEs (UNet rows) per prompt", "mean reward of the output",
                       "reward vs compute")  # fmt: skip


def format_table(results: dict) -> str:
    """A short text summary of the benchmark."""
    ratio = results["nfe_ratio_dts_star_vs_best_of_n"]
    lines = [
        f"best-of-N reward at {results['best_of_n_nfe']} NFEs: {results['best_of_n_reward']:.3f}",
        f"DTS* reward at the same NFEs:         {results['dts_star_reward_at_same_nfe']:.3f}",
        "DTS* NFEs to match best-of-N:        "
        + (f"{results['dts_star_nfe_to_match']} (ratio {ratio:.2f}x)" if ratio else "not reached"),
        f"tree bookkeeping overhead (NFE/s vs best-of-N): {results['tree_overhead']:+.1%}",
        "",
        f"{'sampler':10s} " + " ".join(f"{nfe:>7d}" for nfe in results["budget_nfe"]),
    ]
    budgets = results["budget_nfe"]
    for name, curve in results["curves"].items():
        by_nfe = dict(zip(curve["nfe"], curve["mean_reward"], strict=True))
        cells = (f"{by_nfe[b]:7.3f}" if b in by_nfe else f"{'-':>7s}" for b in budgets)
        lines.append(f"{name:10s} " + " ".join(cells))  # anytime curves stop at best-of-N's n
    return "\n".join(lines)


def tree_vs_batched_speed(
    pipeline: DiffusionPipeline,
    prompt: str,
    steps: int,
    guidance_scale: float,
    chains: int,
    batch_size: int,
    resolution: int | None = None,
    repeats: int = 3,
    tree: TreeSettings | None = None,
    compile_backend: str | None = None,
) -> dict:
    """UNet rows per second of DTS* against best-of-N on one prompt, with scoring left out (no
    decoding, no reward), so the difference is the tree's bookkeeping (the GPU overhead goal).

    Each sampler first runs once on its own, which also pays one-time costs per UNet batch
    shape (kernel selection on a GPU; the tree's batches take many sizes while best-of-N's take
    one): that speed is ``first_run_nfe_per_second``. Then the samplers alternate ``repeats``
    times with the same seed, and ``nfe_per_second`` is each one's median, so a machine that
    slows down for a while slows them all. With ``compile_backend`` both samplers also run on
    ``torch.compile(unet, backend=compile_backend)`` in the same alternation (keys prefixed
    ``compiled_``; their first runs compile), and ``nfe_ratio_compiled_vs_eager`` compares.
    """
    from diffalign.benchmarks.rollout import seconds_of
    from diffalign.pipelines.dts import run_search

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    variants = ("", "compiled_") if compile_backend else ("",)
    searches = _unscored_searches(pipeline, prompt, steps, guidance_scale, chains, batch_size,
                                  resolution, tree, variants, compile_backend)  # fmt: skip
    rows = {}

    def timed_search(name: str) -> float:
        """NFE/s of one search (its NFEs and UNet calls recorded in ``rows``)."""
        chain, options = searches[name]
        nfe, calls = chain.nfe, chain.calls
        seconds = seconds_of(lambda: run_search(chain, options), chain.device)
        rows[name] = (chain.nfe - nfe, chain.calls - calls)
        return (chain.nfe - nfe) / seconds

    first = {name: timed_search(name) for name in searches}
    speeds = {name: [] for name in searches}
    for _ in range(repeats):
        for name in searches:
            speeds[name].append(timed_search(name))
    results = {"repeats": repeats}
    for prefix in variants:
        results.update(_speed_summary(prefix, first, speeds, rows))
    if compile_backend:
        results["nfe_ratio_compiled_vs_eager"] = {
            s: results["compiled_nfe_per_second"][s] / results["nfe_per_second"][s]
            for s in TIMED
        }  # fmt: skip
    return results


def _speed_summary(prefix: str, first: dict, speeds: dict, rows: dict) -> dict:
    """First-run and median NFE/s, UNet rows per call and the tree's overhead of the two
    searches named ``prefix + sampler``, under keys that start with ``prefix``."""
    import statistics

    names = {sampler: prefix + sampler for sampler in TIMED}
    median = {sampler: statistics.median(speeds[name]) for sampler, name in names.items()}
    return {
        f"{prefix}first_run_nfe_per_second": {s: first[n] for s, n in names.items()},
        f"{prefix}nfe_per_second": median,
        f"{prefix}unet_rows_per_call": {s: rows[n][0] / rows[n][1] for s, n in names.items()},
        f"{prefix}tree_overhead": 1 - median["dts-star"] / median["best-of-n"],
    }


def _unscored_searches(pipeline, prompt, steps, guidance_scale, chains, batch_size, resolution,
                       tree, variants, compile_backend) -> dict:  # fmt: skip
    """``{prefix + sampler: (chain, options)}``: best-of-N and DTS* on chains that count their
    UNet calls and score nothing, for each prefix of ``variants`` (``"compiled_"``: on the UNet
    compiled with ``compile_backend``)."""
    from diffalign.pipelines.chain import PipelineChain
    from diffalign.pipelines.dts import SearchOptions

    class UnscoredChain(PipelineChain):
        calls = 0

        def step(self, latents, positions, generator):
            self.calls += 1
            return super().step(latents, positions, generator)

        def _score(self, latents: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(latents))

    searches, compiled = {}, None
    for prefix in variants:
        for sampler in TIMED:
            chain = UnscoredChain(pipeline, prompt, None, steps, guidance_scale, eta=1.0,
                                  height=resolution, width=resolution)  # fmt: skip
            if prefix:  # one compiled wrapper, so both samplers reuse what the other compiled
                if compiled is None:
                    compiled = torch.compile(chain.denoiser, backend=compile_backend)
                chain.denoiser = compiled
            budget = chains * chain.step_cost(steps)
            options = SearchOptions(sampler, budget, tree=tree, batch_size=batch_size)
            searches[prefix + sampler] = (chain, options)
    return searches
