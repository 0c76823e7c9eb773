"""``diffalign bench``: speed and memory benchmarks, measured side by side in one run."""

from __future__ import annotations

import argparse
import json

from diffalign.commands._common import (
    add_device_arguments,
    add_model_config_argument,
    add_out_argument,
    add_tree_arguments,
    check_compile_argument,
    model_config_of,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    tree_settings_from_arguments,
    write_metrics,
)

NAME = "bench"
HELP = "measure speed side by side (ratios in one run); writes OUT/metrics.json"


def _benchmark_parser(subparsers, name: str, help: str, description: str, run_fn):
    """A benchmark subcommand with ``--out``, ``--device`` and ``--dtype`` already added."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_out_argument(parser)
    add_device_arguments(parser)
    parser.set_defaults(benchmark_fn=run_fn)
    return parser


def _report(args: argparse.Namespace, results: dict, device, text: str) -> int:
    """Print ``text``, write ``OUT/metrics.json`` and say where."""
    print(text)
    path = write_metrics(args.out, f"bench {args.benchmark}", results, device)
    print(f"\nwrote {path}")
    return 0


def _add_attention(subparsers) -> None:
    from diffalign.choices import ATTENTION_BENCH_MODELS as MODELS

    parser = _benchmark_parser(
        subparsers, "attention",
        "classic vs SDPA vs SDPA+fused QKV (vs xformers on CUDA), forward and backward",
        "Time the attention backends on the same weights and inputs, in one run.",
        _run_attention,
    )  # fmt: skip
    parser.add_argument(
        "--models", default="tiny-unet,sd15-down-block",
        help=f"comma-separated, from {', '.join(MODELS)}",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=None, help="SD1.5 batch (auto: 8 GPU, 1 CPU)"
    )
    parser.add_argument("--resolution", type=int, default=512, help="SD1.5 image size in pixels")
    parser.add_argument("--tiny-batch-size", type=int, default=8)
    parser.add_argument("--tiny-resolution", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)


def _run_attention(args: argparse.Namespace) -> int:
    from diffalign.benchmarks.attention import MODELS, run_attention_benchmark

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"error: unknown --models {unknown}; choose from {', '.join(MODELS)}.")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batch = args.batch_size or (8 if device.type == "cuda" else 1)
    results = run_attention_benchmark(
        models, device, dtype, batch, args.resolution, args.tiny_batch_size,
        args.tiny_resolution, args.warmup, args.repeats,
    )  # fmt: skip
    results["settings"] = {
        "dtype": str(dtype).removeprefix("torch."), "batch_size": batch,
        "resolution": args.resolution, "tiny_batch_size": args.tiny_batch_size,
        "tiny_resolution": args.tiny_resolution, "warmup": args.warmup, "repeats": args.repeats,
    }  # fmt: skip
    return _report(args, results, device, results["table"])


def _add_rewards(subparsers) -> None:
    parser = _benchmark_parser(
        subparsers, "rewards", "images/s of every reward at a small and a large image size",
        "Score the same images with every reward and time it, in one run.", _run_rewards,
    )  # fmt: skip
    parser.add_argument("--rewards", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--sizes", default="32,512", help="comma-separated image sizes in pixels")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--random-weights", action="store_true",
        help="time rewards whose weights are missing on their real architecture, random weights",
    )  # fmt: skip


def _run_rewards(args: argparse.Namespace) -> int:
    from diffalign.benchmarks.rewards import run_rewards_benchmark
    from diffalign.rewards import reward_info

    quiet_libraries()
    names = [n.strip() for n in args.rewards.split(",") if n.strip()] if args.rewards else None
    for name in names or []:
        reward_info(name)  # unknown names fail here, before any model loads
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results = run_rewards_benchmark(
        names, sizes, args.num_images, device, dtype, args.random_weights, args.batch_size,
        args.repeats,
    )  # fmt: skip
    results["settings"] = {
        "dtype": str(dtype).removeprefix("torch."), "sizes": sizes,
        "num_images": args.num_images, "batch_size": args.batch_size, "repeats": args.repeats,
        "random_weights": args.random_weights,
    }  # fmt: skip
    return _report(args, results, device, results["table"])


def _add_rollout(subparsers) -> None:
    parser = _benchmark_parser(
        subparsers, "rollout",
        "RolloutPipeline vs diffusers sampling throughput; DDPO/AWM step images/s",
        "Time rollout sampling against StableDiffusionPipeline in one run, then one DDPO and "
        "one AWM optimizer step.",
        _run_rollout,
    )  # fmt: skip
    parser.add_argument(
        "--model", default="diffalign:tiny-shapes",
        help="a pipeline folder (SD, SDXL or SD3), diffalign:tiny-shapes, or sd15-random / "
             "sdxl-random / sd35-random (random weights, GPU)",
    )  # fmt: skip
    add_model_config_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="skip the optimizer steps")
    parser.add_argument("--compile", metavar="BACKEND", default=None,
                        help="also time rollouts whose chain runs torch.compile(denoiser, "
                             "backend=BACKEND), e.g. inductor (as training under accelerate's "
                             "--dynamo_backend)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size in pixels (default: the model's)")  # fmt: skip


def _run_rollout(args: argparse.Namespace) -> int:
    from diffalign.benchmarks.rollout import run_rollout_benchmark

    quiet_libraries()
    check_compile_argument(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    results = run_rollout_benchmark(
        args.model, device, dtype, args.batch_size, args.steps, args.guidance_scale, args.eta,
        args.repeats, not args.no_train, args.out, args.resolution, model_config_of(args),
        args.compile,
    )  # fmt: skip
    results["dtype"] = str(dtype).removeprefix("torch.")
    width = max(map(len, results)) + 1
    lines = [f"{key:{width}s} " + (f"{value:.3f}" if isinstance(value, float) else str(value))
             for key, value in results.items()]  # fmt: skip
    return _report(args, results, device, "\n".join(lines))


def _add_dts(subparsers) -> None:
    parser = _benchmark_parser(
        subparsers, "dts",
        "reward vs NFEs for best-of-N, SMC, DTS and DTS* on world prompts; the NFE ratio",
        "Search held-out prompts with every sampler under one NFE accounting; writes "
        "metrics.json (nfe_ratio_dts_star_vs_best_of_n, curves) and reward_vs_nfe.png.",
        _run_dts,
    )  # fmt: skip
    random_models = " or sd15-random / sdxl-random / sd35-random (with --speed-only)"
    _add_chain_arguments(parser, num_prompts=16, model_help=random_models)
    parser.add_argument("--n", type=int, default=32, help="best-of-N's N (the budget)")
    parser.add_argument("--budgets", default="2,4,8,16,32",
                        help="SMC and DTS budgets in chain-equivalents")  # fmt: skip
    parser.add_argument("--inverse-temperature", type=float, default=10.0, help="lambda")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="chains per UNet batch (best-of-N; the tree too unless "
                             "--tree-batch-size)")  # fmt: skip
    add_tree_arguments(parser, "tree settings (DTS and DTS*; choose them on --split validation, "
                       "report held-out)", "default: --batch-size")  # fmt: skip
    parser.add_argument("--no-curves", action="store_true",
                        help="best-of-N and DTS* only (the ratio), no SMC / DTS curves: about "
                             "a third of the time")  # fmt: skip
    parser.add_argument("--speed-only", action="store_true",
                        help="NFE/s of DTS* vs best-of-N only, unscored")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels, with --speed-only (default: the model's)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3,
                        help="with --speed-only: timed runs of each sampler, alternated (their "
                             "median is reported)")  # fmt: skip


def _add_chain_arguments(parser, num_prompts: int, model_help: str = "") -> None:
    """Model, reward, world prompts and the stochastic DDIM chain (shared by dts and branching)."""
    parser.add_argument("--model", default="diffalign:tiny-shapes",
                        help=f"a pipeline folder, diffalign:tiny-shapes{model_help}")  # fmt: skip
    add_model_config_argument(parser)
    parser.add_argument("--reward", default="shapes", help="a registered reward or a sum")
    parser.add_argument("--num-prompts", type=int, default=num_prompts, help="world prompts used")
    parser.add_argument("--split", default="heldout", choices=("heldout", "validation"),
                        help="world split of the prompts: tune settings on validation, report "
                             "held-out")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=1.0,
                        help="DDIM's eta, > 0 (1: DDPM-like; lower: less noise)")  # fmt: skip
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="default: the one recorded with the model, else 3")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--compile", metavar="BACKEND", default=None,
                        help="run the UNet under torch.compile with this backend (e.g. "
                             "inductor); the first searches pay the compilation")  # fmt: skip


def _add_branching(subparsers) -> None:
    parser = _benchmark_parser(
        subparsers, "branching",
        "when is the reward decided? variance of continuations branched at each step",
        "Run chains from noise to each branch step, continue each several times, and report "
        "the share of the reward's variance the prefix already fixes (decided_share): near 1 "
        "means tree search has little left to explore after that step.",
        _run_branching,
    )  # fmt: skip
    _add_chain_arguments(parser, num_prompts=8)
    parser.add_argument("--branch-steps", default="0,2,5,10,15",
                        help="chain positions to branch at (0 = the starting noise)")  # fmt: skip
    parser.add_argument("--prefixes", type=int, default=4, help="chains per prompt and step")
    parser.add_argument("--continuations", type=int, default=8, help="branches per prefix")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per UNet batch")


def _run_branching(args: argparse.Namespace) -> int:
    from diffalign.benchmarks.branching import format_branching_table, run_branching_benchmark
    from diffalign.benchmarks.rollout import RANDOM_ARCHITECTURES
    from diffalign.rewards import load_reward

    quiet_libraries()
    if args.model in RANDOM_ARCHITECTURES:
        raise SystemExit(f"error: {args.model} has random weights: its rewards mean nothing.")
    try:
        branch_steps = [int(b) for b in args.branch_steps.split(",") if b.strip()]
    except ValueError:
        raise SystemExit("error: --branch-steps takes integers, e.g. 0,2,5,10.") from None
    device, dtype, pipeline, guidance, prompts = _chain_setup(args)
    reward = load_reward(args.reward).to(device)
    try:
        results = run_branching_benchmark(
            pipeline, reward, prompts, branch_steps, args.steps, guidance, args.prefixes,
            args.continuations, args.batch_size, args.seed, not args.quiet, args.eta,
        )  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    results["settings"] = {"model": args.model, "reward": args.reward, "split": args.split,
                           "steps": args.steps, "eta": args.eta, "guidance_scale": guidance,
                           "seed": args.seed, "prefixes": args.prefixes,
                           "continuations": args.continuations,
                           "dtype": str(dtype).removeprefix("torch."),
                           "compile_backend": args.compile}  # fmt: skip
    results["prompts"] = prompts
    return _report(args, results, device, format_branching_table(results))


def _chain_setup(args: argparse.Namespace, compile_pipeline: bool = True):
    """Device, dtype, the pipeline (its UNet compiled with ``--compile`` unless
    ``compile_pipeline`` is False), the guidance scale and the world prompts of a chain bench."""
    if args.eta <= 0:
        raise SystemExit(f"error: --eta must be > 0 (got {args.eta}): search branches the chain, "
                         "which needs a stochastic sampler; 1 is DDPM-like.")  # fmt: skip
    check_compile_argument(args)
    from diffalign.benchmarks.rollout import load_benchmark_pipeline
    from diffalign.models import compile_denoiser
    from diffalign.pipelines.dts import DTSPipeline
    from diffalign.world import model_guidance_scale

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_config = model_config_of(args)
    pipeline = load_benchmark_pipeline(args.model, device, dtype, DTSPipeline, model_config)
    pipeline.set_progress_bar_config(disable=True)
    if args.compile is not None and compile_pipeline:
        compile_denoiser(pipeline, args.compile)
    guidance = args.guidance_scale or model_guidance_scale(args.model, config=model_config)
    return device, dtype, pipeline, guidance, _world_prompts(args.num_prompts, args.split)


def _run_dts(args: argparse.Namespace) -> int:
    from diffalign.benchmarks import dts
    from diffalign.benchmarks.rollout import RANDOM_ARCHITECTURES

    quiet_libraries()
    budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
    if args.n < 1 or not budgets or min(budgets) < 1 or args.repeats < 1:
        raise SystemExit("error: --n, --repeats and every --budgets entry must be positive "
                         "integers.")  # fmt: skip
    tree = tree_settings_from_arguments(args, default_in_flight=args.batch_size)
    # --speed-only times the compiled UNet against the eager one, so it keeps the pipeline eager
    device, dtype, pipeline, guidance, prompts = _chain_setup(args, not args.speed_only)
    settings = {"model": args.model, "reward": args.reward, "split": args.split,
                "steps": args.steps, "eta": args.eta, "guidance_scale": guidance, "n": args.n,
                "budgets_in_chains": list(budgets),
                "inverse_temperature": args.inverse_temperature, "batch_size": args.batch_size,
                "tree_batch_size": tree.rollouts_per_batch,
                "exploration": args.exploration, "widening_c": args.widening_c,
                "widening_alpha": args.widening_alpha, "expansion": args.expansion,
                "branch_step": args.branch_step,
                "curves": not args.no_curves,
                "dtype": str(dtype).removeprefix("torch."), "seed": args.seed,
                "resolution": args.resolution, "compile_backend": args.compile,
                "repeats": args.repeats}  # fmt: skip
    if args.speed_only:
        results = dts.tree_vs_batched_speed(pipeline, prompts[0], args.steps, guidance, args.n,
                                            args.batch_size, args.resolution, args.repeats,
                                            tree, args.compile)  # fmt: skip
        results["settings"] = settings
        shown = {k: v for k, v in results.items() if k != "settings"}
        return _report(args, results, device, json.dumps(shown, indent=1))
    if args.model in RANDOM_ARCHITECTURES:
        raise SystemExit(f"error: {args.model} has random weights; use it with --speed-only.")
    from diffalign.rewards import load_reward

    reward = load_reward(args.reward).to(device)
    results = dts.run_dts_benchmark(
        pipeline, reward, prompts, args.steps, guidance, args.n, budgets,
        args.inverse_temperature, args.batch_size, args.seed, not args.quiet, tree,
        not args.no_curves, args.eta,
    )  # fmt: skip
    results["settings"] = settings
    results["prompts"] = prompts
    results["plot"] = str(dts.plot_dts_curves(results, args.out / "reward_vs_nfe.png"))
    return _report(args, results, device, dts.format_table(results))


def _world_prompts(count: int, split: str) -> list[str]:
    from diffalign.world.evaluate import heldout_prompts

    if count < 1:
        raise SystemExit("error: --num-prompts must be at least 1.")
    return heldout_prompts(count, split=split)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one subcommand per benchmark."""
    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    _add_attention(subparsers)
    _add_rewards(subparsers)
    _add_rollout(subparsers)
    _add_dts(subparsers)
    _add_branching(subparsers)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return args.benchmark_fn(args)
