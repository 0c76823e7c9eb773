"""Evaluation metrics: FID / KID math and caching, win-rates, bootstrap intervals, bad inputs."""

import pytest
import torch

from diffalign.fid import (
    FeatureStats,
    InceptionFeatures,
    InceptionWeightsNotFoundError,
    frechet_distance,
    kernel_distance,
    resolve_inception_weights,
)
from diffalign.metrics import (
    MetricScorer,
    bootstrap_interval,
    evaluate,
    parse_metrics,
    reference_statistics,
    sample_model,
    win_outcomes,
)
from diffalign.world.evaluate import heldout_prompts, render_prompts


def gaussian_features(n=400, dim=8, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.double)


def test_fid_of_a_set_against_itself_is_zero():
    stats = FeatureStats.from_features(gaussian_features(), "x")
    assert abs(frechet_distance(stats, stats)) < 1e-8


def test_fid_of_a_shifted_set_is_the_squared_shift_and_grows_with_it():
    features = gaussian_features()
    reference = FeatureStats.from_features(features, "x")
    distances = []
    for shift in (0.5, 1.0, 2.0):
        shifted = FeatureStats.from_features(features + shift, "x")
        distances.append(frechet_distance(reference, shifted))
        # same covariance: the trace term vanishes and FID = ||mean shift||^2 = dim * shift^2
        assert distances[-1] == pytest.approx(8 * shift**2, rel=1e-6)
    assert distances == sorted(distances)


def test_fid_sees_a_change_of_spread_by_hand():
    features = gaussian_features(n=2000, dim=1)
    reference = FeatureStats.from_features(features, "x")
    wider = FeatureStats.from_features(features * 3, "x")
    mean, variance = features.mean().item(), float(reference.cov)
    # 1-D: (m - 3m)^2 + v + 9v - 2 sqrt(v * 9v) = 4 m^2 + 4 v
    assert frechet_distance(reference, wider) == pytest.approx(4 * mean**2 + 4 * variance, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_another():
    reference = FeatureStats.from_features(gaussian_features(seed=0), "x")
    same = FeatureStats.from_features(gaussian_features(seed=1), "x")
    other = FeatureStats.from_features(gaussian_features(seed=2) + 1.0, "x")
    same_mean, same_std = kernel_distance(reference, same)
    other_mean, _ = kernel_distance(reference, other)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert other_mean > 10 * max(abs(same_mean), same_std)
    assert kernel_distance(reference, same) == (same_mean, same_std)  # seeded subsets


def test_statistics_round_trip_through_a_file_and_check_the_network(tmp_path):
    stats = FeatureStats.from_features(gaussian_features(), "tiny-clip", "resized to 32")
    path = stats.save(tmp_path / "ref.safetensors")
    loaded = FeatureStats.load(path, feature="tiny_clip")
    assert (loaded.feature, loaded.n, loaded.resize_convention) == (
        "tiny_clip",
        400,
        "resized to 32",
    )
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.cov, stats.cov)
    assert frechet_distance(loaded, stats) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="inception"):
        FeatureStats.load(path, feature="inception")
    with pytest.raises(ValueError, match="different feature|Cannot compare"):
        frechet_distance(stats, FeatureStats.from_features(gaussian_features(dim=4), "other"))


def test_win_outcomes_and_their_interval_by_hand():
    wins = win_outcomes(torch.tensor([3.0, 2.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0, 0.0]))
    assert wins.tolist() == [1.0, 0.5, 0.0, 1.0]
    low, high = bootstrap_interval(wins)
    assert 0.0 <= low < wins.mean().item() < high <= 1.0
    assert bootstrap_interval(torch.ones(10)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="pairwise"):
        win_outcomes(torch.ones(3), torch.ones(4))


def test_bootstrap_interval_narrows_with_more_values():
    small = gaussian_features(n=20, dim=1).flatten()
    large = gaussian_features(n=2000, dim=1).flatten()
    width = [high - low for low, high in (bootstrap_interval(small), bootstrap_interval(large))]
    assert width[1] < width[0] / 5  # about sqrt(100) = 10 times narrower
    low, high = bootstrap_interval(large)
    assert low < large.mean().item() < high
    assert high - low == pytest.approx(2 * 1.96 / 2000**0.5, rel=0.2)


def test_parse_metrics_names_keys_and_rejects_unknown_names():
    keys = [r.key for r in parse_metrics("fid, fid:tiny-clip,kid:tiny_clip,shapes,shapes")]
    assert keys == ["fid", "fid_tiny_clip", "kid_tiny_clip", "shapes_mean"]
    with pytest.raises(ValueError, match="Unknown metric 'sharpness'.*fid:NET"):
        parse_metrics("shapes,sharpness")
    with pytest.raises(ValueError, match="No metric"):
        parse_metrics(" , ")
    with pytest.raises(ValueError, match="Unknown metric 'fdi:tiny-clip'"):  # not a reference
        parse_metrics("fdi:tiny-clip")


def test_parse_metrics_loads_reward_references_before_any_sampling(tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def redness(images, prompts):\n    return images[:, 0].mean((1, 2))\n")
    (request,) = parse_metrics(f"{rewards}:redness")
    assert (request.kind, request.key, request.label) == ("reward", "redness_mean", "redness")
    with pytest.raises(ValueError, match="defines no 'blueness'.*redness"):
        parse_metrics(f"{rewards}:blueness")
    with pytest.raises(ValueError, match="No reward file .*missing.py"):
        parse_metrics(f"{tmp_path / 'missing.py'}:redness")


@pytest.fixture(scope="module")
def world_sets():
    prompts = heldout_prompts(16)
    real = render_prompts(prompts, seed=1)
    other = render_prompts(prompts, seed=2)
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return prompts, real, other, noise


def test_evaluate_scores_rewards_fid_and_win_rates_on_world_images(world_sets):
    prompts, real, other, noise = world_sets
    metrics = "shapes,tiny_clip,fid:tiny-clip"
    renders = evaluate(other, prompts, metrics, reference=real, baseline=noise)
    blurred = evaluate(noise, prompts, metrics, reference=real)
    assert renders["n"] == 16
    assert renders["shapes_mean"] == 1.0 and renders["shapes_win_rate"] == 1.0
    assert renders["shapes_mean_ci"] == (1.0, 1.0)
    assert renders["tiny_clip_mean"] > blurred["tiny_clip_mean"]
    assert renders["fid_tiny_clip"] < blurred["fid_tiny_clip"] / 5
    low, high = renders["fid_tiny_clip_ci"]
    assert low <= renders["fid_tiny_clip"] <= high
    # 16 images are far below 5 x 32 dimensions: a warning, and KID beside FID
    assert "kid_tiny_clip" in renders and renders["warnings"]
    assert "tiny_clip" in renders["fid_resize"]


def test_evaluate_takes_cached_reference_statistics(world_sets, tmp_path):
    prompts, real, other, _ = world_sets
    stats = reference_statistics(real, "tiny-clip")
    stats.save(tmp_path / "ref.safetensors")
    direct = evaluate(other, prompts, "fid:tiny-clip", reference=real)
    cached = evaluate(other, prompts, "fid:tiny-clip", reference=tmp_path / "ref.safetensors")
    mapped = evaluate(other, prompts, "fid:tiny-clip", reference={"tiny-clip": stats})
    assert direct["fid_tiny_clip"] == pytest.approx(cached["fid_tiny_clip"], rel=1e-6)
    assert mapped["fid_tiny_clip"] == pytest.approx(cached["fid_tiny_clip"], rel=1e-6)


def test_evaluate_rejects_bad_inputs(world_sets):
    prompts, real, _, noise = world_sets
    with pytest.raises(ValueError, match="16 images need 16 prompts, got 15"):
        evaluate(real, prompts[:15], "shapes")
    with pytest.raises(ValueError, match="do not match the images"):
        evaluate(real, prompts, "shapes", baseline=noise[:, :, :16, :16])
    with pytest.raises(ValueError, match="reference images or statistics"):
        evaluate(real, prompts, "fid:tiny-clip")
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate(real, prompts, "fid,aesthetics")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(real * 255, prompts, "shapes")


def test_standard_inception_offline_says_how_to_supply_the_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFALIGN_INCEPTION_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsNotFoundError, match="--fid-weights PATH.*fid:tiny-clip"):
        resolve_inception_weights()
    monkeypatch.setenv("DIFFALIGN_INCEPTION_PATH", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resolve_inception_weights()


def random_inception_file(path):
    """torch-fidelity's Inception-v3 with random weights, saved as its weights file is."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    original = fidelity.FeatureExtractorInceptionV3.load_state_dict
    try:  # build the network without its download: load nothing, keep the random init
        fidelity.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
        fidelity.load_state_dict_from_url = lambda *a, **k: {}
        torch.manual_seed(0)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fidelity.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(network.state_dict(), path)
    return network.eval()


def test_inception_weights_load_from_a_file_and_give_its_features(tmp_path, monkeypatch):
    file = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    network = random_inception_file(file)
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    expected = network((images * 255).round().to(torch.uint8))[0]
    features = InceptionFeatures(file)(images)
    assert features.shape == (3, 2048)
    assert torch.allclose(features, expected)
    monkeypatch.setenv("DIFFALIGN_INCEPTION_PATH", str(file))
    assert resolve_inception_weights() == file
    pickled = tmp_path / "code.pth"
    torch.save({"model": InceptionFeatures}, pickled)  # a class, not tensors: refused
    with pytest.raises(ValueError, match="not an Inception weights file"):
        InceptionFeatures(pickled)


def test_evaluate_samples_a_model_and_a_baseline_model_with_the_same_seeds():
    prompts = heldout_prompts(3)
    results = evaluate("diffalign:tiny-shapes", prompts, "shapes", baseline="diffalign:tiny-shapes",
                       samples_per_prompt=2, steps=3)  # fmt: skip
    assert results["n"] == 6
    assert results["shapes_win_rate"] == 0.5  # the same model and seeds: every pair ties
    with pytest.raises(ValueError, match="baseline's images"):
        evaluate(render_prompts(prompts), prompts, "shapes", baseline="diffalign:tiny-shapes")


def test_a_model_is_scored_a_sampling_batch_at_a_time_as_its_whole_image_set(monkeypatch):
    prompts = heldout_prompts(20)
    reference = render_prompts(prompts, seed=1)
    metrics = "shapes,fid:tiny-clip"
    scored = []
    score = MetricScorer.score
    monkeypatch.setattr(
        MetricScorer,
        "score",
        lambda self, images, p: scored.append(len(images)) or score(self, images, p),
    )
    streamed = evaluate("diffalign:tiny-shapes", prompts, metrics, reference, steps=2)
    assert scored == [16, 4]  # 16 prompts a pipeline call; no more images held at once
    images, repeated = sample_model("diffalign:tiny-shapes", prompts, steps=2)
    whole = evaluate(images, repeated, metrics, reference)
    assert scored[-1] == 20
    for key in ("shapes_mean", "shapes_mean_ci", "fid_tiny_clip", "fid_tiny_clip_ci",
                "kid_tiny_clip"):  # fmt: skip
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6), key
    assert streamed["n"] == whole["n"] == 20


def test_scorer_summaries_refuse_a_baseline_of_another_size(world_sets):
    prompts, real, other, noise = world_sets
    scorer = MetricScorer("shapes")
    with pytest.raises(ValueError, match="16 images against 8 baseline images"):
        scorer.summarize(scorer.score(other, prompts), scorer.score(noise[:8], prompts[:8]))
    with pytest.raises(ValueError, match="reference images or statistics"):
        MetricScorer("shapes,fid:tiny-clip")
