"""Rollout and training-step throughput, side by side in one run.

- Sampling: diffalign's ``RolloutPipeline`` (which also records the chain and the log-probs)
  against diffusers' ``StableDiffusionPipeline`` + ``DDIMScheduler`` at the same eta (SD3: against
  ``StableDiffusion3Pipeline``'s Euler steps, its only sampler), on the same
  weights, prompts and seeds, timed alternately; the ratio of their throughputs is
  ``throughput_ratio_vs_diffusers`` (1.0 = no overhead).
- Training: one DDPO and one AWM optimizer step on a freshly sampled round, in images/s.

Models: ``diffalign:tiny-shapes`` (the shipped tiny model), a pipeline folder (SD, SDXL or SD3), or
one of the :data:`RANDOM_ARCHITECTURES` with random weights, for GPUs: ``sd15-random`` (Stable
Diffusion 1.5: UNet, VAE, CLIP ViT-L text encoder), ``sdxl-random`` (SDXL base 1.0: its UNet,
VAE, CLIP ViT-L and OpenCLIP ViT-bigG text encoders) and ``sd35-random`` (Stable Diffusion 3.5
Medium: its MMDiT-X transformer, 16-channel VAE and both CLIP text encoders; no T5).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    from diffusers import (
        DiffusionPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

SD15_RANDOM = "sd15-random"
SDXL_RANDOM = "sdxl-random"
SD35_RANDOM = "sd35-random"
SD35_MEDIUM_TRANSFORMER_CONFIG = {  # Stable Diffusion 3.5 Medium's MMDiT-X (2.24B parameters)
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,  # CLIP ViT-L's 768 + OpenCLIP ViT-bigG's 1280
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
SDXL_UNET_CONFIG = {  # SDXL base 1.0's UNet (2.6B parameters)
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled 1280
    "norm_num_groups": 32,
}


def _sd_vae(sample_size: int, scaling_factor: float, sd3: bool = False):
    """Stable Diffusion's VAE architecture (SD1.5 and SDXL share it; ``sd3``: SD3's, with 16
    latent channels, a shifted latent space and no quant convolutions), random weights."""
    from diffusers import AutoencoderKL

    sd3_layout = {"latent_channels": 16, "shift_factor": 0.0609, "use_quant_conv": False,
                  "use_post_quant_conv": False} if sd3 else {"latent_channels": 4}  # fmt: skip
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_size, scaling_factor=scaling_factor, **sd3_layout,
    )  # fmt: skip


def _clip_text_encoder(hidden: int, layers: int, heads: int, act: str, projection: bool = False):
    """A CLIP text tower of the given size over CLIP's vocabulary, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, projection_dim=hidden, hidden_act=act,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_sd15_random_pipeline(device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD1.5's architecture and random weights (speed only),
    built on ``device``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffalign.benchmarks.attention import SD15_UNET_CONFIG
    from diffalign.models import build_clip_tokenizer, sd_ddim_scheduler

    torch.manual_seed(0)
    with torch.device(device):
        return StableDiffusionPipeline(
            vae=_sd_vae(512, 0.18215),
            text_encoder=_clip_text_encoder(768, 12, 12, "quick_gelu"),
            tokenizer=build_clip_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
            scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip


def build_sdxl_random_pipeline(device: str | torch.device = "cpu") -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline with SDXL base 1.0's architecture and random weights (speed
    only; 3.5B parameters, about 14 GB in float32), built on ``device``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffalign.models import build_clip_tokenizer, sd_ddim_scheduler

    torch.manual_seed(0)
    with torch.device(device):
        return StableDiffusionXLPipeline(
            vae=_sd_vae(1024, 0.13025),
            text_encoder=_clip_text_encoder(768, 12, 12, "quick_gelu"),
            text_encoder_2=_clip_text_encoder(1280, 32, 20, "gelu", projection=True),
            tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
            unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), scheduler=sd_ddim_scheduler(),
        )  # fmt: skip


def build_sd35_random_pipeline(device: str | torch.device = "cpu") -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline with Stable Diffusion 3.5 Medium's architecture and random
    weights (speed only), built on ``device``: its transformer, VAE, both CLIP text encoders and
    flow-matching scheduler (shift 3). No T5 encoder (its tokenizer cannot be built offline):
    diffusers feeds zeros in its place, so encoding costs less than the real model's."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from diffalign.models import build_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER_CONFIG),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_sd_vae(1024, 1.5305, sd3=True),
            text_encoder=_clip_text_encoder(768, 12, 12, "quick_gelu", projection=True),
            text_encoder_2=_clip_text_encoder(1280, 32, 20, "gelu", projection=True),
            tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None,
        )  # fmt: skip


RANDOM_ARCHITECTURES = {SD15_RANDOM: build_sd15_random_pipeline,
                        SDXL_RANDOM: build_sdxl_random_pipeline,
                        SD35_RANDOM: build_sd35_random_pipeline}  # fmt: skip
"""The ``--model`` names of the random-weight architectures, and their builders."""


def load_benchmark_pipeline(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    pipeline_cls: type | None = None,
    model_config: str | None = None,
) -> DiffusionPipeline:
    """``model`` (a folder, a one-file checkpoint with its ``model_config`` folder,
    ``diffalign:<shipped>`` or a random architecture) as ``pipeline_cls`` (default:
    :class:`~diffalign.pipelines.rollout.RolloutPipeline`; its SDXL counterpart for an SDXL
    model) on ``device``."""
    from diffalign.pipelines.rollout import RolloutPipeline, over_components
    from diffalign.train.trainer import load_training_pipeline

    if model in RANDOM_ARCHITECTURES:
        pipeline = RANDOM_ARCHITECTURES[model](device)  # built in place: SDXL is 14 GB
    else:
        pipeline = load_training_pipeline(model, model_config)
    pipeline_cls = pipeline_cls or RolloutPipeline
    return over_components(pipeline, pipeline_cls).to(device, dtype)


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, the device's queued work included (CUDA is synchronised
    before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_sampling(pipeline: DiffusionPipeline, prompts: list[str], steps: int, guidance: float,
                  eta: float, repeats: int, device: torch.device, resolution: int | None = None,
                  compile_backend: str | Callable | None = None) -> dict:  # fmt: skip
    """Alternate diffusers and rollout sampling; median seconds of each and the ratio. An SD3
    model is timed against ``StableDiffusion3Pipeline``, which samples with Euler steps only
    (no ``eta``); the rollout pipeline samples at ``eta`` as asked. With ``compile_backend``
    the rollout pipeline also samples with its chain calling ``torch.compile(denoiser,
    backend=compile_backend)``, as the trainers do under accelerate's dynamo setting, timed in
    the same alternation (its first call, which compiles, timed apart)."""
    from diffalign.flow import is_flow_scheduler
    from diffalign.models import UnsupportedModelError, denoiser_of, pipeline_family
    from diffalign.pipelines.rollout import plain_pipeline

    sd3 = pipeline_family(pipeline) == "sd3"
    if is_flow_scheduler(pipeline.scheduler) and not sd3:
        raise UnsupportedModelError(
            "bench rollout times the rollout pipeline against diffusers' StableDiffusionPipeline, "
            "which cannot step a flow-matching scheduler; bench a DDPM-family model (e.g. "
            "diffalign:tiny-shapes or sd15-random) or an SD3 model."
        )
    reference = plain_pipeline(pipeline)
    reference.set_progress_bar_config(disable=True)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "eta": eta,
              "height": resolution, "width": resolution}  # fmt: skip
    reference_kwargs = {k: v for k, v in kwargs.items() if not (sd3 and k == "eta")}

    def run_diffusers():
        reference(prompts, generator=torch.Generator().manual_seed(0), output_type="pt",
                  **reference_kwargs)  # fmt: skip

    def run_rollout(chain_denoiser=None):
        pipeline.chain_denoiser = chain_denoiser
        try:
            pipeline(prompts, generator=torch.Generator().manual_seed(0), **kwargs)
        finally:
            pipeline.chain_denoiser = None

    runs = {"diffusers": run_diffusers, "rollout": run_rollout}
    if compile_backend is not None:
        compiled = torch.compile(denoiser_of(pipeline), backend=compile_backend)
        runs["compiled_rollout"] = functools.partial(run_rollout, compiled)
        first_compiled_call = seconds_of(runs["compiled_rollout"], device)
    for run in runs.values():
        run()  # warm-up
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(seconds_of(run, device))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    results = {f"{name}_images_per_s": len(prompts) / median[name] for name in runs}
    results["throughput_ratio_vs_diffusers"] = median["diffusers"] / median["rollout"]
    if compile_backend is not None:
        results["throughput_ratio_compiled_vs_eager"] = (
            median["rollout"] / median["compiled_rollout"]
        )
        results["first_compiled_call_seconds"] = first_compiled_call
    return results


def time_training_steps(pipeline: DiffusionPipeline, model: str, batch: int, steps: int,
                        guidance: float, mixed_precision: str, out: str | os.PathLike,
                        resolution: int | None = None,
                        model_config: str | None = None) -> dict:  # fmt: skip
    """Images/s of one DDPO and one AWM update (LoRA) on a freshly sampled round, timed after
    one warm-up update on the same round; on CUDA also the peak memory of the timed update."""
    from diffalign.models import denoiser_name, denoiser_of
    from diffalign.pipelines.rollout import RolloutPipeline, over_components
    from diffalign.train.awm import AWMTrainer
    from diffalign.train.config import AWMConfig, DDPOConfig
    from diffalign.train.ddpo import DDPOTrainer

    shared = {"prompts_per_step": max(1, batch // 4), "samples_per_prompt": min(4, batch),
              "sample_batch_size": batch, "num_inference_steps": steps, "guidance_scale": guidance,
              "train_batch_size": batch, "log_with": "none", "progress": False,
              "reward": "jpeg_compressibility", "mixed_precision": mixed_precision,
              "lora_rank": 4, "model": model, "model_config": model_config,
              "resolution": resolution}  # fmt: skip
    results = {}
    for name, trainer_cls, config in (
        ("ddpo", DDPOTrainer, DDPOConfig(**shared, timestep_fraction=1.0)),
        ("awm", AWMTrainer, AWMConfig(**shared, num_train_timesteps=6, beta_kl=1e-4)),
    ):
        trained_copy = {denoiser_name(pipeline): copy.deepcopy(denoiser_of(pipeline))}
        fresh = over_components(pipeline, RolloutPipeline, **trained_copy)
        trainer = trainer_cls(config, out, pipeline=fresh)
        device = trainer.model.device
        round_batch = trainer.sample_round(0)
        trainer.train_on(round_batch, 0)  # warm-up: kernel selection, optimizer state
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = seconds_of(lambda t=trainer, b=round_batch: t.train_on(b, 0), device)
        results[f"{name}_step_images_per_s"] = len(round_batch.rollout) / seconds
        results[f"{name}_step_seconds"] = seconds
        if device.type == "cuda":
            results[f"{name}_step_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del trainer, fresh, round_batch
    return results


def run_rollout_benchmark(model: str, device: torch.device, dtype: torch.dtype, batch: int,
                          steps: int, guidance: float, eta: float, repeats: int, train: bool,
                          out: str | os.PathLike, resolution: int | None = None,
                          model_config: str | None = None,
                          compile_backend: str | None = None) -> dict:  # fmt: skip
    """Sampling ratio (and with ``compile_backend`` compiled against eager rollouts, see
    :func:`time_sampling`) and optionally training-step throughput; returns a flat dict."""
    pipeline = load_benchmark_pipeline(model, device, dtype, model_config=model_config)
    prompts = ["two red circles left of a blue square"] * batch
    results = {"model": model, "batch": batch, "steps": steps, "guidance_scale": guidance,
               "eta": eta, "resolution": resolution, "compile_backend": compile_backend,
               **time_sampling(pipeline, prompts, steps, guidance, eta, repeats, device,
                               resolution, compile_backend)}  # fmt: skip
    if train:
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
        if precision != "no":
            pipeline.to(dtype=torch.float32)  # mixed precision keeps float32 master weights
        named = "-" if model in RANDOM_ARCHITECTURES else model
        results.update(time_training_steps(pipeline, named, batch, steps, guidance, precision,
                                           out, resolution, model_config))  # fmt: skip
    return results
