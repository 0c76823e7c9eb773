"""The diffalign command line: help, version, and the commands that exist today."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign import __version__
from diffalign.cli import build_parser, discover_commands, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    for module in discover_commands():
        assert module.NAME in text
    assert {"bench", "sample"} <= {m.NAME for m in discover_commands()}


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).with_name("diffalign")
    assert script.exists(), "the diffalign console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in ([str(script), "--version"], [sys.executable, "-m", "diffalign", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"diffalign {__version__}"


def test_the_command_line_starts_without_importing_torch():
    # every command's options are built at start-up: --help and --version stay fast (0.15 s,
    # not the 8.7 s it took while the parser imported torch and diffusers for choice lists)
    code = (
        "import sys; from diffalign.cli import build_parser; build_parser(); "
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_attention_writes_ratios(tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "bench",
        "attention",
        "--out",
        str(out),
        "--models",
        "tiny-unet",
        "--device",
        "cpu",
        "--tiny-batch-size",
        "2",
        "--tiny-resolution",
        "16",
        "--warmup",
        "0",
        "--repeats",
        "1",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    timings = metrics["results"]["timings"]
    cells = {(t["backend"], t["mode"]) for t in timings}
    assert cells == {
        (b, m) for b in ("classic", "sdpa", "sdpa+fused") for m in ("forward", "forward+backward")
    }
    for timing in timings:
        assert timing["median_ms"] > 0 and timing["speedup_vs_classic"] > 0
        assert timing["max_abs_diff_vs_classic"] < 1e-4
    assert metrics["environment"]["torch"] and metrics["results"]["settings"]["dtype"] == "float32"
    assert "sdpa+fused" in capsys.readouterr().out


def test_bench_rejects_unknown_models(tmp_path):
    with pytest.raises(SystemExit, match="unknown --models"):
        main(["bench", "attention", "--out", str(tmp_path), "--models", "sdxl"])


def test_sample_tiny_random_writes_images_grid_and_metrics(tmp_path):
    out = tmp_path / "sample"
    args = [
        "sample",
        "--model",
        "diffalign:tiny-random",
        "--prompt",
        "a red circle",
        "--prompt",
        "two blue squares",
        "--num-images-per-prompt",
        "2",
        "--steps",
        "3",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())["results"]
    assert metrics["num_images"] == 4
    assert metrics["unet_evaluations"] == 3  # one CFG-batched UNet call per step
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"000{i}.png" for i in range(4)]
    assert Image.open(out / "images" / "0000.png").size == (32, 32)
    assert Image.open(out / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)


def test_sample_runs_batch_size_images_a_call_and_the_same_images_at_any_eta(tmp_path):
    prompts = [arg for text in ("a red circle", "two blue squares", "a green triangle")
               for arg in ("--prompt", text)]  # fmt: skip
    pixels = {}
    calls = {"1": 6, "2": 3, "8": 1}  # 6 images; at 1 a prompt's two images take two calls
    for batch_size in calls:
        out = tmp_path / batch_size
        assert main(["sample", "--model", "diffalign:tiny-random", *prompts, "--steps", "3",
                     "--num-images-per-prompt", "2", "--batch-size", batch_size, "--quiet",
                     "--out", str(out)]) == 0  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())["results"]
        assert metrics["unet_evaluations"] == 3 * calls[batch_size]  # calls x steps
        pixels[batch_size] = [np.asarray(Image.open(f)) for f in sorted(out.glob("images/*.png"))]
    assert len(pixels["2"]) == 6
    for size in ("1", "2"):  # the same noise; float rounding of other batch shapes, ~1e-6
        for a, b in zip(pixels[size], pixels["8"], strict=True):
            assert np.abs(a.astype(int) - b).max() <= 1
    # at eta > 0 each image draws its starting and step noise from its own stream
    noisy = {}
    for batch_size in ("1", "4"):
        out = tmp_path / f"eta-{batch_size}"
        assert main(["sample", "--model", "diffalign:tiny-random", *prompts, "--steps", "3",
                     "--num-images-per-prompt", "2", "--batch-size", batch_size, "--eta", "1",
                     "--quiet", "--out", str(out)]) == 0  # fmt: skip
        noisy[batch_size] = [np.asarray(Image.open(f)) for f in sorted(out.glob("images/*.png"))]
    for a, b, plain in zip(noisy["1"], noisy["4"], pixels["8"], strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1
        assert np.abs(a.astype(int) - plain).max() > 1  # the steps' noise shows
    with pytest.raises(SystemExit, match="--batch-size must be at least 1"):
        main(["sample", "--model", "diffalign:tiny-random", *prompts, "--batch-size", "0",
              "--out", str(tmp_path / "0")])  # fmt: skip


def test_sample_needs_a_prompt(tmp_path):
    with pytest.raises(SystemExit, match="at least one --prompt"):
        main(["sample", "--model", "diffalign:tiny-random", "--out", str(tmp_path)])


def test_every_command_has_help_text():
    parser = build_parser()
    for module in discover_commands():
        assert module.HELP and module.__doc__
        assert callable(module.add_arguments) and callable(module.run)
    assert parser.prog == "diffalign"


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    args = ["sample", "--model", "someone/not-cached", "--prompt", "x", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "diffalign sample: error: Model 'someone/not-cached' is not available" in err
    assert "Traceback" not in err


def test_flow_models_sample_plainly_with_euler_steps_and_search(tmp_path):
    import numpy as np
    import torch

    from diffalign.models import build_tiny_pipeline
    from diffalign.pipelines.rollout import RolloutPipeline

    build_tiny_pipeline(seed=0, flow_shift=3.0).save_pretrained(tmp_path / "flow")
    common = ["sample", "--model", str(tmp_path / "flow"), "--prompt", "x", "--steps", "2",
              "--quiet"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "ddim")]) == 0
    saved = np.asarray(Image.open(tmp_path / "ddim" / "images" / "0000.png"), dtype=np.float32)
    euler = RolloutPipeline.from_pretrained(tmp_path / "flow")(
        "x", num_inference_steps=2, guidance_scale=7.5, eta=0.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    expected = euler.permute(1, 2, 0).numpy() * 255
    assert np.abs(saved - expected).max() <= 1.0  # PNG rounding only
    search = ["--sampler", "dts-star", "--reward", "jpeg_compressibility", "--budget-nfe", "16",
              "--eta", "0.7", "--out", str(tmp_path / "dts")]  # fmt: skip
    assert main([*common, *search]) == 0
    results = json.loads((tmp_path / "dts" / "metrics.json").read_text())["results"]
    assert results["nfe"] <= 16 and results["search"][0]["samples"] >= 2


@pytest.mark.parametrize(
    "command",
    [["train", "awm", "--out", "D"], ["world", "pretrain", "--out", "D"]],
    ids=["train", "world-pretrain"],
)
def test_set_takes_several_overrides_after_one_flag_or_the_flag_repeated(command):
    parser = build_parser()
    together = parser.parse_args([*command, "--set", "a=1", "b=2", "--set", "c=3"])
    apart = parser.parse_args([*command, "--set", "a=1", "--set", "b=2", "--set", "c=3"])
    assert together.set == apart.set == ["a=1", "b=2", "c=3"]
