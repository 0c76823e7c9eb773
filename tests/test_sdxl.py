"""What is particular to SDXL (time ids, the refiner, its float16 VAE, the sdxl-random bench
model), on a tiny SDXL pipeline built offline; what SDXL shares with SD3 (trainers, loading, tree
search, sampling, the bench) is in ``test_model_families.py``."""

import json

import pytest
import torch

from diffalign.models import (
    UnsupportedModelError,
    build_tiny_sdxl_pipeline,
    load_pipeline,
)
from diffalign.pipelines.rollout import RolloutPipeline, rollout_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture()
def sdxl():
    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_sdxl_rollouts_carry_the_time_ids_of_an_uncropped_image(sdxl):
    pipeline = rollout_pipeline(sdxl)
    pipeline.set_progress_bar_config(disable=True)
    rollout = pipeline(PROMPTS, num_inference_steps=2, guidance_scale=3.0, decode=False)
    # (original size, crop corner, target size) at the tiny model's 32 px, one row per sample
    assert rollout.add_time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    assert rollout.conditioning([1]).time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]


def test_the_sdxl_refiner_is_refused_with_what_runs(sdxl_folder, tmp_path):
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    index = json.loads((sdxl_folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="SDXL refiner"):
        load_pipeline(refiner, RolloutPipeline)


def test_a_float16_sdxl_vae_decodes_in_float32_and_stays_float16(sdxl):
    from diffalign.pipelines.rollout import decode_latents

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sdxl.vae.to(torch.float16)
    images = decode_latents(sdxl, latents)
    assert sdxl.vae.dtype == torch.float16 and images.dtype == torch.float32
    sdxl.vae.to(torch.float32)  # the same (float16-rounded) weights, decoding in float32
    expected = decode_latents(sdxl, latents)
    torch.testing.assert_close(images, expected, atol=0, rtol=0)


def test_the_sdxl_random_benchmark_model_has_sdxl_base_sizes_and_its_parts_fit():
    from diffalign.benchmarks.rollout import build_sdxl_random_pipeline
    from diffalign.pipelines.conditioning import encode_conditioning
    from diffalign.pipelines.rollout import guided_noise_prediction

    meta = torch.device("meta")  # shapes only: no memory, no arithmetic
    pipeline = build_sdxl_random_pipeline(meta)
    sizes = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
             for name in ("unet", "text_encoder", "text_encoder_2")}  # fmt: skip
    assert sizes["unet"] == 2_567_463_684 and sizes["text_encoder_2"] == 694_659_840
    conditioning, negative = encode_conditioning(pipeline, PROMPTS, meta, 1, True, None, 1024, 1024)
    assert conditioning.embeds.shape == (2, 77, 2048) and conditioning.pooled.shape == (2, 1280)
    latents = torch.zeros(2, 4, 128, 128, device=meta)
    timestep = torch.tensor(999, device=meta)
    prediction = guided_noise_prediction(
        pipeline.unet, latents, timestep, conditioning, negative, 5.0
    )
    assert prediction.shape == latents.shape
