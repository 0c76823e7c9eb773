"""Trainer callbacks: called every round and at the end, and able to stop a run resumably."""

import json

import pytest

from diffalign.train.awm import AWMTrainer
from diffalign.train.callbacks import TrainerCallback
from diffalign.train.config import AWMConfig

from .test_trainers import SMALL, _trainer


class StopAtRound(TrainerCallback):
    def __init__(self, round_: int):
        self.round, self.rows, self.finals = round_, [], []

    def on_round_end(self, trainer, row):
        self.rows.append(row)
        return row["step"] == self.round

    def on_train_end(self, trainer, final):
        self.finals.append(final)


def test_a_callback_stops_a_run_that_then_resumes_to_its_end(tmp_path):
    stopper, seen = StopAtRound(2), []
    config = AWMConfig(max_steps=4, **{**SMALL, "save_every": 3, "eval_every": 2})
    trainer = _trainer(AWMTrainer, config, tmp_path, callbacks=[stopper,
                       lambda trainer, row: seen.append(row["step"])])  # fmt: skip
    trainer.train()
    assert [row["step"] for row in stopper.rows] == [1, 2] and seen == [1, 2]
    assert "heldout_reward_mean" in stopper.rows[1]  # evaluation rounds carry their metrics
    assert stopper.finals == [tmp_path / "final"] and (tmp_path / "final").is_dir()
    assert (tmp_path / "checkpoints" / "checkpoint-00000002").is_dir()  # saved although not due
    _trainer(AWMTrainer, config, tmp_path).train(resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 3, 4]


def test_a_callback_that_is_neither_a_callback_nor_a_function_is_refused(tmp_path):
    with pytest.raises(TypeError, match="TrainerCallback or a function"):
        _trainer(AWMTrainer, AWMConfig(**SMALL), tmp_path, callbacks=["stop"])
