"""Diffusion Tree Sampling (DTS) and its greedy search variant DTS* over a denoising chain.

The tree's root stands before the chain; its children are draws of the starting noise, and a node
at chain position ``p`` holds the latent after ``p`` denoising steps, its soft value and its visit
count. One rollout:

1. **select**: from the root, descend while the node already has as many children as progressive
   widening allows (``ceil(widening_c * visits ** widening_alpha)``, at least one); pick a child
   uniformly or by Boltzmann sampling over soft values (``mode="sample"``, DTS; see below) or by
   UCT (``mode="search"``, DTS*: ``value + exploration * sqrt(log N(parent) / N(child))``);
2. **expand**: draw one new child with one stochastic denoising step (fresh noise at the root);
3. **roll out**: continue the chain to a clean sample, adding every latent to the tree;
4. **back up**: the leaf's value is its reward; every ancestor's value becomes the log-mean-exp
   of its children's values at inverse temperature ``lambda`` (their plain mean when
   ``lambda = 0``), the soft Bellman backup of ``V_t = (1/lambda) log E[exp(lambda V_{t-1})]``.

DTS outputs Boltzmann descents: from the root, a child with probability proportional to
``exp(lambda * value)``. Children are draws from the base sampler, so each descent step is a
self-normalised estimate of the tilted step ``p(x_{t-1} | x_t) exp(lambda V_{t-1})`` and the
output approaches ``p(x0) exp(lambda r(x0))`` as rollouts grow; ``lambda = 0`` gives back the
base sampler. That holds when the tree's shape does not depend on the rewards. Choosing the
child to grow by Boltzmann weights as well (``uniform_selection=0``, the paper's rule as we
reconstruct it) starves branches whose first rollouts scored low, and their estimates stay
low: on the Gaussian-mixture toy the output's total-variation distance to the exact target
stayed near 0.2 from 16 to 256 rollouts, against 0.006 when the child to grow is chosen
uniformly. So DTS grows the tree uniformly by default (``uniform_selection=1``), and the soft
values steer only the output. DTS* returns the best samples found; its UCT search is anytime.

Several rollouts are in flight at once (pending visits count towards widening) and advance
together, each at its own chain position, in one UNet batch that is refilled as soon as one of
them finishes. The budget is in NFEs and is never exceeded.

The widening rule, rollout nodes kept in the tree and DTS* using the same soft backup are choices
made here where the paper leaves them open; the tests check the sampler against an exactly
computed tilted distribution.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.pipelines.chain import DenoisingChain, chain_generator

TREE_MODES = ("sample", "search")
EXPANSIONS = ("shallowest", "random")
BRANCH_STREAMS = 2**40
"""Noise streams of rollouts that branch below the root are numbered from here, apart from the
streams of fresh chains from the root (see :func:`~diffalign.pipelines.chain.chain_generator`)."""


class TreeFullError(RuntimeError):
    """The tree reached ``max_nodes`` before it produced a single sample."""


@dataclass
class SearchStats:
    """Compute spent and progress of one search (tree, best-of-N or SMC).

    ``best_reward`` and ``nfe_at`` have one entry per finished sample (rollout, chain or
    particle): the best reward found so far and the NFEs spent when it finished.
    """

    sampler: str
    nfe: int = 0
    reward_calls: int = 0
    samples: int = 0
    tree_nodes: int = 0
    best_reward: list[float] = field(default_factory=list)
    nfe_at: list[int] = field(default_factory=list)
    stopped: str = "budget"

    def record(self, reward: float, nfe: int) -> None:
        """Note one finished sample and the compute spent when it finished."""
        best = max(reward, self.best_reward[-1]) if self.best_reward else reward
        self.best_reward.append(best)
        self.nfe_at.append(nfe)
        self.samples += 1

    def best_within(self, budget_nfe: int) -> float:
        """The best reward found within ``budget_nfe`` NFEs (NaN if nothing finished by then)."""
        found = [r for r, n in zip(self.best_reward, self.nfe_at, strict=True) if n <= budget_nfe]
        return found[-1] if found else math.nan

    def to_dict(self) -> dict:
        """A JSON-ready summary (the per-sample curves included)."""
        return dict(self.__dict__)


@dataclass
class SearchResult:
    """Selected clean latents (K, ...), their rewards (K,) and the search statistics."""

    latents: Tensor
    rewards: Tensor
    stats: SearchStats


def soft_value(values: list[float], inverse_temperature: float) -> float:
    """``(1/lambda) log mean exp(lambda v)``; the plain mean when ``lambda == 0``."""
    if inverse_temperature == 0:
        return sum(values) / len(values)
    lam, top = inverse_temperature, max(values)
    total = sum(math.exp(lam * (v - top)) for v in values)
    return top + math.log(total / len(values)) / lam


def widening_cap(visits: int, c: float, alpha: float) -> int:
    """How many children a node with ``visits`` visits may have (progressive widening)."""
    return max(1, math.ceil(c * visits**alpha))


class DiffusionTree:
    """Nodes of the search tree in flat lists (index 0 is the root, which holds no latent)."""

    def __init__(self, storage_device: torch.device | str = "cpu", max_nodes: int = 100_000):
        self.storage_device = torch.device(storage_device)
        self.max_nodes = max_nodes
        self.parent: list[int] = [-1]
        self.position: list[int] = [-1]
        self.children: list[list[int]] = [[]]
        self.visits: list[int] = [0]
        self.pending: list[int] = [0]
        self.value: list[float] = [math.nan]
        self.reward: dict[int, float] = {}
        self.latents: list[Tensor | None] = [None]

    def __len__(self) -> int:
        return len(self.parent)

    def add(self, parent: int, latent: Tensor) -> int:
        """Add a child of ``parent`` holding ``latent``; returns its index."""
        stored = self._store(latent.detach())
        index = len(self.parent)
        self.parent.append(parent)
        self.position.append(self.position[parent] + 1)
        self.children.append([])
        self.visits.append(0)
        self.pending.append(0)
        self.value.append(math.nan)
        self.latents.append(stored)
        self.children[parent].append(index)
        return index

    def _store(self, latent: Tensor) -> Tensor:
        # GPU latents kept on the CPU go to page-locked memory: the copy back to the GPU for a
        # later expansion can then run asynchronously, and both directions copy faster.
        if self.storage_device.type == "cpu" and latent.device.type == "cuda":
            stored = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)
            return stored.copy_(latent)
        return latent.to(self.storage_device)

    def latent(self, node: int, device: torch.device | str) -> Tensor:
        """The latent of ``node`` on ``device`` (asynchronous from pinned CPU storage)."""
        return self.latents[node].to(device, non_blocking=True)

    def valued_children(self, node: int) -> list[int]:
        """Children that have a value (pending rollouts excluded)."""
        return [c for c in self.children[node] if not math.isnan(self.value[c])]

    def path_to_root(self, node: int) -> list[int]:
        """``node`` and its ancestors, root last."""
        path = [node]
        while self.parent[path[-1]] >= 0:
            path.append(self.parent[path[-1]])
        return path

    def backup(self, leaf: int, reward: float, inverse_temperature: float) -> None:
        """Set the leaf's value to ``reward`` and refresh the soft values of its ancestors."""
        self.reward[leaf] = reward
        self.value[leaf] = reward
        for node in self.path_to_root(leaf):
            self.visits[node] += 1
            if node != leaf:
                values = [self.value[c] for c in self.valued_children(node)]
                self.value[node] = soft_value(values, inverse_temperature)


@dataclass
class TreeSettings:
    """The knobs of DTS / DTS* (see the module docstring).

    ``uniform_selection`` is the share of DTS's tree-growing choices made uniformly rather than
    by Boltzmann weights (1 keeps the output exact in the limit; below 1 focuses rollouts on
    high-value branches at the price of a bias). ``exploration`` is DTS*'s UCT constant.
    ``expansion`` picks the node to grow among those the widening cap leaves open on the
    selected path: ``"shallowest"`` (DTS's default) or ``"random"`` (DTS*'s default: branches
    start deep in the chain too, where rollouts are cheap; on the shapes world it found better
    samples for the same NFEs). ``storage_device`` holds the nodes' latents (default: the
    chain's device; ``"cpu"`` when GPU memory is short, at the price of a copy per step, into
    page-locked memory when the chain runs on CUDA);
    ``max_nodes`` caps the tree's size. ``branch_step`` (default None: anywhere) lets the tree
    grow only at the root (fresh chains, under the widening cap) and at the nodes at that chain
    position, which take any number of children: each chain's state there is an arm, and the
    selection rule (UCT for DTS*) spends continuations on the arms, a two-level search for
    rewards that the chain's state fixes only late (``diffalign bench branching`` tells where).
    """

    mode: str = "sample"
    inverse_temperature: float = 10.0
    exploration: float = 1.0
    widening_c: float = 1.0
    widening_alpha: float = 0.5
    uniform_selection: float = 1.0
    expansion: str | None = None
    rollouts_per_batch: int = 8
    max_nodes: int = 100_000
    storage_device: str | None = None
    branch_step: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in TREE_MODES:
            raise ValueError(f"mode must be one of {TREE_MODES}, got {self.mode!r}.")
        if self.inverse_temperature < 0:
            raise ValueError("inverse_temperature (lambda) must be >= 0.")
        if self.rollouts_per_batch < 1:
            raise ValueError("rollouts_per_batch must be at least 1.")
        if self.expansion is not None and self.expansion not in EXPANSIONS:
            raise ValueError(f"expansion must be one of {EXPANSIONS}, got {self.expansion!r}.")
        if not 0 <= self.uniform_selection <= 1:
            raise ValueError("uniform_selection is a probability: it must lie in [0, 1].")
        if self.widening_c <= 0 or not 0 <= self.widening_alpha <= 1:
            raise ValueError("Progressive widening needs widening_c > 0 and 0 <= alpha <= 1.")
        if self.branch_step is not None and self.branch_step < 0:
            raise ValueError(f"branch_step is a chain position >= 0, got {self.branch_step}.")
        if self.max_nodes < 1:
            raise ValueError(f"max_nodes must be at least 1, got {self.max_nodes}.")
        if self.storage_device is not None:
            try:
                torch.device(self.storage_device)
            except RuntimeError:
                raise ValueError(f"storage_device must name a torch device such as cpu or "
                                 f"cuda:0, got {self.storage_device!r}.") from None  # fmt: skip


@dataclass
class _Branch:
    """One rollout in flight: grown from ``start`` (whose path carries its pending mark), now at
    ``node``, whose latent it carries (``None`` for a finished sample revisited), drawing its
    noise from ``generator``."""

    start: int
    node: int
    latent: Tensor | None
    generator: torch.Generator | None = None


@dataclass
class _Budget:
    """NFEs of one search: the total, those promised to selected rollouts, those of the finished
    samples recorded so far, and why selection stopped."""

    total: int
    reserved: int = 0
    recorded: int = 0
    stopped: str = "budget"


class TreeSampler:
    """Runs DTS or DTS* on a :class:`DenoisingChain` within an NFE budget."""

    def __init__(self, chain: DenoisingChain, settings: TreeSettings, seed: int = 0):
        self.chain, self.settings = chain, settings
        default_expansion = "random" if settings.mode == "search" else "shallowest"
        self.expansion = settings.expansion or default_expansion
        if settings.branch_step is not None and settings.branch_step >= chain.num_steps:
            raise ValueError(
                f"branch_step={settings.branch_step} lies outside the chain: it must be below "
                f"its {chain.num_steps} steps (0 branches from the starting noise)."
            )
        self.device = getattr(chain, "device", torch.device("cpu"))
        self.tree = DiffusionTree(settings.storage_device or self.device, settings.max_nodes)
        # Each rollout draws from its own noise stream: the k-th fresh chain from the root from
        # stream k, as best-of-N's k-th chain does, so at one seed the tree starts from
        # best-of-N's chains whatever either's batch size (comparisons are paired).
        self.seed, self.branches_started = seed, 0
        self.rng = torch.Generator().manual_seed(seed + 1)

    # ------------------------------------------------------------------ selection

    def _boltzmann_weights(self, candidates: list[int]) -> Tensor:
        values = torch.tensor([self.tree.value[c] for c in candidates], dtype=torch.float64)
        return torch.softmax(values * self.settings.inverse_temperature, 0)

    def _choose_child(self, node: int) -> int:
        tree, settings = self.tree, self.settings
        candidates = tree.valued_children(node)
        if settings.mode == "sample":
            if torch.rand((), generator=self.rng) < settings.uniform_selection:
                return candidates[torch.randint(len(candidates), (1,), generator=self.rng).item()]
            weights = self._boltzmann_weights(candidates)
            return candidates[torch.multinomial(weights, 1, generator=self.rng).item()]
        values = torch.tensor([tree.value[c] for c in candidates], dtype=torch.float64)
        total = tree.visits[node] + tree.pending[node]
        counts = torch.tensor([tree.visits[c] + tree.pending[c] for c in candidates])
        bonus = settings.exploration * (math.log(max(total, 1)) / counts.double()).sqrt()
        return candidates[int(torch.argmax(values + bonus))]

    def select(self) -> int:
        """Descend to the node to expand (or to a finished sample); marks the path pending.

        Nodes with fewer children than the widening cap may be expanded. ``expansion="shallowest"``
        stops at the first one; ``"random"`` descends on to the end and picks one of them
        uniformly, so branches also start deep in the chain, where rollouts are cheap. With
        ``branch_step`` set only the root and the node at that position may grow, the latter
        without a cap; the descent ends there.
        """
        tree, settings, last = self.tree, self.settings, self.chain.num_steps
        node, open_nodes = 0, []
        while tree.position[node] < last:
            if tree.position[node] == settings.branch_step:  # an arm: always open, last on the path
                open_nodes.append(node)
                break
            cap = widening_cap(tree.visits[node] + tree.pending[node], settings.widening_c,
                               settings.widening_alpha)  # fmt: skip
            may_grow = settings.branch_step is None or node == 0
            valued = bool(tree.valued_children(node))
            if (may_grow and len(tree.children[node]) < cap) or not valued:
                open_nodes.append(node)
                if self.expansion == "shallowest" or not valued:
                    break
            node = self._choose_child(node)
        if open_nodes:
            pick = torch.randint(len(open_nodes), (1,), generator=self.rng).item()
            node = open_nodes[0 if self.expansion == "shallowest" else pick]
        for ancestor in tree.path_to_root(node):
            tree.pending[ancestor] += 1
        return node

    def rollout_cost(self, node: int) -> int:
        """NFEs to roll out from ``node`` to a clean sample."""
        return self.chain.step_cost(self.chain.num_steps - max(self.tree.position[node], 0))

    # ------------------------------------------------------------------ expansion

    def _begin(self, start: int) -> _Branch:
        """A rollout growing from ``start``: a fresh noise draw at the root, else its latent."""
        tree, chain = self.tree, self.chain
        if tree.position[start] == chain.num_steps:  # a finished sample revisited: no compute
            return _Branch(start, start, None)
        if start == 0:
            generator = chain_generator(self.seed, len(tree.children[0]), self.device)
            noise = chain.initial_noise(1, generator)[0]
            return _Branch(start, tree.add(0, noise), noise, generator)
        stream = BRANCH_STREAMS + self.branches_started
        self.branches_started += 1
        generator = chain_generator(self.seed, stream, self.device)
        return _Branch(start, start, tree.latent(start, chain.device), generator)

    def _advance(self, pool: list[_Branch]) -> None:
        """One denoising step for every rollout in ``pool``, each at its own chain position, in
        one UNet batch; every new latent joins the tree."""
        tree = self.tree
        batch = torch.stack([branch.latent for branch in pool])
        positions = torch.tensor([tree.position[branch.node] for branch in pool])
        stepped, _ = self.chain.step(batch, positions, [branch.generator for branch in pool])
        for row, branch in enumerate(pool):
            branch.node, branch.latent = tree.add(branch.node, stepped[row]), stepped[row]

    # ------------------------------------------------------------------ the loop

    def _check_room(self, planned_nodes: int) -> bool:
        return len(self.tree) + planned_nodes <= self.tree.max_nodes

    def _select_into(self, pool: list[_Branch], done: list[_Branch], budget: _Budget) -> bool:
        """Select rollouts until the UNet batch is full; ``False`` once the next one does not
        fit the budget (or the node cap): it is not started and its pending mark is undone."""
        tree, last, size = self.tree, self.chain.num_steps, self.settings.rollouts_per_batch
        while len(pool) < size and len(done) < size:
            node = self.select()
            cost = self.rollout_cost(node) if tree.position[node] < last else 0
            planned = sum(last - tree.position[b.node] for b in pool) + last - tree.position[node]
            fits = budget.reserved + cost <= budget.total
            if not fits or not self._check_room(planned):
                for ancestor in tree.path_to_root(node):
                    tree.pending[ancestor] -= 1
                budget.stopped = "budget" if not fits else "max_nodes"
                return False
            budget.reserved += cost
            branch = self._begin(node)
            (pool if branch.latent is not None else done).append(branch)
        return True

    def run(self, budget_nfe: int, progress: bool = False) -> SearchStats:
        """Roll out until the next rollout would exceed ``budget_nfe`` (or the node cap).

        The UNet batch is kept full: as soon as a rollout reaches a clean sample, another is
        selected in its place (rollouts that branch deep in the chain finish early; waiting for
        the slowest one of a batch left the GPU half busy). Samples are scored and backed up as
        soon as they finish (with those finishing in the same step), so selection sees them.
        """
        chain, settings = self.chain, self.settings
        stats = SearchStats("dts-star" if settings.mode == "search" else "dts")
        start_nfe, budget = chain.nfe, _Budget(budget_nfe)
        bar = tqdm(total=budget_nfe, desc=stats.sampler, unit="nfe", disable=not progress)
        pool, done, selecting, idle_backups = [], [], True, 0
        while True:
            if selecting:
                selecting = self._select_into(pool, done, budget)
            if not pool and not done:
                break
            if pool:
                self._advance(pool)
                done += [b for b in pool if self.tree.position[b.node] == chain.num_steps]
                pool = [b for b in pool if self.tree.position[b.node] < chain.num_steps]
            if done:
                computed = self._back_up(done, stats, budget)
                done, selecting = [], True  # the tree changed: a rollout that fits may exist
                idle_backups = 0 if computed else idle_backups + 1
                if idle_backups > 1000:
                    budget.stopped = "no_progress"
                    break
            bar.update(chain.nfe - start_nfe - bar.n)
        bar.close()
        stats.stopped = budget.stopped
        self._warn_if_full(stats)
        stats.nfe = chain.nfe - start_nfe
        stats.tree_nodes = len(self.tree)
        return stats

    def _back_up(self, done: list[_Branch], stats: SearchStats, budget: _Budget) -> bool:
        """Score the newly finished samples in one reward batch and back every rollout up;
        returns whether any rollout computed something (revisits of finished samples do not).

        Each new sample is recorded at the NFEs of the rollouts finished so far, counted one
        after another (as best-of-N counts its chains), so curves compare at equal compute.
        """
        tree, chain = self.tree, self.chain
        fresh = [branch.node for branch in done if branch.node not in tree.reward]
        rewards = {}
        if fresh:
            scores = chain.score(torch.stack([tree.latents[i] for i in fresh]).to(chain.device))
            rewards = dict(zip(fresh, scores.tolist(), strict=True))
        for branch in done:
            for ancestor in tree.path_to_root(branch.start):
                tree.pending[ancestor] -= 1
            reward = rewards.get(branch.node, tree.reward.get(branch.node))
            tree.backup(branch.node, reward, self.settings.inverse_temperature)
            if branch.node in rewards:
                budget.recorded += self.rollout_cost(branch.start)
                stats.record(reward, budget.recorded)
        stats.reward_calls += len(fresh)
        return bool(fresh)

    def _warn_if_full(self, stats: SearchStats) -> None:
        if stats.stopped != "max_nodes":
            return
        if not self.tree.reward:
            raise TreeFullError(
                f"The tree hit max_nodes={self.tree.max_nodes} before finishing one sample; "
                "raise max_nodes (each node stores one latent)."
            )
        warnings.warn(
            f"Tree sampling stopped at max_nodes={self.tree.max_nodes} nodes before spending its "
            "NFE budget; raise max_nodes (--max-nodes; memory: one latent per node; "
            "storage_device='cpu', --tree-storage-device cpu, keeps them off the GPU) or lower "
            "the budget.",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ results

    def leaf_distribution(self) -> dict[int, float]:
        """Each finished sample's probability under one Boltzmann descent from the root: the
        distribution DTS outputs, which approaches the tilted target as rollouts grow."""
        tree, last = self.tree, self.chain.num_steps
        probabilities, stack = {}, [(0, 1.0)]
        while stack:
            node, mass = stack.pop()
            if tree.position[node] == last:
                probabilities[node] = mass
                continue
            children = tree.valued_children(node)
            weights = self._boltzmann_weights(children).tolist()
            stack += [(child, mass * w) for child, w in zip(children, weights, strict=True)]
        return probabilities

    def results(self, count: int) -> tuple[Tensor, Tensor]:
        """``count`` outputs: independent Boltzmann descents (DTS) or the best samples (DTS*)."""
        tree = self.tree
        if self.settings.mode == "sample":
            distribution = self.leaf_distribution()
            candidates = list(distribution)
            weights = torch.tensor([distribution[i] for i in candidates], dtype=torch.float64)
            draws = torch.multinomial(weights, count, replacement=True, generator=self.rng)
            leaves = [candidates[i] for i in draws.tolist()]
        else:
            ranked = sorted(tree.reward, key=tree.reward.get, reverse=True)
            leaves = [ranked[i % len(ranked)] for i in range(count)]
        latents = torch.stack([tree.latents[i] for i in leaves])
        return latents, torch.tensor([tree.reward[i] for i in leaves])


def tree_search(
    chain: DenoisingChain,
    budget_nfe: int,
    settings: TreeSettings | None = None,
    num_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SearchResult:
    """Run DTS (``settings.mode="sample"``) or DTS* (``"search"``) within ``budget_nfe``."""
    settings = settings or TreeSettings()
    chain.check_budget(budget_nfe)
    sampler = TreeSampler(chain, settings, seed)
    stats = sampler.run(budget_nfe, progress)
    latents, rewards = sampler.results(num_samples)
    return SearchResult(latents, rewards, stats)
