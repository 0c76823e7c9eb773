"""The embedded shapes world: captioned procedural images, a verifiable reward, tiny models.

It lets every diffalign method run, be measured and be tested end to end offline on a CPU.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

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


def recorded_sampling(path: str | Path, key: str, default: Any = None) -> Any:
    """A sampling setting (``guidance_scale``, ``negative_prompt``) recorded with a model folder:
    ``training.json``'s ``sampling`` entry (a world model's chosen on the validation split, a
    trained run's as it trained), else its config, else a training checkpoint's run config
    (``manifest.json``), else ``default``."""
    record, manifest = Path(path) / "training.json", Path(path) / "manifest.json"
    if record.is_file():
        data = json.loads(record.read_text())
        sections = [data.get("sampling"), data.get("config")]
    elif manifest.is_file():
        sections = [json.loads(manifest.read_text())["config"]]
    else:
        sections = []
    return next((section[key] for section in sections if section and key in section), default)


def recorded_guidance_scale(path: str | Path, default: float = 3.0) -> float:
    """The CFG scale recorded with a world model or trained run (:func:`recorded_sampling`)."""
    return float(recorded_sampling(path, "guidance_scale", default))


def model_sampling(model: str, key: str, default: Any = None, config: str | None = None) -> Any:
    """The sampling setting ``key`` recorded with ``model`` (``diffalign:<shipped>`` or a folder;
    a one-file model: with its ``config`` folder), else ``default`` (hub ids and models without
    a record)."""
    if config is not None:
        model = config  # a file holds weights only; its configs come from there
    if not model:  # not a name (Path("") would be the working directory)
        return default
    if model.startswith(SHIPPED_PREFIX) and model != "diffalign:tiny-random":
        return recorded_sampling(shipped_model_path(model.removeprefix(SHIPPED_PREFIX)), key,
                                 default)  # fmt: skip
    return recorded_sampling(model, key, default) if Path(model).is_dir() else default


def model_guidance_scale(model: str, default: float = 3.0, config: str | None = None) -> float:
    """The CFG scale recorded with ``model`` (:func:`model_sampling`), else ``default``."""
    return float(model_sampling(model, "guidance_scale", default, config))


def model_guidance(
    model: str,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    default_scale: float = 7.5,
    config: str | None = None,
) -> tuple[float, str | None]:
    """The classifier-free guidance to sample ``model`` with: ``guidance_scale`` and
    ``negative_prompt`` as given, else as recorded with it (:func:`model_sampling`), else
    ``default_scale`` and none (diffusers' default). A negative prompt is only taken with a scale
    above 1; given with one at most 1, it raises ``ValueError``."""
    if guidance_scale is None:
        guidance_scale = model_guidance_scale(model, default_scale, config)
    if negative_prompt is not None and guidance_scale <= 1:
        raise ValueError(
            f"a negative prompt is the unconditional side of classifier-free guidance, which "
            f"guidance scale {guidance_scale:g} turns off: use a scale above 1"
        )
    if negative_prompt is None and guidance_scale > 1:
        negative_prompt = model_sampling(model, "negative_prompt", None, config)
    return guidance_scale, negative_prompt
