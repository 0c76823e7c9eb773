"""Uploading a finished run to the Hugging Face Hub (``push_to_hub``).

``final/`` (the pipeline, with its model card ``README.md`` and ``training.json``) becomes the
repository's root and ``lora/`` (the adapter alone, when the run trained one) its ``lora/``
folder, so that ``StableDiffusionPipeline.from_pretrained(repo)`` and
``pipeline.load_lora_weights(repo, subfolder="lora")`` both work. Access is checked before any
training; a failed upload at the end keeps the run on disk and says how to retry it.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffalign.config import ConfigError

_TRUE = {"1", "true", "yes", "on"}


class HubUploadError(RuntimeError):
    """A finished run could not be uploaded (it is saved on disk; the message says how to retry)."""


def check_hub_access() -> None:
    """Refuse ``push_to_hub`` before any work when the Hub cannot be reached or written to."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise ConfigError(
            "push_to_hub needs the Hub, and HF_HUB_OFFLINE is set: unset it, or set "
            "push_to_hub=false (the run is saved in --out either way)."
        )
    if get_token() is None:
        raise ConfigError(
            "push_to_hub needs a Hugging Face token with write access: run `hf auth login` or "
            "set HF_TOKEN, or set push_to_hub=false."
        )


def hub_repo_id(out: Path, hub_model_id: str | None) -> str:
    """The repository to push to: ``hub_model_id``, else the run folder's name."""
    return hub_model_id or Path(out).resolve().name


def push_run(out: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``out/final`` (and ``out/lora``) to ``repo_id``, creating it if needed; returns
    the repository's URL.

    Raises:
        HubUploadError: the upload failed; the message says the run is saved and how to retry.
    """
    from huggingface_hub import HfApi

    out = Path(out)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        message = f"diffalign run {out.name}"
        api.upload_folder(repo_id=repo_id, folder_path=out / "final", commit_message=message)
        if (out / "lora").is_dir():
            api.upload_folder(repo_id=repo_id, folder_path=out / "lora", path_in_repo="lora",
                              commit_message=f"{message}: LoRA adapter")  # fmt: skip
    except Exception as error:
        raise HubUploadError(
            f"The run is saved in {out}, but uploading it to the Hub as {repo_id} failed: "
            f"{error}. Retry with `hf upload {repo_id} {out / 'final'}`."
        ) from error
    return str(url)
