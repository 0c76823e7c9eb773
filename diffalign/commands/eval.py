"""``diffalign eval``: sample a model (and a baseline) and measure FID, PickScore, rewards.

Both models are sampled with the same prompts, seeds and sampler, so win-rates compare each image
with its pair. ``--prompts`` takes a file (one prompt per line) or ``world:SPLIT`` (the shapes
world's ``heldout`` / ``validation`` / ``train`` captions, ``--num-prompts`` of them).
``--metrics`` lists metric names (see ``diffalign.metrics``): ``fid`` (standard Inception; offline
it needs ``--fid-weights``), ``fid:tiny-clip`` (FID on another feature network), ``kid``, and any
reward (``pickscore``, ``clip_score``, ``tiny_clip``, ``shapes``, ...). FID needs ``--reference``:
a folder of real images, a statistics file that an earlier run wrote
(``OUT/reference_NET.safetensors``, reusable), or ``world`` (fresh renderings of the prompts).

``--images DIR`` (and ``--baseline-images``) measures a folder of images made elsewhere instead
of sampling a model (:mod:`diffalign.commands._image_folders`).

Writes ``OUT/metrics.json`` (each metric, ``<metric>_ci`` 95% bootstrap interval, ``n``, and the
baseline's under ``baseline``), ``OUT/report.md`` + ``report.html`` (model vs baseline table),
``OUT/grid.png`` (model and baseline side by side) and the reference statistics.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from diffalign.commands._common import (
    add_batch_size_argument,
    add_device_arguments,
    add_guidance_arguments,
    add_lora_argument,
    add_model_config_argument,
    add_out_argument,
    add_speed_arguments,
    add_tree_arguments,
    apply_speed_arguments,
    lora_of,
    lora_record,
    model_config_of,
    model_label,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    resolve_guidance,
    write_metrics,
)

if TYPE_CHECKING:
    import torch

    from diffalign.metrics import ImageScores, MetricRequest, MetricScorer

logger = logging.getLogger(__name__)

SAMPLING_ONLY = (
    "model", "baseline", "model_config", "baseline_config", "lora", "lora_scale", "baseline_lora",
    "baseline_lora_scale", "num_images", "reward", "budget_nfe", "eta", "guidance_scale",
    "negative_prompt", "resolution", "save_images", "compile",
)  # fmt: skip
"""The options that set how a model is sampled, which ``--images`` refuses (unset: None/False)."""

NAME = "eval"
HELP = "evaluate a model (vs a baseline): FID, PickScore, CLIP score, rewards, win-rates"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the evaluation options (sampling options as in ``diffalign sample``)."""
    from diffalign.choices import SEARCH_SAMPLERS

    parser.add_argument("--model", default=None,
                        help="folder, hub id, one-file model or diffalign:tiny-shapes")  # fmt: skip
    parser.add_argument("--images", default=None, type=Path,
                        help="instead of --model: a folder of images to measure")  # fmt: skip
    parser.add_argument("--baseline-images", default=None, type=Path,
                        help="with --images: the baseline's folder, for win-rates")  # fmt: skip
    add_model_config_argument(parser)
    add_lora_argument(parser)
    parser.add_argument("--baseline", default=None, help="a second model to compare against")
    add_model_config_argument(parser, "--baseline")
    add_lora_argument(parser, "--baseline")
    parser.add_argument("--prompts", default=None,
                        help="a prompt file or world:SPLIT (--images: one per image)")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=64, help="for --prompts world:SPLIT")
    parser.add_argument(
        "--metrics", required=True, help="comma-separated: fid,pickscore or fid:tiny-clip,shapes"
    )
    parser.add_argument("--num-images", type=int, default=None,
                        help="images per model (default: one per prompt)")  # fmt: skip
    add_batch_size_argument(parser)
    parser.add_argument(
        "--reference", default=None, help="FID's real images: a folder, a statistics file, world"
    )
    parser.add_argument(
        "--fid-weights", default=None, help="Inception weights file (or DIFFALIGN_INCEPTION_PATH)"
    )
    parser.add_argument("--save-images", action="store_true",
                        help="also write every image to OUT/images/{model,baseline}/")  # fmt: skip
    parser.add_argument("--sampler", default="ddim", choices=("ddim", *SEARCH_SAMPLERS))
    parser.add_argument("--reward", default=None, help="the search samplers' reward")
    parser.add_argument("--budget-nfe", type=int, default=None, help="search budget per prompt")
    parser.add_argument("--inverse-temperature", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--eta", type=float, default=None)
    add_guidance_arguments(parser)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_speed_arguments(parser)
    add_tree_arguments(parser, "tree settings (--sampler dts and dts-star)", "default: 8")
    add_device_arguments(parser)
    add_out_argument(parser)


def read_prompts(spec: str, count: int) -> list[str]:
    """Prompts from a file (one per line) or ``world:SPLIT`` (``count`` captions of the split)."""
    if spec.startswith("world:"):
        from diffalign.world.evaluate import heldout_prompts

        split = spec.removeprefix("world:")
        if split not in ("heldout", "validation", "train"):
            raise SystemExit(f"error: unknown world split {split!r}; use heldout, validation "
                             "or train.")  # fmt: skip
        return heldout_prompts(count, split=split)
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"error: --prompts {spec} is neither a file nor world:SPLIT.")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: --prompts {spec} holds no prompts (one per line).")
    return prompts


def _reference(args: argparse.Namespace, prompts: list[str]):
    if args.reference is None:
        return None
    if args.reference == "world":
        from diffalign.world.evaluate import render_prompts

        return render_prompts(prompts, seed=args.seed + 1)
    path = Path(args.reference)
    if path.is_dir():
        from diffalign.fid import ImageFolder

        return ImageFolder(path)  # read a batch at a time, any sizes
    if path.is_file():
        return path
    raise SystemExit(f"error: --reference {path} is not a folder, a file or 'world'.")


def _sample_and_score(model: str, config: str | None, loras: list[tuple[str, float]],
                      prompts: list[str], args: argparse.Namespace, device, dtype,
                      scorer: MetricScorer, folder: Path | None = None,
                      ) -> tuple[ImageScores, torch.Tensor]:  # fmt: skip
    """The scores of one model's images (``config``: a one-file model's configs; ``loras``:
    adapters merged into it, with their scales) for ``args.num_images`` images of the prompts
    (same seeds and CFG for every model), scored a batch at a time as they are sampled (and
    written to ``folder`` if given), and the images of the grid (the first prompts')."""
    from tqdm.auto import tqdm

    from diffalign.commands.sample import (
        load_optional_reward,
        load_sampling_pipeline,
        sample_batches,
    )
    from diffalign.imaging import GridCollector, numbered_names, save_images
    from diffalign.metrics import ImageScores
    from diffalign.models import denoiser_of

    pipeline = load_sampling_pipeline(model, device, dtype, config, loras)
    pipeline.set_progress_bar_config(disable=True)  # one bar below, not one per call
    apply_speed_arguments(pipeline, args)
    size = args.resolution or denoiser_of(pipeline).config.sample_size * pipeline.vae_scale_factor
    reward = load_optional_reward(args.reward, device)
    grid, parts, count = GridCollector(args.num_images_per_prompt), [], 0
    with tqdm(total=args.num_images, desc=f"images of {model}", unit="image",
              disable=args.quiet) as bar:  # fmt: skip
        for batch in sample_batches(pipeline, prompts, args, size, reward):
            images = batch.images[: args.num_images - count].float()
            parts.append(scorer.score(images, batch.prompts[: len(images)]))
            grid.add(images)
            if folder is not None:
                save_images(images, folder, numbered_names(count, len(images), args.num_images))
            count += len(images)
            bar.update(len(images))
            if count == args.num_images:
                break
    return ImageScores.concatenate(parts), grid.images()


def run(args: argparse.Namespace) -> int:
    """Sample, measure, and write metrics.json, the report and the grids."""
    from diffalign.commands.sample import check_sampling_arguments
    from diffalign.metrics import MetricScorer, parse_metrics

    try:
        requests = parse_metrics(args.metrics)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.images is not None:
        return _run_on_folders(args, requests)
    if args.model is None or args.prompts is None:
        raise SystemExit("error: give --model and --prompts (to sample a model), or --images DIR "
                         "(to measure a folder of images).")  # fmt: skip
    check_sampling_arguments(args)
    configs = {flag: model_config_of(args, flag) for flag in ("--model", "--baseline")}
    loras = {flag: lora_of(args, flag) for flag in ("--model", "--baseline")}
    resolve_guidance(args, configs["--model"])  # one for both models: --model's recorded one
    if args.quiet:
        quiet_libraries()
    prompts = read_prompts(args.prompts, args.num_prompts)
    args.num_images = args.num_images or len(prompts)
    if args.num_images < 2:
        raise SystemExit("error: --num-images must be at least 2 (intervals need two images).")
    args.num_images_per_prompt = math.ceil(args.num_images / len(prompts))
    repeated = [p for p in prompts for _ in range(args.num_images_per_prompt)][: args.num_images]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.out.mkdir(parents=True, exist_ok=True)
    scorer = MetricScorer(args.metrics, _reference(args, repeated), args.fid_weights, device,
                          args.quiet)  # fmt: skip
    for name, stat in scorer.references.items():
        stat.save(args.out / f"reference_{name}.safetensors")
    scores, grids = {}, {}
    for flag in ("--model", "--baseline") if args.baseline else ("--model",):
        name = flag.removeprefix("--")
        folder = args.out / "images" / name if args.save_images else None
        scores[name], grids[name] = _sample_and_score(getattr(args, name), configs[flag],
                                                      loras[flag], prompts, args, device, dtype,
                                                      scorer, folder)  # fmt: skip
    names = {"model": model_label(args.model, loras["--model"])}
    if args.baseline:
        names["baseline"] = model_label(args.baseline, loras["--baseline"])
    negative = args.negative_prompt
    negative = "" if negative is None else f" (negative prompt {negative!r})"
    shown = len(grids["model"])
    shown = "" if shown == args.num_images else f" (the grid shows the first {shown})"
    text = (f"{args.num_images} images per model{shown}, sampler {args.sampler}, "
            f"{args.steps} steps, CFG {args.guidance_scale}{negative}, "
            f"seed {args.seed}")  # fmt: skip
    keys = ("negative_prompt", "prompts", "sampler", "steps", "seed", "attention")
    settings = {key: getattr(args, key) for key in keys}
    record = {"model": args.model, "baseline_model": args.baseline,
              **lora_record(loras["--model"]), **lora_record(loras["--baseline"], "baseline_"),
              "guidance_scale": args.guidance_scale, **settings,
              "compile_backend": args.compile}  # fmt: skip
    _write_outputs(args, scorer, scores, grids, names, text, record, device)
    return 0


def _run_on_folders(args: argparse.Namespace, requests: list[MetricRequest]) -> int:
    """Measure ``--images`` (and ``--baseline-images``) as they are; write what a model's
    evaluation writes."""
    from diffalign.commands._image_folders import folder_prompts, open_folder, score_folder
    from diffalign.metrics import MetricScorer

    _refuse_sampling_options(args)
    if args.quiet:
        quiet_libraries()
    folders = {"model": open_folder(args.images, "--images")}
    if args.baseline_images is not None:
        folders["baseline"] = open_folder(args.baseline_images, "--baseline-images")
    prompts = {name: folder_prompts(folder, args.prompts) for name, folder in folders.items()}
    scorer_needs_prompts = args.reference == "world" or any(
        request.kind == "reward" for request in requests
    )
    if scorer_needs_prompts and prompts["model"] is None:
        raise SystemExit(f"error: rewards and --reference world need each image's prompt: pass "
                         f"--prompts FILE (one per image of {args.images}, in name order), or "
                         "keep sample's samples.json beside the images.")  # fmt: skip
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    scorer = MetricScorer(args.metrics, _reference(args, prompts["model"]), args.fid_weights,
                          device, args.quiet)  # fmt: skip
    for name, stat in scorer.references.items():
        stat.save(args.out / f"reference_{name}.safetensors")
    scores, grids = {}, {}
    for name, folder in folders.items():
        scores[name], grids[name] = score_folder(folder, prompts[name], scorer, args)
    names = {name: str(folder.folder) for name, folder in folders.items()}
    text = f"{len(folders['model'])} images in {names['model']}, read as they are"
    record = {"images": names["model"], "baseline_images": names.get("baseline")}
    _write_outputs(args, scorer, scores, grids, names, text, record, device)
    return 0


def _refuse_sampling_options(args: argparse.Namespace) -> None:
    """Exit naming the sampling options given with ``--images``, which would do nothing."""
    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_ONLY
             if getattr(args, name) not in (None, False)]  # fmt: skip
    given += ["--sampler"] if args.sampler != "ddim" else []
    if given:
        raise SystemExit(
            f"error: --images measures a folder and samples no model: drop "
            f"{', '.join(given)} (a baseline's images: --baseline-images)."
        )


def _write_outputs(args, scorer, scores, grids, names, text, record, device) -> None:
    """The model's (and baseline's) metric values, their warnings once, the grid, the report
    and metrics.json (the values, ``baseline``'s under that key, and ``record``)."""
    from diffalign.imaging import side_by_side
    from diffalign.report import Report, Section, markdown_table, metric_rows

    columns = {"model": scorer.summarize(scores["model"], scores.get("baseline"), args.seed)}
    if "baseline" in scores:
        columns["baseline"] = scorer.summarize(scores["baseline"], None, args.seed)
    warnings = list(dict.fromkeys(w for c in columns.values() for w in c["warnings"]))
    for warning in warnings:
        logger.warning(warning)  # once, though both columns carry it
    per_row = getattr(args, "num_images_per_prompt", None)
    side_by_side(list(grids.items()), columns=per_row).save(args.out / "grid.png")
    rows = metric_rows(columns)
    described = "; ".join(f"{name}: {label}" for name, label in names.items())
    text += f"; {described}. Values with their 95% bootstrap intervals."
    sections = [Section("Metrics", text, rows), Section("Samples", figures=[
        (" | ".join(f"{name} ({names[name]})" for name in grids), "grid.png")])]  # fmt: skip
    if warnings:
        sections.append(Section("Warnings", " ".join(warnings)))
    Report("diffalign eval", sections).write(args.out)
    results = {**columns["model"], "baseline": columns.get("baseline"), **record}
    path = write_metrics(args.out, "eval", results, device)
    print(markdown_table(rows))
    print(f"\nwrote {path} and {args.out / 'report.md'}")
