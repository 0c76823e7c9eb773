"""Sample-efficiency comparison of training runs (diffalign.train.compare, diffalign compare)."""

import json

import pytest

from diffalign.cli import main
from diffalign.train.compare import HeldoutCurve, compare_sample_efficiency, read_heldout_curve


def _write_run(folder, rows):
    folder.mkdir(parents=True)
    lines = [json.dumps(row) for row in rows]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _eval_rows(images_and_rewards):
    return [
        {"step": i, "samples_seen": n, "heldout_reward_mean": r}
        for i, (n, r) in enumerate(images_and_rewards)
    ]


def test_smoothed_is_a_trailing_mean():
    curve = HeldoutCurve("a", [0, 10, 20, 30], [0.0, 0.3, 0.6, 0.3])
    assert curve.smoothed(1) == [0.0, 0.3, 0.6, 0.3]
    assert curve.smoothed(2) == pytest.approx([0.0, 0.15, 0.45, 0.45])
    assert curve.smoothed(3) == pytest.approx([0.0, 0.15, 0.3, 0.4])
    with pytest.raises(ValueError, match="window"):
        curve.smoothed(0)


def test_images_to_reach_uses_the_smoothed_curve():
    curve = HeldoutCurve("a", [0, 10, 20, 30], [0.0, 0.3, 0.6, 0.3])
    assert curve.images_to_reach(0.5, window=1) == 20
    assert curve.images_to_reach(0.39, window=3) == 30  # (0.3 + 0.6 + 0.3) / 3
    assert curve.images_to_reach(0.7, window=1) is None


def test_ratio_against_the_reference_final_value():
    reference = HeldoutCurve("ddpo", [0, 100, 200, 300, 400], [0.40, 0.42, 0.44, 0.45, 0.46])
    fast = HeldoutCurve("awm", [0, 50, 100, 150], [0.40, 0.46, 0.46, 0.47])
    slow = HeldoutCurve("other", [0, 100, 200], [0.40, 0.40, 0.41])
    result = compare_sample_efficiency(reference, [fast, slow], window=2)
    assert result["target"] == pytest.approx(0.455)
    assert result["reference_images"] == 400
    assert result["runs"]["awm"]["images_to_reach"] == 100  # (0.46 + 0.46) / 2 >= 0.455
    assert result["runs"]["awm"]["ratio"] == pytest.approx(4.0)
    assert result["runs"]["other"] == {
        "images_to_reach": None, "ratio": None, "final_smoothed": pytest.approx(0.405),
        "images_total": 200, "best": 0.41, "images_at_best": 200, "fall_after_best": 0.0,
    }  # fmt: skip
    assert result["reference_peak"]["best"] == 0.46


def test_peak_is_the_best_evaluation_and_the_largest_fall_after_it():
    dip = HeldoutCurve("a", [0, 10, 20, 30, 40], [0.0, 0.6, 0.2, 0.6, 0.3])
    # the first of the tied bests (10 images); the lowest value after it is 0.2
    assert dip.peak() == {"best": 0.6, "images_at_best": 10, "fall_after_best": pytest.approx(0.4)}
    rising = HeldoutCurve("b", [0, 10, 20], [-1.0, -0.8, -0.7])
    assert rising.peak() == {"best": -0.7, "images_at_best": 20, "fall_after_best": 0.0}


def test_read_curve_keeps_the_last_row_of_a_repeated_step(tmp_path):
    rows = _eval_rows([(0, 0.4), (32, 0.5)])
    rows.insert(1, {"step": 1, "samples_seen": 32, "reward_mean": 0.7})  # no held-out value
    rows.append({"step": 1, "samples_seen": 32, "heldout_reward_mean": 0.45})  # resumed run
    run = _write_run(tmp_path / "run", rows)
    curve = read_heldout_curve(run)
    assert curve.images == [0, 32]
    assert curve.rewards == [0.4, 0.45]


def test_read_curve_reads_a_run_that_crashed_while_logging(tmp_path):
    run = _write_run(tmp_path / "run", _eval_rows([(0, 0.4), (32, 0.5)]))
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "samples_seen": 64, "heldout_rew')  # the crash cut it short
    curve = read_heldout_curve(run)
    assert curve.images == [0, 32] and curve.rewards == [0.4, 0.5]


def test_read_curve_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_heldout_curve(tmp_path / "missing")
    run = _write_run(tmp_path / "short", _eval_rows([(0, 0.4)]))
    with pytest.raises(ValueError, match="at least two"):
        read_heldout_curve(run)


def test_compare_command_writes_metrics_and_plot(tmp_path, capsys):
    ddpo = _write_run(tmp_path / "ddpo", _eval_rows([(0, 0.4), (100, 0.45), (200, 0.5)]))
    awm = _write_run(tmp_path / "awm", _eval_rows([(0, 0.4), (50, 0.5), (100, 0.55)]))
    out = tmp_path / "out"
    assert main(["compare", str(ddpo), str(awm), "--window", "1", "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["runs"][str(awm)]["images_to_reach"] == 50
    assert results["runs"][str(awm)]["ratio"] == pytest.approx(4.0)
    assert (out / "heldout_vs_images.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "4.00x" in printed and "fall after" in printed
    assert results["runs"][str(awm)]["best"] == 0.55 and results["reference_peak"]["best"] == 0.5
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        main(["compare", str(ddpo), str(tmp_path / "nope"), "--out", str(out)])
