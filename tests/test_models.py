"""Loading and saving SD-family pipelines, offline (LoRA on them: test_lora.py)."""

import json

import pytest
import torch

from diffalign import models


def sample(pipeline, seed=0):
    return pipeline(
        "a red circle",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_offline_tokenizer_matches_stable_diffusion_ids(clip_tokenizer):
    assert len(clip_tokenizer) == 49408
    ids = clip_tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip_tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_tiny_pipeline_is_seeded_and_samples_images(tiny_pipeline):
    from diffusers import StableDiffusionPipeline

    assert isinstance(tiny_pipeline, StableDiffusionPipeline)
    images = sample(tiny_pipeline)
    assert images.shape == (1, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    again = models.build_tiny_pipeline(seed=0)
    other = models.build_tiny_pipeline(seed=1)
    torch.testing.assert_close(sample(again), images)
    assert not torch.allclose(sample(other), images)


def test_save_and_load_round_trip_offline(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    loaded = models.load_pipeline(tmp_path)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.safety_checker is None
    torch.testing.assert_close(sample(loaded), sample(tiny_pipeline), rtol=0, atol=0)


def test_load_pipeline_sets_the_dtype_without_a_deprecation_warning(tiny_pipeline, tmp_path):
    import warnings

    tiny_pipeline.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype", category=FutureWarning)
        loaded = models.load_pipeline(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16


def test_load_pipeline_with_a_diffalign_subclass(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    class MyPipeline(StableDiffusionPipeline):
        pass

    tiny_pipeline.save_pretrained(tmp_path)
    assert isinstance(models.load_pipeline(tmp_path, pipeline_cls=MyPipeline), MyPipeline)


def test_missing_hub_model_fails_fast_with_instructions(monkeypatch, recwarn):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailableError) as info:
        models.load_pipeline("someone/not-a-cached-model")
    # diffusers passes huggingface_hub an argument it deprecated: nothing a user can act on
    assert not [w for w in recwarn if "local_dir_use_symlinks" in str(w.message)]
    message = str(info.value)
    assert "someone/not-a-cached-model" in message
    assert "HF_HUB_OFFLINE" in message and "--local-dir" in message


def test_unreachable_hub_is_detected_without_the_offline_setting(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=3.0: False)
    with pytest.raises(models.ModelNotAvailableError, match="cannot be reached"):
        models.load_pipeline("someone/not-a-cached-model")


def test_local_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        models.load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such model folder"):
        models.load_pipeline(tmp_path / "missing" / "deeper")


def write_flux_like_folder(folder):
    index = {
        "_class_name": "FluxPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))


def test_a_transformer_model_is_refused_by_unet_pipelines_with_the_reason(tmp_path):
    from diffalign.pipelines.rollout import RolloutPipeline

    write_flux_like_folder(tmp_path)
    with pytest.raises(models.UnsupportedModelError) as info:
        models.load_pipeline(tmp_path, pipeline_cls=RolloutPipeline)
    message = str(info.value)
    assert "FluxPipeline" in message and "Stable Diffusion 3 / 3.5" in message
    assert "RolloutPipeline" in message and "FLUX, ...) are not supported yet" in message


@pytest.mark.parametrize(
    "command",
    [
        ["train", "awm", "--recipe", "tiny-shapes", "--set", "model={model}", "--out", "{out}"],
        ["sample", "--model", "{model}", "--prompt", "a red circle", "--out", "{out}"],
        ["world", "eval", "--model", "{model}", "--out", "{out}"],
    ],
)
def test_cli_reports_an_unsupported_model_in_one_line(tmp_path, capsys, command):
    from diffalign.cli import main

    write_flux_like_folder(tmp_path)
    argv = [part.format(model=tmp_path, out=tmp_path / "run") for part in command]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "error:" in error and "FLUX" in error and "Traceback" not in error


def test_hub_probe_answers_for_open_and_closed_ports(monkeypatch):
    import socket

    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        models.hub_is_reachable.cache_clear()
        assert models.hub_is_reachable(timeout=2.0) is True
    finally:
        server.close()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    models.hub_is_reachable.cache_clear()
    assert models.hub_is_reachable(timeout=1.0) is False
    models.hub_is_reachable.cache_clear()


def test_compact_tokenizer_folder_loads_back_with_the_same_ids(clip_tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    models.save_clip_tokenizer(clip_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 1.5 * 2**20
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = ["two red circles left of an orange square on a white background", "a photo of a cat"]
    expected = clip_tokenizer(text, padding="max_length", max_length=77).input_ids
    assert loaded(text, padding="max_length", max_length=77).input_ids == expected
    assert loaded.model_max_length == 77 and len(loaded) == 49408
