"""What is particular to Stable Diffusion 3 (an MMDiT transformer, flow matching, two CLIP
encoders and here no T5), on a tiny SD3 pipeline built offline; what SD3 shares with SDXL
(trainers, loading, tree search, sampling, the bench) is in ``test_model_families.py``."""

import pytest
import torch

from diffalign.models import (
    build_tiny_sd3_pipeline,
)
from diffalign.pipelines.conditioning import Conditioning
from diffalign.pipelines.rollout import (
    decode_latents,
    rollout_pipeline,
)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture()
def sd3():
    return build_tiny_sd3_pipeline(seed=0)


def test_sd3_rollouts_carry_pooled_embeddings_and_no_time_ids(sd3):
    pipeline = rollout_pipeline(sd3)
    pipeline.set_progress_bar_config(disable=True)
    rollout = pipeline(PROMPTS, num_inference_steps=2, guidance_scale=3.0, decode=False)
    # two CLIP encoders' pooled projections joined (32 + 32); 77 CLIP tokens + 256 in T5's place
    assert rollout.pooled_prompt_embeds.shape == (2, 64) and rollout.add_time_ids is None
    assert rollout.prompt_embeds.shape == (2, 333, 64)
    assert rollout.conditioning([1]).for_transformer


def test_the_sd3_vae_decodes_with_its_scale_and_shift(sd3):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    config = sd3.vae.config
    with torch.no_grad():
        raw = sd3.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
        images = decode_latents(sd3, latents)
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))


def test_sd3_conditioning_calls_the_transformer_and_refuses_a_unet_call(sd3):
    conditioning = Conditioning(torch.zeros(2, 333, 64), torch.zeros(2, 64))
    latents = torch.zeros(2, 4, 16, 16)
    assert conditioning.predict(sd3.transformer, latents, torch.tensor(500.0)).shape == (
        2,
        4,
        16,
        16,
    )
    with pytest.raises(ValueError, match="SD3's conditioning"):
        conditioning.unet_kwargs()
    with pytest.raises(ValueError, match="pooled embeddings with its time ids"):
        Conditioning(torch.zeros(2, 77, 32), time_ids=torch.zeros(2, 6))


def test_the_sd35_random_benchmark_model_has_sd35_medium_sizes_and_its_parts_fit():
    from diffalign.benchmarks.rollout import build_sd35_random_pipeline
    from diffalign.pipelines.conditioning import encode_conditioning
    from diffalign.pipelines.rollout import guided_noise_prediction

    meta = torch.device("meta")  # shapes only: no memory, no arithmetic
    pipeline = build_sd35_random_pipeline(meta)
    sizes = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
             for name in ("transformer", "text_encoder_2")}  # fmt: skip
    assert sizes["transformer"] == 2_243_171_520 and sizes["text_encoder_2"] == 694_659_840
    conditioning, negative = encode_conditioning(pipeline, PROMPTS, meta, 1, True)
    # 77 CLIP tokens + 256 in T5's place, 4096 wide; the two pooled embeddings, 768 + 1280
    assert conditioning.embeds.shape == (2, 333, 4096) and conditioning.pooled.shape == (2, 2048)
    latents = torch.zeros(2, 16, 64, 64, device=meta)  # 512 px, the AWM paper's size
    prediction = guided_noise_prediction(
        pipeline.transformer,
        latents,
        torch.tensor(1000.0, device=meta),
        conditioning,
        negative,
        4.5,
    )
    assert prediction.shape == latents.shape
