"""The rollout pipeline: same images as diffusers, log-probs that recompute, no extra UNet calls."""

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from diffalign.pipelines.rollout import Rollout, RolloutPipeline, guided_noise_prediction
from diffalign.sampling import NoiseSchedule, ddim_step_log_prob

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]


@pytest.fixture()
def rollout_pipeline(tiny_pipeline):
    pipeline = RolloutPipeline(**tiny_pipeline.components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_images_equal_stable_diffusion_with_ddim_under_the_same_seed(rollout_pipeline, eta):
    reference = StableDiffusionPipeline(**rollout_pipeline.components)
    reference.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 5, "guidance_scale": 3.0, "eta": eta,
              "num_images_per_prompt": 2}  # fmt: skip
    expected = reference(PROMPTS, generator=_generator(), output_type="pt", **kwargs).images
    rollout = rollout_pipeline(PROMPTS, generator=_generator(), **kwargs)
    torch.testing.assert_close(rollout.images, expected, atol=1e-6, rtol=0)


def test_rollout_records_the_chain_and_log_probs_that_recompute(rollout_pipeline):
    rollout = rollout_pipeline(PROMPTS, num_inference_steps=4, guidance_scale=3.0, eta=1.0,
                               num_images_per_prompt=2, generator=_generator(1))  # fmt: skip
    assert len(rollout) == 4 and rollout.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert rollout.latents.shape == (4, 5, 4, 16, 16) and rollout.timesteps.shape == (4,)
    assert rollout.log_probs.shape == (4, 4) and rollout.log_probs.dtype == torch.float32
    assert rollout.images.shape == (4, 3, 32, 32) and rollout.images.min() >= 0
    assert rollout.prompt_embeds.shape[0] == rollout.negative_prompt_embeds.shape[0] == 4
    torch.testing.assert_close(rollout_pipeline.decode_to_images(rollout.latents[:, -1]),
                               rollout.images)  # fmt: skip
    schedule = NoiseSchedule.from_scheduler(rollout_pipeline.scheduler)
    unet = rollout_pipeline.unet
    for i, t in enumerate(rollout.timesteps):
        both = unet(torch.cat([rollout.latents[:, i]] * 2), t,
                    encoder_hidden_states=torch.cat([rollout.negative_prompt_embeds,
                                                     rollout.prompt_embeds])).sample  # fmt: skip
        uncond, cond = both.chunk(2)
        noise_pred = uncond + 3.0 * (cond - uncond)
        log_prob = ddim_step_log_prob(
            noise_pred, t, rollout.latents[:, i], rollout.latents[:, i + 1], schedule,
            schedule.previous_timestep(t, 4), eta=1.0,
        )  # fmt: skip
        torch.testing.assert_close(log_prob, rollout.log_probs[:, i], atol=1e-4, rtol=1e-4)


def test_recording_costs_no_extra_unet_calls(rollout_pipeline):
    calls = []
    hook = rollout_pipeline.unet.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    rollout_pipeline(PROMPTS, num_inference_steps=3, guidance_scale=3.0)
    rollout_pipeline(PROMPTS, num_inference_steps=3, guidance_scale=1.0)
    hook.remove()
    assert [shape[0] for shape in calls] == [4, 4, 4, 2, 2, 2]  # CFG is one doubled batch


def test_the_chain_calls_the_chain_denoiser_when_one_is_set(rollout_pipeline):
    expected = rollout_pipeline(PROMPTS, num_inference_steps=3, eta=1.0, generator=_generator())
    calls = []

    class Counted(torch.nn.Module):  # stands in for a compiled wrapper of the same UNet
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, *args, **kwargs):
            calls.append(len(args[0]))
            return self.unet(*args, **kwargs)

    rollout_pipeline.chain_denoiser = Counted(rollout_pipeline.unet)
    rollout = rollout_pipeline(PROMPTS, num_inference_steps=3, eta=1.0, generator=_generator())
    assert calls == [4, 4, 4]
    torch.testing.assert_close(rollout.latents, expected.latents, atol=0, rtol=0)


def test_bench_times_compiled_rollouts_beside_eager_ones(rollout_pipeline):
    from diffalign.benchmarks.rollout import time_sampling

    graphs = []

    def backend(graph, example_inputs):  # dynamo's capture, run as captured
        graphs.append(graph)
        return graph.forward

    results = time_sampling(rollout_pipeline, PROMPTS, 2, 3.0, 1.0, 2, torch.device("cpu"),
                            compile_backend=backend)  # fmt: skip
    assert graphs  # the compiled chains called the compiled denoiser
    assert results["throughput_ratio_compiled_vs_eager"] > 0
    assert results["compiled_rollout_images_per_s"] > 0
    assert results["first_compiled_call_seconds"] > 0
    assert rollout_pipeline.chain_denoiser is None  # the eager runs call the UNet itself


def test_eta_zero_has_no_log_probs_and_other_schedulers_become_ddim(rollout_pipeline):
    rollout_pipeline.scheduler = PNDMScheduler.from_config(rollout_pipeline.scheduler.config)
    rollout = rollout_pipeline(PROMPTS, num_inference_steps=2, eta=0.0, decode=False)
    assert rollout.log_probs is None and rollout.images is None
    assert type(rollout_pipeline.scheduler).__name__ == "DDIMScheduler"


def test_select_and_concat_keep_samples_together(rollout_pipeline):
    rollout = rollout_pipeline(PROMPTS, num_inference_steps=2, num_images_per_prompt=2)
    picked = rollout.select([3, 0])
    assert picked.prompts == [PROMPTS[1], PROMPTS[0]]
    torch.testing.assert_close(picked.latents[0], rollout.latents[3])
    torch.testing.assert_close(picked.log_probs[1], rollout.log_probs[0])
    mask = torch.tensor([True, False, False, True])
    joined = Rollout.concat([rollout.select(mask), rollout.select(slice(1, 3))])
    assert joined.prompts == [rollout.prompts[i] for i in (0, 3, 1, 2)]
    torch.testing.assert_close(joined.images, rollout.images[[0, 3, 1, 2]])
    assert torch.equal(joined.timesteps, rollout.timesteps)


@pytest.fixture()
def flow_pipeline():
    from diffalign.models import build_tiny_pipeline

    pipeline = RolloutPipeline(**build_tiny_pipeline(seed=0, flow_shift=3.0).components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _guided(unet, latents, t, rollout, scale=3.0):
    states = torch.cat([rollout.negative_prompt_embeds, rollout.prompt_embeds])
    uncond, cond = unet(torch.cat([latents] * 2), t, encoder_hidden_states=states).sample.chunk(2)
    return uncond + scale * (cond - uncond)


def test_flow_model_keeps_its_scheduler_and_equals_diffusers_euler_steps(flow_pipeline):
    from diffusers import FlowMatchEulerDiscreteScheduler

    rollout = flow_pipeline(PROMPTS, num_inference_steps=4, guidance_scale=3.0, eta=0.0,
                            generator=_generator(2))  # fmt: skip
    assert isinstance(flow_pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert rollout.log_probs is None and rollout.timesteps[0] == 1000
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(4)
    latents = draw = torch.randn(2, 4, 16, 16, generator=_generator(2))
    torch.testing.assert_close(rollout.latents[:, 0], draw)
    with torch.no_grad():
        for t in reference.timesteps:
            latents = reference.step(_guided(flow_pipeline.unet, latents, t, rollout), t,
                                     latents).prev_sample  # fmt: skip
    torch.testing.assert_close(rollout.latents[:, -1], latents, atol=1e-6, rtol=0)


def test_flow_model_sde_rollout_log_probs_recompute(flow_pipeline):
    from diffalign.sampling import load_schedule

    rollout = flow_pipeline(PROMPTS, num_inference_steps=3, guidance_scale=3.0, eta=0.7,
                            generator=_generator(3))  # fmt: skip
    schedule = load_schedule(flow_pipeline.scheduler)
    landing = schedule.following_timesteps(rollout.timesteps, 3)
    assert rollout.log_probs.shape == (2, 3)
    with torch.no_grad():
        for i, t in enumerate(rollout.timesteps):
            velocity = _guided(flow_pipeline.unet, rollout.latents[:, i], t, rollout)
            step = schedule.step(velocity, t, rollout.latents[:, i], landing[i], eta=0.7,
                                 prev_sample=rollout.latents[:, i + 1])  # fmt: skip
            torch.testing.assert_close(step.log_prob, rollout.log_probs[:, i], atol=1e-4,
                                       rtol=1e-4)  # fmt: skip


def test_bench_rollout_refuses_a_flow_model_it_cannot_compare(flow_pipeline):
    from diffalign.benchmarks.rollout import time_sampling
    from diffalign.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="cannot step a flow-matching scheduler"):
        time_sampling(flow_pipeline, ["x"], 2, 1.0, 0.0, 1, torch.device("cpu"))


def test_plain_sampling_of_a_flow_model_uses_the_rollout_pipeline(flow_pipeline):
    from diffusers import StableDiffusionPipeline

    from diffalign.pipelines.rollout import plain_sampling_pipeline, sample_images

    plain = StableDiffusionPipeline(**flow_pipeline.components, requires_safety_checker=False)
    sampler = plain_sampling_pipeline(plain)
    assert isinstance(sampler, RolloutPipeline) and sampler.unet is plain.unet
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0}
    images = sample_images(sampler, "x", generator=torch.Generator().manual_seed(0), **kwargs)
    expected = flow_pipeline("x", eta=0.0, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(images, expected.images)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_repeated_prompts_are_encoded_once_each_and_give_the_same_conditioning(family):
    from diffalign.models import (
        build_tiny_pipeline,
        build_tiny_sd3_pipeline,
        build_tiny_sdxl_pipeline,
    )
    from diffalign.pipelines.conditioning import _encode, encode_conditioning

    build = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline,
             "sd3": build_tiny_sd3_pipeline}[family]  # fmt: skip
    pipeline = build(seed=0)
    rows = [0]
    pipeline.text_encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.__setitem__(0, rows[0] + len(args[0] if args else
                                                                    kwargs["input_ids"])),
        with_kwargs=True,
    )  # fmt: skip
    prompts = ["a red circle"] * 3 + ["two blue squares"] * 3
    cpu = torch.device("cpu")
    with torch.no_grad():
        positive, negative = encode_conditioning(pipeline, prompts, cpu, 2, True)
        # the two distinct prompts, and their negatives but for SDXL's zeros for empty ones
        assert rows[0] == (2 if family == "sdxl" else 2 + 2)
        expected, expected_negative = _encode(pipeline, prompts, cpu, 2, True, None, None, None, {})
    for mine, theirs in [(positive, expected), (negative, expected_negative)]:
        for name in ("embeds", "pooled", "time_ids"):
            if getattr(theirs, name) is not None:  # equal up to batched float summation
                torch.testing.assert_close(getattr(mine, name), getattr(theirs, name))
    assert len(positive) == len(negative) == 12


def test_prompts_are_encoded_where_the_text_encoders_are_and_handed_over(rollout_pipeline):
    from diffalign.pipelines.conditioning import encode_conditioning

    rollout_pipeline.text_encoder_device = torch.device("cpu")  # as offload_text_encoders sets
    meta = torch.device("meta")  # stands for the accelerator: no arithmetic happens there
    with torch.no_grad():
        positive, negative = encode_conditioning(rollout_pipeline, ["a red circle"], meta, 2, True)
    assert positive.embeds.device == negative.embeds.device == meta
    assert positive.embeds.shape == (2, 77, 32)


def test_stochastic_steps_sample_only_those_at_eta(rollout_pipeline):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0}
    window = rollout_pipeline(PROMPTS, eta=1.0, generator=_generator(), stochastic_steps=[1, 2],
                              **kwargs)  # fmt: skip
    deterministic = rollout_pipeline(PROMPTS, eta=0.0, generator=_generator(), **kwargs)
    assert window.stochastic_steps == (1, 2)
    # the same start and first (deterministic) step; the window then departs from eta 0
    torch.testing.assert_close(window.latents[:, :2], deterministic.latents[:, :2])
    assert not torch.allclose(window.latents[:, 3], deterministic.latents[:, 3])
    assert window.log_probs[:, [0, 3]].isnan().all() and window.log_probs[:, 1:3].isfinite().all()
    schedule = NoiseSchedule.from_scheduler(rollout_pipeline.scheduler)
    for i in (1, 2):  # the window's log-probs recompute from the stored transitions
        t = window.timesteps[i]
        with torch.no_grad():
            noise_pred = guided_noise_prediction(
                rollout_pipeline.unet, window.latents[:, i], t, window.conditioning(),
                window.negative_conditioning(), 3.0,
            )  # fmt: skip
        recomputed = ddim_step_log_prob(noise_pred, t, window.latents[:, i],
                                        window.latents[:, i + 1], schedule,
                                        schedule.previous_timestep(t, 4), eta=1.0)  # fmt: skip
        torch.testing.assert_close(recomputed, window.log_probs[:, i], atol=1e-4, rtol=1e-4)
    assert window.select([1]).stochastic_steps == (1, 2)
    with pytest.raises(ValueError, match="stochastic_steps must be chain positions"):
        rollout_pipeline(PROMPTS, eta=1.0, stochastic_steps=[4], **kwargs)
