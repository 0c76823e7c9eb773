"""Loading Stable-Diffusion-family pipelines, their families, and the tiny test components
(LoRA on them: :mod:`diffalign.lora`).

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
import os
import re
import socket
import threading
import warnings
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


def check_compile_backend(backend: str) -> None:
    """Raise a ValueError naming torch's dynamo backends when ``backend`` is not one of them."""
    if backend not in torch.compiler.list_backends(exclude_tags=()):  # debug ones included
        raise ValueError(
            f"{backend!r} is not a torch.compile backend here; use one of "
            f"{', '.join(torch.compiler.list_backends())}, or a debugging one such as eager "
            "(which only traces: it checks that the model compiles)."
        )


def compile_denoiser(pipeline: DiffusionPipeline, backend: str = "inductor") -> nn.Module:
    """Put ``torch.compile(denoiser, backend=backend)`` in place of ``pipeline``'s UNet (or SD3's
    transformer) and return it: the same module and weights behind a compiled call, which
    diffusers' pipelines, the search samplers and forward hooks use as they used the module.

    Compilation happens at the first calls, again for each new batch shape until dynamo makes
    the batch dimension dynamic, so the first images pay for it (about two minutes for the
    tiny model's tree search on a 2-core CPU). Switch attention backends before compiling.
    """
    check_compile_backend(backend)
    compiled = torch.compile(denoiser_of(pipeline), backend=backend)
    setattr(pipeline, denoiser_name(pipeline), compiled)
    return compiled


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


@contextlib.contextmanager
def _quiet_hub_deprecations():
    """Hide the warning that diffusers' config loading raises in huggingface_hub on every hub id
    (an argument, ``local_dir_use_symlinks``, that the hub deprecated and ignores): nothing in
    it is for a user to act on. As a decorator, around one function's calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*local_dir_use_symlinks.*", UserWarning)
        yield


@_quiet_hub_deprecations()
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


@_quiet_hub_deprecations()
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


_LORA_NAMES = frozenset({
    "DEFAULT_LORA_TARGETS", "add_lora", "LoraTargetError", "LoraLayoutError", "has_adapter",
    "has_lora", "adapters_disabled", "merge_lora", "save_lora", "load_lora", "copy_lora_weights",
    "lora_layers", "describe_lora",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    """The LoRA helpers that lived here before :mod:`diffalign.lora` held them, so that code
    written as ``models.add_lora(...)`` keeps working (imported lazily: lora imports models)."""
    if name in _LORA_NAMES:
        from diffalign import lora

        return getattr(lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
