"""Stable Diffusion 1.x / 2.x, SDXL and SD3 pipelines as one checkpoint in the original layout.

A1111, ComfyUI and most shared fine-tunes keep Stable Diffusion as a single ``.safetensors``
file with the original repositories' names (``model.diffusion_model.*``, ``first_stage_model.*``
and the text encoders: ``cond_stage_model.transformer.*``, OpenAI's CLIP, for SD 1.x;
``cond_stage_model.model.*``, OpenCLIP, for SD 2.x; ``conditioner.embedders.0.transformer.*``
and ``conditioner.embedders.1.model.*`` for SDXL's two; ``text_encoders.clip_l|clip_g|t5xxl.
transformer.*`` for SD3's, beside its MMDiT's ``joint_blocks``). :func:`save_single_file` writes a
diffusers pipeline (a trained run's ``final/`` for instance) in that layout;
:func:`diffalign.models.load_pipeline` and every ``--model`` read such files back through
diffusers' ``from_single_file``. The names are the inverse of diffusers' own single-file
conversion, which the tests use to check the round trip.

An OpenCLIP text tower is told from OpenAI's CLIP by its activation (``gelu``, where OpenAI's
uses ``quick_gelu``). diffusers keeps 23 of SD 2.x's 24 OpenCLIP blocks (SD 2.x reads the
penultimate one's output, so the last never runs); the file holds those 23, which A1111 and
ComfyUI load (the missing block is one they never run).
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
    from collections.abc import Iterable

    from diffusers import DiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_TEXT_ENCODER_PREFIXES = (
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
)
SD3_TEXT_ENCODER_PREFIXES = tuple(
    f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl")
)
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
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

_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}  # fmt: skip


_SD3_FIXED = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_SD3_BLOCK = {  # within transformer_blocks.i -> within joint_blocks.i (q, k and v: joined apart)
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}  # fmt: skip


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
    raise _no_original_name(key)


def _no_original_name(key: str) -> ValueError:
    return ValueError(
        f"No original-layout name for the weight {key!r}: this model has parts the original "
        "layout does not (save it with `save_pretrained` instead)."
    )


def unet_to_ldm(state: dict[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict under the original UNet's names."""
    names = unet_ldm_names(state, layers_per_block)
    return {names[key]: value for key, value in state.items()}


def unet_ldm_names(keys: Iterable[str], layers_per_block: int) -> dict[str, str]:
    """Each key of a diffusers UNet state dict (all of them: which levels have attention is read
    from them) with its name in the original UNet. Whatever follows a module's path is kept, so
    peft's ``<module>.lora_A.<adapter>.weight`` keys map as well."""
    keys = list(keys)
    per_level = layers_per_block + 1
    attention_levels = {
        int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)
    }
    names = {}
    for key in keys:
        block = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                         r"\.(\d+)\.(.*)", key)  # fmt: skip
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if block:
            side, level, kind, index, rest = block.groups()
            names[key] = _unet_block_key(side, int(level), kind, int(index), rest, per_level,
                                         int(level) in attention_levels)  # fmt: skip
        elif mid:
            kind, index, rest = mid.groups()
            position = 1 if kind == "attentions" else 2 * int(index)
            names[key] = f"middle_block.{position}.{_resnet_rest(kind, rest)}"
        else:
            names[key] = _rename(key, _UNET_FIXED)
    return names


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


def clip_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP text model's state dict under OpenCLIP's names (SD 2.x's text encoder,
    SDXL's second): each block's query, key and value joined into one ``in_proj``, and the text
    projection (if any) transposed, as the original keeps them."""
    state = _clip_names(state)
    out, blocks = {}, set()
    for key, value in state.items():
        block = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif block and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", block.group(2)):
            blocks.add(block.group(1))
        elif block:
            rest = _rename(block.group(2), _OPEN_CLIP_BLOCK)
            out[f"transformer.resblocks.{block.group(1)}.{rest}"] = value
        else:
            raise _no_original_name(key)
    for index in blocks:
        for kind in ("weight", "bias"):
            parts = [
                state[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"
            ]
            out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(parts)
    return out


def sd3_transformer_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict under the original MMDiT's names: each
    attention's query, key and value joined into one ``qkv``, and the final modulations (the
    last block's context one and the output layer's) with their shift and scale halves in the
    original order (diffusers swaps them)."""
    last = max(int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks."))
    out, joined = {}, {}
    for key, value in state.items():
        block = re.match(r"transformer_blocks\.(\d+)\.(.*)", key)
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif not block:
            out[_rename(key, _SD3_FIXED)] = _swap_halves(value) if "norm_out." in key else value
        elif qkv := re.fullmatch(r"(attn2?)\.(to|add)_([qkv])(?:_proj)?\.(weight|bias)", block[2]):
            attention, stream, part, kind = qkv.groups()
            side = "context_block" if stream == "add" else "x_block"
            target = f"joint_blocks.{block[1]}.{side}.{attention}.qkv.{kind}"
            joined.setdefault(target, {})[part] = value
        else:
            last_context = int(block[1]) == last and block[2].startswith("norm1_context.")
            value = _swap_halves(value) if last_context else value
            out[f"joint_blocks.{block[1]}.{_rename(block[2], _SD3_BLOCK)}"] = value
    out.update({key: torch.cat([parts[p] for p in "qkv"]) for key, parts in joined.items()})
    return out


def _swap_halves(value: Tensor) -> Tensor:
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first])


def ldm_state_dict(pipeline: DiffusionPipeline) -> dict[str, Tensor]:
    """The pipeline's UNet (SD3: MMDiT), VAE and text encoders as one original-layout state
    dict."""
    from diffalign.models import UnsupportedModelError, pipeline_family

    family = pipeline_family(pipeline)
    if family not in ("sd", "sdxl", "sd3"):
        raise UnsupportedModelError(
            f"Single-file export covers Stable Diffusion 1.x / 2.x, SDXL and SD3 pipelines; this "
            f"is {family}. Save it with `pipeline.save_pretrained(DIR)` instead."
        )
    if family == "sd3":
        denoiser = sd3_transformer_to_ldm(_plain_state(pipeline.transformer))
    else:
        denoiser = unet_to_ldm(_plain_state(pipeline.unet), pipeline.unet.config.layers_per_block)
    vae = vae_to_ldm(_plain_state(pipeline.vae), len(pipeline.vae.config.up_block_types))
    return {
        **_prefixed(denoiser, UNET_PREFIX),
        **_prefixed(vae, VAE_PREFIX),
        **_text_encoders_to_ldm(pipeline, family),
    }


def _text_encoders_to_ldm(pipeline: DiffusionPipeline, family: str) -> dict[str, Tensor]:
    from diffalign.models import UnsupportedModelError

    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family != "sd" else [])
    for encoder in encoders:
        if not type(encoder).__name__.startswith("CLIPTextModel"):
            raise UnsupportedModelError(
                f"Single-file export writes CLIP text encoders; this pipeline has "
                f"{type(encoder).__name__}."
            )
    if family == "sd3":
        return _sd3_text_encoders(pipeline)
    if family == "sdxl":
        first, second = SDXL_TEXT_ENCODER_PREFIXES
        return {
            **_prefixed(_clip_names(_plain_state(encoders[0])), first),
            **_prefixed(clip_to_open_clip(_plain_state(encoders[1])), second),
        }
    state = _plain_state(encoders[0])
    if encoders[0].config.hidden_act == "gelu":  # OpenCLIP's text tower: SD 2.x
        return _prefixed(clip_to_open_clip(state), OPEN_CLIP_PREFIX)
    return _prefixed(_clip_names(state), TEXT_ENCODER_PREFIX)


def _sd3_text_encoders(pipeline: DiffusionPipeline) -> dict[str, Tensor]:
    """SD3's CLIP-L and CLIP-G under transformers' names, and T5 when the pipeline has it. The
    original's CLIP-L has no text projection (its readers put the identity in its place), so a
    trained one cannot be written."""
    clip_l, clip_g = _plain_state(pipeline.text_encoder), _plain_state(pipeline.text_encoder_2)
    projection = clip_l.get("text_projection.weight", torch.eye(1))
    if not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        raise ValueError(
            "SD3's CLIP-L text projection is not the identity, and the original layout has no "
            "place for it (readers use the identity): save it with `save_pretrained` instead."
        )
    first, second, third = SD3_TEXT_ENCODER_PREFIXES
    out = {**_prefixed(_clip_names(clip_l), first), **_prefixed(_clip_names(clip_g), second)}
    if getattr(pipeline, "text_encoder_3", None) is not None:
        out.update(_prefixed(_plain_state(pipeline.text_encoder_3), third))
    return out


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in state.items()}


def _clip_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' CLIP text state under the original CLIP names: transformers 5 dropped the
    ``CLIPTextModel``'s ``text_model`` level that the original keeps; the position-id buffer is
    not a weight."""
    return {
        key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: value
        for key, value in state.items()
        if not key.endswith("position_ids")
    }


def _plain_state(module: torch.nn.Module) -> dict[str, Tensor]:
    from diffalign.lora import has_lora

    if has_lora(module):
        raise ValueError(
            "The pipeline still carries LoRA adapters: merge them first "
            "(`diffalign.lora.merge_lora(pipeline.unet)`) or save the run's final/ folder."
        )
    state, seen = {}, set()
    for key, value in module.state_dict().items():
        value = value.detach().cpu()
        # a tied weight (T5's embedding is ``shared`` and the encoder's ``embed_tokens``) is
        # written under each name, as diffusers' reader wants both; safetensors refuses to
        # write one tensor twice, so the second is a copy
        tied = value.numel() > 0 and value.data_ptr() in seen
        seen.add(value.data_ptr())
        state[key] = value.clone() if tied else value.contiguous()
    return state


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
