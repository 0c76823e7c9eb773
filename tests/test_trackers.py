"""What runs tell their trackers: project, settings, and a wandb run kept across resumes."""

import json
import struct

import pytest
import yaml

from diffalign.cli import main
from diffalign.train.config import AWMConfig
from diffalign.train.trackers import WANDB_ID_FILE, tracker_init_kwargs, tracker_settings

from .test_trainers import TINY


def test_tensorboard_gets_the_run_s_project_and_settings(tmp_path):
    settings = ["max_steps=1", "log_with=tensorboard", "tracker_project=shapes-sweep"]
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", *settings,
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    project = tmp_path / "shapes-sweep"
    assert list(project.glob("events.out.tfevents.*"))  # the metrics
    (hparams,) = project.glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    config = AWMConfig.from_yaml(tmp_path / "config.yaml")
    assert stored["learning_rate"] == config.learning_rate and stored["max_steps"] == 1
    assert json.loads(stored["lora_target_modules"]) == list(config.lora_target_modules)
    assert "negative_prompt" not in stored  # unset settings are left out


def test_tracker_settings_are_what_tensorboard_s_hparams_take():
    settings = tracker_settings({"lr": 1e-3, "ok": True, "name": "a", "none": None,
                                 "targets": ["to_q", "to_k"], "pattern": {"conv1": 2}})  # fmt: skip
    assert settings == {"lr": 1e-3, "ok": True, "name": "a", "targets": '["to_q", "to_k"]',
                        "pattern": '{"conv1": 2}'}  # fmt: skip


def test_a_resumed_wandb_run_continues_its_wandb_run(tmp_path):
    out = tmp_path / "awm-run"
    first = tracker_init_kwargs("wandb", out, None, resume=False)["wandb"]
    assert first["name"] == "awm-run" and first["resume"] == "allow" and first["dir"] == str(out)
    resumed = tracker_init_kwargs("wandb", out, "sweep-1", resume=True)["wandb"]
    assert resumed == {**first, "name": "sweep-1"}  # same id: wandb appends to that run
    other = tracker_init_kwargs("wandb", tmp_path / "branch", None, resume=True)["wandb"]
    assert other["id"] != first["id"]  # a run started from another's checkpoint is its own
    assert tracker_init_kwargs("tensorboard", out, None, resume=False) == {}


def wandb_records(path):
    """The records of a wandb offline run file: a LevelDB-style log (7-byte header, 32 KiB blocks
    of chunks with a 7-byte header: crc, length, kind) of protobuf ``Record`` messages."""
    from wandb.proto.wandb_internal_pb2 import Record

    body, block, position = path.read_bytes()[7:], 32768, 0
    messages, pending = [], b""
    while position + 7 <= len(body):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", body[position : position + 7])
        chunk = body[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first, middle, last
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            messages.append(record)
    return messages


def test_wandb_gets_settings_and_metrics_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no server: the run is written to OUT/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    settings = ["log_with=wandb", "save_every=1", "run_name=sweep-1"]
    argv = ["train", "awm", "--recipe", "tiny-shapes", *TINY, "--set", *settings,
            "--out", str(out)]  # fmt: skip
    assert main([*argv, "--set", "max_steps=1"]) == 0
    assert main([*argv, "--set", "max_steps=2", "--resume"]) == 0
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    sessions = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2  # the resumed session wrote to the same wandb run
    records = [wandb_records(next(session.glob("*.wandb"))) for session in sessions]
    (run,) = [r.run for r in records[0] if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name, run.project) == (run_id, "sweep-1", "diffalign-awm")
    config = {item.key: json.loads(item.value_json) for r in records[0]
              if r.WhichOneof("record_type") == "config" for item in r.config.update}  # fmt: skip
    assert config["learning_rate"] == AWMConfig.from_yaml(out / "config.yaml").learning_rate
    rows = [[{item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for item in r.history.item}
             for r in session if r.WhichOneof("record_type") == "history"]
            for session in records]  # fmt: skip
    assert [[row["_step"] for row in session] for session in rows] == [[0, 1], [2]]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1][0]["reward_mean"] == pytest.approx(logged[2]["reward_mean"])
    assert list(sessions[0].glob("files/media/images/heldout_samples_*.png"))  # the grids
