"""``diffalign eval`` and ``diffalign quickstart``: files written, keys, and bad inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.quickstart import COLUMNS, QuickstartSettings, run_quickstart


def eval_args(out, *extra):
    return ["eval", "--model", "diffalign:tiny-shapes", "--prompts", "world:heldout",
            "--num-prompts", "3", "--num-images", "6", "--steps", "2", "--quiet",
            "--out", str(out), *extra]  # fmt: skip


def test_eval_against_a_baseline_writes_metrics_report_grid_and_reference(tmp_path, capsys):
    out = tmp_path / "eval"
    args = eval_args(out, "--baseline", "diffalign:tiny-shapes", "--metrics",
                     "shapes,fid:tiny-clip", "--reference", "world")  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["n"] == 6 and results["baseline"]["n"] == 6
    # the same model twice, same seeds: identical scores, every pair a tie
    assert results["shapes_mean"] == results["baseline"]["shapes_mean"]
    assert results["shapes_win_rate"] == 0.5
    assert len(results["shapes_mean_ci"]) == 2 and "fid_tiny_clip" in results
    report = (out / "report.md").read_text()
    assert "| metric | model | baseline |" in report and "shapes_win_rate" in report
    assert "<table>" in (out / "report.html").read_text()
    assert Image.open(out / "grid.png").width == 2 * (2 * 34 + 2) + 8  # two 2-wide grids
    assert "| shapes_mean |" in capsys.readouterr().out
    # the written reference statistics serve the next run
    again = tmp_path / "again"
    reference = str(out / "reference_tiny_clip.safetensors")
    assert main(eval_args(again, "--metrics", "fid:tiny-clip", "--reference", reference)) == 0
    second = json.loads((again / "metrics.json").read_text())["results"]
    assert second["fid_tiny_clip"] == pytest.approx(results["fid_tiny_clip"])


def test_eval_scores_each_batch_as_sampled_and_warns_once(tmp_path, monkeypatch, caplog):
    from diffalign.metrics import MetricScorer

    scored, score = [], MetricScorer.score
    monkeypatch.setattr(
        MetricScorer, "score", lambda self, x, p: scored.append(len(x)) or score(self, x, p)
    )
    metrics = ("--metrics", "shapes,fid:tiny-clip", "--reference", "world")
    results = {}
    for size in ("2", "8"):
        scored.clear()
        out = tmp_path / size
        args = eval_args(out, "--baseline", "diffalign:tiny-shapes", "--batch-size", size)
        with caplog.at_level("WARNING"):
            assert main([*args, *metrics]) == 0
        results[size] = json.loads((out / "metrics.json").read_text())["results"]
        # 6 images (3 prompts x 2) of each model, scored as sampled: --batch-size images at most
        assert scored == ([2] * 6 if size == "2" else [6, 6]), scored
    warned = [r for r in caplog.records if "below the recommended" in r.getMessage()]
    assert len(warned) == 2  # once a run, though the model and the baseline both carry it
    for key in ("shapes_mean", "fid_tiny_clip", "shapes_win_rate"):
        assert results["2"][key] == pytest.approx(results["8"][key], rel=1e-6)


def test_eval_saves_the_images_it_scored_which_sample_gives_too(tmp_path):
    from diffalign.world.evaluate import heldout_prompts

    out = tmp_path / "eval"
    assert main(eval_args(out, "--metrics", "shapes", "--save-images", "--batch-size", "4")) == 0
    saved = sorted((out / "images" / "model").glob("*.png"))
    assert [f.name for f in saved] == [f"000{i}.png" for i in range(6)]
    prompts = [arg for text in heldout_prompts(3) for arg in ("--prompt", text)]
    sampled = tmp_path / "sample"
    argv = ["sample", "--model", "diffalign:tiny-shapes", *prompts, "--steps", "2",
            "--num-images-per-prompt", "2", "--quiet", "--out", str(sampled)]  # fmt: skip
    assert main(argv) == 0
    for file in saved:  # the same prompts, seeds and guidance: the same images
        pixels = [
            np.asarray(Image.open(f), dtype=int) for f in (file, sampled / "images" / file.name)
        ]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1


def test_numbered_names_sort_in_image_order():
    from diffalign.imaging import numbered_names

    assert numbered_names(0, 3, 10) == ["0000.png", "0001.png", "0002.png"]
    names = numbered_names(9998, 3, 12000)
    assert names == ["09998.png", "09999.png", "10000.png"] == sorted(names)


def test_grid_collector_keeps_the_first_whole_prompts_images():
    from diffalign.imaging import GridCollector

    images = torch.rand(10, 3, 4, 4)
    grid = GridCollector(images_per_prompt=3, limit=8)  # two whole prompts: 6 images
    for start in range(0, 10, 4):
        grid.add(images[start : start + 4])
    assert torch.equal(grid.images(), images[:6])
    single = GridCollector(images_per_prompt=10, limit=8)  # at least one prompt's images
    single.add(images)
    assert torch.equal(single.images(), images)
    with pytest.raises(ValueError, match="No images"):
        GridCollector(2).images()


def test_eval_scores_a_reward_of_ones_own_with_win_rates(tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def redness(images, prompts):\n    return images[:, 0].mean((1, 2))\n")
    out = tmp_path / "eval"
    args = eval_args(out, "--baseline", "diffalign:tiny-shapes", "--metrics",
                     f"shapes,{rewards}:redness")  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert 0.0 < results["redness_mean"] < 1.0
    assert results["redness_mean"] == results["baseline"]["redness_mean"]
    assert results["redness_win_rate"] == 0.5  # the same model and seeds: all ties
    assert "redness_win_rate" in (out / "report.md").read_text()


def test_eval_without_fid_creates_its_output_folder(tmp_path):
    out = tmp_path / "new" / "eval"
    assert main(eval_args(out, "--metrics", "shapes")) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["n"] == 6 and 0.0 <= results["shapes_mean"] <= 1.0
    assert results["baseline"] is None and (out / "grid.png").is_file()


def test_eval_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="Unknown metric 'sharpness'"):
        main(eval_args(tmp_path, "--metrics", "sharpness"))
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no prompts"):
        main(["eval", "--model", "diffalign:tiny-shapes", "--prompts", str(empty),
              "--metrics", "shapes", "--out", str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit, match="neither a file nor world:SPLIT"):
        main(["eval", "--model", "diffalign:tiny-shapes", "--prompts", "nowhere.txt",
              "--metrics", "shapes", "--out", str(tmp_path)])  # fmt: skip
    folder = tmp_path / "real"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    with pytest.raises(ValueError, match="holds 1 images.*FID needs 2 or more"):
        main(eval_args(tmp_path / "o", "--metrics", "fid:tiny-clip", "--reference", str(folder)))


def test_a_reference_folder_of_mixed_sizes_is_read_a_batch_of_one_size_at_a_time(tmp_path):
    from diffalign.fid import FeatureStats, ImageFolder, extract_features, load_feature_network

    folder, generator, images = tmp_path / "real", torch.Generator().manual_seed(0), []
    folder.mkdir()
    for name, (width, height) in enumerate([(32, 32), (40, 24), (32, 32), (40, 24), (32, 32)]):
        pixels = (torch.rand(3, height, width, generator=generator) * 255).to(torch.uint8)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
        images.append(pixels.float() / 255)
    (folder / "notes.txt").write_text("not an image")
    reference = ImageFolder(folder)
    batches = [batch for _, batch in reference.batches(2)]
    assert sorted(len(batch) for batch in batches) == [1, 2, 2] and len(reference) == 5
    network = load_feature_network("tiny-clip")
    alone = torch.cat([network(image[None]).double() for image in images])
    # each image's features as it would have them alone, in name order
    close = {"atol": 1e-5, "rtol": 1e-4}  # float32 networks: batching moves the last digits
    torch.testing.assert_close(extract_features(network, reference, batch_size=2), alone, **close)
    out = tmp_path / "eval"
    assert main(eval_args(out, "--metrics", "fid:tiny-clip", "--reference", str(folder))) == 0
    stats = FeatureStats.load(out / "reference_tiny_clip.safetensors")
    assert stats.n == 5
    torch.testing.assert_close(stats.mean, alone.mean(0), **close)


def tiny_quickstart(**changes) -> QuickstartSettings:
    overrides = ["prompts_per_step=2", "samples_per_prompt=2", "sample_batch_size=4",
                 "train_batch_size=4", "eval_every=1", "num_heldout_prompts=2",
                 "num_inference_steps=3", "save_every=1"]  # fmt: skip
    settings = {"num_prompts": 2, "steps": 3, "awm_rounds": 2, "search_chains": 2,
                "awm_overrides": overrides, **changes}  # fmt: skip
    return QuickstartSettings(**settings)


def test_quickstart_writes_the_four_columns_report_and_figures(tmp_path):
    settings = tiny_quickstart()
    metrics = run_quickstart(tmp_path, settings, progress=False)
    assert list(metrics) == list(COLUMNS)
    for column in COLUMNS:
        assert {"shapes_mean", "tiny_clip_mean", "fid_tiny_clip"} <= set(metrics[column])
    assert "shapes_win_rate" in metrics["aligned_dts_star"]
    written = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert written["base"]["shapes_mean"] == metrics["base"]["shapes_mean"]
    curve = written["curves"]["dts-star"]
    assert curve["nfe"] == [3, 6]  # one and two chains of 3 steps, one row a step at CFG 1
    assert curve["mean_best_reward"] == sorted(curve["mean_best_reward"])  # anytime: never falls
    for name in ("report.md", "report.html", "grid.png", "reward_curve.png", "reward_vs_nfe.png"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert "| metric | base | aligned | aligned_best_of_n | aligned_dts_star |" in report
    assert "## Warnings" in report and "below the recommended" in report  # 4 images per column
    assert (tmp_path / "awm" / "final" / "model_index.json").is_file()


def test_quickstart_reports_an_awm_run_that_the_guard_stopped(tmp_path):
    # at this rate the first round wrecks the images and the recipe's guard (tiny-clip, 5%) trips
    settings = tiny_quickstart(awm_rounds=3)
    settings.awm_overrides.append("learning_rate=0.1")
    run_quickstart(tmp_path, settings, progress=False)
    rows = (tmp_path / "awm" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["stopped_by_guard"] == "heldout_tiny_clip_mean"
    report = (tmp_path / "report.md").read_text()
    assert "The AWM run stopped early: reward-hacking guard: heldout_tiny_clip_mean fell" in report


def test_quickstart_continues_its_own_run_and_refuses_another(tmp_path):
    first = run_quickstart(tmp_path, tiny_quickstart(awm_rounds=1), progress=False)
    with (tmp_path / "awm" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "reward_me')  # as if it crashed while logging a round 2
    # more rounds of the same settings continue from the checkpoint of round 1
    longer = run_quickstart(tmp_path, tiny_quickstart(awm_rounds=2), progress=False)
    rows = (tmp_path / "awm" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [0, 1, 2]
    assert longer["base"] == first["base"]
    with pytest.raises(FileExistsError, match="longer AWM run"):
        run_quickstart(tmp_path, tiny_quickstart(awm_rounds=1), progress=False)
    with pytest.raises(FileExistsError, match=r"other settings \(seed: 0 -> 1\)"):
        run_quickstart(tmp_path, tiny_quickstart(awm_rounds=2, seed=1), progress=False)


def test_eval_measures_a_folder_of_images_with_the_prompts_sample_recorded(tmp_path):
    sampled = tmp_path / "sample"
    prompts = [a for p in ("a red circle", "two blue squares") for a in ("--prompt", p)]
    settings = ["--num-images-per-prompt", "2", "--steps", "2", "--reward", "shapes", "--quiet"]
    argv = [
        "sample",
        "--model",
        "diffalign:tiny-shapes",
        *prompts,
        *settings,
        "--out",
        str(sampled),
    ]
    assert main(argv) == 0
    recorded = json.loads((sampled / "metrics.json").read_text())["results"]
    out = tmp_path / "eval"
    images = str(sampled / "images")
    assert main(["eval", "--images", images, "--baseline-images", images, "--metrics",
                 "shapes,fid:tiny-clip", "--reference", "world", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["n"] == 4 and results["images"] == images
    # the PNGs score as the images did before saving (shapes is robust to 8-bit rounding)
    assert results["shapes_mean"] == pytest.approx(recorded["reward_mean"])
    assert results["shapes_win_rate"] == 0.5 and "fid_tiny_clip" in results
    assert (out / "grid.png").is_file() and (out / "reference_tiny_clip.safetensors").is_file()


def test_a_folder_s_scores_come_back_in_name_order_whatever_the_sizes(tmp_path):
    import argparse

    from diffalign.commands._image_folders import folder_prompts, score_folder
    from diffalign.fid import ImageFolder
    from diffalign.metrics import MetricScorer

    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def redness(images, prompts):\n    return images[:, 0].mean((1, 2))\n")
    folder = tmp_path / "images"
    folder.mkdir()
    reds = [0, 200, 50, 250, 100]
    for index, red in enumerate(reds):  # sizes alternate: batches group them otherwise
        Image.new("RGB", (16 + 8 * (index % 2),) * 2, (red, 0, 0)).save(folder / f"{index}.png")
    (tmp_path / "prompts.txt").write_text("\n".join("x" for _ in reds) + "\n")
    images = ImageFolder(folder)
    prompts = folder_prompts(images, str(tmp_path / "prompts.txt"))
    args = argparse.Namespace(batch_size=2, quiet=True)
    scores, grid = score_folder(images, prompts, MetricScorer(f"{rewards}:redness"), args)
    expected = torch.tensor(reds, dtype=torch.double) / 255
    assert torch.allclose(scores.rewards[f"{rewards}:redness"], expected)
    assert grid.shape == (3, 3, 16, 16)  # the grid keeps the first size's images


def test_eval_on_folders_refuses_what_it_cannot_measure(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{index}.png")
    base = ["eval", "--images", str(folder), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="need each image's prompt"):
        main([*base, "--metrics", "shapes"])
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(SystemExit, match="holds 2 prompts for the 3 images"):
        main([*base, "--metrics", "shapes", "--prompts", str(tmp_path / "two.txt")])
    with pytest.raises(SystemExit, match="samples no model: drop --model"):
        main([*base, "--metrics", "shapes", "--model", "diffalign:tiny-shapes"])
    with pytest.raises(SystemExit, match="drop --lora, --guidance-scale, --sampler"):
        main([*base, "--metrics", "shapes", "--lora", "a.safetensors", "--guidance-scale", "2",
              "--sampler", "dts"])  # fmt: skip
    with pytest.raises(SystemExit, match="--images nowhere is not a folder"):
        main(["eval", "--images", "nowhere", "--metrics", "shapes", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="give --model and --prompts"):
        main(["eval", "--metrics", "shapes", "--out", str(tmp_path)])
