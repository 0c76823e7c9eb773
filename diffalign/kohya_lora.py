"""A LoRA adapter as one ``.safetensors`` file in kohya's layout, for A1111 / ComfyUI.

Most LoRAs that people share were trained with kohya's sd-scripts, and the web UIs read that
layout: one entry per adapted layer, ``lora_unet_<layer path, dots as underscores>`` with
``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (the
layer's scale is ``alpha / rank``, as peft's ``lora_alpha / r``). The layer paths follow the
network kohya trains on: diffusers' UNet names for SD 1.x / 2.x, the original (``input_blocks``)
names for SDXL. Text-encoder layers, when the adapter has them (diffalign's trainers adapt the
UNet alone; LoRAs from elsewhere may not), are ``lora_te_text_model_<path>`` (SDXL:
``lora_te1_`` and ``lora_te2_`` for its two encoders). diffusers reads all of it back
(``pipeline.load_lora_weights(FILE)``, :func:`diffalign.lora.load_lora`), which the tests use
to check the round trip. SD3 adapters stay in diffusers' format
(:func:`diffalign.lora.save_lora`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.files import atomic_path

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

KOHYA_LORA_FILE = "kohya_lora.safetensors"  # its name in a training run's lora/ folder
# each adapted component's entry prefix
_PREFIXES_SD = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_PREFIXES_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# what sd-scripts writes in ``ss_base_model_version``; the web UIs show it
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def kohya_family(pipeline: DiffusionPipeline) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"``: the base model a kohya LoRA file names (SD3:
    refused)."""
    from diffalign.models import UnsupportedModelError, pipeline_family

    family = pipeline_family(pipeline)
    if family == "sd3":
        raise UnsupportedModelError(
            "kohya-layout LoRA files are written for SD 1.x / 2.x and SDXL UNets; keep an SD3 "
            "adapter in diffusers' format (`diffalign.lora.save_lora(pipeline, DIR)`), which "
            "`pipeline.load_lora_weights(DIR)` reads."
        )
    if family == "sdxl":
        return "sdxl"
    return "sd2" if pipeline.text_encoder.config.hidden_act == "gelu" else "sd1"


def kohya_lora_state_dict(
    pipeline: DiffusionPipeline, adapter_name: str = "default"
) -> dict[str, Tensor]:
    """The LoRA adapter ``adapter_name`` (the UNet's and any text encoder's layers) under kohya's
    names (see the module docstring).

    Raises:
        LoraLayoutError: no component has an adapter of that name, or it is a DoRA adapter.
        UnsupportedModelError: an SD3 pipeline.
    """
    state = {}
    for layers in _named_layers(pipeline, adapter_name).values():
        for name, layer in layers.values():
            down = layer.lora_A[adapter_name].weight.detach().cpu().contiguous()
            up = layer.lora_B[adapter_name].weight.detach().cpu().contiguous()
            # alpha / rank is the scale peft applies (whatever its own alpha, rsLoRA included)
            alpha = float(layer.scaling[adapter_name]) * down.shape[0]
            state[f"{name}.lora_down.weight"] = down
            state[f"{name}.lora_up.weight"] = up
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return state


def kohya_lora_names(
    pipeline: DiffusionPipeline, adapter_name: str = "default"
) -> dict[str, dict[str, str]]:
    """For each component that ``adapter_name`` adapts (``unet``, ``text_encoder``,
    ``text_encoder_2``), its adapted layers' paths with their kohya entry names: a prefix
    (``lora_unet_``, ``lora_te_``; SDXL ``lora_te1_`` / ``lora_te2_``) and the layer's path in the
    network kohya trains on, dots as underscores."""
    return {component: {path: name for path, (name, _) in layers.items()}
            for component, layers in _named_layers(pipeline, adapter_name).items()}  # fmt: skip


def _named_layers(
    pipeline: DiffusionPipeline, adapter_name: str, refuse_dora: bool = True
) -> dict[str, dict[str, tuple[str, torch.nn.Module]]]:
    """Per adapted component, each adapted layer's path with its kohya name and the layer
    (``refuse_dora``: a LoraLayoutError for a DoRA adapter, which the writer cannot hold)."""
    from diffalign.lora import has_adapter

    family = kohya_family(pipeline)  # refuses SD3 first
    prefixes = _PREFIXES_SDXL if family == "sdxl" else _PREFIXES_SD
    names = {}
    for component, prefix in prefixes.items():
        module = getattr(pipeline, component, None)
        if not has_adapter(module, adapter_name):
            continue
        layers = _lora_layers(module, adapter_name, refuse_dora)
        paths = list(layers)
        if component == "unet":
            in_kohya = _unet_paths(module, paths, original=family == "sdxl")
        else:  # transformers' CLIP, under the original's text_model level
            in_kohya = {path: path if path.startswith("text_model.") else f"text_model.{path}"
                        for path in paths}  # fmt: skip
        names[component] = {path: (prefix + in_kohya[path].replace(".", "_"), layers[path])
                            for path in paths}  # fmt: skip
    if not names:
        from diffalign.lora import LoraLayoutError

        raise LoraLayoutError(f"The pipeline has no LoRA adapter named {adapter_name!r}.")
    return names


def _unet_paths(unet: torch.nn.Module, paths: list[str], original: bool) -> dict[str, str]:
    """The UNet layers' paths in diffusers' UNet, or (``original``, SDXL) in the original one."""
    if not original:
        return {path: path for path in paths}
    from diffalign.single_file import unet_ldm_names

    keys = list(unet.state_dict())  # all of them: the original names depend on the whole UNet
    names = unet_ldm_names(keys, unet.config.layers_per_block)
    suffix = ".base_layer.weight"  # a peft-wrapped layer's own weight
    return {path: names[path + suffix].removesuffix(suffix) for path in paths}


def _lora_layers(
    module: torch.nn.Module, adapter_name: str, refuse_dora: bool = True
) -> dict[str, torch.nn.Module]:
    """The layers of ``module`` that ``adapter_name`` adapts, by path; refuses DoRA."""
    from diffalign.lora import LoraLayoutError, lora_layers

    layers = lora_layers(module, adapter_name)
    if refuse_dora and any(layer.use_dora.get(adapter_name, False) for layer in layers.values()):
        raise LoraLayoutError(
            f"The adapter {adapter_name!r} is a DoRA adapter, which the kohya layout written here "
            "does not hold: save it with `diffalign.lora.save_lora` instead."
        )
    return layers


def save_kohya_lora(
    pipeline: DiffusionPipeline, path: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Write the LoRA adapter as one kohya-layout ``.safetensors`` file (atomically), with
    sd-scripts' metadata (network module, rank, alpha, base model version) that the web UIs
    show. Read it back with :func:`diffalign.lora.load_lora` or ``load_lora_weights``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Write LoRA files as .safetensors, got {path.name!r}.")
    state = kohya_lora_state_dict(pipeline, adapter_name)
    ranks = {value.shape[0] for key, value in state.items() if key.endswith(".lora_down.weight")}
    alphas = {value.item() for key, value in state.items() if key.endswith(".alpha")}
    metadata = {
        "format": "pt",
        "written_by": "diffalign",
        "ss_network_module": "networks.lora",
        "ss_base_model_version": BASE_MODEL_VERSIONS[kohya_family(pipeline)],
    }
    if len(ranks) == 1:  # one rank and one alpha for the whole network, as sd-scripts records
        metadata["ss_network_dim"] = str(ranks.pop())
    if len(alphas) == 1:
        metadata["ss_network_alpha"] = f"{alphas.pop():g}"
    with atomic_path(path) as staging:
        save_file(state, staging, metadata=metadata)
    return path


def apply_kohya_alphas(
    pipeline: DiffusionPipeline, path: str | os.PathLike, adapter_name: str = "default"
) -> int:
    """Give each layer of the adapter ``adapter_name``, just loaded from the kohya file at
    ``path``, the alpha the file holds for it; returns how many layers changed.

    diffusers (0.42) files the alphas of attention layers (``to_q`` ... ``to_out.0``) under
    names no layer has, so those layers take the file's most common alpha instead of their own:
    a file whose alpha varies by layer (kohya's resized LoRAs) loads at the wrong strength
    there. The layers' scales and the adapter's config (``alpha_pattern``, what
    :func:`diffalign.lora.save_lora` writes) are both set right. Files of diffusers' layout and
    other models (SD3) are left alone.
    """
    from diffalign.models import pipeline_family

    alphas = _kohya_alphas(path)
    if not alphas or pipeline_family(pipeline) == "sd3":
        return 0
    changed = 0
    for component, layers in _named_layers(pipeline, adapter_name, refuse_dora=False).items():
        corrected = {}
        for layer_path, (name, layer) in layers.items():
            alpha, rank = alphas.get(name), layer.r[adapter_name]
            loaded = layer.scaling[adapter_name] * rank
            if alpha is None or math.isclose(loaded, alpha, rel_tol=1e-6):
                continue
            layer.lora_alpha[adapter_name] = alpha
            layer.scaling[adapter_name] = alpha / rank
            corrected[layer_path] = alpha
        config = getattr(pipeline, component).peft_config[adapter_name]
        config.alpha_pattern = {**config.alpha_pattern, **corrected}
        changed += len(corrected)
    return changed


def _kohya_alphas(path: str | os.PathLike) -> dict[str, float]:
    """The per-layer alphas of the kohya file diffusers reads at ``path`` (a file, or a folder
    with ``pytorch_lora_weights.safetensors`` or a single ``.safetensors``), by kohya name;
    empty for a file in diffusers' layout."""
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        found = sorted(file.glob("*.safetensors"))
        default = file / "pytorch_lora_weights.safetensors"
        file = default if default.is_file() else found[0] if len(found) == 1 else None
    if file is None or file.suffix != ".safetensors":
        return {}
    with safe_open(str(file), framework="pt") as weights:
        keys = list(weights.keys())
        if not all(key.startswith(("lora_unet_", "lora_te")) for key in keys):
            return {}
        return {key.removesuffix(".alpha"): weights.get_tensor(key).item()
                for key in keys if key.endswith(".alpha")}  # fmt: skip
