"""What runs tell their trackers: project, settings, and a wandb run kept across resumes."""

import json

import yaml

from diffalign.cli import main
from diffalign.train.config import AWMConfig
from diffalign.train.trackers import tracker_init_kwargs, tracker_settings

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
