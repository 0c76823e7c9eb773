"""What a run tells its experiment trackers (tensorboard, wandb): when it starts, and its sample
grids.

accelerate's ``init_trackers`` takes a project name, the run's settings (tensorboard's hparams,
wandb's config panel) and per-tracker ``wandb.init`` arguments. A wandb run resumed with
``--resume`` continues the same wandb run: its id is kept in the run folder.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

WANDB_ID_FILE = "wandb_run_id.txt"
"""The file in a run folder that holds its wandb run id."""


def tracker_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as trackers can store it: numbers, strings and booleans as they are,
    lists and mappings as JSON text, unset values left out (tensorboard's hparams take no
    others)."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in config.items()
        if value is not None
    }


def wandb_run_id(out: Path, resume: bool) -> str:
    """The wandb run id of the run in ``out``: the one it recorded when resuming, else a new one
    (recorded for the next resume)."""
    path = out / WANDB_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def tracker_init_kwargs(log_with: str, out: Path, run_name: str | None, resume: bool) -> dict:
    """accelerate's ``init_kwargs`` for ``log_with``: wandb gets the run's name (default: the
    ``out`` folder's), its id (continued on resume) and ``out`` as its directory."""
    if log_with != "wandb":
        return {}
    wandb = {"name": run_name or out.name, "id": wandb_run_id(out, resume), "resume": "allow",
             "dir": str(out)}  # fmt: skip
    return {"wandb": wandb}


def log_grid(trackers: list, grid: Image.Image, step: int) -> None:
    """Show a sample grid (an evaluation's) in each tracker, as ``heldout_samples`` at ``step``:
    tensorboard takes pixels, wandb a list of images."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            pixels = np.asarray(grid.convert("RGB"))[None]
            tracker.log_images({"heldout_samples": pixels}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"heldout_samples": [grid]}, step=step)
