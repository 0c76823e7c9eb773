"""LoRA adapters on diffusers pipelines, through peft: attach, switch off (the KL reference),
merge, save in diffusers' format, load (diffusers' or kohya's layout, with a one-line error for a
LoRA of another base model, leaving the pipeline as it was), describe, read a saved LoRA's
layout as training settings, and start a run from one (its denoiser layers copied into the
run's adapter, its text-encoder layers loaded frozen).

kohya's single-file layout for A1111 / ComfyUI is :mod:`diffalign.kohya_lora`; extracting a LoRA
from a fully fine-tuned model is :mod:`diffalign.lora_extract`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffalign.models import denoiser_name, denoiser_of

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    init: str | bool = "gaussian",
    dropout: float = 0.0,
    adapter_name: str = "default",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> nn.Module:
    """Attach a peft LoRA adapter to a diffusers model (UNet / transformer) in place.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (scale = alpha / rank); defaults to ``rank`` (scale 1).
        target_modules: module-name suffixes to adapt; the default is the attention projections.
        init: peft's ``init_lora_weights`` (``"gaussian"``: A Gaussian, B zero, so the adapter
            starts as the identity).
        dropout: LoRA dropout.
        rank_pattern, alpha_pattern: other ranks / alphas for some layers, by layer path or
            name suffix (peft's ``rank_pattern`` / ``alpha_pattern``).
    Returns the same model, with only the LoRA parameters left trainable.
    """
    from peft import LoraConfig

    if rank < 1 or any(value < 1 for value in (rank_pattern or {}).values()):
        raise ValueError(f"LoRA ranks must be >= 1, got {rank} and {dict(rank_pattern or {})}.")
    if not hasattr(model, "add_adapter"):
        raise TypeError(f"{type(model).__name__} does not support peft adapters (no add_adapter).")
    _check_lora_targets(model, target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        init_lora_weights=init,
        lora_dropout=dropout,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=adapter_name)
    return model


class LoraTargetError(ValueError):
    """LoRA target modules that name no layer of the model (peft would silently skip them)."""


def _check_lora_targets(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Raise a LoraTargetError naming the targets that match no Linear / Conv2d of ``model``."""
    layers = list(adaptable_layers(model))
    if not target_modules:
        raise LoraTargetError("No LoRA target modules given: name at least one (e.g. to_q).")
    missing = [t for t in target_modules if not any(_matches(n, t) for n in layers)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers} - {str(i) for i in range(10)})
        raise LoraTargetError(
            f"LoRA targets {missing} match no Linear or Conv2d layer of "
            f"{type(model).__name__}; its layer names end in: {', '.join(suffixes)} "
            "(attention projections: to_q, to_k, to_v, to_out.0)."
        )


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and (ungrouped) Conv2d layers of ``model`` a LoRA can adapt, by path (one
    under a peft layer by the path it had before it)."""

    def adaptable(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d)
                                                 and module.groups == 1)  # fmt: skip

    return {name.removesuffix(".base_layer"): module for name, module in model.named_modules()
            if ".lora_" not in name and adaptable(module)}  # fmt: skip


def _matches(path: str, target: str) -> bool:
    """Whether a LoRA target (a layer-name suffix, as peft reads ``target_modules``) names the
    layer at ``path``."""
    return path == target or path.endswith(f".{target}")


def layers_matching(model: nn.Module, target_modules: Sequence[str]) -> set[str]:
    """The paths of the layers of ``model`` that ``target_modules`` would adapt."""
    return {path for path in adaptable_layers(model)
            if any(_matches(path, target) for target in target_modules)}  # fmt: skip


def has_adapter(module: nn.Module | None, adapter_name: str = "default") -> bool:
    """Whether ``module`` (a pipeline component, or None) carries the peft adapter
    ``adapter_name``."""
    return module is not None and adapter_name in (getattr(module, "peft_config", None) or {})


def has_lora(model: nn.Module) -> bool:
    """Whether any peft LoRA layer sits in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base network (LoRA off) inside the block: the reference model of KL
    and DPO terms, with no second copy of the weights in memory."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active LoRA adapter into the base weights and remove the adapter layers (a
    diffusers UNet / transformer, or a transformers text encoder)."""
    if not has_lora(model):
        raise ValueError("The model has no LoRA adapter to merge.")
    if hasattr(model, "fuse_lora"):  # diffusers' models
        model.fuse_lora(lora_scale=1.0)
        model.unload_lora()
        return model
    from peft.tuners.lora import LoraLayer

    for layer in [module for module in model.modules() if isinstance(module, LoraLayer)]:
        layer.merge()  # its active adapters
    _strip_peft(model)
    return model


def merge_every_lora(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """Merge the LoRA layers of every component that has some (the denoiser's, and text
    encoders' such as an ``init_lora``'s) into its weights."""
    for component in _components(pipeline).values():
        if has_lora(component):
            merge_lora(component)
    return pipeline


def save_lora(
    pipeline: DiffusionPipeline, directory: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Save the LoRA adapter ``adapter_name`` in diffusers' format
    (``pytorch_lora_weights.safetensors`` with its rank/alpha metadata), loadable with
    ``pipeline.load_lora_weights(directory)``: the denoiser's layers (the UNet's; SD3's
    transformer's) and the text encoders' when it adapts them too (LoRAs from elsewhere may)."""
    from peft.utils import get_peft_model_state_dict

    parts = {}
    for name in (denoiser_name(pipeline), "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, name, None)
        if has_adapter(module, adapter_name):
            parts[f"{name}_lora_layers"] = get_peft_model_state_dict(
                module, adapter_name=adapter_name
            )
            parts[f"{name}_lora_adapter_metadata"] = module.peft_config[adapter_name].to_dict()
    if not parts:
        raise ValueError(f"The pipeline has no LoRA adapter named {adapter_name!r}.")
    type(pipeline).save_lora_weights(save_directory=directory, **parts)
    return Path(directory)


class LoraLayoutError(ValueError):
    """A LoRA adapter that does not fit the model it is loaded into (made for another base
    model, or of a kind diffusers cannot read), or the adapter it should fill (other layers,
    rank or scale)."""


def copy_lora_weights(
    pipeline: DiffusionPipeline, path: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Fill the denoiser's existing adapter ``adapter_name`` with the weights of the LoRA at
    ``path`` (a folder or file, as :func:`load_lora` reads): a trainer's start from a saved
    adapter. The saved one must adapt the same layers at the same ranks and scales; its
    text-encoder layers, if any, are not copied (:func:`load_text_encoder_lora` loads them).

    Raises:
        LoraLayoutError: it does not (the message says which setting to change).
    """
    with _staged_lora(pipeline, path) as staging:
        _check_lora_fits(pipeline, path, staging, adapter_name)
        with torch.no_grad():
            for layer in lora_layers(denoiser_of(pipeline), adapter_name).values():
                for weights in (layer.lora_A, layer.lora_B):
                    weights[adapter_name].weight.copy_(weights[staging].weight)
    denoiser_of(pipeline).set_adapter(adapter_name)


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """What a saved LoRA adapts, in a run's terms: its most common ``rank`` and ``alpha``, the
    layers of other ones (``rank_pattern`` / ``alpha_pattern``, by layer path, as kohya's
    resized LoRAs have them), and the shortest ``target_modules`` (layer-name suffixes) that
    pick out exactly its ``layers``."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: frozenset[str]
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    text_encoders: tuple[str, ...] = ()  # the other components it adapts (kept as they are)

    def settings(self) -> dict[str, Any]:
        """The layout as training settings (``lora_rank``, ``lora_alpha``, ...)."""
        return {"lora_rank": self.rank, "lora_alpha": self.alpha,
                "lora_target_modules": list(self.target_modules),
                "lora_rank_pattern": dict(self.rank_pattern),
                "lora_alpha_pattern": dict(self.alpha_pattern)}  # fmt: skip


def lora_layout(pipeline: DiffusionPipeline, path: str | os.PathLike) -> LoraLayout:
    """The layout of the LoRA at ``path`` (a folder or file, as :func:`load_lora` reads), read
    by loading it into ``pipeline`` beside its adapters and taking it out again: the settings a
    run needs to train that adapter on.

    The layout describes the denoiser's layers; ``text_encoders`` names the other components
    it adapts (:func:`load_text_encoder_lora` loads those as they are).

    Raises:
        LoraLayoutError: it does not load, or adapts no layer of the denoiser.
    """
    name = denoiser_name(pipeline)
    candidates = list(adaptable_layers(getattr(pipeline, name)))
    with _staged_lora(pipeline, path) as staging:
        layers = lora_layers(getattr(pipeline, name), staging)
        if not layers:
            raise LoraLayoutError(f"The LoRA at {path} adapts no layer of the {name}.")
        others = tuple(part for part, module in _components(pipeline).items()
                       if part != name and has_adapter(module, staging))  # fmt: skip
        layout = _layout_of(layers, staging, _target_suffixes(candidates, set(layers)))
    return dataclasses.replace(layout, text_encoders=others)


def load_text_encoder_lora(
    pipeline: DiffusionPipeline, path: str | os.PathLike, adapter_name: str = "default"
) -> tuple[str, ...]:
    """Load the text-encoder layers of the LoRA at ``path`` (none: nothing changes) into the
    pipeline's text encoders as the adapter ``adapter_name``, frozen, and not its denoiser
    layers: a run that trains the denoiser part of a LoRA keeps its text-encoder part as it is.
    Returns the components it adapted. The denoiser must not hold ``adapter_name`` yet."""
    name = denoiser_name(pipeline)
    denoiser = getattr(pipeline, name)
    had_lora = has_lora(denoiser)
    load_lora(pipeline, path, adapter_name)
    _drop_adapter(denoiser, adapter_name, strip=not had_lora)
    encoders = tuple(part for part, module in _components(pipeline).items()
                     if part != name and has_adapter(module, adapter_name))  # fmt: skip
    for part in encoders:
        for layer in lora_layers(getattr(pipeline, part), adapter_name).values():
            layer.requires_grad_(False)
    return encoders


def _layout_of(
    layers: dict[str, nn.Module], adapter_name: str, target_modules: tuple[str, ...] = ()
) -> LoraLayout:
    """The layout of the adapter ``adapter_name`` over its ``layers``."""
    ranks = {path: layer.r[adapter_name] for path, layer in layers.items()}
    alphas = {path: _alpha(layer, adapter_name) for path, layer in layers.items()}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    return LoraLayout(
        rank, alpha, target_modules, frozenset(layers),
        rank_pattern={path: value for path, value in sorted(ranks.items()) if value != rank},
        alpha_pattern={path: value for path, value in sorted(alphas.items()) if value != alpha},
    )  # fmt: skip


def _alpha(layer: nn.Module, adapter_name: str) -> float:
    """A peft LoRA layer's alpha (its scale times its rank), rounded off float noise."""
    return round(layer.scaling[adapter_name] * layer.r[adapter_name], 6)


def _most_common(values: Iterable[float]) -> Any:
    """The value most layers have (the larger one on a tie)."""
    counts = collections.Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


def _target_suffixes(candidates: Sequence[str], adapted: set[str]) -> tuple[str, ...]:
    """The shortest layer-name suffixes that, among the ``candidates``, pick out exactly the
    ``adapted`` layer paths (``to_q`` where every ``to_q`` is adapted; longer where only some
    are; a whole path at worst)."""
    chosen: set[str] = set()
    for path in sorted(adapted):
        if any(_matches(path, suffix) for suffix in chosen):
            continue
        parts = path.split(".")
        for length in range(1, len(parts)):
            suffix = ".".join(parts[-length:])
            picked = [name for name in candidates if _matches(name, suffix)]
            starts_at_a_name = not parts[-length].isdigit()  # not at a block's index
            if starts_at_a_name and all(name in adapted for name in picked):
                chosen.add(suffix)
                break
        else:
            chosen.add(path)
    return tuple(sorted(chosen))


@contextlib.contextmanager
def _staged_lora(pipeline: DiffusionPipeline, path: str | os.PathLike) -> Iterator[str]:
    """The LoRA at ``path`` loaded into ``pipeline`` under a staging name for the block, taken
    out after it (with the peft layers it added to components that had none), every parameter
    as trainable or frozen as before (peft's adapter switching makes active adapters
    trainable)."""
    import warnings

    staging = "diffalign_staged"
    components = _components(pipeline)
    had_lora = {name for name, module in components.items() if has_lora(module)}
    trainable = {parameter: parameter.requires_grad for module in components.values()
                 for parameter in module.parameters()}  # fmt: skip
    with warnings.catch_warnings():  # peft's notes on a second adapter and on deleting it
        warnings.simplefilter("ignore", UserWarning)
        load_lora(pipeline, path, adapter_name=staging)
        try:
            yield staging
        finally:
            for name, module in components.items():
                _drop_adapter(module, staging, strip=name not in had_lora)
            for parameter, was_trainable in trainable.items():
                parameter.requires_grad_(was_trainable)


def _components(pipeline: DiffusionPipeline) -> dict[str, nn.Module]:
    """The pipeline's components that are torch modules (those a LoRA can adapt), by name."""
    return {name: module for name, module in pipeline.components.items()
            if isinstance(module, nn.Module)}  # fmt: skip


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` that the adapter ``adapter_name`` adapts, by path."""
    from peft.tuners.lora import LoraLayer

    return {path: module for path, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}  # fmt: skip


def describe_lora(pipeline: DiffusionPipeline, adapter_name: str = "default") -> str:
    """What the adapter ``adapter_name`` adapts, in a line: its layers per component, with their
    rank(s) and alpha(s), e.g. ``"32 layers of the unet (rank 4, alpha 8)"``."""
    parts = []
    for name, component in pipeline.components.items():
        layers = lora_layers(component, adapter_name) if isinstance(component, nn.Module) else {}
        if layers:
            ranks = sorted({layer.r[adapter_name] for layer in layers.values()})
            alphas = sorted({layer.scaling[adapter_name] * layer.r[adapter_name]
                             for layer in layers.values()})  # fmt: skip
            parts.append(f"{len(layers)} layers of the {name} (rank {_span(ranks)}, alpha "
                         f"{_span(alphas)})")  # fmt: skip
    return "; ".join(parts) or f"no LoRA adapter named {adapter_name!r}"


def _span(values: list[float]) -> str:
    return f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g} to {values[-1]:g}"


def _check_lora_fits(pipeline, path, source: str, target: str) -> None:
    """Raise a LoraLayoutError unless the adapter ``source`` (loaded from ``path``) adapts the
    denoiser alone, at the layers, rank and scale of ``target``."""
    name = denoiser_name(pipeline)
    denoiser = getattr(pipeline, name)
    given, wanted = lora_layers(denoiser, source), lora_layers(denoiser, target)
    if given.keys() != wanted.keys():
        targets = ", ".join(_target_suffixes(list(adaptable_layers(denoiser)), set(given)))
        raise LoraLayoutError(
            f"The LoRA at {path} adapts {len(given)} layers of the {name}, the run's "
            f"lora_target_modules {len(wanted)}{_layer_differences(given, wanted)}. Set "
            f"lora_target_modules=[{targets}] (the LoRA's targets)."
        )
    mine, run = _layout_of(given, source), _layout_of(wanted, target)
    differing = [key for key in ("rank", "alpha", "rank_pattern", "alpha_pattern")
                 if getattr(mine, key) != getattr(run, key)]  # fmt: skip
    if differing:
        said = ", ".join(_setting(key, getattr(mine, key)) for key in differing)
        raise LoraLayoutError(
            f"The LoRA at {path} has other ranks or alphas than the run's adapter: set {said} "
            "(as diffalign.lora.lora_layout reads them; a training run's init_lora does so itself)."
        )


def _setting(key: str, value: Any) -> str:
    """A layout value as the training setting that holds it, shortened for a message."""
    if isinstance(value, dict):
        return f"lora_{key}=<{len(value)} layers>" if value else f"lora_{key}={{}}"
    return f"lora_{key}={value:g}"


def _layer_differences(given: dict, wanted: dict) -> str:
    """A few of the layers only one of two adapters adapts, for a message."""
    extra, missing = sorted(given.keys() - wanted.keys()), sorted(wanted.keys() - given.keys())
    return (f"; only the LoRA: {extra[:2]}" if extra else "") + (
        f"; only the run: {missing[:2]}" if missing else ""
    )


def load_lora(
    pipeline: DiffusionPipeline, path: str | os.PathLike, adapter_name: str = "default"
) -> DiffusionPipeline:
    """Load a LoRA adapter into ``pipeline``: a folder saved by ``save_lora`` (or any diffusers
    LoRA folder), or one ``.safetensors`` file, diffusers' or kohya's layout (A1111 / ComfyUI
    LoRAs, :func:`diffalign.kohya_lora.save_kohya_lora`). A LoRA that does not load leaves the
    pipeline as it was: the components it had reached lose the layers it added.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the pipeline already has an adapter named ``adapter_name``.
        LoraLayoutError: it does not fit the pipeline (another base model, another kind of
            adapter).
    """
    from diffalign.kohya_lora import apply_kohya_alphas

    _check_lora_path(path)
    components = _components(pipeline)
    taken = [name for name, module in components.items() if has_adapter(module, adapter_name)]
    if taken:
        raise ValueError(
            f"The pipeline's {', '.join(taken)} already has a LoRA adapter named "
            f"{adapter_name!r}: load this one under another adapter_name, or merge the first "
            "(merge_lora) before loading."
        )
    had_lora = {name for name, module in components.items() if has_lora(module)}
    try:
        with _diffusers_load_errors_unlogged():
            pipeline.load_lora_weights(path, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as error:  # diffusers' and torch's, pages long
        for name, module in components.items():
            _drop_adapter(module, adapter_name, strip=name not in had_lora)
        raise LoraLayoutError(
            f"The LoRA at {path} does not load into this {type(pipeline).__name__} "
            f"({type(error).__name__}: {_gist(error)}). Is it made for another base model (SD "
            "1.x, SD 2.x, SDXL, SD3), or another kind of adapter than LoRA?"
        ) from error
    apply_kohya_alphas(pipeline, path, adapter_name)  # diffusers' reader loses some of them
    return pipeline


def _check_lora_path(path: str | os.PathLike) -> None:
    """Raise a FileNotFoundError unless ``path`` is a file, or a folder with weight files."""
    if not Path(path).exists():
        raise FileNotFoundError(f"No LoRA folder or file at {path}.")
    weights = [*Path(path).glob("*.safetensors"), *Path(path).glob("*.bin")]
    if Path(path).is_dir() and not weights:
        raise FileNotFoundError(
            f"The folder {path} holds no LoRA weights (pytorch_lora_weights.safetensors, or "
            "another .safetensors / .bin file)."
        )


def _gist(error: Exception, limit: int = 300) -> str:
    """The first two lines of an error's message, cut at ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    gist = " ".join(lines[:2])
    return gist if len(gist) <= limit else gist[:limit] + "..."


@contextlib.contextmanager
def _diffusers_load_errors_unlogged() -> Iterator[None]:
    """Keep diffusers from logging a failed adapter load in full (a page of size mismatches)
    before it raises the same error, which :func:`load_lora` reports in a line."""
    import logging

    peft_logger = logging.getLogger("diffusers.loaders.peft")
    below_errors = _BelowLevel(logging.ERROR)
    peft_logger.addFilter(below_errors)
    try:
        yield
    finally:
        peft_logger.removeFilter(below_errors)


class _BelowLevel:
    """A logging filter passing only records under ``level``."""

    def __init__(self, level: int):
        self.level = level

    def filter(self, record) -> bool:
        return record.levelno < self.level


def drop_adapter(module: nn.Module, adapter_name: str = "default") -> None:
    """Remove the adapter ``adapter_name`` from ``module`` (a pipeline component); with no
    adapter left, its peft layers too, so that it is the plain network again."""
    others = [name for name in (getattr(module, "peft_config", None) or {}) if name != adapter_name]
    _drop_adapter(module, adapter_name, strip=not others)


def _drop_adapter(module: nn.Module, adapter_name: str, strip: bool) -> None:
    """Remove the adapter ``adapter_name`` from ``module``; with ``strip``, every peft layer and
    config (a component that had no LoRA before)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if strip:
        _strip_peft(module)
        return
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer) and adapter_name in getattr(layer, "lora_A", {}):
            layer.delete_adapter(adapter_name)
    (getattr(module, "peft_config", None) or {}).pop(adapter_name, None)


def _strip_peft(module: nn.Module) -> None:
    """Put every peft layer of ``module`` back to the layer it wraps and forget its adapters'
    configs (what a merged or never-adapted module should hold)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
