"""Stable Diffusion 1.x pipelines as one checkpoint file in the original (LDM) layout.

A1111, ComfyUI and most shared fine-tunes keep Stable Diffusion as a single ``.safetensors``
file with the original repository's names (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). :func:`save_single_file` writes a diffusers pipeline (a
trained run's ``final/`` for instance) in that layout; :func:`diffalign.models.load_pipeline` and
every ``--model`` read such files back through diffusers' ``from_single_file``. The names are
the inverse of diffusers' own single-file conversion, which the tests use to check the round trip.
The text encoder is written under SD 1.x's CLIP names; an SD 2.x pipeline's file reads back in
diffusers, but A1111 / ComfyUI look for SD 2.x's OpenCLIP names, which are not written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.files import atomic_path

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}  # fmt: skip
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}  # fmt: skip
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def is_single_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a one-file checkpoint rather than a pipeline folder."""
    return Path(path).suffix in SINGLE_FILE_SUFFIXES and not Path(path).is_dir()


def single_file_family(path: str | os.PathLike) -> str:
    """``"sd"``, ``"sdxl"`` or ``"sd3"``: which family a single-file checkpoint holds, read from
    its key names (a ``.safetensors`` header only; a pickled ``.ckpt`` is taken as SD 1.x/2.x)."""
    if Path(path).suffix != ".safetensors":
        return "sd"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(
        key.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for key in keys
    ):
        return "sd3"
    return "sd"


def _rename(key: str, renames: dict[str, str]) -> str:
    """``key`` with its leading module path replaced by the first entry of ``renames`` it has."""
    for old, new in renames.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    raise ValueError(
        f"No original-layout name for the weight {key!r}: this model has parts the Stable "
        "Diffusion 1.x / 2.x layout does not (save it with `save_pretrained` instead)."
    )


def unet_to_ldm(state: dict[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict under the original UNet's names."""
    per_level = layers_per_block + 1
    attention_levels = {
        int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)
    }
    out = {}
    for key, value in state.items():
        block = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                         r"\.(\d+)\.(.*)", key)  # fmt: skip
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if block:
            side, level, kind, index, rest = block.groups()
            ldm_key = _unet_block_key(side, int(level), kind, int(index), rest, per_level,
                                      int(level) in attention_levels)  # fmt: skip
            out[ldm_key] = value
        elif mid:
            kind, index, rest = mid.groups()
            position = 1 if kind == "attentions" else 2 * int(index)
            out[f"middle_block.{position}.{_resnet_rest(kind, rest)}"] = value
        else:
            out[_rename(key, _UNET_FIXED)] = value
    return out


def _resnet_rest(kind: str, rest: str) -> str:
    return _rename(rest, _UNET_RESNET) if kind == "resnets" else rest


def _unet_block_key(side, level, kind, index, rest, per_level, has_attention) -> str:
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
        position = 0 if kind == "resnets" else 1
        return f"input_blocks.{level * per_level + index + 1}.{position}.{_resnet_rest(kind, rest)}"
    if kind == "upsamplers":  # in the level's last output block, after its attention if any
        return f"output_blocks.{level * per_level + per_level - 1}.{1 + has_attention}.{rest}"
    position = 0 if kind == "resnets" else 1
    return f"output_blocks.{level * per_level + index}.{position}.{_resnet_rest(kind, rest)}"


def vae_to_ldm(state: dict[str, Tensor], num_up_blocks: int) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under the original autoencoder's names."""

    def up_level(match: re.Match) -> str:  # the original counts the decoder's levels upwards
        part = "block" if match.group(2) == "resnets" else "upsample"
        return f"decoder.up.{num_up_blocks - 1 - int(match.group(1))}.{part}."

    renames = [
        (r"conv_norm_out", "norm_out"),
        (r"conv_shortcut", "nin_shortcut"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", up_level),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".mid_block.attentions.0." in key:
            head, rest = key.split(".mid_block.attentions.0.")
            key = f"{head}.mid.attn_1.{_rename(rest, _VAE_ATTENTION)}"
            if value.ndim == 2:  # the original holds these projections as 1x1 convolutions
                value = value[:, :, None, None]
        out[key] = value
    return out


def ldm_state_dict(pipeline: DiffusionPipeline) -> dict[str, Tensor]:
    """The pipeline's UNet, VAE and text encoder as one original-layout state dict."""
    from diffalign.models import UnsupportedModelError, pipeline_family

    family = pipeline_family(pipeline)
    if family != "sd":
        raise UnsupportedModelError(
            f"Single-file export covers Stable Diffusion 1.x pipelines; this is {family}. "
            "Save it with `pipeline.save_pretrained(DIR)` instead."
        )
    if type(pipeline.text_encoder).__name__ != "CLIPTextModel":
        raise UnsupportedModelError(
            f"Single-file export writes a CLIPTextModel text encoder (SD 1.x); this pipeline has "
            f"{type(pipeline.text_encoder).__name__}."
        )
    unet = unet_to_ldm(_plain_state(pipeline.unet), pipeline.unet.config.layers_per_block)
    vae = vae_to_ldm(_plain_state(pipeline.vae), len(pipeline.vae.config.up_block_types))
    text = {_original_clip_key(k): v for k, v in _plain_state(pipeline.text_encoder).items()}
    return {
        **{UNET_PREFIX + k: v for k, v in unet.items()},
        **{VAE_PREFIX + k: v for k, v in vae.items()},
        **{TEXT_ENCODER_PREFIX + k: v for k, v in text.items()},
    }


def _original_clip_key(key: str) -> str:
    # transformers 5 dropped the CLIPTextModel's ``text_model`` level that the original keeps
    return key if key.startswith("text_model.") else "text_model." + key


def _plain_state(module: torch.nn.Module) -> dict[str, Tensor]:
    from diffalign.models import has_lora

    if has_lora(module):
        raise ValueError(
            "The pipeline still carries LoRA adapters: merge them first "
            "(`diffalign.models.merge_lora(pipeline.unet)`) or save the run's final/ folder."
        )
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def save_single_file(pipeline: DiffusionPipeline, path: str | os.PathLike) -> Path:
    """Write ``pipeline`` as one original-layout ``.safetensors`` file (atomically).

    Load it back with ``load_pipeline(path, config=FOLDER)`` (``FOLDER``: any diffusers folder of
    the same architecture, for its configs, tokenizer and scheduler) or in A1111 / ComfyUI.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Write single files as .safetensors, got {path.name!r}.")
    metadata = {"format": "pt", "written_by": "diffalign"}
    state = ldm_state_dict(pipeline)
    with atomic_path(path) as staging:
        save_file(state, staging, metadata=metadata)
    return path
