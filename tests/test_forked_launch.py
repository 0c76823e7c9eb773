"""The forked launcher the distributed tests use: each process gets its rank, and a failing or
hanging process fails the launch with its output (so that those tests cannot pass vacuously)."""

import json
import os
import time

import pytest

from .conftest import launch_two_processes
from .forked_launch import launch_forked

SCRIPT = """
import json, os, sys, time
out, behaviour = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "EXTRA")
with open(f"{out}/env-{rank}.json", "w") as file:
    json.dump({name: os.environ.get(name) for name in names}, file)
if "fail" in behaviour and rank == 1:
    print("rank 1 gives up")
    sys.exit(3)
if "hang" in behaviour and rank == 0:
    time.sleep(600)
"""


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def test_each_process_gets_its_rank_and_the_launch_environment(script, tmp_path):
    launch_two_processes(script, tmp_path, "pass", env={"EXTRA": "yes"})
    seen = [json.loads((tmp_path / f"env-{rank}.json").read_text()) for rank in (0, 1)]
    assert [env["RANK"] for env in seen] == ["0", "1"]
    assert [env["LOCAL_RANK"] for env in seen] == ["0", "1"]
    assert {env["WORLD_SIZE"] for env in seen} == {"2"}
    assert {env["EXTRA"] for env in seen} == {"yes"}
    assert len({env["MASTER_PORT"] for env in seen}) == 1


def test_a_failing_process_fails_the_launch_with_its_output(script, tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 \(exit code 3\).*rank 1 gives up"):
        launch_forked([str(script), str(tmp_path), "fail"], dict(os.environ), 2, 29999,
                      tmp_path / "logs")  # fmt: skip


def test_a_process_left_waiting_is_stopped_after_the_others_failed(script, tmp_path, monkeypatch):
    monkeypatch.setattr("tests.forked_launch.GRACE_SECONDS", 0.5)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 0 \(exit code -9\).*rank 1 \(exit code 3\)"):
        launch_forked([str(script), str(tmp_path), "fail-and-hang"], dict(os.environ), 2, 29999,
                      tmp_path / "logs")  # fmt: skip
    assert time.monotonic() - began < 60


def test_a_launch_that_runs_past_its_timeout_fails(script, tmp_path):
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        launch_forked([str(script), str(tmp_path), "hang"], dict(os.environ), 2, 29999,
                      tmp_path / "logs", timeout=1)  # fmt: skip
