"""Evaluate generated images: FID / KID, reward means and win-rates, with bootstrap intervals.

``evaluate(images, prompts, metrics=[...], reference=..., baseline=...)`` is the entry point;
:class:`MetricScorer` under it scores batches as they come and keeps per-image scores and
features only (``evaluate`` of a model scores a pipeline call at a time). Metric names
(``parse_metrics``):

- ``fid`` (standard Inception-v3) or ``fid:NET`` for another feature network (``fid:tiny-clip``
  on the shapes world), see :mod:`diffalign.fid`. Needs ``reference``: real images, or a file
  of cached statistics. Below the recommended sample size a warning is recorded and KID on the
  same features is added (``kid_NET``, unbiased at small n). ``kid`` / ``kid:NET`` ask for KID.
- any registered reward (``pickscore``, ``clip_score``, ``tiny_clip``, ``shapes``, ...): the mean
  score (key ``NAME_mean``) and, when a baseline's images are given (same prompts and seeds, same
  order), the win-rate against it (``NAME_win_rate``: ties count half).

Each value comes with ``KEY_ci``, a 95% percentile-bootstrap interval over images (pairs of
images for win-rates; for FID shifted by the bootstrap's bias, for KID mean +- 1.96 standard
deviations over subsets), and the result holds ``n``, the number of images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.fid import FeatureStats, ImageFolder, canonical_feature_name

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
FID_BOOTSTRAP_RESAMPLES = 100  # each resample re-solves a d x d eigenproblem
DISTANCES = ("fid", "kid")


@dataclass(frozen=True)
class MetricRequest:
    """One requested metric: a distance on a feature network, or a reward's scores."""

    kind: str  # "fid", "kid" or "reward"
    name: str  # the feature network, or the reward (a name or a FILE.py:NAME reference)

    @property
    def label(self) -> str:
        """The name results are keyed by: a reward reference's ``NAME``, else ``name``."""
        from diffalign.rewards.function import reward_label

        return reward_label(self.name) if self.kind == "reward" else self.name

    @property
    def key(self) -> str:
        """The result key: ``fid``, ``fid_tiny_clip``, ``kid``, ``shapes_mean``, ..."""
        if self.kind == "reward":
            return f"{self.label}_mean"
        return self.kind if self.name == "inception" else f"{self.kind}_{self.name}"


def parse_metrics(spec: str | Sequence[str]) -> list[MetricRequest]:
    """``"fid:tiny-clip,shapes"`` (or a list of names) as metric requests, in order, no repeats.

    A reward of one's own is named by reference, ``FILE.py:NAME`` or ``package.module:NAME``
    (see :mod:`diffalign.rewards.function`); it is loaded here, so that a wrong one fails before
    any sampling.

    Raises:
        ValueError: no metric, a name that is neither a distance nor a registered reward, or a
            reward reference that does not load.
    """
    from diffalign.rewards import list_rewards
    from diffalign.rewards.function import load_reward_reference

    names = spec.split(",") if isinstance(spec, str) else list(spec)
    requests: list[MetricRequest] = []
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        head, _, feature = raw.partition(":")
        head = canonical_feature_name(head)
        if head in DISTANCES:
            request = MetricRequest(head, canonical_feature_name(feature or "inception"))
        elif head in list_rewards() and not feature:
            request = MetricRequest("reward", head)
        elif _names_a_reference(head, feature):
            load_reward_reference(raw)
            request = MetricRequest("reward", raw)
        else:
            known = ", ".join(["fid", "fid:NET", "kid", "kid:NET", *list_rewards(),
                               "FILE.py:NAME", "package.module:NAME"])  # fmt: skip
            raise ValueError(f"Unknown metric {raw!r}; known metrics: {known}.")
        if request not in requests:
            requests.append(request)
    if not requests:
        raise ValueError("No metric requested; pass e.g. --metrics fid:tiny-clip,shapes.")
    return requests


def _names_a_reference(location: str, name: str) -> bool:
    """Whether ``LOCATION:NAME`` reads as a reward reference (a ``.py`` file or a dotted module,
    and an identifier), not a misspelt ``fid:NET``."""
    return name.isidentifier() and (location.endswith(".py") or "." in location)


def bootstrap_interval(
    values: torch.Tensor,
    statistic: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
    bias_corrected: bool = False,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over the rows of ``values``.

    ``bias_corrected`` shifts the interval by the bootstrap's bias (mean of the resampled
    statistics minus the statistic itself): for statistics such as FID, which a resample with
    repeated rows pushes upwards, the plain percentile interval would miss the estimate.
    """
    if len(values) < 2:
        raise ValueError("A bootstrap interval needs at least 2 values.")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(values), (resamples, len(values)), generator=generator)
    estimates = torch.stack([torch.as_tensor(statistic(values[rows])) for rows in draws]).double()
    tail = (1 - level) / 2
    low, high = torch.quantile(estimates, torch.tensor([tail, 1 - tail], dtype=torch.double))
    shift = float(estimates.mean() - torch.as_tensor(statistic(values))) if bias_corrected else 0.0
    return float(low) - shift, float(high) - shift


def win_outcomes(scores: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    """1 where a score beats its baseline pair, 0.5 on a tie, 0 where it loses."""
    if scores.shape != baseline_scores.shape:
        raise ValueError(
            f"Win-rates compare images pairwise: {len(scores)} scores against "
            f"{len(baseline_scores)} baseline scores; sample both with the same prompts and seeds."
        )
    return (scores > baseline_scores).double() + 0.5 * (scores == baseline_scores).double()


def evaluate(
    model_or_images: Any,
    prompts: Sequence[str],
    metrics: str | Sequence[str] = ("shapes",),
    reference: Any = None,
    baseline: Any = None,
    *,
    samples_per_prompt: int = 1,
    steps: int = 25,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    fid_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quiet: bool = True,
) -> dict[str, Any]:
    """Metrics of a model's images, or of images (N, 3, H, W) in [0, 1] with one prompt each.

    Args:
        model_or_images: images, one per prompt; or a model (a Stable Diffusion pipeline, a
            folder, a hub id or ``diffalign:tiny-shapes``), sampled with deterministic DDIM,
            ``samples_per_prompt`` images per prompt (prompt-major), ``steps`` steps,
            ``guidance_scale`` and ``negative_prompt`` (default: those recorded with a world
            model or a trained run's ``final/``, else 7.5 and none), ``seed``. A model's images
            are scored a batch at a time as they are sampled and not kept.
        metrics: names as in the module docstring.
        reference: for FID / KID: real images (a tensor), a statistics file written by
            :meth:`FeatureStats.save`, a :class:`FeatureStats`, or a mapping from feature-network
            name to any of those.
        baseline: the baseline's images for the same prompts and seeds, or a baseline model
            (sampled as the model is: the same seeds and the model's guidance), for win-rates.
        fid_weights: the Inception weights file (or a CLIP folder for ``fid:NET``).

    Returns:
        ``{KEY: value, KEY_ci: [low, high], ..., "n": N, "fid_resize": ..., "warnings": [...]}``.
    """
    from diffalign.world import model_guidance

    baseline_is_model = baseline is not None and not isinstance(baseline, torch.Tensor)
    if isinstance(model_or_images, torch.Tensor):
        if baseline_is_model:
            raise ValueError(
                "Images are compared with a baseline's images: pass them, not a model."
            )
        _check_inputs(model_or_images, prompts, baseline)  # before any network loads
        scorer = MetricScorer(metrics, reference, fid_weights, device, quiet)
        scores = scorer.score(model_or_images, prompts)
        baseline_scores = None if baseline is None else scorer.score(baseline, prompts)
    else:
        _require_prompts(prompts)
        scorer = MetricScorer(metrics, reference, fid_weights, device, quiet)
        guidance_scale, negative_prompt = model_guidance(  # one for the model and the baseline
            _model_name(model_or_images), guidance_scale, negative_prompt
        )
        sampling = {"samples_per_prompt": samples_per_prompt, "steps": steps,
                    "guidance_scale": guidance_scale, "negative_prompt": negative_prompt,
                    "seed": seed, "device": device, "quiet": quiet}  # fmt: skip
        scores = scorer.score_batches(_sampled_batches(model_or_images, prompts, **sampling))
        baseline_scores = None
        if baseline_is_model:  # at the model's guidance, not one the baseline records
            baseline_scores = scorer.score_batches(_sampled_batches(baseline, prompts, **sampling))
    results = scorer.summarize(scores, baseline_scores, seed)
    for warning in results["warnings"]:
        logger.warning(warning)
    return results


@dataclass
class ImageScores:
    """What the metrics keep of one set of images, in image order: each reward's scores
    (keyed by the reward's name) and each feature network's features; never the images."""

    count: int = 0
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, rows: torch.Tensor) -> ImageScores:
        """The scores of the images at ``rows``, in that order (e.g. back to name order)."""
        return ImageScores(
            len(rows),
            {name: values[rows] for name, values in self.rewards.items()},
            {name: values[rows] for name, values in self.features.items()},
        )

    @classmethod
    def concatenate(cls, parts: Sequence[ImageScores]) -> ImageScores:
        """The scores of consecutive batches as the scores of the whole set."""
        if not parts:
            raise ValueError("No images were scored.")
        return cls(
            sum(part.count for part in parts),
            {name: torch.cat([p.rewards[name] for p in parts]) for name in parts[0].rewards},
            {name: torch.cat([p.features[name] for p in parts]) for name in parts[0].features},
        )


class MetricScorer:
    """The requested metrics' rewards, feature networks and reference statistics, loaded once.

    ``score`` turns a batch of images into :class:`ImageScores` (the images can then be
    dropped: a 10,000-image FID never holds 10,000 images), ``summarize`` turns the scores of a
    whole set (and of a baseline's set, for win-rates) into the metric values. One scorer serves
    a model and its baseline.

    Raises:
        ValueError: as :func:`parse_metrics`, or FID / KID without a ``reference``.
    """

    def __init__(
        self,
        metrics: str | Sequence[str],
        reference: Any = None,
        fid_weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        quiet: bool = True,
    ) -> None:
        from diffalign.fid import load_feature_network
        from diffalign.rewards import load_reward

        self.requests = parse_metrics(metrics)
        names = [r.name for r in self.requests if r.kind != "reward"]
        if names and reference is None:  # fail before loading any network
            reference_statistics(reference, names[0])
        self.rewards = {r.name: load_reward(r.name).to(device)
                        for r in self.requests if r.kind == "reward"}  # fmt: skip
        self.networks = {n: load_feature_network(n, fid_weights, device) for n in names}
        self.references = {
            name: reference_statistics(reference, name, network=network, quiet=quiet)
            for name, network in self.networks.items()
        }

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> ImageScores:
        """The rewards' scores and the networks' features of ``images`` (N, 3, H, W) in
        [0, 1], one prompt each."""
        from diffalign.fid import extract_features

        _check_inputs(images, prompts, None)
        return ImageScores(
            len(images),
            {name: reward(images, list(prompts)).double().cpu()  # it moves a batch at a time
             for name, reward in self.rewards.items()},
            {name: extract_features(network, images)  # a batch: no bar of its own
             for name, network in self.networks.items()},
        )  # fmt: skip

    def score_batches(self, batches: Iterable[tuple[torch.Tensor, Sequence[str]]]) -> ImageScores:
        """The scores of a set given as ``(images, prompts)`` batches, scored as they come."""
        return ImageScores.concatenate([self.score(images, p) for images, p in batches])

    def summarize(
        self, scores: ImageScores, baseline: ImageScores | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """The metric values of a scored set (win-rates against ``baseline``, scored from the
        same prompts and seeds), with their bootstrap intervals; see :func:`evaluate`."""
        if baseline is not None and baseline.count != scores.count:
            raise ValueError(
                f"Win-rates compare images pairwise: {scores.count} images against "
                f"{baseline.count} baseline images; sample both with the same prompts and seeds."
            )
        results: dict[str, Any] = {"n": scores.count, "warnings": []}
        for request in self.requests:
            if request.kind == "reward":
                base = None if baseline is None else baseline.rewards[request.name]
                results.update(_reward_summary(request, scores.rewards[request.name], base, seed))
            else:
                results.update(_distance_metrics(
                    request, self.references[request.name], scores.features[request.name],
                    self.networks[request.name], results, seed,
                ))  # fmt: skip
        return results


def sample_model(
    model: Any,
    prompts: Sequence[str],
    samples_per_prompt: int = 1,
    steps: int = 25,
    guidance_scale: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    quiet: bool = True,
    negative_prompt: str | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Deterministic DDIM images of ``model`` (a pipeline or a model name) for every prompt,
    ``samples_per_prompt`` each, and the prompt of each image (prompt-major); the guidance
    settings left unset are those recorded with a model name
    (:func:`diffalign.world.model_guidance`)."""
    from diffalign.world import model_guidance

    guidance_scale, negative_prompt = model_guidance(_model_name(model), guidance_scale,
                                                     negative_prompt)  # fmt: skip
    _require_prompts(prompts)
    batches = list(_sampled_batches(model, prompts, samples_per_prompt, steps, guidance_scale,
                                    seed, device, quiet, negative_prompt))  # fmt: skip
    return torch.cat([images for images, _ in batches]), [p for _, b in batches for p in b]


def _sampled_batches(
    model: Any,
    prompts: Sequence[str],
    samples_per_prompt: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    device: str | torch.device,
    quiet: bool,
    negative_prompt: str | None,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """:func:`sample_model`'s images and their prompts a pipeline call at a time, at the
    guidance given (looking nothing up)."""
    from diffalign.world.evaluate import generate_batches

    pipeline = model
    if isinstance(model, (str, os.PathLike)):
        from diffalign.commands.sample import load_sampling_pipeline

        pipeline = load_sampling_pipeline(str(model), torch.device(device), torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for images, repeated in generate_batches(
        pipeline, list(prompts), samples_per_prompt, seed=seed, quiet=quiet,
        num_inference_steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
    ):  # fmt: skip
        yield images.float(), repeated


def _require_prompts(prompts: Sequence[str]) -> None:
    if not prompts:
        raise ValueError("Give at least one prompt to sample the model with.")


def _model_name(model: Any) -> str:
    """A model given by name or folder as that name; a pipeline as "" (nothing recorded)."""
    return str(model) if isinstance(model, (str, os.PathLike)) else ""


def _check_inputs(images, prompts, baseline) -> None:
    from diffalign.rewards.base import check_images

    check_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images need {len(images)} prompts, got {len(prompts)}.")
    if baseline is not None:
        check_images(baseline)
        if baseline.shape != images.shape:
            raise ValueError(
                f"The baseline images {tuple(baseline.shape)} do not match the images "
                f"{tuple(images.shape)}; sample both at the same size, prompts and seeds."
            )


def _reward_summary(request, scores, baseline_scores, seed) -> dict[str, Any]:
    out = {request.key: float(scores.mean()),
           f"{request.key}_ci": bootstrap_interval(scores, seed=seed)}  # fmt: skip
    if baseline_scores is not None:
        wins = win_outcomes(scores, baseline_scores)
        out[f"{request.label}_win_rate"] = float(wins.mean())
        out[f"{request.label}_win_rate_ci"] = bootstrap_interval(wins, seed=seed)
    return out


def reference_statistics(
    reference: Any,
    feature: str,
    fid_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    network: nn.Module | None = None,
    quiet: bool = True,
) -> FeatureStats:
    """``reference`` (real images, a statistics file, :class:`FeatureStats`, or a mapping from
    feature-network name to one of those) as the statistics of ``feature``'s network."""
    from diffalign.fid import extract_features, load_feature_network

    name = canonical_feature_name(feature)
    if reference is None:
        raise ValueError(
            f"FID / KID on {name} features need reference images or statistics (--reference)."
        )
    if isinstance(reference, Mapping):
        given = {canonical_feature_name(k): v for k, v in reference.items()}
        if name not in given:
            raise ValueError(f"No reference was given for the {name!r} feature network.")
        reference = given[name]
    if isinstance(reference, (str, os.PathLike)) and Path(reference).is_dir():
        reference = ImageFolder(reference)
    if isinstance(reference, (torch.Tensor, ImageFolder)):
        network = network or load_feature_network(name, fid_weights, device)
        features = extract_features(network, reference, quiet=quiet)
        return FeatureStats.from_features(features, name, network.resize_convention)
    stats = reference if isinstance(reference, FeatureStats) else FeatureStats.load(reference)
    if stats.feature != name:
        raise ValueError(f"The reference holds {stats.feature!r} features, not {name!r}.")
    return stats


def _distance_metrics(request, reference, features, network, results, seed) -> dict[str, Any]:
    from diffalign.fid import frechet_distance, kernel_distance, recommended_sample_size

    generated = FeatureStats.from_features(features, request.name, network.resize_convention)
    out: dict[str, Any] = {f"{request.kind}_resize": network.resize_convention}
    recommended = recommended_sample_size(request.name, network.dim)
    too_few = min(len(features), reference.n) < recommended
    if request.kind == "fid":
        out[request.key] = frechet_distance(reference, generated)
        low, high = bootstrap_interval(
            features, lambda rows: _fid_of(reference, rows, request.name),
            resamples=FID_BOOTSTRAP_RESAMPLES, seed=seed, bias_corrected=True,
        )  # fmt: skip
        out[f"{request.key}_ci"] = (max(low, 0.0), max(high, 0.0))  # FID is never negative
        if too_few:
            results["warnings"].append(
                f"FID on {request.name} features from {len(features)} images and "
                f"{reference.n} reference images is below the recommended {recommended} and "
                "biased upwards; compare it only at equal n, or read KID (added)."
            )
    if request.kind == "kid" or too_few:
        kid_key = MetricRequest("kid", request.name).key
        mean, std = kernel_distance(reference, generated, seed)
        out[kid_key], out[f"{kid_key}_std"] = mean, std
        out[f"{kid_key}_ci"] = (mean - 1.96 * std, mean + 1.96 * std)
    return out


def _fid_of(reference: FeatureStats, features: torch.Tensor, name: str) -> torch.Tensor:
    from diffalign.fid import frechet_distance

    return torch.tensor(frechet_distance(reference, FeatureStats.from_features(features, name)))
