"""Pretrain the tiny shapes-world text-to-image model: the VAE first, then text encoder + UNet.

The result is a standard ``StableDiffusionPipeline`` folder (AutoencoderKL, CLIPTextModel with the
real CLIP tokenizer, UNet2DConditionModel, DDIMScheduler), so it loads with the same code as Stable
Diffusion. The denoiser predicts epsilon under SD's schedule, or v under a zero-terminal-SNR
schedule (``prediction_type`` / ``zero_terminal_snr``), or, with ``prediction_type=flow``, the
flow-matching velocity under a ``FlowMatchEulerDiscreteScheduler`` (``flow_shift``), which makes a
flow-matching UNet. Data are drawn fresh every step from the world's training split.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.config import BaseConfig, ConfigError
from diffalign.ema import EMA
from diffalign.files import atomic_write_text
from diffalign.flow import is_flow_scheduler
from diffalign.sampling import PREDICTION_TYPES, load_schedule
from diffalign.world.render import generate_pairs

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        SchedulerMixin,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from torch import nn
    from transformers import PreTrainedTokenizerBase


@dataclass
class WorldPretrainConfig(BaseConfig):
    """Settings of ``diffalign world pretrain`` (the defaults began the shipped model; its card
    lists the runs and overrides that continued it)."""

    seed: int = field(default=0, metadata={"help": "Seed of weights, data and noise."})
    image_size: int = field(default=32, metadata={"help": "Image side in pixels."})
    vae_steps: int = field(default=800, metadata={"help": "VAE training steps."})
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "KL weight (as in SD's VAE)."})
    decoder_steps: int = field(
        default=0,
        metadata={"help": "Decoder-only steps after the VAE stage (encoder and latents fixed)."},
    )
    decoder_learning_rate: float = 3e-4
    unet_steps: int = field(
        default=3000, metadata={"help": "Text encoder + UNet steps (0 with init_from: keep them)."}
    )
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    prediction_type: str = field(
        default="epsilon",
        metadata={
            "help": "What the UNet predicts: epsilon (SD 1.x), v_prediction, sample, or flow "
            "(the flow-matching velocity noise - x0)."
        },
    )
    flow_shift: float = field(
        default=1.0, metadata={"help": "Static shift of the flow schedule (prediction_type=flow)."}
    )
    zero_terminal_snr: bool = field(
        default=False,
        metadata={
            "help": "Rescale SD's betas so the last timestep is pure noise, and sample with "
            "trailing timesteps (needs v_prediction or sample)."
        },
    )
    high_noise_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of each batch whose timesteps are drawn from the noisiest 20% of the "
            "schedule, where the layout (and so the relation) is decided; the rest are uniform."
        },
    )
    caption_dropout: float = field(default=0.1, metadata={"help": "Empty-caption rate, for CFG."})
    ema_decay: float = 0.999
    unet_channels: tuple[int, ...] = (40, 80, 80)
    text_hidden_size: int = 32
    guidance_scale: float = field(default=3.0, metadata={"help": "CFG scale used to evaluate."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Continue from this folder (VAE kept; decoder_steps apply)."},
    )

    def validate(self) -> None:
        if self.image_size % 8 or self.image_size < 32:
            raise ConfigError(
                f"image_size must be a multiple of 8 and at least 32 (four objects must fit), "
                f"got {self.image_size}."
            )
        if min(self.vae_steps, self.batch_size, self.vae_batch_size) < 1:
            raise ConfigError("vae_steps and the batch sizes must be >= 1.")
        if self.decoder_steps < 0 or self.unet_steps < 0:
            raise ConfigError("decoder_steps and unet_steps must be >= 0.")
        if self.unet_steps == 0 and not self.init_from:
            raise ConfigError(
                "unet_steps=0 keeps the denoiser of init_from; set init_from=FOLDER or give "
                "unet_steps >= 1."
            )
        if self.prediction_type not in (*PREDICTION_TYPES, "flow"):
            raise ConfigError(
                f"prediction_type must be one of {(*PREDICTION_TYPES, 'flow')}, got "
                f"{self.prediction_type!r}."
            )
        if self.prediction_type == "flow" and (self.zero_terminal_snr or self.flow_shift <= 0):
            raise ConfigError(
                "prediction_type=flow needs flow_shift > 0 and no zero_terminal_snr (flow "
                "matching reaches pure noise at t = 1 by construction)."
            )
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "zero_terminal_snr=true needs prediction_type=v_prediction (or sample): at zero "
                "SNR the noisy latent is the noise itself, so epsilon prediction carries no "
                "information about the image."
            )
        if not 0 <= self.high_noise_share <= 1:
            raise ConfigError(f"high_noise_share must be in [0, 1], got {self.high_noise_share}.")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")


def build_world_unet(config: WorldPretrainConfig) -> UNet2DConditionModel:
    """The shapes-world UNet: cross-attention at every level but the first."""
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _batches(config: WorldPretrainConfig, stage: int, step: int, size: int):
    # Distinct, reproducible data per (stage, step): no two steps see the same images.
    return generate_pairs(size, seed=(config.seed * 7 + stage) * 1_000_003 + step,
                          split="train", image_size=config.image_size)  # fmt: skip


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _fit_reconstruction(vae, parameters, learning_rate: float, steps: int, stage: int,
                        config: WorldPretrainConfig, kl_weight: float, desc: str, quiet: bool,
                        generator: torch.Generator | None = None) -> float:  # fmt: skip
    """Train ``parameters`` of ``vae`` to reconstruct fresh renderings; the mean of the last 50
    losses. Frozen parts (the encoder, for a decoder-only stage) build no graph."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=quiet):
        images, _ = _batches(config, stage, step, config.vae_batch_size)
        posterior = vae.encode(images * 2 - 1).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator)).sample, images * 2 - 1)
        if kl_weight:
            loss = loss + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-50:]) / len(losses[-50:])


def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """``images`` in [0, 1] encoded to their latent mode and decoded again, in [-1, 1]."""
    with torch.no_grad():
        return vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample


def _reconstruction_psnr(vae, images: torch.Tensor) -> float:
    error = F.mse_loss(reconstruct(vae, images), images * 2 - 1).item()
    return 10 * math.log10(4 / error)


def _held_back_images(config: WorldPretrainConfig) -> torch.Tensor:
    """256 renderings no training stage draws (stage 3), for the scale and the PSNR."""
    return _batches(config, 3, 0, 256)[0]


def train_vae(vae: AutoencoderKL, config: WorldPretrainConfig, quiet: bool = False) -> dict:
    """Train the VAE to reconstruct world images; set its latent ``scaling_factor``."""
    final_loss = _fit_reconstruction(vae, vae.parameters(), config.vae_learning_rate,
                                     config.vae_steps, 1, config, config.vae_kl_weight, "vae",
                                     quiet)  # fmt: skip
    images = _held_back_images(config)
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.sample()
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    return {"final_loss": final_loss, "scaling_factor": scaling,
            "reconstruction_psnr_db": _reconstruction_psnr(vae, images)}  # fmt: skip


def finetune_decoder(vae: AutoencoderKL, config: WorldPretrainConfig, quiet: bool = False) -> dict:
    """Train only the decoder (and ``post_quant_conv``) on fresh renderings.

    The encoder, and so the latent space the denoiser was trained on, stays fixed: a sharper
    decoder can be swapped under an already trained UNet.
    """
    images = _held_back_images(config)
    before = _reconstruction_psnr(vae, images)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    final_loss = _fit_reconstruction(vae, trainable, config.decoder_learning_rate,
                                     config.decoder_steps, 4, config, 0.0, "vae decoder", quiet,
                                     torch.Generator().manual_seed(config.seed))  # fmt: skip
    vae.requires_grad_(False)
    return {"steps": config.decoder_steps, "final_loss": final_loss,
            "reconstruction_psnr_db_before": before,
            "reconstruction_psnr_db": _reconstruction_psnr(vae, images)}  # fmt: skip


def encode_text(
    tokenizer: PreTrainedTokenizerBase, text_encoder: nn.Module, captions: list[str]
) -> torch.Tensor:
    """The text encoder's token states (B, max_length, hidden) of ``captions``, padded."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    return text_encoder(ids)[0]


def training_timesteps(count: int, num_train_timesteps: int, high_noise_share: float,
                       generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """``count`` training timesteps: uniform, except that each is drawn from the noisiest 20% of
    the schedule with probability ``high_noise_share``."""
    timesteps = torch.randint(0, num_train_timesteps, (count,), generator=generator)
    if not high_noise_share:  # draws nothing more, so earlier runs replay exactly
        return timesteps
    high = torch.randint(num_train_timesteps * 4 // 5, num_train_timesteps, (count,),
                         generator=generator)  # fmt: skip
    return torch.where(torch.rand(count, generator=generator) < high_noise_share, high, timesteps)


def train_denoiser(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    vae: AutoencoderKL,
    scheduler: SchedulerMixin,
    config: WorldPretrainConfig,
    quiet: bool = False,
) -> dict:
    """Train text encoder and UNet jointly with the denoising loss of ``scheduler``'s schedule and
    prediction type."""
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.warmup_steps, config.unet_steps)
    )
    ema = EMA(parameters, decay=config.ema_decay)
    schedule = load_schedule(scheduler)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in tqdm(range(config.unet_steps), desc="text encoder + unet", disable=quiet):
        images, captions = _batches(config, 2, step, config.batch_size)
        drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample(generator)
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = training_timesteps(len(latents), schedule.num_train_timesteps,
                                       config.high_noise_share, generator)  # fmt: skip
        point = schedule.training_point(latents, noise, timesteps)
        states = encode_text(tokenizer, text_encoder, captions)
        prediction = unet(point.noisy, point.timestep, states).sample
        loss = F.mse_loss(prediction, point.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.update()
        losses.append(loss.item())
    ema.copy_to_model()
    return {"final_loss": sum(losses[-100:]) / len(losses[-100:]), "loss_curve": losses[::50]}


def world_scheduler(config: WorldPretrainConfig) -> SchedulerMixin:
    """The scheduler the denoiser trains under: SD's DDIM (``prediction_type``,
    ``zero_terminal_snr``), or flow matching with ``flow_shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.models import sd_ddim_scheduler

    if config.prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(shift=config.flow_shift)
    return sd_ddim_scheduler(config.prediction_type, config.zero_terminal_snr)


def _check_kept_scheduler(scheduler, config: WorldPretrainConfig) -> None:
    """With ``unet_steps=0`` the denoiser of ``init_from`` is kept, and so must its schedule be."""
    settings = scheduler.config
    kept = ("flow", False) if is_flow_scheduler(scheduler) else (
        settings.prediction_type, bool(settings.rescale_betas_zero_snr))  # fmt: skip
    if kept != (config.prediction_type, config.zero_terminal_snr):
        raise ConfigError(
            f"unet_steps=0 keeps the denoiser of {config.init_from}, which was trained with "
            f"prediction_type={kept[0]} zero_terminal_snr={kept[1]}; set those, or give "
            f"unet_steps >= 1 to retrain it for prediction_type={config.prediction_type} "
            f"zero_terminal_snr={config.zero_terminal_snr}."
        )


def pretrain_world(
    config: WorldPretrainConfig, out: Path, quiet: bool = False
) -> tuple[StableDiffusionPipeline, dict]:
    """Run both stages and save the pipeline to ``out``; returns (pipeline, training record)."""
    from diffusers import StableDiffusionPipeline

    from diffalign.models import (
        build_clip_tokenizer,
        build_tiny_text_encoder,
        build_tiny_vae,
        save_clip_tokenizer,
    )

    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = build_clip_tokenizer()
    scheduler = world_scheduler(config)
    start, history = time.time(), None
    if config.init_from:
        base = StableDiffusionPipeline.from_pretrained(config.init_from)
        vae, text_encoder, unet = base.vae, base.text_encoder.train(), base.unet.train()
        text_encoder.requires_grad_(True)
        unet.requires_grad_(True)
        base_record = Path(config.init_from) / "training.json"
        history = json.loads(base_record.read_text()) if base_record.is_file() else None
        vae_record = {"kept_from": config.init_from}
        if not config.unet_steps:
            _check_kept_scheduler(base.scheduler, config)
            scheduler = base.scheduler
    else:
        torch.manual_seed(config.seed)
        vae = build_tiny_vae(config.seed, config.image_size)
        text_encoder = build_tiny_text_encoder(config.seed, config.text_hidden_size)
        torch.manual_seed(config.seed)
        unet = build_world_unet(config)
        vae_record = train_vae(vae, config, quiet)
    if config.decoder_steps:
        vae_record = {**vae_record, "decoder": finetune_decoder(vae, config, quiet)}
    vae_seconds = time.time() - start
    vae.requires_grad_(False).eval()
    denoiser_record = {"kept_from": config.init_from}
    if config.unet_steps:
        denoiser_record = train_denoiser(
            unet, text_encoder, tokenizer, vae, scheduler, config, quiet
        )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    record = {
        "config": config.to_dict(),
        "vae": {**vae_record, "seconds": vae_seconds},
        "denoiser": {**denoiser_record, "seconds": time.time() - start - vae_seconds},
        "parameters": {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))
        },  # fmt: skip
        "continued_from": history,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if not config.unet_steps and history and "sampling" in history:
        record["sampling"] = history["sampling"]  # the same denoiser: its chosen CFG still holds
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out)
    save_clip_tokenizer(tokenizer, out / "tokenizer")
    atomic_write_text(out / "training.json", json.dumps(record, indent=1))
    return pipeline, record
