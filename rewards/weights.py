"""Where a reward's weights come from: one resolution order for every adapter.

1. an explicit ``path=`` argument (a folder or a file, as the reward expects);
2. the environment variable ``DIFFALIGN_<NAME>_PATH`` (e.g. ``DIFFALIGN_PICKSCORE_PATH``);
3. the Hugging Face cache (no network);
4. the Hugging Face hub, only when it is reachable and ``HF_HUB_OFFLINE`` is not set.

When all four fail the caller gets a :class:`WeightsNotFoundError` at once, naming the model id,
the files expected and both ways to supply them. Nothing is downloaded at import time and no
reward ever falls back to random weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.models import ModelNotAvailableError, hub_is_offline_by_setting, hub_is_reachable


class WeightsNotFoundError(ModelNotAvailableError):
    """A reward's weights were not supplied and cannot be found offline or fetched."""


@dataclass(frozen=True)
class WeightsSpec:
    """What one reward needs and where it lives on the hub.

    Args:
        name: the registry name; the environment variable is ``DIFFALIGN_<NAME>_PATH``.
        repo_id: the hub repository holding the weights.
        files: files that must all be present. For a folder, each entry may list alternatives
            separated by ``|`` (``"model.safetensors|pytorch_model.bin"``); for a single file, the
            one file name.
        is_folder: whether the weights are a folder (a transformers model) or one file.
        env_name: override for the environment variable's name.
    """

    name: str
    repo_id: str
    files: tuple[str, ...]
    is_folder: bool = True
    env_name: str | None = None
    download_patterns: tuple[str, ...] = field(default=("*.json", "*.txt"))

    @property
    def env_var(self) -> str:
        """The environment variable that may point at the weights."""
        return self.env_name or f"DIFFALIGN_{self.name.upper()}_PATH"

    def describe_files(self) -> str:
        """The expected files, for messages (``a``, ``b or c``)."""
        return ", ".join(entry.replace("|", " or ") for entry in self.files)


def missing_files(folder: Path, files: Sequence[str]) -> list[str]:
    """The entries of ``files`` (with ``|`` alternatives) that ``folder`` lacks."""
    return [
        entry.replace("|", " or ")
        for entry in files
        if not any((folder / option).is_file() for option in entry.split("|"))
    ]


def _check_local(path: Path, spec: WeightsSpec, origin: str) -> Path:
    if spec.is_folder:
        if not path.is_dir():
            raise FileNotFoundError(
                f"{origin} {path} for the {spec.name!r} reward is not a folder; it should hold "
                f"{spec.describe_files()} (a copy of {spec.repo_id})."
            )
        absent = missing_files(path, spec.files)
        if absent:
            raise FileNotFoundError(
                f"{origin} {path} for the {spec.name!r} reward lacks {', '.join(absent)}; "
                f"it should be a complete copy of {spec.repo_id}."
            )
        return path
    if path.is_dir():
        path = path / spec.files[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"{origin} {path} for the {spec.name!r} reward does not exist; expected the file "
            f"{spec.files[0]} from {spec.repo_id}."
        )
    return path


def _from_hub(spec: WeightsSpec, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if not spec.is_folder:
        return Path(hf_hub_download(spec.repo_id, spec.files[0], local_files_only=local_only))
    patterns = list(spec.download_patterns) + [e.split("|")[0] for e in spec.files]
    folder = Path(
        snapshot_download(spec.repo_id, allow_patterns=patterns, local_files_only=local_only)
    )
    for entry in spec.files:  # fetch an alternative file when the preferred one is absent
        options = entry.split("|")
        if not any((folder / option).is_file() for option in options) and not local_only:
            for option in options[1:]:
                try:
                    hf_hub_download(spec.repo_id, option)
                    break
                except OSError:
                    continue
    if missing_files(folder, spec.files):
        raise FileNotFoundError(f"incomplete copy of {spec.repo_id} in {folder}")
    return folder


def not_found_error(spec: WeightsSpec, reason: str) -> WeightsNotFoundError:
    """The error that says what is missing and the two ways to supply it."""
    kind = "folder" if spec.is_folder else "file"
    fetch = (
        f"huggingface-cli download {spec.repo_id} --local-dir DIR"
        if spec.is_folder
        else f"huggingface-cli download {spec.repo_id} {spec.files[0]} --local-dir DIR"
    )
    where = "DIR" if spec.is_folder else f"DIR/{spec.files[0]}"
    return WeightsNotFoundError(
        f"The {spec.name!r} reward needs the weights of {spec.repo_id} (a {kind} with "
        f"{spec.describe_files()}), and none were found: no path= was given, {spec.env_var} is "
        f"not set, they are not in the Hugging Face cache, and {reason}. Supply them either way: "
        f"load_reward({spec.name!r}, path={where!r}) or `export {spec.env_var}={where}`, after "
        f"`{fetch}` on a machine with network."
    )


def resolve_weights(spec: WeightsSpec, path: str | os.PathLike | None = None) -> Path:
    """The local path of ``spec``'s weights, by the order in the module docstring.

    Raises:
        FileNotFoundError: ``path`` or the environment variable points at something incomplete.
        WeightsNotFoundError: nothing found and the hub cannot be used.
    """
    if path is not None:
        return _check_local(Path(path).expanduser(), spec, "The path")
    from_env = os.environ.get(spec.env_var, "").strip()
    if from_env:
        return _check_local(Path(from_env).expanduser(), spec, f"{spec.env_var}=")
    try:
        return _from_hub(spec, local_only=True)
    except (OSError, ValueError):
        pass
    if hub_is_offline_by_setting():
        raise not_found_error(spec, "HF_HUB_OFFLINE is set")
    if not hub_is_reachable():
        raise not_found_error(spec, "the hub cannot be reached")
    try:
        return _from_hub(spec, local_only=False)
    except (OSError, ValueError) as error:
        raise not_found_error(spec, f"downloading failed ({error})") from error


def load_state_dict_file(file: os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file (plain or under ``"state_dict"``)."""
    if str(file).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file's name
        raise ValueError(f"Could not read the weights file {file}: {error}") from error
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{file} does not hold a state dict (found {type(loaded).__name__}).")
    return {key.removeprefix("module."): value for key, value in loaded.items()}
