"""When is the reward decided? Branch a stochastic chain at several steps and split the variance.

Tree search (DTS, DTS*) saves compute by sharing chain prefixes between samples. That pays only
when samples that share a prefix still differ in reward: if the first steps already fix the
reward, the branches of a tree are near-copies and independent chains (best-of-N) explore more
per NFE. This benchmark measures it directly. For each branch step ``k`` it runs ``prefixes``
chains from noise to step ``k``, continues each one ``continuations`` times to the end, scores
them, and reports the share of the reward's variance that the prefix already explains:

    decided_share(k) = 1 - mean over prefixes of Var(reward | prefix) / Var(reward)

0 means the continuations vary as much as fresh chains (branching at ``k`` is as good as
starting over, at a fraction of the cost); 1 means the reward was fixed by step ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from diffalign.pipelines.chain import DenoisingChain
    from diffalign.rewards import Reward


def variance_split(rewards: Tensor) -> dict[str, float]:
    """Split rewards of shape (prefixes, continuations) into within- and total variance.

    Returns ``within_std`` (root mean within-prefix variance, unbiased per prefix), ``total_std``
    (over all rows), ``decided_share`` (1 - within/total; NaN when every reward is equal),
    ``mean_reward`` and ``mean_best_continuation`` (the best of each prefix's continuations).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must have shape (prefixes, continuations >= 2), got {tuple(rewards.shape)}."
        )
    rewards = rewards.double()
    within = rewards.var(dim=1).mean().item()
    total = rewards.flatten().var().item()
    return {
        "within_std": math.sqrt(within),
        "total_std": math.sqrt(total),
        "decided_share": 1.0 - within / total if total > 0 else math.nan,
        "mean_reward": rewards.mean().item(),
        "mean_best_continuation": rewards.max(dim=1).values.mean().item(),
    }


def branch_rewards(
    chain: DenoisingChain,
    branch_steps: Sequence[int],
    prefixes: int = 4,
    continuations: int = 8,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[int, Tensor]:
    """Rewards of shape (prefixes, continuations) for each branch step of ``chain``.

    The prefixes are shared by all branch steps (each is one chain, stored where it passes every
    branch step); continuations run ``batch_size`` rows per model call.
    """
    from diffalign.pipelines.baselines import finish_chains

    steps = sorted(set(branch_steps))
    if not steps or steps[0] < 0 or steps[-1] >= chain.num_steps:
        raise ValueError(
            f"branch steps must lie in [0, {chain.num_steps}) (0 = branch from the starting "
            f"noise), got {list(branch_steps)}."
        )
    if prefixes < 2 or continuations < 2:
        raise ValueError("A variance split needs at least 2 prefixes and 2 continuations each.")
    generator = torch.Generator(device=getattr(chain, "device", "cpu")).manual_seed(seed)
    latents = chain.initial_noise(prefixes, generator)
    stored = {}
    for position in range(steps[-1] + 1):
        if position in steps:
            stored[position] = latents.clone()
        if position < steps[-1]:
            latents, _ = chain.step(latents, torch.full((prefixes,), position), generator)
    results = {}
    for step in steps:
        starts = stored[step].repeat_interleave(continuations, dim=0)
        scores = [
            chain.score(finish_chains(chain, starts[i : i + batch_size], generator, start=step))
            for i in range(0, len(starts), batch_size)
        ]
        results[step] = torch.cat(scores).view(prefixes, continuations)
    return results


def run_branching_benchmark(
    pipeline: DiffusionPipeline,
    reward: Reward,
    prompts: list[str],
    branch_steps: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 3.0,
    prefixes: int = 4,
    continuations: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    eta: float = 1.0,
) -> dict:
    """``variance_split`` per branch step, per prompt and averaged over the prompts (chains
    of stochastic DDIM at ``eta``)."""
    from diffalign.pipelines.chain import PipelineChain

    per_prompt = []
    for index, prompt in enumerate(tqdm(prompts, desc="bench branching", disable=not progress)):
        chain = PipelineChain(pipeline, prompt, reward, steps, guidance_scale, eta=eta)
        rewards = branch_rewards(chain, branch_steps, prefixes, continuations, batch_size,
                                 seed + index)  # fmt: skip
        per_prompt.append({step: variance_split(r) for step, r in rewards.items()})
    summary = {}
    for step in sorted(per_prompt[0]):
        rows = [p[step] for p in per_prompt]
        summary[str(step)] = {key: _finite_mean([row[key] for row in rows]) for key in rows[0]}
        summary[str(step)]["nfe_per_continuation"] = chain.step_cost(steps - step)
    return {
        "by_branch_step": summary,
        "per_prompt": [{str(k): v for k, v in p.items()} for p in per_prompt],
        "undecided_prompts": sum(math.isnan(p[min(p)]["decided_share"]) for p in per_prompt),
    }


def _finite_mean(values: list[float]) -> float:
    return torch.tensor(values, dtype=torch.float64).nanmean().item()


def format_branching_table(results: dict) -> str:
    """One line per branch step: the decided share and the spread of the continuations."""
    lines = ["branch step  decided share  within std  total std  mean  best continuation"]
    for step, row in results["by_branch_step"].items():
        lines.append(f"{step:>11}  {row['decided_share']:13.3f}  {row['within_std']:10.3f}  "
                     f"{row['total_std']:9.3f}  {row['mean_reward']:.3f}  "
                     f"{row['mean_best_continuation']:.3f}")  # fmt: skip
    return "\n".join(lines)
