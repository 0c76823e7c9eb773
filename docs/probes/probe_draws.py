"""What the DTS probes share: the shapes world's chains, their states and continuations, and the
command line that stores the draws and replays searches on them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

STEPS = 20


def world_chains(split: str, num_prompts: int) -> Iterator[tuple[int, str, object]]:
    """(index, prompt, chain) for the first ``num_prompts`` world prompts of ``split``: the
    shipped model's chain as `diffalign bench dts` runs it (20 DDIM steps, eta 1, its CFG)."""
    from diffalign.benchmarks.rollout import load_benchmark_pipeline
    from diffalign.pipelines.chain import PipelineChain
    from diffalign.pipelines.dts import DTSPipeline
    from diffalign.rewards import load_reward
    from diffalign.world import model_guidance_scale
    from diffalign.world.evaluate import heldout_prompts

    model = "assets/tiny-shapes"
    pipeline = load_benchmark_pipeline(model, torch.device("cpu"), torch.float32, DTSPipeline)
    pipeline.set_progress_bar_config(disable=True)
    reward, guidance = load_reward("shapes"), model_guidance_scale(model)
    for index, prompt in enumerate(heldout_prompts(num_prompts, split=split)):
        yield index, prompt, PipelineChain(pipeline, prompt, reward, STEPS, guidance, eta=1.0)


def pool_chains(chain, stream_seed: int, count: int, keep: int, branch_steps) -> tuple:
    """Chains 0 to ``count - 1`` (best-of-N's noise streams) to the end: (final latents, the
    first ``keep`` chains' states at each of ``branch_steps``)."""
    from diffalign.pipelines.chain import chain_generators

    generators = chain_generators(stream_seed, 0, count)
    latents, states = chain.initial_noise(count, generators), {}
    for position in range(chain.num_steps):
        if position in branch_steps:
            states[position] = latents[:keep].clone()
        latents, _ = chain.step(latents, torch.full((count,), position), generators)
    return latents, states


def continuation_rewards(chain, state, start: int, tails: int, stream_seed: int) -> torch.Tensor:
    """Rewards (len(state), tails) of ``tails`` stochastic continuations of each state from chain
    position ``start``, on noise streams apart from the pool's."""
    from diffalign.pipelines.baselines import finish_chains
    from diffalign.pipelines.chain import chain_generator

    starts = state.repeat_interleave(tails, 0)
    first = 10**6 + 1000 * start
    streams = [chain_generator(stream_seed, first + i) for i in range(len(starts))]
    finals = finish_chains(chain, starts, streams, start=start)
    return chain.score(finals).view(len(state), tails)


def probe_main(description: str, collect: Callable, report: Callable) -> None:
    """Parse the probes' shared options, collect the draws (or reuse stored ones), report."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--split", default="validation", choices=("validation", "heldout"))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="draws (.pt), reused if present")
    args = parser.parse_args()
    if args.out.exists():
        draws = torch.load(args.out)
    else:
        draws = collect(args.split, args.num_prompts, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(draws, args.out)
    report(draws)
