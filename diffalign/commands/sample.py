"""``diffalign sample``: generate images from a Stable-Diffusion-family model with DDIM.

``--model`` takes a pipeline folder, a hub id (loaded offline first), or ``diffalign:tiny-random``
for the tiny random-weight test pipeline (its images are noise; it exercises the full path).
Writes ``OUT/images/*.png``, ``OUT/grid.png`` and ``OUT/metrics.json`` (UNet evaluations counted,
wall time, the attention backend used).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffalign.commands._common import (
    add_device_arguments,
    add_out_argument,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    write_metrics,
)

NAME = "sample"
HELP = "generate images with DDIM from a model folder or hub id; writes OUT/metrics.json"
TINY_RANDOM = "diffalign:tiny-random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sampling options."""
    parser.add_argument("--model", required=True, help=f"folder, hub id or {TINY_RANDOM}")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--num-images-per-prompt", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--attention", default="auto", choices=("auto", "xformers", "sdpa", "classic")
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arguments(parser)
    add_out_argument(parser)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SystemExit(f"error: --prompts-file {args.prompts_file} does not exist.")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file.")
    return prompts


def _load(model: str, device, dtype):
    import torch
    from diffusers import DDIMScheduler

    from diffalign.models import build_tiny_pipeline, load_pipeline

    if model == TINY_RANDOM:
        pipeline = build_tiny_pipeline(seed=0).to(device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
    else:
        pipeline = load_pipeline(model, torch_dtype=dtype, device=device)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    return pipeline


def count_calls(module) -> list[int]:
    """Count forward calls of ``module`` (one per UNet batch evaluation = one NFE)."""
    counter = [0]

    def hook(*_):
        counter[0] += 1

    module.register_forward_pre_hook(hook)
    return counter


def run(args: argparse.Namespace) -> int:
    """Sample, save the images and the grid, and write metrics.json."""
    import torch

    from diffalign.attention import enable_fused_attention
    from diffalign.imaging import make_grid, save_images

    prompts = _prompts(args)
    if args.quiet:
        quiet_libraries()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipeline = _load(args.model, device, dtype)
    pipeline.set_progress_bar_config(disable=args.quiet)
    reports = enable_fused_attention(pipeline, args.attention)
    nfe = count_calls(pipeline.unet)
    size = args.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    images = pipeline(
        prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
        num_images_per_prompt=args.num_images_per_prompt, height=size, width=size,
        generator=generator, output_type="pt",
    ).images  # fmt: skip
    seconds = time.perf_counter() - start
    save_images(images, args.out / "images")
    make_grid(images, columns=args.num_images_per_prompt if len(prompts) > 1 else None).save(
        args.out / "grid.png"
    )
    results = {
        "model": args.model, "prompts": prompts, "num_images": len(images),
        "resolution": size, "steps": args.steps, "eta": args.eta,
        "guidance_scale": args.guidance_scale, "seed": args.seed,
        "unet_evaluations": nfe[0], "seconds": seconds, "images_per_second": len(images) / seconds,
        "attention": {name: str(report) for name, report in reports.items()},
    }  # fmt: skip
    path = write_metrics(args.out, "sample", results, device)
    print(f"{len(images)} images in {seconds:.1f} s ({nfe[0]} UNet evaluations) -> {args.out}")
    print(f"wrote {path}")
    return 0
