"""Loss functions and advantages against values worked out by hand (numbers in the comments)."""

import math

import pytest
import torch

from diffalign.train.advantages import PerPromptStatTracker, group_advantages, mean_group_std
from diffalign.train.losses import awm_loss, ddpo_loss, step_kl


def test_ddpo_loss_matches_hand_computation():
    log_probs = torch.tensor([0.0, 0.1, -0.2], requires_grad=True)
    out = ddpo_loss(log_probs, torch.zeros(3), torch.tensor([1.0, -2.0, 10.0]), clip_range=0.05,
                    adv_clip_max=5.0)  # fmt: skip
    # ratios 1, e^0.1 = 1.105171, e^-0.2 = 0.818731; advantages clipped to 1, -2, 5
    # per sample max(-A r, -A clip(r)): -1, 2.210342 (unclipped), -4.093654 (unclipped)
    assert out.loss.item() == pytest.approx((-1 + 2.210342 - 4.093654) / 3, abs=1e-6)
    assert out.diagnostics["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.04) / 3, abs=1e-7)
    assert out.diagnostics["clipfrac"] == pytest.approx(2 / 3)
    out.loss.backward()
    # d/dlogp of -A r / 3 where the unclipped branch is active (a tie at r = 1 counts once)
    expected = torch.tensor([-1 / 3, 2 * 1.105171 / 3, -5 * 0.818731 / 3])
    torch.testing.assert_close(log_probs.grad, expected, atol=1e-5, rtol=0)


def test_ddpo_loss_weighs_each_sample_by_its_step_weight():
    log_probs = torch.tensor([0.0, 0.1], requires_grad=True)
    advantages, weights = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
    out = ddpo_loss(log_probs, torch.zeros(2), advantages, clip_range=0.05, step_weights=weights)
    # per sample (as above) -1 and 2.210342, times 0.5 and 2, mean over 2
    assert out.loss.item() == pytest.approx((-0.5 + 4.420684) / 2, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([-0.25, 2 * 1.105171]), atol=1e-5,
                               rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="step_weights"):
        ddpo_loss(log_probs, torch.zeros(2), advantages, step_weights=torch.ones(3))


def test_step_kl_and_the_ddpo_loss_kl_term_match_hand_computation():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.5]], requires_grad=True)
    reference = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    kl = step_kl(mean, reference, 0.5)
    # per dim (mu - mu_ref)^2 / (2 * 0.25): (2, 8) and (0, 0.5); mean over dims: 5 and 0.25
    torch.testing.assert_close(kl, torch.tensor([5.0, 0.25]))
    log_probs = torch.tensor([0.0, 0.1])
    out = ddpo_loss(log_probs, torch.zeros(2), torch.tensor([1.0, -2.0]), clip_range=0.05,
                    kl=kl, beta_kl=0.1)  # fmt: skip
    # the policy term as above, (-1 + 2.210342) / 2, plus 0.1 * mean(5, 0.25)
    assert out.loss.item() == pytest.approx((-1 + 2.210342) / 2 + 0.2625, abs=1e-6)
    assert out.diagnostics["kl"] == pytest.approx(2.625)
    out.loss.backward()
    # d(0.1 * mean_b mean_d (mu - 0)^2 / 0.5) / d mu = 0.1 * 2 mu / 0.5 / (2 * 2) = 0.1 mu
    torch.testing.assert_close(mean.grad, 0.1 * mean.detach())
    with pytest.raises(ValueError, match="std > 0"):
        step_kl(mean, reference, 0.0)
    with pytest.raises(ValueError, match="kl has shape"):
        ddpo_loss(log_probs, torch.zeros(2), torch.ones(2), kl=torch.ones(3), beta_kl=0.1)


def test_ddpo_loss_stops_the_gradient_outside_the_clip_range():
    log_probs = torch.tensor([0.5], requires_grad=True)  # ratio 1.65 > 1 + eps with A > 0
    ddpo_loss(log_probs, torch.zeros(1), torch.ones(1), clip_range=0.2).loss.backward()
    assert log_probs.grad.item() == 0.0


def test_ddpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="Shapes differ"):
        ddpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))


def _awm_inputs():
    prediction = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]], requires_grad=True)
    return prediction, torch.zeros(2, 1, 2), torch.tensor([2.0, -10.0])


def test_awm_uniform_loss_weights_the_denoising_error_by_advantage():
    prediction, target, advantages = _awm_inputs()
    out = awm_loss(prediction, target, advantages)
    # mse per sample 2.5 and 0; advantages clipped to [-5, 5] then / 5: 0.4 and -1
    assert out.loss.item() == pytest.approx(-(0.4 - 1.0) / 2)
    assert out.diagnostics["mse"] == pytest.approx(1.25)
    out.loss.backward()
    # d/dpred of -A' * (-mse) / B = A' / B * (pred - target): 0.2 * [1, 2] and 0
    torch.testing.assert_close(prediction.grad, torch.tensor([[[0.2, 0.4]], [[0.0, 0.0]]]))


def test_awm_kl_and_ema_terms_add_mean_squared_distances():
    prediction, target, advantages = _awm_inputs()
    reference = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = awm_loss(prediction, target, advantages, reference_prediction=reference, beta_kl=0.5,
                   ema_prediction=torch.zeros(2, 1, 2), beta_ema=0.1)  # fmt: skip
    # kl: (0 + 4) / 2 = 2 and (0 + 1) / 2 = 0.5, mean 1.25; ema: 2.5 and 0, mean 1.25
    assert out.diagnostics["kl"] == pytest.approx(1.25)
    assert out.diagnostics["ema_kl"] == pytest.approx(1.25)
    assert out.loss.item() == pytest.approx(0.3 + 0.5 * 1.25 + 0.1 * 1.25)


def test_awm_ghuber_weighting_matches_its_derivative():
    prediction, target, advantages = _awm_inputs()
    out = awm_loss(prediction, target, advantages, time_fraction=torch.tensor([0.5, 1.0]),
                   weighting="ghuber")  # fmt: skip
    assert out.loss.item() == pytest.approx(0.3)  # on-policy value: -mean(A')
    out.loss.backward()
    # dlogp/dm = -(m + d)^(p - 1) * t = -2.5^-0.75 * 0.5 = -0.251487; dm/dpred = pred (2 dims)
    # d loss / d pred = -A'/B * dlogp/dm * pred = -0.2 * -0.251487 * [1, 2]
    slope = 0.2 * math.exp(-0.75 * math.log(2.5)) * 0.5
    torch.testing.assert_close(prediction.grad[0, 0], torch.tensor([slope, 2 * slope]))
    with pytest.raises(ValueError, match="time_fraction"):
        awm_loss(*_awm_inputs(), weighting="ghuber")


def test_per_prompt_tracker_uses_the_batch_until_a_prompt_has_min_count():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    first = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    # a: own mean 2, std 1; b: batch mean 3, std sqrt(8/3) = 1.632993
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0, 2 / 1.632993]), atol=1e-5, rtol=0)
    tracker.update(["a"], torch.tensor([5.0]))
    state = tracker.state_dict()
    third = tracker.update(["a"], torch.tensor([8.0]))
    # buffer keeps the last 3: [3, 5, 8], mean 5.333333, std 2.054805
    assert third.item() == pytest.approx((8 - 5.333333) / 2.054805, abs=1e-5)
    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(state)
    assert restored.update(["a"], torch.tensor([8.0])).item() == pytest.approx(third.item())


def test_group_advantages_center_per_prompt_and_scale_by_the_global_std():
    advantages = group_advantages(torch.tensor([1.0, 3.0, 5.0, 9.0]), ["a", "a", "b", "b"])
    # global std of [1, 3, 5, 9] = sqrt(8.75) = 2.958040; groups centred at 2 and 7
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (2.958040 + 1e-4)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)
    own = group_advantages(torch.tensor([1.0, 3.0, 5.0, 9.0]), ["a", "a", "b", "b"], False)
    torch.testing.assert_close(own, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3, rtol=0)


def test_mean_group_std_averages_each_prompts_own_spread():
    # prompt a: 1 and 3 (std 1); prompt b: 5 and 5 (std 0, a reward that no longer tells them apart)
    rewards = torch.tensor([1.0, 5.0, 3.0, 5.0])
    assert mean_group_std(rewards, ["a", "b", "a", "b"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 prompts for 4 rewards"):
        mean_group_std(rewards, ["a", "b", "a"])


def test_group_advantages_divide_by_the_std_floor_when_the_std_is_below_it():
    rewards, prompts = torch.tensor([1.0, 3.0, 5.0, 9.0]), ["a", "a", "b", "b"]
    floored = group_advantages(rewards, prompts, std_floor=4.0)  # batch std 2.958 < 4
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (4.0 + 1e-4)
    torch.testing.assert_close(floored, expected, atol=1e-6, rtol=0)
    below = group_advantages(rewards, prompts, std_floor=1.0)  # the std itself is larger
    torch.testing.assert_close(below, group_advantages(rewards, prompts), atol=0, rtol=0)
    # per-group stds are 1 and 2: the floor 1.5 lifts only the first group's
    own = group_advantages(rewards, prompts, global_std=False, std_floor=1.5)
    torch.testing.assert_close(own, torch.tensor([-1 / 1.5, 1 / 1.5, -1.0, 1.0]), atol=1e-3, rtol=0)
