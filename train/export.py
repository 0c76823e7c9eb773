"""A training checkpoint as a pipeline: any ``checkpoints/checkpoint-<step>`` of a run loads where a
model folder does (``--model``, :func:`diffalign.models.load_pipeline`).

A checkpoint holds only what training changed (the LoRA adapter, or the UNet when fine-tuned
fully), the EMA of it when the run kept one, and the run's config. The pipeline is the run's base
model (its ``model`` setting) with those weights put in, the EMA's by default as in ``final/``,
and the LoRA merged: the same pipeline ``final/`` would have held, had the run ended there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.checkpoint import CheckpointError, load_checkpoint

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a trainer's checkpoint folder (a manifest and trainable weights)."""
    path = Path(path)
    return (path / "manifest.json").is_file() and (path / "trainable.safetensors").is_file()


def pipeline_from_checkpoint(path: str | Path, pipeline_cls: type | None = None,
                             use_ema: bool = True, merge: bool = True,
                             **kwargs: Any) -> DiffusionPipeline:  # fmt: skip
    """Load the checkpoint at ``path`` as a pipeline of ``pipeline_cls`` (default: the base
    model's own class); ``use_ema=False`` takes the live weights instead of the EMA's;
    ``merge=False`` leaves a LoRA adapter attached (to save it alone) instead of merging it.

    Raises:
        CheckpointError: the checkpoint is damaged, or its weights do not fit the base model.
        ModelNotAvailableError: the run's base model cannot be found.
    """
    from diffalign.lora import add_lora, merge_every_lora
    from diffalign.models import denoiser_of, load_pipeline
    from diffalign.train.config import lora_options
    from diffalign.world import resolve_shipped

    checkpoint = load_checkpoint(path)
    config = checkpoint.config
    base = resolve_shipped(config["model"])  # a one-file base model names its configs' folder
    pipeline = load_pipeline(base, pipeline_cls, config=config.get("model_config"), **kwargs)
    unet = denoiser_of(pipeline)  # the UNet, or SD3's transformer
    if config.get("use_lora", True):
        _load_init_text_encoders(pipeline, config.get("init_lora"))
        add_lora(unet, **lora_options(config))
    else:
        unet.requires_grad_(True)
    trained = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    weights = _trained_weights(checkpoint.states, list(trained), use_ema, Path(path))
    with torch.no_grad():
        for name, value in weights.items():
            trained[name].copy_(value)
    if merge:
        merge_every_lora(pipeline)
    unet.requires_grad_(False).eval()
    return pipeline


def _load_init_text_encoders(pipeline: DiffusionPipeline, init_lora: str | None) -> None:
    """Put the text-encoder layers of the adapter a run started from (``init_lora``), which
    it kept as they were and its checkpoints do not hold, back into the text encoders."""
    from diffalign.lora import load_text_encoder_lora

    if init_lora is None:
        return
    if not Path(init_lora).exists():
        logger.warning("The run started from init_lora %s, which is not there now: text-encoder "
                       "layers it may have had are left out.", init_lora)  # fmt: skip
        return
    load_text_encoder_lora(pipeline, init_lora)


def _trained_weights(states: dict, names: list[str], use_ema: bool, path: Path) -> dict:
    """The checkpoint's weights by parameter name: the EMA's (kept in the trainer's parameter
    order) when asked for and present, else the live ones."""
    live = states["trainable"]
    if set(live) != set(names):
        raise CheckpointError(
            f"{path} holds weights for {len(live)} parameters that do not match the "
            f"{len(names)} its run's settings give the base model; was the base model "
            "replaced since?"
        )
    if use_ema and "ema" in states:
        return dict(zip(names, states["ema"]["shadow"], strict=True))
    return live
