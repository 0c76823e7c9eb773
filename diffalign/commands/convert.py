"""``diffalign convert``: a Stable Diffusion model between a diffusers folder and one file.

``diffalign convert --model M --out FILE.safetensors`` writes a diffusers folder, a training
run's ``final/`` or checkpoint (LoRA already merged in), or a hub id as one original-layout file for
A1111 / ComfyUI. ``diffalign convert --model FILE.safetensors --config FOLDER --out DIR`` reads
such a file (a community fine-tune, say) into a diffusers folder that every ``--model`` takes;
``FOLDER`` is any diffusers folder of the same architecture (for its configs, tokenizer and
scheduler; without it, diffusers' default from the hub cache). Writes SD 1.x / 2.x, SDXL
and SD3 / 3.5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.commands._common import quiet_libraries

NAME = "convert"
HELP = "a model between a diffusers folder and one original-layout .safetensors file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--config`` and ``--out``."""
    parser.add_argument("--model", required=True,
                        help="diffusers folder, run's final/ or checkpoint, hub id, or a "
                             ".safetensors / .ckpt file")  # fmt: skip
    parser.add_argument("--config", "--model-config", dest="config", default=None,
                        help="for a single-file --model: a diffusers folder or hub id of the same "
                             "architecture")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True,
                        help="FILE.safetensors to write one file, else a folder")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Load ``--model`` and write it the other way."""
    from diffalign.models import load_pipeline
    from diffalign.single_file import is_single_file, save_single_file

    quiet_libraries()
    if args.config and not is_single_file(args.model):
        raise SystemExit("error: diffalign convert: --config is for a single-file --model.")
    if args.out.suffix == ".ckpt":
        raise SystemExit(
            "error: diffalign convert: writes .safetensors only (a pickled .ckpt can run code "
            "when it is loaded): use --out FILE.safetensors."
        )
    pipeline = load_pipeline(args.model, config=args.config)
    if args.out.suffix == ".safetensors":
        save_single_file(pipeline, args.out)
    else:
        pipeline.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0
