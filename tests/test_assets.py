"""The shipped world models load offline with the standard loaders and do their job."""

from pathlib import Path

import pytest
import torch

from diffalign.world import recorded_guidance_scale, shipped_model_path

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_assets_stay_small():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 25 * 2**20, f"assets/ holds {total / 2**20:.1f} MB"


def test_tiny_shapes_loads_like_stable_diffusion():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffalign.models import load_pipeline

    path = shipped_model_path("tiny-shapes")
    direct = StableDiffusionPipeline.from_pretrained(path)
    ours = load_pipeline(path)
    assert isinstance(ours, StableDiffusionPipeline) and isinstance(ours.scheduler, DDIMScheduler)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    assert ours.scheduler.config.rescale_betas_zero_snr
    assert ours.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for a, b in zip(direct.unet.parameters(), ours.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert recorded_guidance_scale(path) == 4.5  # chosen on the validation split (model card)


def test_tiny_shapes_draws_single_objects_well():
    from diffalign.models import load_pipeline
    from diffalign.world.evaluate import evaluate_prompts, generate, heldout_prompts
    from diffalign.world.grammar import parse_caption

    path = shipped_model_path("tiny-shapes")
    pipeline = load_pipeline(path)
    pipeline.set_progress_bar_config(disable=True)
    scale = recorded_guidance_scale(path)
    prompts = [p for p in heldout_prompts(60) if len(parse_caption(p).objects) == 1][:6]
    images = generate(pipeline, prompts, samples_per_prompt=2, steps=25, guidance_scale=scale,
                      quiet=True)  # fmt: skip
    summary = evaluate_prompts(images, prompts, samples_per_prompt=2)
    # A random-weight pipeline scores ~0; the shipped model is measured at >= 0.8 (model card).
    assert summary["shapes_mean"] >= 0.5, summary


def test_tiny_clip_retrieves_captions():
    from transformers import CLIPModel, CLIPProcessor

    from diffalign.world.clip import retrieval_accuracy

    path = shipped_model_path("tiny-clip")
    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    assert retrieval_accuracy(model, processor.tokenizer, num_queries=128) >= 0.6


@pytest.mark.parametrize("name", ["tiny-shapes", "tiny-clip"])
def test_model_cards_are_present(name):
    card = (shipped_model_path(name) / "README.md").read_text()
    assert "diffalign world" in card and "Measured" in card
