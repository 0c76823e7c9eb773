"""Loading, saving and LoRA for Stable-Diffusion-family pipelines, and the tiny test components.

``load_pipeline`` is offline-first: a local folder loads directly; a hub id loads from the local
Hugging Face cache when it is there, and only goes to the network when the hub is reachable. When
neither works it fails at once with a message that says how to supply a local copy, instead of
retrying for a minute.

``build_tiny_pipeline`` makes a real ``StableDiffusionPipeline`` out of real diffusers and
transformers components with random weights and the real CLIP vocabulary, so every code path that
loads Stable Diffusion can be exercised offline in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import nn

from diffalign.single_file import is_single_file, single_file_family

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiffusionPipeline,
        SchedulerMixin,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        PreTrainedTokenizerBase,
    )

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_MAX_LENGTH = 77
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_CLIP_NUM_MERGES = 49152 - 256 - 2  # vocabulary size minus bytes and the two special tokens


class ModelNotAvailableError(OSError):
    """A model could not be found locally and the hub cannot be reached."""


class UnsupportedModelError(ValueError):
    """The folder holds a pipeline that the requested diffalign pipeline cannot run."""


# --------------------------------------------------------------------------- tokenizer


def _clip_merges() -> list[str]:
    """The CLIP BPE merges ("a b" lines) from the vocabulary file open-clip-torch ships."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        return handle.read().split("\n")[1 : _CLIP_NUM_MERGES + 1]


def build_clip_tokenizer() -> CLIPTokenizer:
    """The Stable Diffusion CLIP tokenizer (49,408 tokens), built offline.

    open-clip-torch ships the original CLIP BPE merges inside its wheel; the vocabulary is the 256
    byte symbols, the same with the end-of-word marker, every merge, then the two special tokens.
    Token ids equal those of ``openai/clip-vit-large-patch14`` (the SD1.x tokenizer).
    """
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    merges = _clip_merges()
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=CLIP_MAX_LENGTH,
    )


def save_clip_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> Path:
    """Write ``tokenizer`` the way Stable Diffusion repositories store it (``vocab.json`` +
    ``merges.txt``, 1.4 MB) instead of transformers' 3.6 MB ``tokenizer.json``; it loads back with
    ``CLIPTokenizer.from_pretrained(folder)`` and gives the same ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    vocab = json.dumps(tokenizer.get_vocab(), ensure_ascii=False, separators=(",", ":"))
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    merges = "#version: 0.2\n" + "\n".join(_clip_merges()) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tokenizer.model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


# --------------------------------------------------------------------------- tiny components


def sd_ddim_scheduler(
    prediction_type: str = "epsilon", zero_terminal_snr: bool = False, **overrides: Any
) -> DDIMScheduler:
    """A DDIM scheduler configured exactly like Stable Diffusion 1.x's (``overrides`` replace
    any of its settings). ``zero_terminal_snr`` rescales its betas so that the last timestep is
    pure noise and samples with trailing timesteps, so that sampling starts there."""
    from diffusers import DDIMScheduler

    settings = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
    }
    if zero_terminal_snr:
        settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDIMScheduler(**{**settings, **overrides})


_SDXL_TIME_ID_DIM = 8  # the tiny SDXL UNet's embedding width per time id (SDXL's: 256)


def build_tiny_unet(
    seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32, pooled_dim: int = 0
) -> UNet2DConditionModel:
    """A two-level ``UNet2DConditionModel`` (about 1M parameters) with cross-attention; with
    ``pooled_dim`` it also takes SDXL's added conditioning (a pooled text embedding of that
    width and six time ids)."""
    from diffusers import UNet2DConditionModel

    sdxl = {}
    if pooled_dim:
        sdxl = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _SDXL_TIME_ID_DIM,
            "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_ID_DIM + pooled_dim,
        }
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **sdxl,
    )


def build_tiny_vae(
    seed: int = 0, sample_size: int = 32, shift_factor: float | None = None
) -> AutoencoderKL:
    """A two-level ``AutoencoderKL`` (4 latent channels, downsampling by 2) with mid attention;
    ``shift_factor`` shifts its latent space as SD3's VAE does."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        shift_factor=shift_factor,
    )


def build_tiny_text_encoder(
    seed: int = 0, hidden_size: int = 32, with_projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A two-layer ``CLIPTextModel`` over the full CLIP vocabulary (``with_projection``: a
    ``CLIPTextModelWithProjection``, SDXL's second text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_tiny_pipeline(
    seed: int = 0, image_size: int = 32, hidden_size: int = 32, flow_shift: float | None = None
) -> StableDiffusionPipeline:
    """A real ``StableDiffusionPipeline`` with tiny random components, built offline.

    Images are ``image_size`` pixels square and latents half that. The safety checker is off.
    The same ``seed`` always gives the same weights. With ``flow_shift`` the scheduler is a
    ``FlowMatchEulerDiscreteScheduler`` with that shift (a flow-matching UNet) instead of SD's
    DDIM.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}.")
    return StableDiffusionPipeline(
        vae=build_tiny_vae(seed, image_size),
        text_encoder=build_tiny_text_encoder(seed, hidden_size),
        tokenizer=build_clip_tokenizer(),
        unet=build_tiny_unet(seed, image_size // 2, hidden_size),
        scheduler=sd_ddim_scheduler()
        if flow_shift is None
        else FlowMatchEulerDiscreteScheduler(shift=flow_shift),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0, image_size: int = 32, hidden_size: int = 32
) -> StableDiffusionXLPipeline:
    """A real ``StableDiffusionXLPipeline`` with tiny random components, built offline: two
    text encoders (the second with a projection, whose output is the pooled embedding), a UNet
    with SDXL's added conditioning, SD's DDIM scheduler; otherwise as :func:`build_tiny_pipeline`.
    """
    from diffusers import StableDiffusionXLPipeline

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}.")
    return StableDiffusionXLPipeline(
        vae=build_tiny_vae(seed, image_size),
        text_encoder=build_tiny_text_encoder(seed, hidden_size),
        text_encoder_2=build_tiny_text_encoder(seed + 1, hidden_size, with_projection=True),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        unet=build_tiny_unet(seed, image_size // 2, 2 * hidden_size, pooled_dim=hidden_size),
        scheduler=sd_ddim_scheduler(),
    )


def build_tiny_sd3_transformer(
    seed: int = 0, sample_size: int = 16, joint_attention_dim: int = 64, pooled_dim: int = 64
) -> SD3Transformer2DModel:
    """A two-block ``SD3Transformer2DModel`` (MMDiT, patch size 2, 4 latent channels) reading
    text states of width ``joint_attention_dim`` and a pooled embedding of width ``pooled_dim``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=sample_size,
    )


def build_tiny_sd3_pipeline(
    seed: int = 0, image_size: int = 32, hidden_size: int = 32
) -> StableDiffusion3Pipeline:
    """A real ``StableDiffusion3Pipeline`` with tiny random components, built offline: two CLIP
    text encoders with projections (their token states side by side and their pooled
    embeddings joined, as SD3 reads them), no T5 encoder (diffusers then feeds zeros in its
    place, as it does for SD3 loaded with ``text_encoder_3=None``), an MMDiT transformer, a VAE
    with a shifted latent space, and SD3's flow-matching scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 (VAE x patch), got {image_size}.")
    return StableDiffusion3Pipeline(
        transformer=build_tiny_sd3_transformer(
            seed, image_size // 2, 2 * hidden_size, pooled_dim=2 * hidden_size
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_tiny_vae(seed, image_size, shift_factor=0.0609),
        text_encoder=build_tiny_text_encoder(seed, hidden_size, with_projection=True),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=build_tiny_text_encoder(seed + 1, hidden_size, with_projection=True),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def as_ddim_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """``scheduler`` as a ``DDIMScheduler`` with the same config (SD1.5 ships PNDM), for features
    that sample with DDIM steps; a flow-matching scheduler is returned as it is (those features
    step it with :mod:`diffalign.flow`)."""
    from diffusers import DDIMScheduler

    from diffalign.flow import is_flow_scheduler

    if is_flow_scheduler(scheduler) or isinstance(scheduler, DDIMScheduler):
        return scheduler
    return DDIMScheduler.from_config(scheduler.config)


# --------------------------------------------------------------------------- loading


def hub_is_offline_by_setting() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) asks for offline."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(name, "").strip().lower() in truthy
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=4)
def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (cached
    for the life of the process)."""
    from huggingface_hub import constants

    parsed = urlparse(constants.ENDPOINT)
    return host_is_reachable(parsed.hostname or "huggingface.co", parsed.port or 443, timeout)


def host_is_reachable(host: str | None, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    The probe runs in a daemon thread so that a slow DNS lookup cannot hold the caller longer
    than ``timeout``.
    """
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _not_available(name: str, reason: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Model {name!r} is not available: it is not a local folder, it is not in the Hugging Face "
        f"cache, and {reason}. Supply a local copy: on a machine with network run "
        f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here and pass DIR instead of "
        f"{name!r}; or copy a populated Hugging Face cache and point HF_HOME at it."
    )


def _component_overrides(model_index: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` arguments for a folder: no safety checker where the pipeline has one
    (research training never needs it), and None for every component the folder was saved
    without (``[null, null]``, such as SD3 saved with ``text_encoder_3=None``), which diffusers
    would otherwise refuse to load unless the component is optional."""
    overrides = {name: None for name, entry in model_index.items()
                 if isinstance(entry, list) and entry == [None, None]}  # fmt: skip
    if "safety_checker" in model_index:
        overrides.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return overrides


FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "Stable Diffusion 3"}
"""The model families diffalign runs, keyed as :func:`pipeline_family` names them."""


def pipeline_family(pipeline: DiffusionPipeline) -> str:
    """``"sd"``, ``"sdxl"`` or ``"sd3"``: which diffusers pipeline ``pipeline`` is (or extends)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if isinstance(pipeline, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipeline, StableDiffusion3Pipeline):
        return "sd3"
    return "sd"


def denoiser_name(pipeline: DiffusionPipeline) -> str:
    """The component that denoises: ``"transformer"`` for SD3, ``"unet"`` otherwise."""
    return "transformer" if pipeline_family(pipeline) == "sd3" else "unet"


def denoiser_of(pipeline: DiffusionPipeline) -> nn.Module:
    """``pipeline``'s denoising network: its UNet, or SD3's transformer."""
    return getattr(pipeline, denoiser_name(pipeline))


def _index_family(model_index: dict[str, Any]) -> str | None:
    """The family of a ``model_index.json``, or None for pipelines diffalign does not run."""
    if "unet" in model_index:
        return "sdxl" if "text_encoder_2" in model_index else "sd"
    if str(model_index.get("_class_name", "")).startswith("StableDiffusion3"):
        return "sd3"
    return None


def family_counterpart(pipeline_cls: type[DiffusionPipeline], family: str) -> type:
    """The pipeline class that does for ``family`` (``"sdxl"``, ``"sd3"``) what
    ``pipeline_cls`` (a Stable Diffusion pipeline class) does: diffusers' SDXL or SD3 pipeline
    for its ``StableDiffusionPipeline``, else the class a diffalign pipeline names as its
    ``sdxl_pipeline_class`` / ``sd3_pipeline_class``; None when there is none."""
    from diffusers import (
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if family == "sd":
        return pipeline_cls
    if pipeline_cls is StableDiffusionPipeline:
        return {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[family]
    return getattr(pipeline_cls, f"{family}_pipeline_class", None)


def _pipeline_class_for(model_index: dict[str, Any], pipeline_cls, name: str):
    """The class that loads ``model_index``'s folder for a caller who asked for ``pipeline_cls``:
    itself, or for an SDXL or SD3 folder the counterpart of a Stable Diffusion pipeline class
    (:func:`family_counterpart`). Raises :class:`UnsupportedModelError` for folders that no
    counterpart runs: other transformer models (FLUX), the SDXL refiner."""
    from diffusers import StableDiffusionPipeline

    if not issubclass(pipeline_cls, StableDiffusionPipeline):
        return pipeline_cls
    family = _index_family(model_index)
    kind = model_index.get("_class_name", "a pipeline")
    if family is None:
        raise UnsupportedModelError(
            f"{name} holds {kind}, but {pipeline_cls.__name__} runs Stable Diffusion 1.x/2.x, "
            "SDXL (UNet) and Stable Diffusion 3 / 3.5 (MMDiT transformer) pipelines; other "
            "transformer models (FLUX, ...) are not supported yet."
        )
    if family == "sdxl" and (model_index.get("text_encoder") or [None])[0] is None:
        raise UnsupportedModelError(
            f"{name} is an SDXL pipeline without a first text encoder (the SDXL refiner, an "
            "image-to-image model); diffalign runs the SDXL base model (text_encoder and "
            "text_encoder_2)."
        )
    counterpart = family_counterpart(pipeline_cls, family)
    if counterpart is None:
        raise UnsupportedModelError(
            f"{name} is {FAMILY_NAMES[family]} ({kind}), which "
            f"{pipeline_cls.__name__} does not run; it runs Stable Diffusion 1.x/2.x folders."
        )
    return counterpart


def _load_local(path: Path, pipeline_cls, **kwargs):
    from diffalign.train.export import is_training_checkpoint, pipeline_from_checkpoint

    if is_training_checkpoint(path):
        return pipeline_from_checkpoint(path, pipeline_cls, **kwargs)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json). Save one with "
            "`pipeline.save_pretrained(DIR)` or download a complete model folder."
        )
    model_index = json.loads(index_file.read_text())
    pipeline_cls = _pipeline_class_for(model_index, pipeline_cls, str(path))
    return pipeline_cls.from_pretrained(path, **_component_overrides(model_index), **kwargs)


def _load_single_file(path: Path, pipeline_cls, config: str | None = None, **kwargs):
    """A one-file original-layout checkpoint through diffusers' ``from_single_file``: the weights
    from the file, configs, tokenizer and scheduler from ``config`` (a diffusers folder or hub id
    of the same architecture; default: the one diffusers infers, from the hub cache or the hub)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    if pipeline_cls is DiffusionPipeline:
        pipeline_cls = StableDiffusionPipeline
    family = single_file_family(path)
    if issubclass(pipeline_cls, StableDiffusionPipeline):
        pipeline_cls = family_counterpart(pipeline_cls, family)
    if pipeline_cls is None:
        raise UnsupportedModelError(
            f"{path} holds {FAMILY_NAMES[family]}, which this pipeline does not run."
        )
    if config is not None and not _HUB_ID.fullmatch(str(config)) and not Path(config).is_dir():
        raise FileNotFoundError(f"config={config}: no such diffusers folder.")
    offline = hub_is_offline_by_setting() or (config is None and not hub_is_reachable())
    kwargs = {**_components_left_out(config, pipeline_cls, offline), **kwargs}
    try:
        return pipeline_cls.from_single_file(
            str(path), config=config, local_files_only=offline, **kwargs
        )
    except OSError as error:
        raise ModelNotAvailableError(
            f"{path} holds the weights only; the configs, tokenizer and scheduler of its "
            f"architecture ({FAMILY_NAMES[family]}) were not found"
            f"{' in ' + str(config) if config else ' in the hub cache'}. Name a diffusers folder "
            "of that architecture (the base model's, say): config=FOLDER to load_pipeline, "
            "model_config=FOLDER in a training config, --model-config FOLDER on the command "
            "line, or convert the file once with `diffalign convert --model FILE --config "
            f"FOLDER --out DIR` and use DIR. ({error})"
        ) from error


def _components_left_out(config: str | None, pipeline_cls, offline: bool) -> dict[str, None]:
    """The required components ``config``'s ``model_index.json`` sets to null (SD3 saved without
    T5, say): ``from_pretrained`` leaves them out itself, ``from_single_file`` must be told."""
    if config is None:
        return {}
    try:
        index = pipeline_cls.load_config(config, local_files_only=offline)
    except OSError:
        return {}  # the load that follows reports the missing configs
    optional = set(getattr(pipeline_cls, "_optional_components", []))
    return {
        name: None
        for name, value in index.items()
        if isinstance(value, list) and value[0] is None and name not in optional
    }


def _load_hub(name: str, pipeline_cls, **kwargs):
    offline = hub_is_offline_by_setting() or not hub_is_reachable()
    try:
        model_index = pipeline_cls.load_config(name, local_files_only=True)
        pipeline_cls = _pipeline_class_for(model_index, pipeline_cls, name)
        return pipeline_cls.from_pretrained(
            name, local_files_only=True, **_component_overrides(model_index), **kwargs
        )
    except (OSError, ValueError) as cached_error:
        if offline:
            reason = (
                "HF_HUB_OFFLINE is set"
                if hub_is_offline_by_setting()
                else "the hub cannot be reached"
            )
            raise _not_available(name, reason) from cached_error
    model_index = pipeline_cls.load_config(name)
    pipeline_cls = _pipeline_class_for(model_index, pipeline_cls, name)
    return pipeline_cls.from_pretrained(name, **_component_overrides(model_index), **kwargs)


def _dtype_keyword() -> str:
    """The keyword diffusers' ``from_pretrained`` takes the weights' dtype under: ``dtype`` in
    releases that deprecate ``torch_dtype`` (they warn on every load given it), else
    ``torch_dtype``. Those releases resolve the two with ``deprecation_utils._resolve_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(
    name_or_path: str | os.PathLike,
    pipeline_cls: type | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: str | None = None,
    **kwargs: Any,
) -> DiffusionPipeline:
    """Load a Stable-Diffusion-family pipeline from a local folder or a hub id, offline first.

    Args:
        name_or_path: a folder written by ``save_pretrained``, a trainer's checkpoint folder
            (``RUN/checkpoints/checkpoint-<step>``: the run's base model with the checkpoint's
            weights, see :mod:`diffalign.train.export`) or a hub id such as
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``, or a one-file original-layout
            checkpoint (``.safetensors`` / ``.ckpt``, see :mod:`diffalign.single_file`).
        pipeline_cls: the pipeline class to build (default ``diffusers.DiffusionPipeline``, which
            picks the class named in ``model_index.json``); diffalign's own pipelines subclass
            diffusers' and load the same folders. An SDXL or SD3 folder asked for as a Stable
            Diffusion class loads as its counterpart (``StableDiffusionXLPipeline``,
            ``SDXLRolloutPipeline``, ``SDXLDTSPipeline``; ``StableDiffusion3Pipeline``,
            ``SD3RolloutPipeline``).
        torch_dtype: dtype for the weights (e.g. ``torch.float16`` on GPU).
        device: where to move the pipeline after loading.
        config: for a one-file checkpoint only: a diffusers folder or hub id of its architecture,
            for the configs, tokenizer and scheduler (default: the one diffusers infers).
        **kwargs: passed on to ``from_pretrained`` (``variant``, ``scheduler``, ...).

    Raises:
        ModelNotAvailableError: the model is neither local nor cached and the hub is unreachable
            or ``HF_HUB_OFFLINE=1``; the message says how to supply a local copy.
        FileNotFoundError: a local path that is not a diffusers pipeline folder.
        UnsupportedModelError: ``pipeline_cls`` is a Stable Diffusion pipeline (such as
            diffalign's rollout and DTS pipelines) and the model is one it has no counterpart
            for (FLUX; SD3 for the DTS pipeline), or is the SDXL refiner.
    """
    from diffusers import DiffusionPipeline

    pipeline_cls = pipeline_cls or DiffusionPipeline
    if torch_dtype is not None:
        kwargs[_dtype_keyword()] = torch_dtype
    path = Path(name_or_path).expanduser()
    if path.is_file() and is_single_file(path):
        pipeline = _load_single_file(path, pipeline_cls, config, **kwargs)
    elif config is not None:
        raise ValueError(f"config= is for one-file checkpoints; {name_or_path} brings its own.")
    elif path.exists():
        pipeline = _load_local(path, pipeline_cls, **kwargs)
    elif _HUB_ID.fullmatch(str(name_or_path)):
        pipeline = _load_hub(str(name_or_path), pipeline_cls, **kwargs)
    else:
        raise FileNotFoundError(f"No such model folder: {path} (and it is not a hub id).")
    if device is not None:
        pipeline.to(device)
    return pipeline


# --------------------------------------------------------------------------- LoRA


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    init: str | bool = "gaussian",
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    """Attach a peft LoRA adapter to a diffusers model (UNet / transformer) in place.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (scale = alpha / rank); defaults to ``rank`` (scale 1).
        target_modules: module-name suffixes to adapt; the default is the attention projections.
        init: peft's ``init_lora_weights`` (``"gaussian"``: A Gaussian, B zero, so the adapter
            starts as the identity).
        dropout: LoRA dropout.
    Returns the same model, with only the LoRA parameters left trainable.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    if not hasattr(model, "add_adapter"):
        raise TypeError(f"{type(model).__name__} does not support peft adapters (no add_adapter).")
    _check_lora_targets(model, target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        init_lora_weights=init,
        lora_dropout=dropout,
    )
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=adapter_name)
    return model


class LoraTargetError(ValueError):
    """LoRA target modules that name no layer of the model (peft would silently skip them)."""


def _check_lora_targets(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Raise a LoraTargetError naming the targets that match no Linear / Conv2d of ``model``."""
    layers = [name for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, nn.Conv2d))]  # fmt: skip
    if not target_modules:
        raise LoraTargetError("No LoRA target modules given: name at least one (e.g. to_q).")
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in layers)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers} - {str(i) for i in range(10)})
        raise LoraTargetError(
            f"LoRA targets {missing} match no Linear or Conv2d layer of "
            f"{type(model).__name__}; its layer names end in: {', '.join(suffixes)} "
            "(attention projections: to_q, to_k, to_v, to_out.0)."
        )


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
    """Fold the active LoRA adapter into the base weights and remove the adapter layers."""
    if not has_lora(model):
        raise ValueError("The model has no LoRA adapter to merge.")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return model


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
    adapter. The saved one must adapt the same layers at the same rank and scale, and only the
    denoiser.

    Raises:
        LoraLayoutError: it does not (the message says which setting to change).
    """
    import warnings

    staging = "diffalign_copy_source"
    with warnings.catch_warnings():  # peft's notes on a second adapter and on deleting it
        warnings.simplefilter("ignore", UserWarning)
        load_lora(pipeline, path, adapter_name=staging)
        try:
            _check_lora_fits(pipeline, path, staging, adapter_name)
            with torch.no_grad():
                for layer in lora_layers(denoiser_of(pipeline), adapter_name).values():
                    for weights in (layer.lora_A, layer.lora_B):
                        weights[adapter_name].weight.copy_(weights[staging].weight)
        finally:
            pipeline.delete_adapters(staging)
            denoiser_of(pipeline).set_adapter(adapter_name)


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
    others = [part for part, module in pipeline.components.items()
              if part != name and has_adapter(module, source)]  # fmt: skip
    if others:
        raise LoraLayoutError(
            f"The LoRA at {path} also adapts the {', '.join(others)}; diffalign trains the "
            f"{name} alone. Start from an adapter of the {name} only."
        )
    denoiser = getattr(pipeline, name)
    given, wanted = lora_layers(denoiser, source), lora_layers(denoiser, target)
    if given.keys() != wanted.keys():
        targets = ", ".join(sorted(denoiser.peft_config[source].target_modules))
        raise LoraLayoutError(
            f"The LoRA at {path} adapts {len(given)} layers of the {name}, the run's "
            f"lora_target_modules {len(wanted)}{_layer_differences(given, wanted)}. Set "
            f"lora_target_modules=[{targets}] (the LoRA's targets)."
        )
    ranks = sorted({layer.r[source] for layer in given.values()})
    if len(ranks) > 1:
        raise LoraLayoutError(
            f"The LoRA at {path} has ranks {ranks[0]} to {ranks[-1]} across its layers; a run "
            "trains one rank everywhere: start from an adapter of one rank."
        )
    for layer_path, layer in given.items():
        rank, run = layer.r[source], wanted[layer_path]
        if rank != run.r[target]:
            raise LoraLayoutError(f"The LoRA at {path} has rank {rank} at {layer_path}, the run "
                                  f"{run.r[target]}: set lora_rank={rank}.")  # fmt: skip
        if not math.isclose(layer.scaling[source], run.scaling[target], rel_tol=1e-6):
            alpha, run_alpha = layer.scaling[source] * rank, run.scaling[target] * rank
            raise LoraLayoutError(f"The LoRA at {path} has alpha {alpha:g} at {layer_path}, the "
                                  f"run {run_alpha:g}: set lora_alpha={alpha:g}.")  # fmt: skip


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
    LoRAs, :func:`diffalign.kohya_lora.save_kohya_lora`).

    Raises:
        FileNotFoundError: nothing at ``path``.
        LoraLayoutError: it does not fit the pipeline (another base model, another kind of
            adapter); the pipeline may then hold a half-loaded adapter: load it afresh.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"No LoRA folder or file at {path}.")
    weights = [*Path(path).glob("*.safetensors"), *Path(path).glob("*.bin")]
    if Path(path).is_dir() and not weights:
        raise FileNotFoundError(
            f"The folder {path} holds no LoRA weights (pytorch_lora_weights.safetensors, or "
            "another .safetensors / .bin file)."
        )
    try:
        pipeline.load_lora_weights(path, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as error:  # diffusers' and torch's, pages long
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        gist = " ".join(lines[:2])
        gist = gist if len(gist) <= 300 else gist[:300] + "..."
        raise LoraLayoutError(
            f"The LoRA at {path} does not load into this {type(pipeline).__name__} "
            f"({type(error).__name__}: {gist}). Is it made for another base model (SD 1.x, SD "
            "2.x, SDXL, SD3), or another kind of adapter than LoRA?"
        ) from error
    return pipeline
