"""Fréchet and kernel distances between image sets (FID, KID) on a chosen feature network.

Two kinds of features:

- ``inception``: the standard FID network, Inception-v3 pool features (2,048) with torch-fidelity's
  weights (``weights-inception-2015-12-05-6726825d.pth``, the TensorFlow FID graph converted).
  Images are quantised to uint8 and resized to 299 x 299 inside the network with the bilinear
  interpolation of TensorFlow 1.x, as the original FID code does. The weights come from
  ``weights=``, ``DIFFALIGN_INCEPTION_PATH``, torch's hub cache, or a download; offline without
  a file the loader says how to supply one.
- any CLIP reward of :mod:`diffalign.rewards` (``tiny_clip``, ``clip_score``, ``pickscore``): the
  unnormalised image embeddings of its image tower, preprocessed as its processor does. On the
  embedded shapes world ``tiny_clip`` is the FID network (``fid:tiny-clip``).

The distance itself is torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``
fed with features computed here, so that a reference set's statistics (:class:`FeatureStats`:
mean, covariance, n and the feature's name) can be cached to a file and reused across runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffalign.rewards.clip import ClipReward

logger = logging.getLogger(__name__)

INCEPTION = "inception"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "DIFFALIGN_INCEPTION_PATH"
INCEPTION_RESIZE = "uint8, resized to 299 x 299 by TensorFlow-1.x bilinear (torch-fidelity)"
FID_PAPER_SAMPLE_SIZE = 10_000  # Heusel et al. 2017: FID is biased below about 10k images
KID_SUBSETS = 100
KID_MAX_REFERENCE_FEATURES = 10_000  # features kept in a cache file for KID
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The standard FID network's weights were not supplied and cannot be downloaded."""


def canonical_feature_name(name: str) -> str:
    """``tiny-clip`` -> ``tiny_clip``; names are compared and stored in this form."""
    return name.strip().lower().replace("-", "_")


def inception_weights_url() -> str:
    """Where torch-fidelity publishes the Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$DIFFALIGN_INCEPTION_PATH``, else torch's hub
    cache, else a download into that cache (unless ``HF_HUB_OFFLINE`` is set).

    Raises:
        FileNotFoundError: ``path`` or the environment variable names a missing file.
        InceptionWeightsNotFoundError: nothing local and the download is not possible.
    """
    for origin, value in (("path", path), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            file = Path(value).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"The Inception weights file {file} ({origin}) is missing.")
            return file
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    return _download_inception(cached)


def _download_inception(target: Path) -> Path:
    from urllib.parse import urlparse

    from diffalign.models import host_is_reachable, hub_is_offline_by_setting

    url = inception_weights_url()
    reason = None
    if hub_is_offline_by_setting():
        reason = "HF_HUB_OFFLINE is set"
    elif not host_is_reachable(urlparse(url).hostname, 443):
        reason = f"{urlparse(url).hostname} cannot be reached"
    else:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target))
            return target
        except OSError as error:
            reason = f"downloading failed ({error})"
    raise InceptionWeightsNotFoundError(
        f"FID with the standard Inception network needs {INCEPTION_FILE}, and it was not found: "
        f"no --fid-weights / weights= was given, {INCEPTION_ENV} is not set, it is not in "
        f"{target.parent}, and {reason}. Download it on a machine with network from {url} and "
        f"pass --fid-weights PATH (or export {INCEPTION_ENV}=PATH). For a run that needs no "
        "download, use another feature network, e.g. --metrics fid:tiny-clip."
    )


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (N, 2048) of images in [0, 1], torch-fidelity's network."""

    resize_convention = INCEPTION_RESIZE

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        file = resolve_inception_weights(weights)
        try:  # torch-fidelity unpickles in full; accept only files that hold plain tensors
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the file's name
            raise ValueError(f"{file} is not an Inception weights file: {error}") from error
        self.network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file)
        ).eval()
        self.name, self.dim = INCEPTION, 2048

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, 2048) of images (N, 3, H, W) in [0, 1], quantised to uint8 first."""
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.network(pixels)[0].reshape(len(images), -1)


class ClipImageFeatures(nn.Module):
    """A CLIP reward's image-tower embeddings (unnormalised), with the reward's preprocessing."""

    def __init__(self, name: str, reward: ClipReward) -> None:
        super().__init__()
        self.name, self.reward = name, reward
        self.dim = reward.model.config.projection_dim
        transform = reward.transform
        crop = f", centre-cropped to {transform.crop}" if transform.crop else ""
        self.resize_convention = (
            f"{name} processor: resized to {transform.size} ({transform.interpolation}, "
            f"{transform.mode} edge){crop}, CLIP-normalised"
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, projection_dim) of images (N, 3, H, W) in [0, 1]."""
        from diffalign.rewards.clip import pooled

        pixels = self.reward.transform(images.to(self.reward.device, self.reward.dtype))
        return pooled(self.reward.model.get_image_features(pixel_values=pixels)).float()


def load_feature_network(
    name: str, weights: str | os.PathLike | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The FID feature network called ``name``: ``inception`` or a CLIP reward's name."""
    from diffalign.rewards import list_rewards, load_reward
    from diffalign.rewards.clip import ClipReward

    name = canonical_feature_name(name)
    if name == INCEPTION:
        return InceptionFeatures(weights).to(device)
    if name not in list_rewards():
        raise ValueError(
            f"Unknown FID feature network {name!r}: use 'inception' or a CLIP reward "
            f"({', '.join(r for r in list_rewards() if 'clip' in r or r == 'pickscore')})."
        )
    reward = load_reward(name, **({"path": weights} if weights else {}))
    if not isinstance(reward, ClipReward):
        raise ValueError(f"The reward {name!r} has no image tower to take FID features from.")
    return ClipImageFeatures(name, reward.to(device))


class ImageFolder:
    """The images of a folder (PNG, JPEG, WebP, BMP), in name order, read a batch at a time: a
    reference set of real images (COCO-sized: 30,000 at 512 px would take 94 GB as one float
    tensor) whose sizes may differ. Each batch holds images of one size, because the feature
    networks resize a batch as a whole; each image is then resized as it would be alone."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(self.files) < 2:
            raise ValueError(
                f"The image folder {self.folder} holds {len(self.files)} images "
                f"({', '.join(IMAGE_SUFFIXES)}); FID needs 2 or more."
            )

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(positions, images)``: the images (B, 3, H, W) in [0, 1] of one size, at most
        ``batch_size``, and their positions in name order."""
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        by_size = defaultdict(list)
        for position, file in enumerate(self.files):
            with Image.open(file) as image:  # reads the header only
                by_size[image.size].append(position)
        for positions in by_size.values():
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                images = [pil_to_tensor(Image.open(self.files[i]).convert("RGB")) for i in chunk]
                yield torch.tensor(chunk), torch.stack(images).float() / 255


def extract_features(
    network: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | ImageFolder,
    batch_size: int = 64,
    quiet: bool = True,
) -> torch.Tensor:
    """Features (N, d) in float64 of images (N, 3, H, W) in [0, 1], or of an
    :class:`ImageFolder`'s images in name order, batch by batch."""
    device = next(network.parameters()).device if isinstance(network, nn.Module) else "cpu"
    if isinstance(images, ImageFolder):
        batches = images.batches(batch_size)
    else:
        batches = ((torch.arange(start, min(start + batch_size, len(images))),
                    images[start : start + batch_size])
                   for start in range(0, len(images), batch_size))  # fmt: skip
    positions, chunks = [], []
    with tqdm(total=len(images), desc="features", unit="image", disable=quiet) as bar:
        for where, batch in batches:
            chunks.append(network(batch.to(device)).double().cpu())
            positions.append(where)
            bar.update(len(batch))
    features = torch.cat(chunks)
    ordered = torch.empty_like(features)
    ordered[torch.cat(positions)] = features
    return ordered


@dataclass
class FeatureStats:
    """The statistics FID needs of one image set, and a subset of its features for KID."""

    feature: str
    n: int
    mean: torch.Tensor
    cov: torch.Tensor
    features: torch.Tensor | None = None
    resize_convention: str = ""

    @classmethod
    def from_features(
        cls, features: torch.Tensor, feature: str, resize_convention: str = ""
    ) -> FeatureStats:
        """Mean and unbiased covariance of ``features`` (N, d), N >= 2."""
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"FID needs at least 2 images, got features {tuple(features.shape)}.")
        features = features.double()
        kept = features[:KID_MAX_REFERENCE_FEATURES]
        return cls(canonical_feature_name(feature), len(features), features.mean(0),
                   torch.cov(features.T), kept, resize_convention)  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        from diffalign.files import atomic_path

        tensors = {"mean": self.mean, "cov": self.cov}
        if self.features is not None:
            tensors["features"] = self.features.contiguous()
        metadata = {"feature": self.feature, "n": str(self.n),
                    "resize_convention": self.resize_convention}  # fmt: skip
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, feature: str | None = None) -> FeatureStats:
        """Read statistics written by :meth:`save`; ``feature`` checks they match the network."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if "feature" not in metadata or "mean" not in tensors:
            raise ValueError(f"{path} is not a diffalign reference-statistics file.")
        stats = cls(metadata["feature"], int(metadata["n"]), tensors["mean"], tensors["cov"],
                    tensors.get("features"), metadata.get("resize_convention", ""))  # fmt: skip
        if feature is not None and stats.feature != canonical_feature_name(feature):
            raise ValueError(
                f"{path} holds statistics of {stats.feature!r} features, not of "
                f"{canonical_feature_name(feature)!r}; compute a reference for that network."
            )
        return stats


class _GivenFeatures(nn.Module):
    """Identity 'network' so that torchmetrics' metrics take features computed elsewhere."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(reference: FeatureStats, generated: FeatureStats) -> float:
    """FID between two sets' feature statistics (torchmetrics' formula)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_same_feature(reference, generated)
    metric = FrechetInceptionDistance(feature=_GivenFeatures(len(reference.mean)))
    for prefix, stats in (("real", reference), ("fake", generated)):
        mean = stats.mean.double()
        outer_sum = stats.n * torch.outer(mean, mean)
        setattr(metric, f"{prefix}_features_sum", mean * stats.n)
        setattr(
            metric, f"{prefix}_features_cov_sum", stats.cov.double() * (stats.n - 1) + outer_sum
        )
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(stats.n))
    metric.orig_dtype, metric._update_count = torch.float64, 1  # states were set, not updated
    return float(metric.compute())


def kernel_distance(
    reference: FeatureStats, generated: FeatureStats, seed: int = 0
) -> tuple[float, float]:
    """KID (mean and standard deviation over random subsets drawn with ``seed``), unbiased at
    small sample sizes."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_same_feature(reference, generated)
    if reference.features is None or generated.features is None:
        raise ValueError("KID needs the features themselves, not only their statistics.")
    smallest = min(len(reference.features), len(generated.features))
    subset = min(1000, max(2, smallest // 2))  # subsets of a whole set would all be the same
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(len(reference.mean)), subsets=KID_SUBSETS, subset_size=subset
        )
    metric.update(reference.features.float(), real=True)
    metric.update(generated.features.float(), real=False)
    with torch.random.fork_rng():  # the subsets come from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def recommended_sample_size(feature: str, dim: int) -> int:
    """Images per set below which FID is strongly biased: the FID paper's 10,000 for
    Inception, five times the feature dimension (a well-conditioned covariance) otherwise."""
    return FID_PAPER_SAMPLE_SIZE if canonical_feature_name(feature) == INCEPTION else 5 * dim


def _check_same_feature(reference: FeatureStats, generated: FeatureStats) -> None:
    if reference.feature != generated.feature or reference.mean.shape != generated.mean.shape:
        raise ValueError(
            f"Cannot compare {reference.feature!r} features ({tuple(reference.mean.shape)}) with "
            f"{generated.feature!r} features ({tuple(generated.mean.shape)})."
        )
