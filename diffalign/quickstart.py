"""The whole user story on the embedded shapes world: fine-tune, search, evaluate, report.

``run_quickstart(out)`` takes the shipped tiny model (``diffalign:tiny-shapes``) through

1. an evaluation of the base model on held-out prompts (combinations never trained on);
2. AWM fine-tuning on the ``shapes`` reward (``diffalign train awm --recipe tiny-shapes``, short);
3. the same evaluation of the aligned model, paired with the base (same prompts and seeds);
4. DTS* and best-of-N on the aligned model at one NFE budget per prompt;
5. ``metrics.json`` (``base``, ``aligned``, ``aligned_best_of_n``, ``aligned_dts_star``: metric
   name to value, intervals as ``NAME_ci``), ``report.md`` / ``report.html`` with the table, the
   reward-vs-round curve, reward-vs-NFE curves and before/after grids.

Metrics: the ``shapes`` reward, the tiny-clip score (the PickScore formula on the world's tiny
CLIP; a check that the reward is not hacked) and FID on tiny-clip features against renderings of
the same prompts (the world's real images), with win-rates against the base.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METRICS = ("shapes", "tiny_clip", "fid:tiny-clip")
SEARCH_SAMPLERS = ("best-of-n", "dts-star")
COLUMNS = ("base", "aligned", "aligned_best_of_n", "aligned_dts_star")
CAPTIONS = {"base": "base", "aligned": "aligned (AWM)", "aligned_best_of_n": "+ best-of-N",
            "aligned_dts_star": "+ DTS*"}  # fmt: skip


@dataclass
class QuickstartSettings:
    """What the quickstart runs; the defaults take about 6 minutes on 2 CPU cores.

    Args:
        num_prompts: held-out prompts evaluated (each ``samples_per_prompt`` times).
        awm_rounds: AWM rounds (each samples 32 training images).
        awm_overrides: ``key=value`` settings on top of the ``tiny-shapes`` AWM recipe.
        search_chains: the search budget per prompt, in full denoising chains (best-of-N's N).
        search_batch_size: chains (rollouts) advanced together. DTS*'s first batch expands the
            root, so it equals best-of-N's first chains; it searches only beyond that batch.
        guidance_scale: the CFG scale of training, evaluation and search alike; None takes the
            one recorded with the model. The default, 1 (no guidance), is where AWM's held-out
            gain was steadiest in our runs (README Results).
    """

    num_prompts: int = 32
    samples_per_prompt: int = 2
    steps: int = 20
    seed: int = 0
    awm_rounds: int = 60
    awm_overrides: list[str] = field(
        default_factory=lambda: [
            "learning_rate=1e-3",
            "train_batch_size=16",
            "weighting=ghuber",
            "beta_kl=0.01",
            "global_std=false",
            "eval_every=10",
            "num_heldout_prompts=32",
        ]  # fmt: skip
    )
    search_chains: int = 8
    search_batch_size: int = 4
    model: str = "diffalign:tiny-shapes"
    guidance_scale: float | None = 1.0

    def resolved_guidance_scale(self) -> float:
        """``guidance_scale``, else the CFG scale recorded with ``model``."""
        from diffalign.world import model_guidance_scale

        if self.guidance_scale is None:
            return model_guidance_scale(self.model)
        return self.guidance_scale


def run_quickstart(out: str | Path, settings: QuickstartSettings | None = None,
                   progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the five stages into ``out``; returns the metrics written to ``out/metrics.json``."""
    from diffalign.metrics import reference_statistics
    from diffalign.world.evaluate import heldout_prompts, render_prompts

    settings = settings or QuickstartSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock(progress)
    prompts = heldout_prompts(settings.num_prompts, seed=settings.seed)
    repeated = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    reference = reference_statistics(render_prompts(repeated, seed=settings.seed + 1), "tiny_clip")
    state = _Stage(settings, prompts, repeated, {"tiny_clip": reference}, progress)
    images = {"base": state.sample(_load(settings.model))}
    columns = {"base": state.evaluate(images["base"])}
    clock.done("base model evaluated")
    run_folder = train_awm(settings, out / "awm", progress)
    clock.done(f"AWM: {settings.awm_rounds} rounds")
    aligned = _load(str(run_folder / "final"))
    images["aligned"] = state.sample(aligned)
    columns["aligned"] = state.evaluate(images["aligned"], images["base"])
    clock.done("aligned model evaluated")
    curves = {}
    for sampler in SEARCH_SAMPLERS:
        key = f"aligned_{sampler.replace('-', '_')}"
        images[key], curves[sampler] = state.search(aligned, sampler)
        columns[key] = state.evaluate(images[key], images["base"])
        clock.done(f"{sampler} at {state.budget()} NFEs per prompt")
    metrics = {name: columns[name] for name in COLUMNS}
    write_quickstart_outputs(out, metrics, images, curves, run_folder, settings, clock.total(),
                             prompts[:8])  # fmt: skip
    return metrics


class _Clock:
    """Prints each stage's end and the time since the start."""

    def __init__(self, verbose: bool) -> None:
        self.start, self.verbose = time.perf_counter(), verbose

    def total(self) -> float:
        return time.perf_counter() - self.start

    def done(self, what: str) -> None:
        if self.verbose:
            print(f"[{self.total():6.1f} s] {what}", flush=True)


def _load(model: str):
    """The model as a DDIM pipeline on the CPU."""
    import torch

    from diffalign.commands.sample import load_sampling_pipeline

    pipeline = load_sampling_pipeline(model, torch.device("cpu"), torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class _Stage:
    """The shared evaluation set-up: prompts, seeds, reference and sampling settings."""

    settings: QuickstartSettings
    prompts: list[str]
    repeated: list[str]
    reference: dict[str, Any]  # feature network -> FeatureStats, computed once
    progress: bool

    @property
    def guidance(self) -> float:
        return self.settings.resolved_guidance_scale()

    def sample(self, pipeline) -> torch.Tensor:
        """Deterministic DDIM images of every prompt, the same seeds for every model."""
        from diffalign.metrics import sample_model

        images, _ = sample_model(pipeline, self.prompts, self.settings.samples_per_prompt,
                                 self.settings.steps, self.guidance, self.settings.seed,
                                 quiet=not self.progress)  # fmt: skip
        return images

    def budget(self) -> int:
        """NFEs per prompt: ``search_chains`` full chains (CFG counts two rows a step)."""
        rows = 2 if self.guidance > 1 else 1
        return self.settings.search_chains * self.settings.steps * rows

    def search(self, pipeline, sampler: str) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Images of a search sampler and its mean best reward against NFEs."""
        from diffalign.pipelines.dts import search_pipeline

        searcher = search_pipeline(pipeline)
        searcher.set_progress_bar_config(disable=True)  # one bar per prompt is too many
        output = searcher(
            self.prompts, "shapes", budget_nfe=self.budget(), sampler=sampler,
            num_images_per_prompt=self.settings.samples_per_prompt,
            num_inference_steps=self.settings.steps, guidance_scale=self.guidance,
            seed=self.settings.seed, output_type="pt", batch_size=self.settings.search_batch_size,
        )  # fmt: skip
        return output.images.float(), anytime_curve(output.stats, self.budget(),
                                                     self.settings.search_chains)  # fmt: skip

    def evaluate(self, images: torch.Tensor, baseline: torch.Tensor | None = None) -> dict:
        from diffalign.metrics import evaluate

        return evaluate(images, self.repeated, METRICS, self.reference, baseline,
                        seed=self.settings.seed)  # fmt: skip


def anytime_curve(stats: list[dict], budget: int, points: int) -> dict[str, list[float]]:
    """Mean over prompts of the best reward found within each of ``points`` equal budget steps."""
    from diffalign.pipelines.tree import SearchStats

    searches = [SearchStats(**s) for s in stats]
    nfe = [budget * (i + 1) // points for i in range(points)]
    means = [sum(s.best_within(n) for s in searches) / len(searches) for n in nfe]
    return {"nfe": nfe, "mean_best_reward": means}


def train_awm(settings: QuickstartSettings, out: Path, progress: bool = True) -> Path:
    """A short AWM run of the ``tiny-shapes`` recipe in ``out``; returns ``out``.

    A run of the same settings already there is continued from its latest checkpoint (an
    interrupted quickstart resumes, a finished one is reused, more rounds extend it); a run of
    other settings, or a longer one, is an error rather than overwritten.
    """
    from diffalign.commands.train import recipe_path
    from diffalign.train.awm import AWMTrainer
    from diffalign.train.config import AWMConfig
    from diffalign.train.run_folder import describe_changes

    overrides = [f"model={settings.model}", f"max_steps={settings.awm_rounds}",
                 f"guidance_scale={settings.resolved_guidance_scale()}",
                 f"seed={settings.seed}", f"progress={str(progress).lower()}",
                 *settings.awm_overrides]  # fmt: skip
    config = AWMConfig.from_yaml(recipe_path("awm", "tiny-shapes"), overrides)
    existing = out / "config.yaml"
    changed = _run_changes(AWMConfig.from_yaml(existing), config) if existing.is_file() else {}
    if changed:
        raise FileExistsError(
            f"{out} holds an AWM run with other settings ({describe_changes(changed)}); pass "
            f"another --out or delete {out}."
        )
    same = existing.is_file()
    if same and _rounds_done(out) > config.max_steps:
        raise FileExistsError(
            f"{out} holds a longer AWM run than --awm-rounds {config.max_steps}; pass another "
            f"--out or delete {out}."
        )
    AWMTrainer(config, out).train(resume=same)
    return out


def _rounds_done(out: Path) -> int:
    """The last round an AWM run folder logged (0 when none)."""
    from diffalign.train.run_folder import METRICS_FILE, read_rows

    return max((row["step"] for row in read_rows(out / METRICS_FILE)), default=0)


def _run_changes(recorded, config) -> dict[str, tuple]:
    """The settings that make two configs different runs, ``{key: (recorded, now)}`` (the
    run's length and display settings aside)."""
    from diffalign.train.run_folder import changed_settings

    changes = changed_settings(recorded.to_dict(), config.with_launch_precision().to_dict())
    return {key: values for key, values in changes.items() if key != "max_steps"}


def write_quickstart_outputs(out: Path, metrics: dict, images: dict, curves: dict,
                             run_folder: Path, settings: QuickstartSettings,
                             seconds: float, shown_prompts: list[str]) -> None:  # fmt: skip
    """metrics.json, the figures and report.md / report.html; prints the table."""
    from diffalign.commands._common import write_metrics
    from diffalign.imaging import side_by_side
    from diffalign.plots import plot_curves, plot_reward_curve
    from diffalign.report import markdown_table, metric_rows
    from diffalign.train.run_folder import METRICS_FILE, read_rows

    rows = read_rows(run_folder / METRICS_FILE)
    plot_reward_curve(rows, out / "reward_curve.png", title="AWM: shapes reward per round")
    plot_curves({name: (c["nfe"], c["mean_best_reward"]) for name, c in curves.items()},
                out / "reward_vs_nfe.png", "NFEs per prompt", "mean best shapes reward",
                "search on the aligned model")  # fmt: skip
    shown = 8 * settings.samples_per_prompt  # the first 8 prompts
    tiles = [(CAPTIONS[name], images[name][:shown]) for name in COLUMNS]
    side_by_side(tiles, columns=settings.samples_per_prompt, scale=2).save(out / "grid.png")
    table = metric_rows(metrics)
    results = {**metrics, "settings": asdict(settings), "seconds": seconds, "curves": curves}
    write_metrics(out, "quickstart", results)
    warnings = sorted({w for column in metrics.values() for w in column.get("warnings", [])})
    warnings += _guard_warning(run_folder)
    _report(table, settings, seconds, shown_prompts, warnings).write(out)
    print(markdown_table(table))
    print(f"\nreport: {out / 'report.md'} (and report.html)")


def _guard_warning(run_folder: Path) -> list[str]:
    """The reward-hacking guard's message when it stopped the AWM run (else nothing)."""
    from diffalign.train.guard import GuardTrip

    record = run_folder / "final" / "training.json"
    trip = json.loads(record.read_text()).get("stopped_by_guard") if record.is_file() else None
    return [f"The AWM run stopped early: {GuardTrip(**trip).message()}."] if trip else []


def _report(table, settings: QuickstartSettings, seconds: float, shown_prompts: list[str],
            warnings: list[str]):  # fmt: skip
    from diffalign.report import Report, Section

    n = settings.num_prompts * settings.samples_per_prompt
    about = (f"{settings.num_prompts} held-out prompts x {settings.samples_per_prompt} images "
             f"({n} per column), {settings.steps} DDIM steps, seed {settings.seed}. Aligned: "
             f"{settings.awm_rounds} AWM rounds on the shapes reward. Search: "
             f"{settings.search_chains} chains' worth of NFEs per prompt. Values with 95% "
             f"bootstrap intervals; win-rates against the base, image by image. "
             f"Total time {seconds / 60:.1f} min.")  # fmt: skip
    report = Report("diffalign quickstart: align, search, evaluate", [
        Section("Results", about, table),
        Section("Samples", "The first 8 prompts, one row each (two images per column), top to "
                "bottom: " + "; ".join(shown_prompts) + ".",
                figures=[("base | aligned | aligned + best-of-N | aligned + DTS*", "grid.png")]),
        Section("Training", figures=[("shapes reward during AWM", "reward_curve.png")]),
        Section("Search", "The best image per prompt found within each budget (the table's "
                "search columns hold each prompt's two best images).",
                figures=[("mean best reward against NFEs", "reward_vs_nfe.png")]),
    ])  # fmt: skip
    if warnings:
        report.sections.insert(1, Section("Warnings", " ".join(warnings)))
    return report
