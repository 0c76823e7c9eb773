"""Probe for the DTS log: does a few-step deterministic jump to the end value a mid-chain state?

A tree search (or SMC) that knew, at chain position k, which states have the best continuations
could drop the others before paying for their last steps. The predicted clean latent (x0-hat, a
one-step jump) tells little before step 12 on `shapes` (DTS log). This probe measures a
jump of J deterministic DDIM steps (eta 0, J = 1 is x0-hat) from the state to the end: for each
world prompt, 16 chains (20 DDIM steps, eta 1, the model's CFG; chain k on noise stream k, as
`diffalign bench dts` draws them), and from each chain's state at steps 6 and 10 the jumps'
rewards and 6 stochastic continuations (eta 1) to the end. The continuations' mean estimates the
state's value (its conditional mean reward), their max what a search branching there finds.

It prints, per branch step and jump length, the within-prompt correlation of the jump's reward
with the state's value and with the chain's own final reward, next to how well the value itself
is estimated (two halves of the continuations) and predicts the chain's reward; then it replays
screen-and-extend searches (chains to step k, valued, the best one continued) against
best-of-n at similar NFEs.

Usage (1 torch thread):
    python docs/probes/lookahead_value.py --split validation --num-prompts 24 \
        --out runs/probe/lookahead-val.pt
"""

from __future__ import annotations

import torch
from probe_draws import STEPS, continuation_rewards, pool_chains, probe_main, world_chains

POOL, TAILS, BRANCH_STEPS, JUMPS = 16, 6, (6, 10), (1, 2, 4)


def jump(chain, latents, start: int, num_jumps: int):
    """Deterministic DDIM (eta 0) from chain position ``start`` to the end in ``num_jumps``
    steps spread evenly over the rest of the chain; returns the clean latents."""
    stops = torch.linspace(start, chain.num_steps, num_jumps + 1).round().long().tolist()
    for here, there in zip(stops[:-1], stops[1:], strict=True):
        t = chain.timesteps[here]
        following = chain.timesteps[there] if there < chain.num_steps else chain.next_timesteps[-1]
        with torch.no_grad():
            output = chain._predict(latents, torch.full((len(latents),), int(t)))
        chain.nfe += len(latents) * chain.rows_per_sample
        latents = chain.schedule.step(output, int(t), latents, int(following), eta=0.0).prev_sample
    return latents


def collect(split: str, num_prompts: int, seed: int) -> list[dict]:
    """Pool rewards, jump rewards and continuation rewards for each prompt."""
    draws = []
    for index, prompt, chain in world_chains(split, num_prompts):
        finals, states = pool_chains(chain, seed + index, POOL, POOL, BRANCH_STEPS)
        draw = {"prompt": prompt, "pool": chain.score(finals), "tails": {}, "jumps": {}}
        for k, state in states.items():
            draw["tails"][k] = continuation_rewards(chain, state, k, TAILS, seed + index)
            for j in JUMPS:
                draw["jumps"][(k, j)] = chain.score(jump(chain, state, k, j))
        draws.append(draw)
        print(f"{index + 1}/{num_prompts} {prompt}: best of {POOL} {draw['pool'].max():.3f}")
    return draws


def _within(values: list[torch.Tensor]) -> torch.Tensor:
    """Each prompt's values centred on that prompt's mean, concatenated."""
    return torch.cat([v - v.mean() for v in values])


def correlation(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Within-prompt Pearson correlation of two per-prompt series."""
    x, y = _within(a), _within(b)
    denominator = x.norm() * y.norm()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def report(draws: list[dict]) -> None:
    """Print the jumps' correlations with the states' values and the chains' rewards."""
    pool = [d["pool"] for d in draws]
    print(f"{len(draws)} prompts, {POOL} chains each, {TAILS} continuations per state")
    for k in BRANCH_STEPS:
        tails = [d["tails"][k] for d in draws]
        # split halves: one half estimates the value, the other stands for a fresh continuation
        value_a, value_b = [t[:, ::2].mean(1) for t in tails], [t[:, 1::2].mean(1) for t in tails]
        ceiling = correlation(value_a, value_b)  # reliability of a half-mean estimate
        value = [t.mean(1) for t in tails]
        print(f"step {k}: value half vs half r = {ceiling:.2f}; value vs the chain's own "
              f"reward r = {correlation(value, pool):.2f}")  # fmt: skip
        for j in JUMPS:
            jumps = [d["jumps"][(k, j)] for d in draws]
            print(f"  jump {j} step(s), {2 * j} NFEs with CFG: r with value "
                  f"{correlation(jumps, value):.2f}, with one continuation "
                  f"{correlation(jumps, [t[:, 0] for t in tails]):.2f}, with the chain's own "
                  f"reward {correlation(jumps, pool):.2f}")  # fmt: skip


def screen(draw: dict, k: int, rank: str, prefixes: int, tails: int, j: int = 2) -> tuple:
    """(NFEs, best reward) of one screen-and-extend search on one prompt, replayed offline.

    ``prefixes`` chains run to step ``k``; each is valued (``rank``: "jump" by its ``j``-step
    jump's reward, "value" by the mean of its continuations, an oracle, or "none": the first);
    the best-valued one is continued ``tails`` times (its own chain's end first, then its
    continuations). The jumps' images only value states: they are not counted as samples.
    """
    order = {
        "jump": lambda: draw["jumps"][(k, j)][:prefixes],
        "value": lambda: draw["tails"][k][:prefixes].mean(1),
        "none": lambda: -torch.arange(prefixes, dtype=torch.float32),
    }[rank]()
    chosen = int(order.argmax())
    ends = torch.cat([draw["pool"][chosen : chosen + 1], draw["tails"][k][chosen]])[:tails]
    cost = 2 * (prefixes * k + (prefixes * j if rank == "jump" else 0) + tails * (STEPS - k))
    return cost, float(ends.max())


def report_all(draws: list[dict]) -> None:
    """The correlations, then the replayed searches."""
    report(draws)
    report_schemes(draws)


def report_schemes(draws: list[dict]) -> None:
    """Mean best reward of screen-and-extend searches against best-of-n at similar NFEs."""
    full = 2 * STEPS
    for n in (4, 8, 11, 16):
        best = sum(float(d["pool"][:n].max()) for d in draws) / len(draws)
        print(f"best-of-{n} ({n * full} NFEs): {best:.3f}")
    for k in BRANCH_STEPS:
        for prefixes, tails in ((8, 7), (12, 7), (16, 7), (16, 4)):
            line = []
            for rank in ("none", "jump", "value"):
                runs = [screen(d, k, rank, prefixes, tails) for d in draws]
                mean = sum(r for _, r in runs) / len(runs)
                line.append(f"{rank} {mean:.3f} ({runs[0][0]} NFEs)")
            print(f"step {k}, {prefixes} prefixes, {tails} ends: " + ", ".join(line))


if __name__ == "__main__":
    probe_main(__doc__.split("\n")[0], collect, report_all)
