"""The reward-hacking guard's arithmetic (the trainers' use of it: tests/test_trainers.py)."""

import pytest
import torch

from diffalign.train.guard import HackingGuard, relative_drop


def test_a_drop_is_a_share_of_the_start_magnitude():
    assert relative_drop(16.0, 15.2) == pytest.approx(0.05)
    assert relative_drop(-1.0, -1.1) == pytest.approx(0.1)  # JPEG size 1.0 -> 1.1 kB: worse
    assert relative_drop(-1.0, -0.9) == pytest.approx(-0.1)  # a check that rose
    assert relative_drop(0.0, -0.2) == pytest.approx(0.2)  # no scale: the plain difference


def test_the_guard_trips_on_the_largest_fall_beyond_its_bound():
    guard = HackingGuard(["a", "b"], max_drop=0.05)
    assert guard.check(0, {"a": 10.0, "b": -2.0, "loss": 3.0}) is None  # sets the start
    guard.keep(0, [torch.zeros(2)])
    assert guard.check(3, {"a": 9.6, "b": -2.08}) is None  # 4% and 4%
    guard.keep(3, [torch.ones(2)])
    trip = guard.check(6, {"a": 9.0, "b": -2.4})  # 10% and 20%
    assert (trip.key, trip.start, trip.now, trip.step, trip.passed_step) == ("b", -2.0, -2.4, 6, 3)
    assert trip.drop == pytest.approx(0.2)
    assert "b fell 20.00% below its round-0 value" in trip.message()
    live = torch.full((2,), 7.0)
    guard.restore([[live]])
    assert live.tolist() == [1.0, 1.0]


def test_a_check_added_later_starts_where_it_is_first_seen():
    guard = HackingGuard(["a"], max_drop=0.05)
    guard.load_state_dict({"start": {}, "weights": None, "passed_step": 4})
    assert guard.check(5, {"a": 3.0}) is None and guard.start == {"a": 3.0}
    with pytest.raises(RuntimeError, match="no passing weights"):
        guard.restore([[torch.zeros(1)]])
