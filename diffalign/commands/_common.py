"""Helpers shared by commands: the ``--out`` folder, metrics.json, devices and dtypes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.files import atomic_write_text

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "fp32", "fp16", "bf16")
_VERSIONED = ("torch", "diffusers", "transformers", "accelerate", "peft", "xformers")


def add_out_argument(
    parser: argparse.ArgumentParser,
    required: bool = True,
    help: str = "output folder; metrics.json is written there",
) -> None:
    """``--out DIR``: where the command writes ``metrics.json`` and its other outputs."""
    parser.add_argument("--out", type=Path, required=required, metavar="DIR", help=help)


def add_set_argument(parser: argparse.ArgumentParser, owner: str) -> None:
    """``--set KEY=VALUE ...``: config overrides, several after one flag or the flag repeated."""
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {owner} fields: --set a=1 b=2 (repeatable)",
    )


def add_model_config_argument(parser: argparse.ArgumentParser, model_flag: str = "--model") -> None:
    """``--model-config FOLDER`` (``--baseline-config`` for ``--baseline``): where a one-file
    checkpoint given as ``model_flag`` finds its configs, tokenizer and scheduler."""
    parser.add_argument(
        f"{model_flag}-config",
        default=None,
        metavar="FOLDER",
        help=f"for a one-file {model_flag} (.safetensors / .ckpt): a diffusers folder or hub id "
        "of its architecture, for the configs, tokenizer and scheduler",
    )


RECORDED_SCALE = "the one recorded with a world model or a trained run's final/, else 7.5"


def add_guidance_arguments(parser: argparse.ArgumentParser,
                           scale_default: str = RECORDED_SCALE) -> None:  # fmt: skip
    """``--guidance-scale`` and ``--negative-prompt``: classifier-free guidance, by default as
    recorded with the model (:func:`resolve_guidance`)."""
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help=f"CFG scale; default: {scale_default}")  # fmt: skip
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="CFG's negative prompt (needs a guidance scale > 1); default: the "
                             "one a trained run's final/ was trained with, else diffusers' "
                             "(empty)")  # fmt: skip


def add_batch_size_argument(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``: images per pipeline call of plain sampling (``--sampler ddim``)."""
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per pipeline call with --sampler ddim (the search samplers "
                             "batch by --tree-batch-size); it does not change the images "
                             "(beyond float rounding)")  # fmt: skip


def resolve_guidance(args: argparse.Namespace, model_config: str | None,
                     model: str | None = None, default_scale: float = 7.5) -> None:  # fmt: skip
    """Fill an unset ``--guidance-scale`` / ``--negative-prompt`` with what the model
    (``model``, else ``--model``) records (:func:`diffalign.world.model_guidance`); exit when a
    negative prompt is given without guidance."""
    from diffalign.world import model_guidance

    try:
        args.guidance_scale, args.negative_prompt = model_guidance(
            args.model if model is None else model, args.guidance_scale, args.negative_prompt,
            default_scale, model_config,
        )  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"error: --negative-prompt: {error}.") from None


def add_lora_argument(parser: argparse.ArgumentParser, model_flag: str = "--model") -> None:
    """``--lora`` and ``--lora-scale`` (``--baseline-lora`` and ``--baseline-lora-scale`` for
    ``--baseline``): LoRA adapters merged into that model before sampling, each at a strength."""
    flag = _lora_flag(model_flag)
    parser.add_argument(
        flag,
        default=None,
        nargs="+",
        action="extend",
        metavar="LORA",
        help=f"LoRA adapters for {model_flag}, merged before sampling (several stack, as in the "
        "web UIs): a diffusers LoRA folder (a run's lora/) or a .safetensors file (diffusers' or "
        "kohya's layout, A1111 / ComfyUI)",
    )
    parser.add_argument(
        f"{flag}-scale",
        type=float,
        default=None,
        nargs="+",
        action="extend",
        metavar="S",
        help=f"the strength each {flag} is merged at, one per adapter (default 1: as trained; "
        "0: not at all)",
    )


def _lora_flag(model_flag: str) -> str:
    return "--lora" if model_flag == "--model" else f"{model_flag}-lora"


def _dest(flag: str) -> str:
    """The attribute argparse stores ``flag`` under."""
    return flag.removeprefix("--").replace("-", "_")


def lora_of(args: argparse.Namespace, model_flag: str = "--model") -> list[tuple[str, float]]:
    """The ``--lora`` adapters given for ``model_flag``, each with its scale (none: empty);
    exits when scales come without adapters or in another number, or adapters without their
    model."""
    flag = _lora_flag(model_flag)
    loras, scales = getattr(args, _dest(flag)) or [], getattr(args, f"{_dest(flag)}_scale")
    if scales is not None and not loras:
        raise SystemExit(f"error: {flag}-scale is the strength of {flag}: give {flag} as well.")
    if scales is not None and len(scales) != len(loras):
        raise SystemExit(f"error: give one {flag}-scale per {flag} ({len(loras)} adapters, "
                         f"{len(scales)} scales), or none for 1 each.")  # fmt: skip
    if loras and getattr(args, _dest(model_flag)) is None:
        raise SystemExit(f"error: {flag} adapts {model_flag}: give {model_flag} as well.")
    return list(zip(loras, scales or [1.0] * len(loras), strict=True))


def model_label(model: str, loras: Sequence[tuple[str, float]] = ()) -> str:
    """``model``, with its LoRA adapters and the strengths they are merged at."""
    return model + "".join(f" + LoRA {lora}" + (f" at {scale:g}" if scale != 1.0 else "")
                           for lora, scale in loras)  # fmt: skip


def lora_record(loras: Sequence[tuple[str, float]], prefix: str = "") -> dict[str, Any]:
    """The adapters for metrics.json: ``lora`` (their paths) and ``lora_scale`` (their
    strengths), each a list in merge order, or None without adapters."""
    paths = [lora for lora, _ in loras] or None
    scales = [scale for _, scale in loras] or None
    return {f"{prefix}lora": paths, f"{prefix}lora_scale": scales}


def model_config_of(args: argparse.Namespace, model_flag: str = "--model") -> str | None:
    """The ``--model-config`` given for ``model_flag``; exits when the model is not one file."""
    from diffalign.single_file import is_single_file

    name = _dest(model_flag)
    model, config = getattr(args, name), getattr(args, f"{name}_config")
    if config is not None and (model is None or not is_single_file(model)):
        raise SystemExit(
            f"error: {model_flag}-config is for a one-file {model_flag} (.safetensors / .ckpt); "
            f"{model or 'the default model'} brings its own configs: drop {model_flag}-config."
        )
    return config


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` with ``auto`` defaults (CUDA + fp16 when there is a GPU)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights dtype (auto: fp16 on CUDA, else fp32)",
    )


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--attention`` and ``--compile``: how the denoiser of a sampling command runs."""
    from diffalign.choices import ATTENTION_BACKENDS

    parser.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                        help="attention backend of every component (auto: xformers on CUDA "
                             "when it runs there, else SDPA)")  # fmt: skip
    parser.add_argument("--compile", metavar="BACKEND", default=None,
                        help="run the UNet (SD3: the transformer) under torch.compile with this "
                             "backend, e.g. inductor: the first batches pay the compilation "
                             "(minutes), the rest run faster")  # fmt: skip


def check_compile_argument(args: argparse.Namespace) -> None:
    """Exit with the known backends when ``--compile`` names none (before any model loads)."""
    from diffalign.models import check_compile_backend

    if args.compile is not None:
        try:
            check_compile_backend(args.compile)
        except ValueError as error:
            raise SystemExit(f"error: --compile: {error}") from None


def apply_speed_arguments(pipeline, args: argparse.Namespace) -> dict[str, Any]:
    """Switch ``pipeline``'s attention to ``--attention``, then compile its denoiser with
    ``--compile``; returns what metrics.json records of both."""
    from diffalign.attention import enable_fused_attention
    from diffalign.models import compile_denoiser

    reports = enable_fused_attention(pipeline, args.attention)
    if args.compile is not None:
        compile_denoiser(pipeline, args.compile)
    return {"attention": {name: str(report) for name, report in reports.items()},
            "compile_backend": args.compile}  # fmt: skip


def resolve_device(name: str):
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --device {name}: no CUDA device is visible here; use --device cpu."
        )
    return device


def resolve_dtype(name: str, device: torch.device):
    """``auto`` -> fp16 on CUDA, fp32 elsewhere (bf16 on CPU is slower than fp32)."""
    import torch

    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _device_name(device) -> str:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and hardware, recorded beside every measurement."""
    import torch

    return {
        "diffalign": _version("diffalign"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: _version(name) for name in _VERSIONED},
        "device": str(device) if device is not None else None,
        "device_name": _device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_metrics(
    out: Path, command: str, results: dict[str, Any], device: torch.device | str | None = None
) -> Path:
    """Write ``out/metrics.json`` (atomically) with the command line, environment and results."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment_info(device),
        "results": results,
    }
    return atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, default=str))


def quiet_libraries() -> None:
    """Silence the loading progress bars and advice that diffusers and transformers print."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def add_tree_arguments(parser: argparse.ArgumentParser, title: str, in_flight_help: str) -> None:
    """The knobs of DTS and DTS* (:class:`~diffalign.pipelines.tree.TreeSettings`) as flags."""
    tree = parser.add_argument_group(title)
    tree.add_argument("--tree-batch-size", type=int, default=None,
                      help=f"rollouts in flight per UNet batch ({in_flight_help}); fewer let the "
                           "tree branch on more finished rollouts, at a lower NFE/s")  # fmt: skip
    tree.add_argument("--exploration", type=float, default=1.0, help="DTS*'s UCT constant")
    tree.add_argument("--widening-c", type=float, default=1.0,
                      help="children allowed: ceil(c * visits ** alpha)")  # fmt: skip
    tree.add_argument("--widening-alpha", type=float, default=0.5)
    tree.add_argument("--expansion", choices=("shallowest", "random"), default=None,
                      help="node to grow on the path (default: random for DTS*, shallowest "
                           "for DTS)")  # fmt: skip
    tree.add_argument("--branch-step", type=int, default=None,
                      help="grow the tree only at the root and at this chain position (a "
                           "two-level search over the chains' states there; default: "
                           "anywhere)")  # fmt: skip
    tree.add_argument("--max-nodes", type=int, default=100_000,
                      help="cap on the tree's stored nodes (one latent each); the search stops "
                           "there with a warning")  # fmt: skip
    tree.add_argument("--tree-storage-device", default=None,
                      help="where the nodes' latents live (default: the model's device; cpu "
                           "keeps them in pinned memory when the GPU is short)")  # fmt: skip


def tree_settings_from_arguments(args: argparse.Namespace, default_in_flight: int):
    """The :class:`~diffalign.pipelines.tree.TreeSettings` of :func:`add_tree_arguments`'s
    flags (``default_in_flight`` rollouts per UNet batch unless ``--tree-batch-size``); exits
    with the problem named when they are invalid."""
    from diffalign.pipelines.tree import TreeSettings

    if args.branch_step is not None and args.branch_step >= args.steps:
        raise SystemExit(f"error: --branch-step must lie below --steps ({args.steps}), got "
                         f"{args.branch_step} (0 branches from the starting noise).")  # fmt: skip
    in_flight = default_in_flight if args.tree_batch_size is None else args.tree_batch_size
    try:
        return TreeSettings(exploration=args.exploration, widening_c=args.widening_c,
                            widening_alpha=args.widening_alpha, expansion=args.expansion,
                            branch_step=args.branch_step, rollouts_per_batch=in_flight,
                            max_nodes=args.max_nodes,
                            storage_device=args.tree_storage_device)  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
