"""A LoRA adapter extracted from a fine-tuned model: the low-rank part of its weights' change.

A fully fine-tuned denoiser (a run with ``use_lora: false``) is as large as its base model. For
each Linear and Conv2d layer that training changed, :func:`extract_lora` keeps the ``rank``
largest singular directions of the change ``W_tuned - W_base`` (a truncated SVD: the closest
matrix of that rank, in Frobenius norm) and attaches them to the base model as a peft LoRA
adapter (scale 1), which :func:`diffalign.lora.save_lora` or
:func:`diffalign.kohya_lora.save_kohya_lora` then writes: a file of megabytes instead of
gigabytes. How much of the change the adapter keeps is reported, and so is what no LoRA can
hold (changed biases, normalization and embedding weights): nothing is dropped silently.

:func:`resize_lora` does the same for a LoRA adapter itself (kohya's ``resize_lora``): each
layer's change kept at a smaller rank.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class LoraExtraction:
    """What :func:`extract_lora` attached and what it could not.

    Attributes:
        rank: the adapter's rank.
        layers: the layers given an adapter (those whose weights changed).
        kept: the fraction of the change (its squared Frobenius norm, over all those layers) that
            the adapter reproduces; 1.0 when every change has at most ``rank`` directions.
        left_out: changed tensors that a LoRA cannot hold (biases, norms, embeddings).
    """

    rank: int
    layers: list[str]
    kept: float
    left_out: list[str]

    def describe(self) -> str:
        """One line for a log or a command's output."""
        line = (f"a rank-{self.rank} LoRA on {len(self.layers)} changed layers keeps "
                f"{100 * self.kept:.1f}% of the change")  # fmt: skip
        if self.left_out:
            shown = ", ".join(self.left_out[:3]) + (", ..." if len(self.left_out) > 3 else "")
            line += f"; {len(self.left_out)} changed tensors no LoRA holds are left out ({shown})"
        return line


def extract_lora(
    tuned: nn.Module, base: nn.Module, rank: int, adapter_name: str = "default"
) -> LoraExtraction:
    """Attach to ``base`` (in place) the rank-``rank`` LoRA adapter closest to ``tuned``'s change
    of each Linear / Conv2d weight, and report it.

    Args:
        tuned: the fine-tuned network (a UNet or SD3 transformer), the same architecture as
            ``base``.
        base: the network it was fine-tuned from; gets the adapter.
        rank: the adapter's rank (a layer whose change has fewer directions keeps all of them).

    Raises:
        ValueError: ``rank`` < 1, the two networks differ in architecture, or nothing changed.
    """
    from diffalign.lora import adaptable_layers, add_lora, lora_layers

    if rank < 1:
        raise ValueError(f"The LoRA rank must be >= 1, got {rank}.")
    tuned_state, base_state = tuned.state_dict(), base.state_dict()
    if tuned_state.keys() != base_state.keys() or any(
        tuned_state[key].shape != value.shape for key, value in base_state.items()
    ):
        raise ValueError("The tuned and base networks differ in architecture: no LoRA turns one "
                         "into the other.")  # fmt: skip
    factors, energy, kept = {}, 0.0, 0.0
    for path, module in adaptable_layers(base).items():
        change = tuned_state[f"{path}.weight"].float() - module.weight.detach().float()
        if not change.any():
            continue
        down, up, total, reproduced = _low_rank(change, rank)
        factors[path] = (down, up)
        energy, kept = energy + total, kept + reproduced
    if not factors:
        raise ValueError("The tuned network's Linear and Conv2d weights equal the base's: there is "
                         "no change to extract.")  # fmt: skip
    handled = {f"{path}.weight" for path in factors}
    left_out = sorted(key for key, value in base_state.items()
                      if key not in handled
                      and not torch.equal(value, tuned_state[key]))  # fmt: skip
    add_lora(base, rank=rank, alpha=rank, target_modules=list(factors), adapter_name=adapter_name)
    layers = lora_layers(base, adapter_name)
    with torch.no_grad():
        for path, (down, up) in factors.items():
            layer = layers[path]
            weights = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            for weight, factor in zip(weights, (down, up), strict=True):
                weight.copy_(factor.reshape(weight.shape))  # a convolution's: 4-D
    return LoraExtraction(rank, sorted(factors), kept / energy, left_out)


def _low_rank(change: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """``(down, up, energy, kept)``: ``up @ down`` is the closest rank-``rank`` matrix to
    ``change`` (flattened to ``out x rest`` for a convolution), the singular values split evenly
    between the factors; zero rows and columns pad a change of fewer directions to ``rank``;
    ``energy`` is the change's squared norm and ``kept`` the part the factors reproduce."""
    matrix = change.reshape(change.shape[0], -1)
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    used = min(rank, values.numel())
    kept_down, kept_up, energy, kept = _split_directions(left, values, right, used)
    down = torch.zeros(rank, matrix.shape[1])
    up = torch.zeros(matrix.shape[0], rank)
    down[:used], up[:, :used] = kept_down, kept_up
    return down, up, energy, kept


def _split_directions(left: Tensor, values: Tensor, right: Tensor, used: int):
    """``(down, up, energy, kept)`` from an SVD ``left @ diag(values) @ right``: its ``used``
    largest directions as LoRA factors, each taking the square root of the singular values;
    ``energy`` is the squared norm of the whole, ``kept`` of the part kept."""
    root = values[:used].sqrt()
    squares = values.square()
    return (root[:, None] * right[:used], left[:, :used] * root, float(squares.sum()),
            float(squares[:used].sum()))  # fmt: skip


@dataclasses.dataclass
class LoraResize:
    """What :func:`resize_lora` did.

    Attributes:
        rank: the largest rank a layer now has.
        kept: the fraction of the adapter's change (its squared Frobenius norm, over all layers)
            the resized adapter reproduces; 1.0 when no layer had more than ``rank`` directions.
        already_small: how many layers had at most ``rank`` directions.
        keep: the share of each layer's change it was asked to keep (None: all ``rank``
            directions, whatever they hold).
        ranks: each adapted layer's new rank, by ``component.path``.
    """

    rank: int
    kept: float
    already_small: int
    keep: float | None = None
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The adapted layers (``component.path``), all of them resized or kept."""
        return list(self.ranks)

    def describe(self) -> str:
        """One line for a log or a command's output."""
        chosen, by_share = sorted(set(self.ranks.values())), ""
        if self.keep is not None:
            by_share = (f", each to the rank that keeps {100 * self.keep:g}% of its change "
                        f"(ranks {chosen[0]} to {chosen[-1]})")  # fmt: skip
        return (f"resized {len(self.layers)} layers to rank <= {self.rank}{by_share} "
                f"({self.already_small} already were at most {self.rank}), keeping "
                f"{100 * self.kept:.1f}% of the adapter's change")  # fmt: skip


def resize_lora(
    pipeline, rank: int, adapter_name: str = "default", keep: float | None = None
) -> LoraResize:
    """Replace the LoRA adapter ``adapter_name`` of every component of ``pipeline`` it adapts
    by the closest one of rank ``rank`` (kohya's ``resize_lora``): per layer, the ``rank``
    largest singular directions of its change ``scale * B @ A``, found through the QR factors of
    ``B`` and ``A`` (an SVD of a rank x rank core, not of the whole weight). A layer of lower
    rank keeps its own (the adapter's ``rank_pattern``); the new adapter has scale 1.

    With ``keep`` (0 < keep <= 1), each layer gets the smallest rank, up to ``rank``, whose
    directions hold that share of its change's squared norm (kohya's dynamic ``sv_fro``): layers
    whose change is nearly low-rank shrink further.

    Raises:
        ValueError: ``rank`` < 1, ``keep`` outside (0, 1], no component has the adapter, or it
            is a DoRA adapter.
    """
    from diffalign.lora import lora_layers

    if rank < 1:
        raise ValueError(f"The LoRA rank must be >= 1, got {rank}.")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"keep is a share of each layer's change, in (0, 1]; got {keep}.")
    components = {name: part for name, part in pipeline.components.items()
                  if isinstance(part, nn.Module) and lora_layers(part, adapter_name)}  # fmt: skip
    if not components:
        raise ValueError(f"The pipeline has no LoRA adapter named {adapter_name!r} to resize.")
    energy, kept, small, ranks = 0.0, 0.0, 0, {}
    for name, module in components.items():
        factors = {}
        for path, layer in lora_layers(module, adapter_name).items():
            if layer.use_dora.get(adapter_name, False):
                raise ValueError("A DoRA adapter cannot be resized as a LoRA (its magnitudes).")
            down, up, total, reproduced = _resized_factors(layer, adapter_name, rank, keep)
            factors[path] = (down, up)
            energy, kept = energy + total, kept + reproduced
            small += layer.r[adapter_name] <= rank
            ranks[f"{name}.{path}"] = down.shape[0]
        _replace_adapter(module, factors, rank, adapter_name)
    share = kept / energy if energy else 1.0
    return LoraResize(rank, share, small, keep, ranks)


def _resized_factors(layer: nn.Module, adapter_name: str, rank: int, keep: float | None):
    """``(down, up, energy, kept)`` for one peft LoRA layer: factors of its change at rank
    ``min(rank, its rank)`` (with ``keep``, at most the rank holding that share of the change),
    shaped as its own ``lora_A`` / ``lora_B`` weights are."""
    a = layer.lora_A[adapter_name].weight.detach().float()
    b = layer.lora_B[adapter_name].weight.detach().float()
    down_flat, up_flat = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    q_up, r_up = torch.linalg.qr(up_flat)  # out x r, r x r
    q_down, r_down = torch.linalg.qr(down_flat.T)  # in x r, r x r
    core = float(layer.scaling[adapter_name]) * r_up @ r_down.T
    left, values, right = torch.linalg.svd(core)
    used = min(rank, values.numel(), _rank_keeping(values, keep))
    down, up, energy, kept = _split_directions(q_up @ left, values, right @ q_down.T, used)
    down, up = down.reshape(used, *a.shape[1:]), up.reshape(b.shape[0], used, *b.shape[2:])
    return down, up, energy, kept


def _replace_adapter(module: nn.Module, factors: dict, rank: int, adapter_name: str) -> None:
    """Swap ``module``'s adapter ``adapter_name`` for one holding ``factors`` (by layer path),
    at scale 1."""
    from diffalign.lora import add_lora, drop_adapter, lora_layers

    ranks = {path: down.shape[0] for path, (down, _) in factors.items()}
    smaller = {path: value for path, value in ranks.items() if value != rank}
    drop_adapter(module, adapter_name)
    add_lora(module, rank=rank, alpha=rank, target_modules=list(factors),
             adapter_name=adapter_name, rank_pattern=smaller, alpha_pattern=smaller)  # fmt: skip
    layers = lora_layers(module, adapter_name)
    with torch.no_grad():
        for path, (down, up) in factors.items():
            layers[path].lora_A[adapter_name].weight.copy_(down)
            layers[path].lora_B[adapter_name].weight.copy_(up)


def _rank_keeping(values: Tensor, keep: float | None) -> int:
    """The fewest of the (descending) singular ``values`` whose squares hold the share ``keep``
    of their sum (None, or a zero change: all of them)."""
    squares = values.square()
    if keep is None or not squares.sum() > 0:
        return values.numel()
    shares = squares.cumsum(0) / squares.sum()
    return int((shares < keep * (1 - 1e-6)).sum()) + 1
