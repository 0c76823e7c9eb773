"""The shapes world: grammar round trips, rendering, splits, and the verifiable reward."""

import random

import numpy as np
import pytest
import torch

from diffalign.world import grammar, render, reward
from diffalign.world.grammar import Caption, CaptionError, ObjectPhrase, parse_caption


def test_every_generated_caption_parses_back():
    rng = random.Random(0)
    for _ in range(3000):
        caption = grammar.random_caption(rng)
        assert parse_caption(str(caption)) == caption
        assert caption.num_objects <= 4


def test_caption_text_by_hand():
    caption = Caption(
        (ObjectPhrase(2, "red", "circle"), ObjectPhrase(1, "orange", "square")),
        "left of",
        "white",
    )
    assert str(caption) == "two red circles left of an orange square on a white background"
    assert str(Caption((ObjectPhrase(1, "blue", "triangle"),), None, "orange")) == (
        "a blue triangle on an orange background"
    )
    assert parse_caption("One Green Circle above a red square.") == Caption(
        (ObjectPhrase(1, "green", "circle"), ObjectPhrase(1, "red", "square")), "above"
    )


@pytest.mark.parametrize(
    "text,match",
    [
        ("a red circles", "shape"),
        ("two red circle", "shape"),
        ("four red circles", "count colour shape"),
        ("a pink circle", "Unknown colour"),
        ("a red circle next to a blue square", "expected one of"),
        ("three red circles left of two blue squares", "At most 4"),
        ("a red circle on a red background", "background colour must differ"),
        ("a red circle left of two red circles", "differ in colour or shape"),
        ("an red circle", "'an' goes before a vowel"),
    ],
)
def test_parser_rejects_text_outside_the_grammar(text, match):
    with pytest.raises(CaptionError, match=match):
        parse_caption(text)


def test_generation_is_deterministic_and_images_are_valid():
    images, captions = render.generate_pairs(64, seed=3)
    again, same = render.generate_pairs(64, seed=3)
    assert torch.equal(images, again) and captions == same
    assert images.shape == (64, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    other, _ = render.generate_pairs(64, seed=4)
    assert not torch.equal(images, other)
    big, _ = render.generate_pairs(4, seed=3, image_size=64)
    assert big.shape == (4, 3, 64, 64)


def test_layout_keeps_objects_apart_and_honours_relations():
    rng = random.Random(5)
    for caption in render.sample_captions(500, seed=5, split=None):
        placed = render.layout(caption, rng)
        assert len(placed) == caption.num_objects
        for i, a in enumerate(placed):
            assert a.x0 > 0 and a.x0 + a.size < 32 and a.y0 > 0 and a.y0 + a.size < 32
            for b in placed[i + 1 :]:
                assert render._overlaps((a.x0, a.y0, a.size), [b]) is False
        if caption.relation is not None:
            first = [
                o
                for o in placed
                if (o.colour, o.shape) == (caption.objects[0].colour, caption.objects[0].shape)
            ]
            second = [o for o in placed if o not in first]
            axis = 0 if caption.relation in ("left of", "right of") else 1
            before = caption.relation in ("left of", "above")
            a, b = max(o.centre[axis] for o in first), min(o.centre[axis] for o in second)
            if before:
                assert a < b
            else:
                assert min(o.centre[axis] for o in first) > max(o.centre[axis] for o in second)


def test_heldout_combinations_never_appear_in_training():
    train = {c.combination_key() for c in render.sample_captions(4000, seed=0, split="train")}
    heldout = render.sample_captions(500, seed=1, split="heldout")
    assert heldout and not train & {c.combination_key() for c in heldout}
    counts = {s: 0 for s in render.SPLITS}
    for caption in render.sample_captions(4000, seed=2, split=None):
        counts[render.split_of(caption)] += 1
    assert 0.05 < counts["heldout"] / 4000 < 0.15 and counts["train"] / 4000 > 0.75
    with pytest.raises(ValueError, match="Unknown split"):
        render.sample_captions(1, seed=0, split="test")


def test_reward_is_one_on_ground_truth():
    images, captions = render.generate_pairs(2000, seed=11, split=None)
    totals = reward.shapes_reward(images, captions)
    assert totals.shape == (2000,)
    assert (totals == 1.0).float().mean() >= 0.98


def test_reward_is_low_for_swapped_captions():
    images, captions = render.generate_pairs(2000, seed=12, split=None)
    swapped = captions[1:] + captions[:1]
    totals = reward.shapes_reward(images, swapped)
    assert (totals < 0.5).float().mean() >= 0.95


def draw(caption_text, seed=0):
    image = render.render(parse_caption(caption_text), random.Random(seed))
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def test_reward_breakdown_by_hand():
    image = draw("two red circles left of a blue square")
    (exact,) = reward.score_images(image, ["two red circles left of a blue square"])
    assert exact.total == 1.0 and exact.relation == 1.0
    # Wrong count of red circles (asked 3, found 2): count = mean(1 - 1/3, 1) = 5/6.
    (count,) = reward.score_images(image, ["three red circles left of a blue square"])
    assert count.count == pytest.approx(5 / 6) and count.colour == 1.0 and count.shape == 1.0
    assert count.total == pytest.approx((1 + 1 + 5 / 6) / 3)
    # Wrong relation halves the score.
    (relation,) = reward.score_images(image, ["two red circles right of a blue square"])
    assert relation.relation == 0.0 and relation.total == pytest.approx(0.5)
    # Wrong background halves; unmentioned objects scale by 1/sqrt(1 + n).
    (background,) = reward.score_images(image, ["two red circles on a white background"])
    assert background.background == 0.0 and background.extra == 0.5
    assert background.total == pytest.approx(0.5 * np.sqrt(0.5))
    # Right colour, wrong shape: colour 1, shape 0, count 0.
    (shape,) = reward.score_images(draw("a green circle"), ["a green triangle"])
    assert (shape.colour, shape.shape, shape.count) == (1.0, 0.0, 0.0)
    assert np.isnan(shape.relation)


def test_reward_survives_mild_blur_and_noise():
    images, captions = render.generate_pairs(200, seed=13, split=None)
    noisy = images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert reward.shapes_reward(noisy.clamp(0, 1), captions).mean() > 0.9


def test_reward_rejects_bad_input():
    image = draw("a red circle")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward.shapes_reward(image[0], ["a red circle"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward.shapes_reward(image * 255, ["a red circle"])
    with pytest.raises(ValueError, match="NaN"):
        reward.shapes_reward(image * float("nan"), ["a red circle"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        reward.shapes_reward(image, ["a red circle", "a red circle"])
    with pytest.raises(CaptionError):
        reward.shapes_reward(image, ["a dog"])
