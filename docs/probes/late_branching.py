"""Probe for the DTS log: what could a search that branches late in the chain save on `shapes`?

For each world prompt it samples best-of-N's 32 chains (20 DDIM steps, eta 1, the model's CFG;
chain k on noise stream k, as `diffalign bench dts` draws them) and, for the first 8 chains, 12
continuations from their states at steps 10, 13 and 16. It then replays search strategies on
these draws, offline and at no further cost:

- best-of-N: the first n chains;
- hindsight: the 8 chains, then the continuations of the one whose continuations score best on
  average (an oracle: a search cannot know this);
- two-level bandits: the 8 chains, then continuations of the chain chosen by UCB (mean reward +
  c * sqrt(log n / n_i)) or greedily by its best reward so far.

Usage (2026-12-06: 32 prompts in 15 min on 1 torch thread):
    python docs/probes/late_branching.py --split validation --num-prompts 32 \
        --out runs/probe/val32.pt
"""

from __future__ import annotations

import math

from probe_draws import STEPS, continuation_rewards, pool_chains, probe_main, world_chains

POOL, ARMS, TAILS, BRANCH_STEPS = 32, 8, 12, (10, 13, 16)


def collect(split: str, num_prompts: int, seed: int) -> list[dict]:
    """Final rewards of the pool chains and of the continuations from each branch step."""
    draws = []
    for index, prompt, chain in world_chains(split, num_prompts):
        finals, states = pool_chains(chain, seed + index, POOL, ARMS, BRANCH_STEPS)
        tails = {k: continuation_rewards(chain, state, k, TAILS, seed + index)
                 for k, state in states.items()}  # fmt: skip
        draws.append({"prompt": prompt, "pool": chain.score(finals), "tails": tails})
        print(f"{index + 1}/{num_prompts} {prompt}: best of {POOL} {draws[-1]['pool'].max():.3f}")
    return draws


def two_level(draw: dict, k: int, rule: str, c: float = 0.0, budget: int = 1280) -> list:
    """(NFEs spent, reward) of each sample: the arms' chains, then continuations chosen by rule."""
    full, tail = 2 * STEPS, 2 * (STEPS - k)
    seen = {i: [float(draw["pool"][i])] for i in range(ARMS)}
    events = [((i + 1) * full, seen[i][0]) for i in range(ARMS)]
    spent, tails = ARMS * full, draw["tails"][k]
    while spent + tail <= budget:
        open_arms = [i for i in range(ARMS) if len(seen[i]) <= TAILS]
        if not open_arms:
            break
        pulls = sum(len(seen[i]) for i in open_arms)
        arm = max(open_arms, key=lambda i: _arm_score(seen[i], rule, c, pulls))
        value = float(tails[arm, len(seen[arm]) - 1])
        seen[arm].append(value)
        spent += tail
        events.append((spent, value))
    return events


def _arm_score(seen: list[float], rule: str, c: float, pulls: int) -> float:
    if rule == "greedy":
        return max(seen)
    return sum(seen) / len(seen) + c * math.sqrt(math.log(pulls) / len(seen))


def mean_best(runs: list[list], budget: int) -> float:
    """Mean over prompts of the best reward found within ``budget`` NFEs."""
    return sum(max(v for n, v in events if n <= budget) for events in runs) / len(runs)


def report(draws: list[dict]) -> None:
    """Print best-of-N, the hindsight oracle and the bandits against best-of-32."""
    full = 2 * STEPS
    best_of = [[((i + 1) * full, float(v)) for i, v in enumerate(d["pool"])] for d in draws]
    target = mean_best(best_of, POOL * full)
    print(f"{len(draws)} prompts; best-of-{POOL} {target:.3f}; best-of-8 "
          f"{mean_best(best_of, ARMS * full):.3f}")  # fmt: skip
    for k in BRANCH_STEPS:
        cost = ARMS * full + TAILS * 2 * (STEPS - k)
        oracle = []
        for d in draws:
            arm = int(d["tails"][k].mean(1).argmax())
            oracle.append(max(float(d["pool"][:ARMS].max()), float(d["tails"][k][arm].max())))
        print(f"step {k}: hindsight {sum(oracle) / len(oracle):.3f} at {cost} NFEs "
              f"({POOL * full / cost:.2f}x fewer than best-of-{POOL})")  # fmt: skip
        for rule, c in (("greedy", 0.0), ("ucb", 0.3), ("ucb", 1.0)):
            runs = [two_level(d, k, rule, c) for d in draws]
            match = next((b for b in range(full, POOL * full + 1, 4)
                          if mean_best(runs, b) >= target - 1e-9), None)  # fmt: skip
            ratio = f"{POOL * full / match:.2f}x" if match else "not reached"
            print(f"  {rule} c={c}: {mean_best(runs, 426):.3f} at 426 NFEs, "
                  f"{mean_best(runs, 640):.3f} at 640; matches best-of-{POOL}: "
                  f"{ratio}")  # fmt: skip


if __name__ == "__main__":
    probe_main(__doc__.split("\n")[0], collect, report)
