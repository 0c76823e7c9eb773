"""Samplers and log-probs on a v-prediction, zero-terminal-SNR schedule (alpha_bar = 0 at t=999).

The shipped world model (v2) starts every chain at pure noise; nothing may divide by alpha_bar.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffalign.models import sd_ddim_scheduler
from diffalign.pipelines.dts import SEARCH_SAMPLERS, DTSPipeline
from diffalign.pipelines.rollout import RolloutPipeline
from diffalign.sampling import NoiseSchedule, ddim_step_log_prob

PROMPTS = ["a red circle", "a blue square above a green triangle"]


def zero_snr_components(pipeline) -> dict:
    scheduler = sd_ddim_scheduler("v_prediction", zero_terminal_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0
    return {**pipeline.components, "scheduler": scheduler}


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_rollout_images_equal_diffusers_from_the_pure_noise_step(tiny_pipeline, eta):
    components = zero_snr_components(tiny_pipeline)
    rollout_pipeline = RolloutPipeline(**components)
    reference = StableDiffusionPipeline(**components)
    for pipeline in (rollout_pipeline, reference):
        pipeline.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0, "eta": eta}
    expected = reference(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt",
                         **kwargs).images  # fmt: skip
    rollout = rollout_pipeline(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert rollout.timesteps[0] == 999
    assert torch.isfinite(rollout.latents).all()
    torch.testing.assert_close(rollout.images, expected, atol=1e-6, rtol=0)


def test_log_probs_are_finite_and_recompute_at_the_pure_noise_step(tiny_pipeline):
    pipeline = RolloutPipeline(**zero_snr_components(tiny_pipeline))
    pipeline.set_progress_bar_config(disable=True)
    rollout = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=1.0, eta=1.0,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.isfinite(rollout.log_probs).all()
    schedule = NoiseSchedule.from_scheduler(pipeline.scheduler)
    t = rollout.timesteps[0]
    prediction = pipeline.unet(rollout.latents[:, 0], t, rollout.prompt_embeds).sample
    log_prob = ddim_step_log_prob(
        prediction, t, rollout.latents[:, 0], rollout.latents[:, 1], schedule,
        schedule.previous_timestep(t, 3), eta=1.0,
    )  # fmt: skip
    torch.testing.assert_close(log_prob, rollout.log_probs[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", SEARCH_SAMPLERS)
def test_search_samplers_stay_finite(tiny_pipeline, sampler):
    pipeline = DTSPipeline(**zero_snr_components(tiny_pipeline), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(PROMPTS[0], lambda images, _: images.mean(dim=(1, 2, 3)), budget_nfe=32,
                   sampler=sampler, num_inference_steps=4, guidance_scale=2.0,
                   output_type="pt")  # fmt: skip
    assert torch.isfinite(out.images).all() and torch.isfinite(out.rewards).all()
