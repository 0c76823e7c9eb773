"""The flow-matching step math against diffusers' FlowMatchEulerDiscreteScheduler and a toy whose
marginals are known exactly."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign import flow
from diffalign.flow import FlowSchedule, flow_step
from diffalign.models import sd_ddim_scheduler
from diffalign.sampling import NoiseSchedule, load_schedule


def test_flow_matching_helpers():
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 2, 3, 4, 4, generator=gen)
    t = torch.tensor([0.25, 0.75])
    x_t = flow.flow_interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    v = flow.flow_velocity_target(x0, noise)
    torch.testing.assert_close(flow.flow_predict_x0(x_t, v, t), x0, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow.flow_interpolate(x0, noise, 1.5)


def test_euler_chain_equals_diffusers_flow_match_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    schedule = load_schedule(scheduler)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    gen = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(2, 4, 8, 8, generator=gen)
    landing = schedule.following_timesteps(scheduler.timesteps, 6)
    for t, t_next in zip(scheduler.timesteps, landing, strict=True):
        velocity = torch.randn(2, 4, 8, 8, generator=gen)
        theirs = scheduler.step(velocity, t, theirs).prev_sample
        ours = schedule.step(velocity, t, ours, t_next).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert landing[-1] == 0


def test_sde_step_mean_and_std_by_hand():
    # x = 1, v = 0.5, sigma 0.5 -> 0.25, eta 1: g^2 = 0.5 / 0.5 = 1, the predicted noise is
    # x + (1 - sigma) v = 1.25, so mean = 1 - 0.25 * (0.5 + 1.25) = 0.5625 and std = sqrt(0.25)
    x = torch.ones(1, 1)
    out = flow_step(torch.full((1, 1), 0.5), 0.5, 0.25, x, eta=1.0, noise=torch.ones(1, 1))
    assert out.mean.item() == pytest.approx(0.5625) and out.std.item() == pytest.approx(0.5)
    assert out.prev_sample.item() == pytest.approx(1.0625)
    expected = -0.5 * (0.5 / 0.5) ** 2 - torch.log(torch.tensor(0.5)) - 0.5 * torch.log(
        torch.tensor(2 * torch.pi))  # fmt: skip
    assert out.log_prob.item() == pytest.approx(expected.item())
    again = flow_step(torch.full((1, 1), 0.5), 0.5, 0.25, x, eta=1.0, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)
    first = flow_step(torch.zeros(1, 1), 1.0, 0.8, x, eta=1.0, noise=torch.zeros(1, 1))
    assert first.std.item() == pytest.approx((1 / 0.2 * 0.2) ** 0.5)  # 1 - sigma_next at sigma 1


def _gaussian_velocity(x, t, scale):
    """The exact velocity field of data N(0, scale^2): E[noise - x0 | x_t]."""
    variance = (1 - t) ** 2 * scale**2 + t**2
    return (t - (1 - t) * scale**2) / variance * x


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_ode_and_sde_reach_the_data_distribution_of_a_gaussian_toy(eta):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 1, generator=gen)
    sigmas = torch.linspace(1, 0, 101)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        velocity = _gaussian_velocity(x, sigma, 0.5)
        x = flow_step(velocity, sigma, sigma_next, x, eta=eta, generator=gen).prev_sample
    assert x.std().item() == pytest.approx(0.5, abs=0.015)
    assert abs(x.mean().item()) < 0.015


def test_training_point_uses_the_shifted_training_sigmas():
    schedule = FlowSchedule(num_train_timesteps=1000, shift=3.0)
    x0, noise = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    point = schedule.training_point(x0, noise, torch.tensor([999, 499, 0]))
    torch.testing.assert_close(point.noise_level, torch.tensor([1.0, 0.75, 3e-3 / 1.002]))
    torch.testing.assert_close(point.timestep, point.noise_level * 1000)
    torch.testing.assert_close(point.noisy[:, 0, 0, 0], point.noise_level)
    assert torch.equal(point.target, noise - x0)


def test_schedules_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="not a DDIM/DDPM-family"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())
    assert isinstance(load_schedule(sd_ddim_scheduler()), NoiseSchedule)
    with pytest.raises(ValueError, match="eta"):
        flow_step(torch.zeros(1, 1), 0.5, 0.25, torch.zeros(1, 1), eta=-1.0)
