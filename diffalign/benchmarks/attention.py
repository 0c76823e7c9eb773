"""Attention backends side by side: classic vs SDPA vs SDPA + fused QKV (and xformers on CUDA).

Every case runs in one process on the same weights and inputs, so the ratios against the classic
backend are fair. Models (random weights; speed does not depend on the values):

- ``tiny-unet``: the tiny test UNet of ``diffalign.models``.
- ``sd15-down-block``: the first down block of Stable Diffusion 1.5's UNet (320 channels,
  two transformer layers with 8 heads, cross-attention to 77 x 768 text states) at the latent
  size of the requested resolution. Its self-attention over 64 x 64 = 4,096 tokens at 512 px is
  where attention dominates SD1.5's cost.
- ``sd15-unet``: the full SD1.5 UNet (859.5M parameters); slow on CPU, meant for GPUs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffalign.attention import enable_fused_attention, xformers_problem
from diffalign.choices import ATTENTION_BENCH_MODELS

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
MODELS = ATTENTION_BENCH_MODELS
MODES = ("forward", "forward+backward")


@dataclass
class Case:
    """A model to time: the module, a function that runs it once, and a label."""

    name: str
    module: nn.Module
    run: Callable[[], torch.Tensor]
    shape: str


@dataclass
class Timing:
    """One measured (model, backend, mode) cell."""

    model: str
    backend: str
    mode: str
    median_ms: float
    speedup_vs_classic: float | None = None
    max_abs_diff_vs_classic: float | None = None


def backends_for(device: torch.device) -> list[tuple[str, str, bool]]:
    """(label, backend, fuse_qkv) rows to time on ``device``; xformers only where it can run."""
    rows = [("classic", "classic", False), ("sdpa", "sdpa", False), ("sdpa+fused", "sdpa", True)]
    if device.type == "cuda" and xformers_problem(str(device)) is None:
        rows.append(("xformers", "xformers", False))
    return rows


def _inputs(generator, device, dtype, *shape):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def build_case(
    name: str, batch_size: int, resolution: int, device: torch.device, dtype: torch.dtype
) -> Case:
    """Build one benchmark model with random weights and inputs on ``device``."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_blocks import get_down_block
    from diffusers.utils import logging as diffusers_logging

    from diffalign.models import build_tiny_unet

    diffusers_logging.set_verbosity_error()  # silence the cast-to-dtype advice for random weights
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "tiny-unet":
        module = build_tiny_unet(0, sample_size=resolution // 2)
        latent, text_dim = resolution // 2, module.config.cross_attention_dim
    elif name == "sd15-unet":
        module = UNet2DConditionModel(**SD15_UNET_CONFIG)
        latent, text_dim = resolution // 8, 768
    elif name == "sd15-down-block":
        module = get_down_block(
            "CrossAttnDownBlock2D", num_layers=2, in_channels=320, out_channels=320,
            temb_channels=1280, add_downsample=True, resnet_eps=1e-5, resnet_act_fn="silu",
            num_attention_heads=8, attention_head_dim=40, resnet_groups=32,
            cross_attention_dim=768, downsample_padding=1,
        )  # fmt: skip
        latent, text_dim = resolution // 8, 768
    else:
        raise ValueError(f"Unknown benchmark model {name!r}; choose from {MODELS}.")
    module = module.to(device=device, dtype=dtype).train()
    text = _inputs(gen, device, dtype, batch_size, 77, text_dim)
    if name == "sd15-down-block":
        hidden = _inputs(gen, device, dtype, batch_size, 320, latent, latent)
        temb = _inputs(gen, device, dtype, batch_size, 1280)
        run = lambda: module(hidden, temb, encoder_hidden_states=text)[0]
        shape = f"{batch_size}x320x{latent}x{latent}"
    else:
        sample = _inputs(gen, device, dtype, batch_size, 4, latent, latent)
        timestep = torch.full((batch_size,), 500, device=device)
        run = lambda: module(sample, timestep, encoder_hidden_states=text).sample
        shape = f"{batch_size}x4x{latent}x{latent}"
    return Case(name, module, run, shape)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _step(case: Case, mode: str) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            case.run()

    def forward_backward() -> None:
        case.run().float().pow(2).mean().backward()
        case.module.zero_grad(set_to_none=True)

    return forward if mode == "forward" else forward_backward


def benchmark_case(case: Case, device: torch.device, warmup: int, repeats: int) -> list[Timing]:
    """Time every backend and mode for one model; ratios and output differences vs classic."""
    timings, reference = [], None
    for label, backend, fuse in backends_for(device):
        enable_fused_attention(case.module, backend, fuse_qkv=fuse)
        with torch.no_grad():
            output = case.run().float()
        if reference is None:  # the classic backend runs first
            reference = output
        diff = (output - reference).abs().max().item()
        for mode in MODES:
            ms = time_call(_step(case, mode), device, warmup, repeats)
            timings.append(Timing(case.name, label, mode, ms, max_abs_diff_vs_classic=diff))
    enable_fused_attention(case.module, "sdpa")  # leave no fused layers behind
    classic = {t.mode: t.median_ms for t in timings if t.backend == "classic"}
    for timing in timings:
        timing.speedup_vs_classic = classic[timing.mode] / timing.median_ms
    return timings


def format_table(timings: list[Timing]) -> str:
    """A fixed-width table of the timings, one row per (model, backend)."""
    header = f"{'model':<16} {'backend':<11} {'fwd ms':>9} {'x classic':>9} "
    header += f"{'fwd+bwd ms':>11} {'x classic':>9} {'max|diff|':>10}"
    lines = [header, "-" * len(header)]
    rows: dict[tuple[str, str], dict[str, Timing]] = {}
    for t in timings:
        rows.setdefault((t.model, t.backend), {})[t.mode] = t
    for (model, backend), by_mode in rows.items():
        fwd, both = by_mode["forward"], by_mode["forward+backward"]
        lines.append(
            f"{model:<16} {backend:<11} {fwd.median_ms:>9.2f} {fwd.speedup_vs_classic:>8.2f}x "
            f"{both.median_ms:>11.2f} {both.speedup_vs_classic:>8.2f}x "
            f"{fwd.max_abs_diff_vs_classic:>10.1e}"
        )
    return "\n".join(lines)


def run_attention_benchmark(
    models: list[str],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    resolution: int,
    tiny_batch_size: int,
    tiny_resolution: int,
    warmup: int = 1,
    repeats: int = 3,
) -> dict:
    """Run the benchmark and return the results as plain data (for ``metrics.json``)."""
    results, shapes = [], {}
    for name in models:
        tiny = name == "tiny-unet"
        case = build_case(
            name,
            tiny_batch_size if tiny else batch_size,
            tiny_resolution if tiny else resolution,
            device,
            dtype,
        )
        shapes[name] = case.shape
        results.extend(benchmark_case(case, device, warmup, repeats))
        del case
    xformers_note = xformers_problem(str(device)) if device.type == "cuda" else "CPU"
    table = format_table(results)
    if xformers_note:
        table += f"\nxformers not timed: {xformers_note}"
    return {
        "timings": [asdict(t) for t in results],
        "input_shapes": shapes,
        "xformers_not_timed_because": xformers_note,
        "table": table,
    }
