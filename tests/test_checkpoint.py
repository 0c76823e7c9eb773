"""Atomic checkpoints: round trips, integrity checks, crash safety, pruning."""

import json
import random

import pytest
import torch

from diffalign import checkpoint as ckpt
from diffalign.checkpoint import CheckpointError


def training_states(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, optimizer = training_states()
    random.seed(3)
    states = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "progress": {"epoch": 2, "history": [0.5, 0.25], "done": False, "note": None},
    }
    path = ckpt.save_checkpoint(tmp_path, step=12, states=states, config={"lr": 1e-3})
    assert path.name == "checkpoint-00000012"
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 12 and loaded.config == {"lr": 1e-3}
    assert loaded.states["progress"] == states["progress"]

    fresh_model, fresh_optimizer = training_states(seed=1)
    fresh_model.load_state_dict(loaded.states["model"])
    fresh_optimizer.load_state_dict(loaded.states["optimizer"])
    for a, b in zip(fresh_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].equal(
        optimizer.state_dict()["state"][0]["exp_avg"]
    )
    random.setstate(loaded.states["rng"]["python"])
    assert random.random() == (random.seed(3), random.random())[1]
    torch.set_rng_state(loaded.states["rng"]["torch"])


def test_latest_and_pruning(tmp_path):
    for step in (5, 10, 15):
        ckpt.save_checkpoint(tmp_path, step, {"x": {"v": torch.tensor([step])}}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-00000010",
        "checkpoint-00000015",
    ]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)).states["x"]["v"].item() == 15
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None


def test_truncated_file_is_detected(tmp_path):
    model, _ = training_states()
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load_checkpoint(path)


def test_tampered_file_is_detected(tmp_path):
    model, _ = training_states()
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(path)


def test_missing_file_and_manifest_are_detected(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"a": {"t": torch.ones(2)}, "b": {"t": torch.ones(1)}})
    (path / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(path)
    assert ckpt.latest_checkpoint(tmp_path) is None  # incomplete ones are never "latest"


def test_crash_mid_write_leaves_previous_checkpoint_latest(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"x": {"v": torch.tensor([1])}})

    class Unsaveable:
        pass

    with pytest.raises(TypeError, match="Cannot checkpoint"):
        ckpt.save_checkpoint(tmp_path, 2, {"x": {"v": torch.tensor([2])}, "y": Unsaveable()})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000001"]  # no debris
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-00000001"


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 3, {"x": {"v": torch.tensor([1])}})
    ckpt.save_checkpoint(tmp_path, 3, {"x": {"v": torch.tensor([2])}})
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path, 3)).states["x"]["v"].item() == 2
    assert len(list(tmp_path.iterdir())) == 1


def test_manifest_records_hashes_and_format(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 4, {"x": {"v": torch.zeros(3)}}, config={"a": 1},
                                kind="awm")  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == ckpt.FORMAT_VERSION and manifest["step"] == 4
    assert ckpt.read_manifest(path) == manifest and ckpt.load_checkpoint(path).kind == "awm"
    assert len(manifest["files"]["x.safetensors"]["sha256"]) == 64
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format 99"):
        ckpt.load_checkpoint(path)


def test_bad_state_names_and_keep_last(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        ckpt.save_checkpoint(tmp_path, 1, {"../evil": {}})
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.prune_checkpoints(tmp_path, 0)
