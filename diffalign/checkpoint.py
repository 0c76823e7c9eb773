"""Atomic checkpoints with a manifest, integrity checks and resume.

A checkpoint is a folder ``<root>/checkpoint-<step>`` holding one safetensors file per saved
state (model, optimizer, scheduler, RNG, ...) and ``manifest.json`` with the step, the config,
every file's size and SHA-256, and the non-tensor skeleton of each state. It is written into a
temporary folder beside its final place and renamed when complete, so a crash mid-write never
leaves a checkpoint that looks valid. Loading verifies sizes and hashes first: a truncated or
tampered file raises ``CheckpointError`` naming the file, instead of resuming from garbage.

States are arbitrary nests of dicts, lists, tuples, tensors and JSON scalars (what
``optimizer.state_dict()`` or ``torch.get_rng_state()`` return). Tensors go to safetensors;
no pickle is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"checkpoint-(\d+)")
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_KEY_PREFIX = "__key__"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, truncated or tampered with."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the checkpoint folder.
        step: the training step it was taken at.
        config: the run's config as plain builtins.
        states: every saved state, rebuilt with its tensors (e.g. ``states["model"]``).
        kind: what wrote it (a trainer's method), None when not recorded.
    """

    path: Path
    step: int
    config: dict[str, Any]
    states: dict[str, Any]
    kind: str | None = None


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in ``obj`` by a reference into ``tensors`` (JSON skeleton out)."""
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(obj, Mapping):
        # JSON keys must be strings: integer keys (optimizer param ids) are tagged to survive.
        return {
            (k if isinstance(k, str) else f"{_KEY_PREFIX}{json.dumps(k)}"): _flatten(v, tensors)
            for k, v in obj.items()
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot checkpoint a value of type {type(obj).__name__}: {obj!r}")


def _unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_TUPLE}:
            return tuple(_unflatten(v, tensors) for v in skeleton[_TUPLE])
        return {
            (json.loads(k[len(_KEY_PREFIX) :]) if k.startswith(_KEY_PREFIX) else k): _unflatten(
                v, tensors
            )
            for k, v in skeleton.items()
        }
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    return skeleton


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``."""
    return Path(root) / f"checkpoint-{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    states: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    kind: str | None = None,
) -> Path:
    """Write ``states`` atomically as ``<root>/checkpoint-<step>`` and return its path.

    Args:
        root: the run's checkpoint folder (created if needed).
        step: the step number; an existing checkpoint of the same step is replaced atomically.
        states: name -> state (``{"model": model.state_dict(), "optimizer": ...}``).
        config: the run's config as plain builtins, stored in the manifest.
        keep_last: when set, older checkpoints beyond this many are deleted afterwards.
        kind: what wrote it (a trainer's method, ``"awm"``), stored in the manifest so that a
            reader can refuse another kind's states.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        manifest = {**_write_states(staging, step, states, config or {}), "kind": kind}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(staging / MANIFEST)
        if final.exists():
            trash = root / f".old-{final.name}-{os.getpid()}"
            final.rename(trash)
            shutil.rmtree(trash)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def _write_states(folder: Path, step: int, states: Mapping[str, Any], config: Mapping) -> dict:
    files, skeletons = {}, {}
    for name, state in states.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"State name {name!r} must be a plain file name.")
        tensors: dict[str, torch.Tensor] = {}
        skeletons[name] = _flatten(state, tensors)
        file = folder / f"{name}.safetensors"
        save_file(tensors, file)
        _fsync(file)
        files[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dict(config),
        "files": files,
        "states": skeletons,
    }


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a manifest), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _NAME.fullmatch(path.name)) and (path / MANIFEST).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or ``None``."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns what was deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}.")
    doomed = list_checkpoints(root)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path`` (its step, config, kind and files), in a format
    this diffalign reads; the weights are neither read nor verified."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}).")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_file} is corrupt: {error}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format_version')!r}; this diffalign "
            f"reads format {FORMAT_VERSION}."
        )
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that every file of the checkpoint at ``path`` is present and intact.

    Returns the manifest; raises ``CheckpointError`` naming the first problem found.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file} is truncated or altered: {size} bytes, expected {expected['bytes']}."
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its recorded SHA-256: it was altered.")
    return manifest


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify and load the checkpoint at ``path`` (a ``checkpoint-<step>`` folder)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    states = {
        name: _unflatten(skeleton, load_file(path / f"{name}.safetensors"))
        for name, skeleton in manifest["states"].items()
    }
    return Checkpoint(path, int(manifest["step"]), manifest["config"], states,
                      manifest.get("kind"))  # fmt: skip
