"""``diffalign world``: the embedded shapes world (pretrain its model, sample, evaluate).

- ``pretrain --out DIR [--set key=value ...]``: train the tiny text-to-image model from scratch
  (VAE, then text encoder + UNet) on the world's training split and save it as a Stable Diffusion
  pipeline folder, with ``training.json``.
- ``pretrain-clip --out DIR [--set key=value ...]``: train the tiny CLIP contrastively on the
  world's pairs and save a transformers ``CLIPModel`` + ``CLIPProcessor`` folder.
- ``sample --prompt TEXT --out DIR``: sample a grid from a model (default: the shipped
  ``tiny-shapes``) and score it with the ``shapes`` reward.
- ``eval --model DIR --out DIR``: the shapes reward on held-out prompts (combinations never seen in
  training; ``--split`` for another split): ``shapes_mean``, ``shapes_mean_single_object``, the
  breakdown and the two-phrase composition.
- ``diagnose --model DIR --out DIR``: what the model's VAE and text encoder let any fine-tuning of
  its UNet reach (reward of perfect renderings through the VAE; relation-word sensitivity), and
  whether its denoiser uses the relation at all (loss increase when the relation flips).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffalign.commands._common import (
    add_guidance_arguments,
    add_model_config_argument,
    add_out_argument,
    add_set_argument,
    model_config_of,
    quiet_libraries,
    resolve_guidance,
    write_metrics,
)
from diffalign.world.grammar import SPLITS

NAME = "world"
HELP = "the embedded shapes world: pretrain its tiny model, sample, evaluate"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model folder or file (default: shipped tiny-shapes)"
    )
    add_model_config_argument(parser)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    add_guidance_arguments(parser, "the one recorded with the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_out_argument(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``pretrain``, ``sample`` and ``eval``."""
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    trainings = (
        ("pretrain", "train the tiny text-to-image model", "WorldPretrainConfig", _pretrain),
        ("pretrain-clip", "train the tiny CLIP contrastively", "WorldClipConfig", _pretrain_clip),
    )
    for name, text, config_name, action in trainings:
        training = sub.add_parser(name, help=text)
        add_set_argument(training, config_name)
        training.add_argument("--quiet", action="store_true")
        add_out_argument(training)
        training.set_defaults(action=action)
    sample = sub.add_parser("sample", help="sample a grid and score it with the shapes reward")
    sample.add_argument("--prompt", action="append", required=True, help="repeatable")
    sample.add_argument("--num-images-per-prompt", type=int, default=8)
    _add_model_arguments(sample)
    sample.set_defaults(action=_sample)
    measures = (
        ("eval", "shapes reward on held-out prompts", _eval),
        ("diagnose", "what the model's VAE, text encoder and denoiser can express", _diagnose),
    )
    for name, text, action in measures:
        measure = sub.add_parser(name, help=text)
        measure.add_argument("--num-prompts", type=int, default=200)
        measure.add_argument("--samples-per-prompt", type=int, default=4)
        measure.add_argument("--split", choices=SPLITS, default="heldout",
                             help="prompt split (default: held-out combinations)")  # fmt: skip
        _add_model_arguments(measure)
        measure.set_defaults(action=action)


def run(args: argparse.Namespace) -> int:
    """Run the chosen world action."""
    return args.action(args)


def _pretrain(args: argparse.Namespace) -> int:
    from diffalign.world.pretrain import WorldPretrainConfig, pretrain_world

    config = WorldPretrainConfig.from_dict({}, args.set)
    _, record = pretrain_world(config, args.out, quiet=args.quiet)
    write_metrics(args.out, "world pretrain", record)
    print(f"saved the pipeline to {args.out}")
    return 0


def _pretrain_clip(args: argparse.Namespace) -> int:
    from diffalign.world.clip import WorldClipConfig, pretrain_clip

    config = WorldClipConfig.from_dict({}, args.set)
    _, record = pretrain_clip(config, args.out, quiet=args.quiet)
    write_metrics(args.out, "world pretrain-clip", record)
    top1 = record["heldout_retrieval_top1_of_16"]
    print(f"saved the tiny CLIP to {args.out}; held-out retrieval top-1 of 16: {top1:.3f}")
    return 0


def _load(args: argparse.Namespace):
    """The model's folder and its plain sampling pipeline; fills in the guidance it records."""
    from diffusers import StableDiffusionPipeline

    from diffalign.models import load_pipeline
    from diffalign.pipelines.rollout import plain_sampling_pipeline
    from diffalign.world import shipped_model_path

    config = model_config_of(args)
    if args.quiet:
        quiet_libraries()
    path = Path(args.model) if args.model else shipped_model_path()
    loaded = load_pipeline(path, pipeline_cls=StableDiffusionPipeline, config=config)
    pipeline = plain_sampling_pipeline(loaded)
    pipeline.set_progress_bar_config(disable=True)
    resolve_guidance(args, config, str(path), default_scale=3.0)
    return path, pipeline


def _sample(args: argparse.Namespace) -> int:
    from diffalign.imaging import make_grid
    from diffalign.world.evaluate import evaluate_prompts, generate

    path, pipeline = _load(args)
    start = time.perf_counter()
    images = generate(pipeline, args.prompt, args.num_images_per_prompt, args.steps,
                      args.guidance_scale, args.seed, quiet=args.quiet,
                      negative_prompt=args.negative_prompt)  # fmt: skip
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns=args.num_images_per_prompt).save(args.out / "grid.png")
    results = evaluate_prompts(images, args.prompt, args.num_images_per_prompt)
    results.update(model=str(path), prompts=args.prompt, **_guidance(args), steps=args.steps,
                   seed=args.seed, seconds=seconds)  # fmt: skip
    write_metrics(args.out, "world sample", results)
    print(f"shapes reward {results['shapes_mean']:.3f} over {len(images)} images -> {args.out}")
    return 0


def _guidance(args: argparse.Namespace) -> dict:
    """The CFG settings a sampled model ran with, for metrics.json."""
    return {"guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt}


def _eval(args: argparse.Namespace) -> int:
    from diffalign.world.evaluate import evaluate_prompts, generate, heldout_prompts

    path, pipeline = _load(args)
    prompts = heldout_prompts(args.num_prompts, seed=args.seed, split=args.split)
    start = time.perf_counter()
    images = generate(pipeline, prompts, args.samples_per_prompt, args.steps,
                      args.guidance_scale, args.seed, quiet=args.quiet,
                      negative_prompt=args.negative_prompt)  # fmt: skip
    seconds = time.perf_counter() - start
    results = evaluate_prompts(images, prompts, args.samples_per_prompt)
    results.update(model=str(path), split=args.split, **_guidance(args), steps=args.steps,
                   seed=args.seed, seconds=seconds)  # fmt: skip
    write_metrics(args.out, "world eval", results)
    single = results["shapes_mean_single_object"]
    single_text = "n/a" if single is None else f"{single:.3f}"
    print(f"shapes_mean {results['shapes_mean']:.3f}, single-object {single_text} "
          f"on {len(prompts)} {args.split} prompts")  # fmt: skip
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from diffalign.world.diagnose import (
        denoiser_sensitivity,
        relation_sensitivity,
        reward_ceiling,
    )
    from diffalign.world.evaluate import heldout_prompts

    path, pipeline = _load(args)
    prompts = heldout_prompts(args.num_prompts, seed=args.seed, split=args.split)
    results = {
        "reward_ceiling": reward_ceiling(pipeline.vae, prompts, args.samples_per_prompt,
                                         args.seed),  # fmt: skip
        "text_encoder": relation_sensitivity(pipeline.tokenizer, pipeline.text_encoder, prompts),
        "denoiser": denoiser_sensitivity(pipeline, prompts, args.samples_per_prompt, args.seed),
        "model": str(path), "split": args.split, "num_prompts": len(prompts),
        "samples_per_prompt": args.samples_per_prompt, "seed": args.seed,
    }  # fmt: skip
    write_metrics(args.out, "world diagnose", results)
    ceiling, text, denoiser = (results[k] for k in ("reward_ceiling", "text_encoder", "denoiser"))
    print(f"perfect renderings through the VAE: {ceiling['through_vae_exact']:.3f} "
          f"({ceiling['through_vae_relations_at_chance']:.3f} with relations at chance); "
          f"text encoding moves {text['relation_flip_change']:.3f} when the relation flips, "
          f"{text['colour_change']:.3f} when a colour changes")  # fmt: skip
    print(f"denoising loss {denoiser['loss']:.4f}, "
          f"{denoiser['relation_flip_loss_increase']:+.5f} when the relation flips, "
          f"{denoiser['colour_change_loss_increase']:+.5f} when a colour changes")  # fmt: skip
    return 0
