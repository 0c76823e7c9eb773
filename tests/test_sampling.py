"""The denoising-step math against diffusers' DDIMScheduler and closed-form densities."""

import math

import pytest
import torch

from diffalign import sampling
from diffalign.models import sd_ddim_scheduler
from diffalign.sampling import NoiseSchedule


def make_scheduler(prediction_type="epsilon", **kwargs):
    return sd_ddim_scheduler(prediction_type, **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_deterministic_step_equals_diffusers_exactly(prediction_type):
    scheduler = make_scheduler(prediction_type)
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps.tolist():
        output = torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
        ours = sampling.ddim_step(output, t, sample, schedule, schedule.previous_timestep(t, 10))
        assert torch.equal(ours.prev_sample, expected)
        assert ours.log_prob is None
        sample = expected


def test_stochastic_step_equals_diffusers_with_same_noise():
    scheduler = make_scheduler()
    scheduler.set_timesteps(20)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(3, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps.tolist()[:5] + scheduler.timesteps.tolist()[-2:]:
        output, noise = torch.randn(2, 3, 4, 8, 8, generator=gen)
        expected = scheduler.step(output, t, sample, eta=0.7, variance_noise=noise).prev_sample
        ours = sampling.ddim_step(
            output, t, sample, schedule, schedule.previous_timestep(t, 20), eta=0.7, noise=noise
        )
        torch.testing.assert_close(ours.prev_sample, expected, rtol=0, atol=1e-6)
        assert ours.log_prob.shape == (3,)


def test_clip_sample_matches_diffusers():
    scheduler = make_scheduler(prediction_type="sample", clip_sample_range=0.5)
    scheduler.register_to_config(clip_sample=True)
    scheduler.set_timesteps(5)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.clip_sample_range == 0.5
    sample, output = 3 * torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = int(scheduler.timesteps[1])
    expected = scheduler.step(output, t, sample).prev_sample
    ours = sampling.ddim_step(output, t, sample, schedule, schedule.previous_timestep(t, 5))
    assert torch.equal(ours.prev_sample, expected)
    assert ours.pred_original_sample.abs().max() <= 0.5


def closed_form_log_density(x, mean, std):
    """Per-dimension Gaussian log density in float64, written out independently."""
    x, mean, std = x.double(), mean.double(), torch.as_tensor(std).double()
    return torch.log(
        1.0 / (std * math.sqrt(2 * math.pi)) * torch.exp(-0.5 * ((x - mean) / std) ** 2)
    )


def test_step_log_prob_matches_float64_closed_form():
    scheduler = make_scheduler()
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(3)
    sample, output = torch.randn(2, 2, 4, 3, 3, generator=gen)
    t = int(scheduler.timesteps[3])
    out = sampling.ddim_step(
        output, t, sample, schedule, schedule.previous_timestep(t, 10), eta=1.0, generator=gen
    )
    per_dim = closed_form_log_density(out.prev_sample, out.mean, out.std)
    torch.testing.assert_close(
        out.log_prob.double(), per_dim.mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-6
    )
    summed = sampling.ddim_step_log_prob(
        output, t, sample, out.prev_sample, schedule, schedule.previous_timestep(t, 10), 1.0, "sum"
    )
    torch.testing.assert_close(summed.double(), per_dim.sum(dim=(1, 2, 3)), atol=1e-3, rtol=1e-6)
    # The std itself is DDIM's sigma_t with eta = 1.
    a_t, a_p = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 100]
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    assert float(out.std) == pytest.approx(sigma, rel=1e-5)


def test_log_prob_is_highest_at_the_mean_and_has_gradient_through_model_output():
    scheduler = make_scheduler()
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 4, 4, 4, generator=gen)
    output = torch.randn(1, 4, 4, 4, generator=gen, requires_grad=True)
    t = int(scheduler.timesteps[0])
    prev = schedule.previous_timestep(t, 10)
    out = sampling.ddim_step(output, t, sample, schedule, prev, eta=1.0, generator=gen)
    at_mean = sampling.ddim_step_log_prob(output, t, sample, out.mean.detach(), schedule, prev, 1.0)
    assert at_mean.item() > out.log_prob.item()
    out.log_prob.sum().backward()
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_per_sample_timesteps_match_one_at_a_time():
    scheduler = make_scheduler()
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(5)
    sample, output, noise = torch.randn(3, 3, 4, 4, 4, generator=gen)
    timesteps = torch.tensor([901, 501, 1])
    prevs = schedule.previous_timestep(timesteps, 10)
    batched = sampling.ddim_step(output, timesteps, sample, schedule, prevs, eta=0.5, noise=noise)
    for i, t in enumerate(timesteps.tolist()):
        single = sampling.ddim_step(
            output[i : i + 1],
            t,
            sample[i : i + 1],
            schedule,
            t - 100,
            eta=0.5,
            noise=noise[i : i + 1],
        )
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
    assert prevs[-1] < 0  # the last step uses final_alpha_cumprod


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(prediction_type):
    gen = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(2, 2, 3, 4, 4, generator=gen)
    alpha_bar = torch.tensor([0.9, 0.1]).reshape(2, 1, 1, 1)
    x_t = sampling.add_noise(x0, eps, alpha_bar)
    target = sampling.prediction_target(x0, eps, alpha_bar, prediction_type)
    got_x0, got_eps = sampling.split_prediction(target, x_t, alpha_bar, prediction_type)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_eps, eps, atol=1e-5, rtol=1e-5)


def test_velocity_by_hand():
    x0, eps = torch.tensor([1.0]), torch.tensor([2.0])
    # alpha_bar = 0.64: v = 0.8 * 2 - 0.6 * 1
    assert sampling.velocity(x0, eps, torch.tensor(0.64)).item() == pytest.approx(1.0)


def invert_then_sample(eps_model, x0, steps):
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    z, t_prev = x0, -1
    for t in scheduler.timesteps.flip(0).tolist():
        z = sampling.ddim_inversion_step(eps_model(z, t_prev), t_prev, z, t, schedule)
        t_prev = t
    assert not torch.allclose(z, x0, atol=0.1)  # really went to noise
    for t in scheduler.timesteps.tolist():
        prev = schedule.previous_timestep(t, steps)
        z = sampling.ddim_step(eps_model(z, t), t, z, schedule, prev).prev_sample
    return (z - x0).abs().max().item()


def test_inversion_is_exact_when_the_noise_prediction_is_fixed():
    gen = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(2, 2, 4, 8, 8, generator=gen, dtype=torch.float64)
    assert invert_then_sample(lambda z, t: eps, x0, steps=50) < 1e-9


def test_inversion_error_shrinks_with_step_count_on_a_smooth_model():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def smooth(z, t):
        return 0.1 * torch.tanh(z) + 1e-4 * t

    coarse, fine = invert_then_sample(smooth, x0, 50), invert_then_sample(smooth, x0, 400)
    assert fine < 5e-3
    assert fine < coarse / 4  # first-order convergence: 8x the steps, ~8x smaller error


def test_bad_inputs_raise_clear_errors():
    schedule = NoiseSchedule.from_scheduler(make_scheduler())
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(schedule.alphas_cumprod, schedule.final_alpha_cumprod, "noise")
    with pytest.raises(ValueError, match="eta"):
        sampling.ddim_step(x, 500, x, schedule, 400, eta=-1)
    with pytest.raises(ValueError, match="eta > 0"):
        sampling.ddim_step_log_prob(x, 500, x, x, schedule, 400, eta=0.0)
    with pytest.raises(ValueError, match="outside the schedule"):
        sampling.ddim_step(x, 1000, x, schedule, 900)
    with pytest.raises(ValueError, match="either"):
        sampling.ddim_step(x, 500, x, schedule, 400, eta=1, noise=x, generator=torch.Generator())


def test_half_precision_keeps_dtype_and_log_prob_recomputes_exactly():
    scheduler = make_scheduler()
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(9)
    sample, output = torch.randn(2, 2, 4, 8, 8, generator=gen).to(torch.bfloat16)
    t = int(scheduler.timesteps[2])
    prev = schedule.previous_timestep(t, 10)
    out = sampling.ddim_step(output, t, sample, schedule, prev, eta=1.0, generator=gen)
    assert out.prev_sample.dtype == torch.bfloat16 and out.log_prob.dtype == torch.float32
    again = sampling.ddim_step_log_prob(output, t, sample, out.prev_sample, schedule, prev, 1.0)
    assert torch.equal(again, out.log_prob)
    deterministic = sampling.ddim_step(output, t, sample, schedule, prev)
    assert deterministic.prev_sample.dtype == torch.bfloat16
