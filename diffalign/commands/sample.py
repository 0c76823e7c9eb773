"""``diffalign sample``: generate images with DDIM, or search for reward with a budget.

``--model`` takes a pipeline folder, a hub id (loaded offline first), ``diffalign:tiny-shapes``
(the shipped world model) or ``diffalign:tiny-random`` (random weights: noise images, the full
path). ``--sampler`` is ``ddim`` (plain sampling; ``--reward`` optional, to score the images) or
a search sampler of :mod:`diffalign.pipelines.dts` (``best-of-n``, ``smc``, ``dts``,
``dts-star``), which spends ``--budget-nfe`` UNet rows per prompt to raise ``--reward``.
Writes ``OUT/images/*.png``, ``OUT/grid.png``, ``OUT/samples.json`` (prompt, reward and NFEs of
each image) and ``OUT/metrics.json`` (compute counted, wall time, rewards, search statistics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    check_compile_argument,
    lora_of,
    lora_record,
    model_config_of,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    resolve_guidance,
    tree_settings_from_arguments,
    write_metrics,
)
from diffalign.files import atomic_write_text

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from diffusers import DiffusionPipeline
    from torch import nn

    from diffalign.rewards import Reward

NAME = "sample"
HELP = "generate images (DDIM, best-of-n, smc, dts, dts-star); writes images and samples.json"
TINY_RANDOM = "diffalign:tiny-random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sampling options."""
    from diffalign.choices import SEARCH_SAMPLERS

    parser.add_argument("--model", required=True,
                        help=f"folder, hub id, .safetensors / .ckpt file, diffalign:tiny-shapes "
                             f"or {TINY_RANDOM}")  # fmt: skip
    add_model_config_argument(parser)
    add_lora_argument(parser)
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts", "--prompts-file", dest="prompts_file", type=Path,
                        help="a file with one prompt per line")  # fmt: skip
    parser.add_argument("--num-images-per-prompt", type=int, default=1)
    add_batch_size_argument(parser)
    parser.add_argument("--sampler", default="ddim", choices=("ddim", *SEARCH_SAMPLERS))
    parser.add_argument("--reward", default=None,
                        help="reward name or sum (needed by search samplers)")  # fmt: skip
    parser.add_argument("--budget-nfe", type=int, default=None,
                        help="UNet rows per prompt for search (CFG: 2 per step)")  # fmt: skip
    parser.add_argument("--inverse-temperature", type=float, default=10.0,
                        help="lambda: DTS targets p(x) exp(lambda r(x))")  # fmt: skip
    parser.add_argument("--steps", type=int, default=25,
                        help="denoising steps (DDIM; Euler on a flow-matching model)")  # fmt: skip
    parser.add_argument("--eta", type=float, default=None,
                        help="noise per step: DDIM's eta, or the SDE's noise level on a "
                             "flow-matching model (default: 0 for ddim, 1 for search "
                             "samplers)")  # fmt: skip
    add_guidance_arguments(parser)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    add_speed_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_tree_arguments(parser, "tree settings (--sampler dts and dts-star)", "default: 8")
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


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """Exit with a message when ``--batch-size`` is below 1, ``--compile`` names no backend,
    or a search sampler lacks its reward / budget or gets eta <= 0."""
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, got {args.batch_size}.")
    check_compile_argument(args)
    if args.sampler == "ddim":
        return
    if args.reward is None or args.budget_nfe is None:
        raise SystemExit(f"error: --sampler {args.sampler} needs --reward and --budget-nfe.")
    if args.eta is not None and args.eta <= 0:
        raise SystemExit("error: search samplers branch the chain and need --eta > 0 (1 is DDPM).")
    tree_settings_from_arguments(args, default_in_flight=8)  # exits on invalid tree flags


def load_sampling_pipeline(
    model: str,
    device: torch.device | str,
    dtype: torch.dtype,
    config: str | None = None,
    loras: Sequence[tuple[str, float]] = (),
) -> DiffusionPipeline:
    """A DDIM-scheduled Stable Diffusion (or SDXL) pipeline for ``--model`` (folder, hub id,
    shipped, or a one-file checkpoint with its ``config`` folder), with the LoRA adapters
    ``loras`` (each a folder or file, :func:`diffalign.lora.load_lora`, and the strength it is
    merged in at; several add up, in order); a flow-matching
    model (SD3 too) keeps its scheduler and comes as a rollout pipeline, which steps it (the
    search samplers use the same components either way)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from diffalign.lora import load_lora
    from diffalign.models import as_ddim_scheduler, build_tiny_pipeline, load_pipeline
    from diffalign.pipelines.rollout import plain_sampling_pipeline

    if model == TINY_RANDOM:
        pipeline = build_tiny_pipeline(seed=0).to(device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
    else:
        from diffalign.world import resolve_shipped

        pipeline = load_pipeline(resolve_shipped(model), StableDiffusionPipeline,
                                 torch_dtype=dtype, device=device, config=config)  # fmt: skip
    for lora, scale in loras:  # merged: sampling then costs what the plain model costs
        load_lora(pipeline, lora).fuse_lora(lora_scale=scale)  # every component it adapts
        pipeline.unload_lora_weights()  # the next one loads onto the merged weights
    pipeline.scheduler = as_ddim_scheduler(pipeline.scheduler)
    return plain_sampling_pipeline(pipeline)


def count_calls(module: nn.Module) -> list[int]:
    """Count forward calls of ``module`` (one per UNet or transformer batch evaluation) and the
    rows they evaluated (NFEs): returns ``[calls, rows]``, updated as the module runs."""
    counter = [0, 0]

    def hook(_module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter[0] += 1
        counter[1] += sample.shape[0]

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


@dataclasses.dataclass
class SampledBatch:
    """One batch of :func:`sample_batches`: images in [0, 1] (on the CPU), their rewards (NaN
    without a reward), the prompt of each and, for search samplers, one stats dict per prompt."""

    images: torch.Tensor
    rewards: torch.Tensor
    prompts: list[str]
    search_stats: list[dict]


def sample_batches(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    args: argparse.Namespace,
    size: int,
    reward: Reward | None,
) -> Iterator[SampledBatch]:
    """Images of ``prompts`` by ``args.sampler`` (``ddim`` or a search sampler), so that a
    caller can save or score each batch and let it go: ``--batch-size`` images a batch for
    ``ddim``, whole prompts' searches for the others (at least one prompt's). The images do not
    depend on the batch size (for ``ddim``: beyond float rounding)."""
    batches = _ddim_batches if args.sampler == "ddim" else _search_batches
    yield from batches(pipeline, list(prompts), args, size, reward)


def _ddim_batches(pipeline, prompts, args, size, reward) -> Iterator[SampledBatch]:
    """Plain DDIM batches: one seeded generator runs through the pipeline calls."""
    import torch

    from diffalign.world.evaluate import generate_batches

    for images, repeated in generate_batches(
        pipeline, prompts, args.num_images_per_prompt, args.batch_size, args.seed, quiet=True,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, eta=args.eta or 0.0, height=size, width=size,
    ):  # fmt: skip
        rewards = torch.full((len(images),), float("nan"))
        if reward is not None:
            rewards = reward(images, repeated).float().cpu()
        yield SampledBatch(images, rewards, repeated, [])


def _search_batches(pipeline, prompts, args, size, reward) -> Iterator[SampledBatch]:
    """Search batches: each prompt's search is seeded by its place in ``prompts``, so the
    images are the ones a single call over every prompt gives."""
    from diffalign.pipelines.dts import search_pipeline

    tree = tree_settings_from_arguments(args, default_in_flight=8)
    searcher = search_pipeline(pipeline)
    searcher.set_progress_bar_config(disable=args.quiet)
    per_call = max(1, args.batch_size // args.num_images_per_prompt)  # whole prompts
    for start in range(0, len(prompts), per_call):
        output = searcher(
            prompts[start : start + per_call], reward, budget_nfe=args.budget_nfe,
            sampler=args.sampler, num_images_per_prompt=args.num_images_per_prompt,
            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            eta=1.0 if args.eta is None else args.eta,
            inverse_temperature=args.inverse_temperature, height=size, width=size,
            seed=args.seed + start, output_type="pt", tree_settings=tree,
            negative_prompt=args.negative_prompt,
        )  # fmt: skip
        yield SampledBatch(output.images.float(), output.rewards.float().cpu(), output.prompts,
                           output.stats)  # fmt: skip


def search_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The tree settings a ``dts`` / ``dts-star`` search ran with (mode and lambda set), for
    metrics.json; empty for other samplers."""
    from diffalign.pipelines.dts import SearchOptions

    if args.sampler not in ("dts", "dts-star"):
        return {}
    tree = tree_settings_from_arguments(args, default_in_flight=8)
    options = SearchOptions(args.sampler, args.budget_nfe, args.inverse_temperature, tree)
    return {"tree_settings": dataclasses.asdict(options.tree_settings())}


@dataclasses.dataclass
class _SavedSamples:
    """What ``sample`` keeps of its images once they are written: names, prompts, rewards."""

    files: list[str] = dataclasses.field(default_factory=list)
    prompts: list[str] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    search_stats: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # sampling only, not the writing

    @property
    def count(self) -> int:
        return len(self.files)


def _sample_and_save(pipeline, prompts, args, size, reward) -> _SavedSamples:
    """Sample batch by batch, writing each batch's PNGs as it comes (a 10,000-image run never
    holds 10,000 images), and the grid of the first prompts' images."""
    from tqdm.auto import tqdm

    from diffalign.imaging import GridCollector, make_grid, numbered_names, save_images

    saved, grid = _SavedSamples(), GridCollector(args.num_images_per_prompt)
    total = len(prompts) * args.num_images_per_prompt
    bar = tqdm(total=total, desc="images", unit="image", disable=args.quiet)
    start = time.perf_counter()
    for batch in sample_batches(pipeline, prompts, args, size, reward):
        saved.seconds += time.perf_counter() - start
        bar.update(len(batch.images))
        names = numbered_names(saved.count, len(batch.images), total)
        save_images(batch.images, args.out / "images", names)
        grid.add(batch.images)
        saved.files += names
        saved.prompts += batch.prompts
        saved.rewards += batch.rewards.tolist()
        saved.search_stats += batch.search_stats
        start = time.perf_counter()
    bar.close()
    columns = args.num_images_per_prompt if len(prompts) > 1 else None
    make_grid(grid.images(), columns=columns).save(args.out / "grid.png")
    return saved


def _nfe_of_each_image(saved: _SavedSamples, args: argparse.Namespace,
                       per_image: float) -> list[float]:  # fmt: skip
    """The NFEs each image cost: its prompt's search's spend shared by the images the search
    gave (searches stop short of the budget by different amounts), or for DDIM, where every
    image costs the same, ``per_image``."""
    if not saved.search_stats:
        return [per_image] * saved.count
    share = [stats["nfe"] / args.num_images_per_prompt for stats in saved.search_stats]
    return [nfe for nfe in share for _ in range(args.num_images_per_prompt)]


def _sample_records(saved: _SavedSamples, nfe: list[float]) -> list[dict]:
    """``samples.json``: one record per image, in the order of its file names."""
    return [
        {
            "file": file,
            "prompt": prompt,
            "reward": None if math.isnan(reward) else reward,
            "nfe": cost,
        }  # fmt: skip
        for file, prompt, reward, cost in zip(
            saved.files, saved.prompts, saved.rewards, nfe, strict=True
        )  # fmt: skip
    ]


def run(args: argparse.Namespace) -> int:
    """Sample (or search), save the images, the grid, samples.json and metrics.json."""
    import torch

    from diffalign.models import denoiser_of

    prompts = _prompts(args)
    check_sampling_arguments(args)
    model_config = model_config_of(args)
    resolve_guidance(args, model_config)
    if args.quiet:
        quiet_libraries()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loras = lora_of(args)
    pipeline = load_sampling_pipeline(args.model, device, dtype, model_config, loras)
    pipeline.set_progress_bar_config(disable=True)  # a bar over the images, not one per call
    speed = apply_speed_arguments(pipeline, args)
    reward = load_optional_reward(args.reward, device)
    nfe = count_calls(denoiser_of(pipeline))
    size = args.resolution or denoiser_of(pipeline).config.sample_size * pipeline.vae_scale_factor
    saved = _sample_and_save(pipeline, prompts, args, size, reward)
    per_image = nfe[1] / saved.count
    records = _sample_records(saved, _nfe_of_each_image(saved, args, per_image))
    atomic_write_text(args.out / "samples.json", json.dumps(records, indent=2))
    mean_reward = torch.tensor(saved.rewards).nanmean().item() if reward is not None else None
    results = {
        "model": args.model, **lora_record(loras),
        "sampler": args.sampler, "prompts": prompts,
        "num_images": saved.count, "resolution": size, "steps": args.steps, "eta": args.eta,
        "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt,
        "seed": args.seed, "reward": args.reward,
        "reward_mean": mean_reward,
        "budget_nfe_per_prompt": args.budget_nfe, "nfe": nfe[1], "unet_evaluations": nfe[0],
        "nfe_per_image": per_image, "seconds": saved.seconds,
        "images_per_second": saved.count / saved.seconds,
        **speed,
        **({"search": saved.search_stats} if args.sampler != "ddim" else {}),
        **search_settings(args),
    }  # fmt: skip
    path = write_metrics(args.out, "sample", results, device)
    mean = f", mean {args.reward} {results['reward_mean']:.3f}" if reward is not None else ""
    count = f"{saved.count} image" + ("s" if saved.count != 1 else "")
    print(f"{count} in {saved.seconds:.1f} s ({nfe[1]} NFEs{mean}) -> {args.out}")
    print(f"wrote {path}")
    return 0


def load_optional_reward(name: str | None, device: torch.device | str) -> Reward | None:
    """The reward called ``name`` on ``device``, or None."""
    if name is None:
        return None
    from diffalign.rewards import load_reward

    return load_reward(name).to(device)
