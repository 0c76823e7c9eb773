"""The embedded shapes world: captioned procedural images, a verifiable reward, tiny models.

It lets every diffalign method run, be measured and be tested end to end offline on a CPU.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

TINY_SHAPES = "tiny-shapes"


def shipped_model_path(name: str = TINY_SHAPES) -> Path:
    """The folder of a model shipped in ``diffalign.assets`` (raises if it is not there)."""
    path = Path(str(resources.files("diffalign.assets"))) / name
    if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The shipped model {name!r} is missing from {path.parent}; regenerate it with "
            f"`diffalign world pretrain --out {path}`."
        )
    return path


SHIPPED_PREFIX = "diffalign:"
"""How a model name refers to a shipped model (``diffalign:tiny-shapes``)."""


def resolve_shipped(model: str) -> str:
    """``diffalign:<name>`` as the shipped model's folder; any other name as it is."""
    if model.startswith(SHIPPED_PREFIX):
        return str(shipped_model_path(model.removeprefix(SHIPPED_PREFIX)))
    return model


def recorded_guidance_scale(path: str | Path, default: float = 3.0) -> float:
    """The CFG scale recorded with a world model: ``training.json``'s ``sampling`` entry (chosen on
    the validation split), else the pretraining config's, else ``default``."""
    record = Path(path) / "training.json"
    manifest = Path(path) / "manifest.json"  # a training checkpoint: its run's setting
    if not record.is_file() and manifest.is_file():
        return float(json.loads(manifest.read_text())["config"].get("guidance_scale", default))
    if not record.is_file():
        return default
    data = json.loads(record.read_text())
    return float((data.get("sampling") or data["config"])["guidance_scale"])


def model_guidance_scale(model: str, default: float = 3.0, config: str | None = None) -> float:
    """The CFG scale recorded with ``model`` (``diffalign:<shipped>`` or a folder; a one-file
    model: with its ``config`` folder), else ``default`` (hub ids and models without a
    record)."""
    if config is not None:
        model = config  # a file holds weights only; its configs come from there
    if model.startswith("diffalign:") and model != "diffalign:tiny-random":
        return recorded_guidance_scale(
            shipped_model_path(model.removeprefix("diffalign:")), default
        )
    return recorded_guidance_scale(model, default) if Path(model).is_dir() else default
