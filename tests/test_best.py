"""keep_best and early stopping: the best held-out evaluation, its weights, and resumes."""

import json

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.models import build_tiny_pipeline, load_pipeline
from diffalign.train.awm import AWMTrainer
from diffalign.train.best import BestEvaluation
from diffalign.train.callbacks import TrainerCallback
from diffalign.train.config import AWMConfig

from .test_trainers import SMALL, _logged, _trainer


def test_the_best_evaluation_keeps_its_weights_and_counts_the_evaluations_since():
    best = BestEvaluation("heldout_reward_mean", keep_weights=True)
    live = torch.zeros(3)
    assert best.observe(0, {"heldout_reward_mean": -1.0}, [live])
    live += 1.0
    assert best.observe(5, {"heldout_reward_mean": -0.5}, [live])
    live += 1.0  # the kept copy does not follow the live weights
    assert not best.observe(10, {"heldout_reward_mean": -0.5}, [live])  # a tie is no new best
    assert not best.observe(15, {"heldout_reward_mean": -0.7}, [live])
    assert (best.step, best.value, best.since) == (5, -0.5, 2)
    assert best.describe() == "round 5, the best heldout_reward_mean (-0.5)"
    ema = torch.full((3,), 7.0)
    best.restore([[live], [ema]])
    assert live.tolist() == [1.0, 1.0, 1.0] and ema.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(KeyError, match="no 'heldout_reward_mean'.*heldout_tiny_clip_mean"):
        best.observe(20, {"heldout_tiny_clip_mean": 3.0, "loss": 1.0}, [live])


def test_a_best_state_loads_only_into_a_tracker_of_the_same_metric_that_it_can_serve():
    counted = BestEvaluation("heldout_reward_mean")
    counted.observe(3, {"heldout_reward_mean": 2.0}, [torch.zeros(1)])
    state = counted.state_dict()
    assert state["weights"] is None  # without keep_weights nothing is copied
    same = BestEvaluation("heldout_reward_mean")
    assert same.load_state_dict(state) and (same.step, same.value) == (3, 2.0)
    assert not BestEvaluation("heldout_tiny_clip_mean").load_state_dict(state)
    assert not same.load_state_dict({})  # a checkpoint from a run that tracked no best
    assert (same.step, same.value) == (3, 2.0)
    keeping = BestEvaluation("heldout_reward_mean", keep_weights=True)
    assert not keeping.load_state_dict(state) and keeping.step is None  # no weights to go back to
    with pytest.raises(RuntimeError, match="No weights were kept"):
        keeping.restore([[torch.zeros(1)]])


def test_settings_that_name_no_logged_metric_or_a_negative_patience_are_refused():
    with pytest.raises(ConfigError, match="one of heldout_reward_mean, heldout_tiny_clip_mean"):
        AWMConfig(heldout_extra_rewards=["tiny_clip"], best_metric="heldout_clip_mean")
    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 0"):
        AWMConfig(early_stopping_patience=-1)
    assert AWMConfig(heldout_extra_rewards=["tiny_clip"], best_metric="heldout_tiny_clip_mean")


class WeightsByRound(TrainerCallback):
    """Copies of the evaluated weights after every round."""

    def __init__(self):
        self.weights = {}

    def on_round_end(self, trainer, row):
        self.weights[row["step"]] = [w.detach().clone() for w in trainer._evaluated_weights()]


def _scripted(config, out, scores, **kwargs):
    """A trainer whose held-out evaluations score as ``scores`` (round -> value) says."""
    trainer = _trainer(AWMTrainer, config, out, **kwargs)
    trainer.evaluate = lambda step: {"heldout_reward_mean": scores[step]}
    return trainer


def _assert_equal(weights, expected):
    for kept, wanted in zip(weights, expected, strict=True):
        torch.testing.assert_close(kept, wanted, atol=0, rtol=0)


def test_keep_best_saves_the_weights_of_the_best_evaluation_as_final(tmp_path):
    rounds = WeightsByRound()
    base = tmp_path / "base"  # the run's model, so that its checkpoints load as pipelines
    build_tiny_pipeline(seed=0).save_pretrained(base)
    out = tmp_path / "run"
    config = AWMConfig(max_steps=4, keep_best=True, model=str(base), **{**SMALL, "save_every": 2})
    trainer = _scripted(config, out, {0: 0.1, 1: 0.2, 2: 0.9, 3: 0.5, 4: 0.3},
                        callbacks=[rounds])  # fmt: skip
    trainer.train()
    _assert_equal(trainer._evaluated_weights(), rounds.weights[2])
    assert not torch.equal(rounds.weights[2][0], rounds.weights[4][0])  # the run did move on
    record = json.loads((out / "final" / "training.json").read_text())
    assert record["kept_best"] == {"step": 2, "metric": "heldout_reward_mean", "value": 0.9}
    card = (out / "final" / "README.md").read_text()
    assert "weights of round 2, the best heldout_reward_mean (0.9)" in card
    assert "this model (round 2)" in card
    # final/ is the pipeline that round 2's checkpoint loads as
    final = load_pipeline(out / "final").unet.state_dict()
    round_two = load_pipeline(out / "checkpoints" / "checkpoint-00000002").unet.state_dict()
    for name, weight in round_two.items():
        torch.testing.assert_close(final[name], weight, atol=0, rtol=0)


def test_early_stopping_stops_resumably_and_a_resumed_run_keeps_its_best(tmp_path):
    scores = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.2, 4: 0.4, 5: 0.2, 6: 0.45}
    rounds = WeightsByRound()
    settings = {**SMALL, "save_every": 10, "keep_best": True}
    config = AWMConfig(max_steps=6, early_stopping_patience=2, **settings)
    _scripted(config, tmp_path, scores, callbacks=[rounds]).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 3]
    assert (tmp_path / "checkpoints" / "checkpoint-00000003").is_dir()  # saved though not due
    # resumed without early stopping, it runs to its end; round 1, scored before the resume,
    # stays the best, so its weights (kept in the checkpoint) are the final ones
    resumed = _scripted(AWMConfig(max_steps=6, **settings), tmp_path, scores)
    resumed.train(resume=True)
    assert [row["step"] for row in _logged(resumed)] == list(range(7))
    assert (resumed.best.step, resumed.best.since) == (1, 5)
    _assert_equal(resumed._evaluated_weights(), rounds.weights[1])
