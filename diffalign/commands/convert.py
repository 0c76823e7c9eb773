"""``diffalign convert``: a Stable Diffusion model between a diffusers folder and one file, and a
LoRA adapter between diffusers' format and kohya's one file.

``diffalign convert --model M --out FILE.safetensors`` writes a diffusers folder, a training
run's ``final/`` or checkpoint (LoRA already merged in), or a hub id as one original-layout file for
A1111 / ComfyUI. ``diffalign convert --model FILE.safetensors --config FOLDER --out DIR`` reads
such a file (a community fine-tune, say) into a diffusers folder that every ``--model`` takes;
``FOLDER`` is any diffusers folder of the same architecture (for its configs, tokenizer and
scheduler; without it, diffusers' default from the hub cache). Writes SD 1.x / 2.x, SDXL
and SD3 / 3.5.

``diffalign convert --lora L --model BASE --out OUT`` converts the LoRA adapter ``L`` (a diffusers
LoRA folder such as a run's ``lora/``, or one ``.safetensors`` file in diffusers' or kohya's
layout) for the base model ``BASE``: ``OUT.safetensors`` is written in kohya's layout (A1111 /
ComfyUI), any other ``OUT`` as a diffusers LoRA folder. A training checkpoint as ``L`` brings its
own base model (no ``--model``).

``--lora-rank R`` with ``--lora`` resizes the adapter to rank ``R`` on the way (kohya's
``resize_lora``: each layer's ``R`` largest singular directions).

``diffalign convert --model TUNED --base BASE [--lora-rank 32] --out OUT`` extracts a LoRA adapter
from a fully fine-tuned model instead (:mod:`diffalign.lora_extract`): the low-rank part of how
``TUNED``'s denoiser differs from ``BASE``'s, written as above.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.commands._common import model_config_of, quiet_libraries

SAVE_PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
NAME = "convert"
HELP = "a model between a diffusers folder and one original-layout file; a LoRA to kohya's"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--config``, ``--lora`` and ``--out``."""
    parser.add_argument("--model", default=None,
                        help="diffusers folder, run's final/ or checkpoint, hub id, or a "
                             ".safetensors / .ckpt file; with --lora, the adapter's base "
                             "model")  # fmt: skip
    parser.add_argument("--config", "--model-config", dest="model_config", default=None,
                        help="for a single-file --model: a diffusers folder or hub id of the same "
                             "architecture")  # fmt: skip
    parser.add_argument("--lora", default=None,
                        help="convert this LoRA adapter instead: a diffusers LoRA folder (a "
                             "run's lora/), a .safetensors LoRA file, or a training "
                             "checkpoint")  # fmt: skip
    parser.add_argument("--base", default=None,
                        help="extract a LoRA adapter from --model instead: the model it was "
                             "fine-tuned from")  # fmt: skip
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="the extracted adapter's rank (with --base; default 32), or the "
                             "rank to resize --lora to (its largest directions kept)")  # fmt: skip
    parser.add_argument("--lora-keep", type=float, default=None, metavar="SHARE",
                        help="resizing --lora: each layer's smallest rank (up to --lora-rank) "
                             "that keeps this share of its change, e.g. 0.9")  # fmt: skip
    parser.add_argument("--save-precision", choices=tuple(SAVE_PRECISIONS), default=None,
                        help="the written weights' precision (default: as loaded; fp16 halves "
                             "a file, as A1111 / ComfyUI models and kohya LoRAs usually "
                             "are)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True,
                        help="FILE.safetensors to write one file (a LoRA: kohya's layout), else "
                             "a folder")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Load ``--model`` (and ``--lora``) and write it the other way."""
    from diffalign.world import resolve_shipped

    quiet_libraries()
    args.model = resolve_shipped(args.model) if args.model else None  # diffalign:tiny-shapes
    args.base = resolve_shipped(args.base) if args.base else None
    config = model_config_of(args)  # exits when --model is not one file
    if args.out.suffix == ".ckpt":
        raise SystemExit(
            "error: diffalign convert: writes .safetensors only (a pickled .ckpt can run code "
            "when it is loaded): use --out FILE.safetensors."
        )
    pipeline = _to_write(args, config)
    if args.save_precision is not None:
        import torch

        pipeline.to(dtype=getattr(torch, SAVE_PRECISIONS[args.save_precision]))
    if args.lora or args.base:
        _write_lora(pipeline, args.out)
    else:
        _write_model(pipeline, args.out)
    print(f"wrote {args.out}")
    return 0


def _to_write(args: argparse.Namespace, config: str | None):
    """The pipeline to write: ``--model``; with ``--lora``, a base model and that adapter; with
    ``--base``, the base and the adapter extracted from ``--model``."""
    if args.lora and args.base:
        raise SystemExit("error: diffalign convert: --lora converts an adapter and --base "
                         "extracts one: give one of them.")  # fmt: skip
    if args.base:
        return _extracted_lora(args, config)
    if args.lora_keep is not None and not (args.lora and args.lora_rank):
        raise SystemExit("error: diffalign convert: --lora-keep picks each layer's rank when "
                         "resizing: give --lora and --lora-rank (the largest) too.")  # fmt: skip
    if args.lora:
        return _resized(_pipeline_with_lora(args, config), args.lora_rank, args.lora_keep)
    if args.lora_rank is not None:
        raise SystemExit("error: diffalign convert: --lora-rank is the rank of an adapter: give "
                         "--lora (to resize it) or --base (to extract one).")  # fmt: skip
    if not args.model:
        raise SystemExit("error: diffalign convert: give --model (a model) or --lora (an adapter).")
    from diffalign.models import load_pipeline

    return load_pipeline(args.model, config=config)


def _write_model(pipeline, out: Path) -> None:
    """One original-layout file for ``OUT.safetensors``, else a diffusers folder."""
    from diffalign.single_file import save_single_file

    if out.suffix == ".safetensors":
        save_single_file(pipeline, out)
    else:
        pipeline.save_pretrained(out)


def _pipeline_with_lora(args: argparse.Namespace, config: str | None):
    """``--model`` with the adapter ``--lora`` (a training checkpoint: its run's base with it)."""
    from diffalign.lora import has_lora, load_lora
    from diffalign.models import denoiser_of, load_pipeline
    from diffalign.train.export import is_training_checkpoint, pipeline_from_checkpoint

    if is_training_checkpoint(args.lora):
        if args.model:
            raise SystemExit(
                "error: diffalign convert: a training checkpoint as --lora brings its run's base "
                "model; drop --model."
            )
        pipeline = pipeline_from_checkpoint(args.lora, merge=False)
        if not has_lora(denoiser_of(pipeline)):
            raise SystemExit(
                f"error: diffalign convert: {args.lora} is from a run that trained every weight "
                "(use_lora: false), so it holds no adapter: convert it as a model, with --model, "
                "or extract one, with --model CHECKPOINT --base BASE."
            )
    elif not args.model:
        raise SystemExit(
            "error: diffalign convert: --lora needs the base model it adapts: add --model BASE "
            "(the run's `model` setting, for a run's lora/)."
        )
    else:
        pipeline = load_lora(load_pipeline(args.model, config=config), args.lora)
    return pipeline


def _resized(pipeline, rank: int | None, keep: float | None = None):
    """``pipeline`` with its adapter resized to ``rank`` (None: as it is), each layer to the
    rank keeping the share ``keep`` of its change when given."""
    from diffalign.lora_extract import resize_lora

    if rank is None:
        return pipeline
    try:
        print(resize_lora(pipeline, rank, keep=keep).describe())
    except ValueError as error:
        raise SystemExit(f"error: diffalign convert: {error}") from None
    return pipeline


def _extracted_lora(args: argparse.Namespace, config: str | None):
    """``--base`` with the adapter extracted from ``--model``'s change of it."""
    from diffalign.lora_extract import extract_lora
    from diffalign.models import denoiser_of, load_pipeline

    if not args.model:
        raise SystemExit("error: diffalign convert: --base extracts a LoRA from --model: give "
                         "--model TUNED as well.")  # fmt: skip
    tuned = load_pipeline(args.model, config=config)
    base = load_pipeline(args.base)
    try:
        report = extract_lora(denoiser_of(tuned), denoiser_of(base), args.lora_rank or 32)
    except ValueError as error:
        raise SystemExit(f"error: diffalign convert: {error}") from None
    print(report.describe())
    return base


def _write_lora(pipeline, out: Path) -> None:
    """Kohya's one file for ``OUT.safetensors``, else a diffusers LoRA folder."""
    from diffalign.kohya_lora import save_kohya_lora
    from diffalign.lora import describe_lora, save_lora

    if out.suffix == ".safetensors":
        save_kohya_lora(pipeline, out)
    else:
        save_lora(pipeline, out)
    print(f"LoRA adapter: {describe_lora(pipeline)}")
