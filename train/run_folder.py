"""A training run's folder on disk: its ``metrics.jsonl``, the checks made before a run starts or
resumes in it, and the settings a resumed run changes.

``metrics.jsonl`` holds one JSON row per round. A crash in the middle of a write can leave its
last line cut short; every reader here skips such a line (a resume runs that round again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffalign.checkpoint import CheckpointError, latest_checkpoint
from diffalign.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"

DISPLAY_SETTINGS = frozenset({"progress", "push_to_hub", "hub_model_id", "hub_private_repo",
                              "tracker_project", "run_name"})  # fmt: skip
"""Settings that change what a run shows or where it goes, not what it computes: not reported
as changed."""


def parse_row(line: str) -> dict | None:
    """One ``metrics.jsonl`` line as its row; None for a blank line or one cut short by a crash
    in the middle of its write."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file, in the order written (none when it is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [row for line in path.read_text().splitlines() if (row := parse_row(line)) is not None]


def keep_rounds_until(source: str | os.PathLike, dest: str | os.PathLike, step: int) -> None:
    """Write ``dest`` as the rows of the metrics file ``source`` up to round ``step``, atomically:
    a resumed run drops the rounds after its checkpoint, which it runs again."""
    source = Path(source)
    if not source.exists():
        return
    kept = [line for line in source.read_text().splitlines()
            if (row := parse_row(line)) is not None and row["step"] <= step]  # fmt: skip
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, "".join(f"{line}\n" for line in kept))


def refuse_existing_run(out: str | os.PathLike) -> None:
    """Raise ``FileExistsError`` when ``out`` already holds a run (a checkpoint, logged rounds or
    a final model), which a fresh start would overwrite."""
    out = Path(out)
    checkpoint = latest_checkpoint(out / "checkpoints")
    metrics = out / METRICS_FILE
    logged = metrics.is_file() and metrics.read_text().strip()
    final = (out / "final").exists()
    if checkpoint is None and not logged and not final:
        return
    found = checkpoint.name if checkpoint is not None else "final/" if final else "metrics"
    raise FileExistsError(
        f"{out} already holds a training run ({found}); a fresh start would overwrite it. "
        "Continue it with --resume (train(resume=True)), or pass another --out."
    )


def changed_settings(before: dict, after: dict) -> dict[str, tuple]:
    """The settings whose values differ between two config dicts: ``{key: (before, after)}``
    (compared as JSON, so a tuple equals the list a checkpoint's manifest stores), display
    settings (:data:`DISPLAY_SETTINGS`) aside."""
    before, after = json.loads(json.dumps(before)), json.loads(json.dumps(after))
    keys = sorted((set(before) | set(after)) - DISPLAY_SETTINGS)
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def describe_changes(changes: dict[str, tuple]) -> str:
    """``changed_settings``' result as text: ``key: old -> new, ...``."""
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def refuse_other_method(path: str | os.PathLike, kind: str | None, method: str) -> None:
    """Raise ``CheckpointError`` when the checkpoint at ``path`` was written by a run of another
    method (``kind``; None: not recorded, as before diffalign recorded it), whose states this
    ``method`` cannot take up."""
    if kind is None or kind == method:
        return
    raise CheckpointError(
        f"{path} was written by {kind.upper()} training, which {method.upper()} cannot "
        f"continue (their method states differ). Continue it with `diffalign train {kind}`, "
        f"or start {method.upper()} from its weights: its adapter as init_lora (`diffalign convert "
        f"--lora {path} --out ADAPTER.safetensors`, then --set init_lora=ADAPTER.safetensors), "
        "or a run's final/ as model."
    )
