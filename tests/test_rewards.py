"""Reward adapters: tiny random models in the real on-disk formats, loaded the real way."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.rewards import (
    AsyncRewardScorer,
    NonFiniteRewardError,
    Reward,
    RewardBatchError,
    WeightedReward,
    WeightsNotFoundError,
    list_rewards,
    load_reward,
    parse_reward_spec,
)
from diffalign.rewards.preprocess import ImageTransform
from diffalign.world.render import generate_pairs

ALL_REWARDS = {
    "aesthetic", "clip_score", "hpsv2", "jpeg_compressibility", "jpeg_incompressibility",
    "pickscore", "shapes", "tiny_clip",
}  # fmt: skip
LOGIT_SCALE = 50.0


def _tiny_clip_model(seed: int):
    from diffalign.world.clip import WorldClipConfig, build_clip

    model = build_clip(WorldClipConfig(seed=seed))
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Folders and files laid out as the hub repositories hold them, with tiny random models."""
    import open_clip

    from diffalign.rewards.aesthetic import AestheticHead
    from diffalign.world.clip import build_processor

    root = tmp_path_factory.mktemp("reward-weights")
    _tiny_clip_model(1).save_pretrained(root / "pickscore")  # model only, like PickScore_v1
    build_processor(32).save_pretrained(root / "processor")  # like the laion processor repo
    for name, seed in (("clip", 2),):  # a CLIP repo that holds its processor, like openai's
        _tiny_clip_model(seed).save_pretrained(root / name)
        build_processor(32).save_pretrained(root / name)
    torch.manual_seed(3)
    torch.save(AestheticHead(32).state_dict(), root / "aesthetic-model.pth")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    (root / "diffalign-test-tiny-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "diffalign-test-tiny-vit.json")
    torch.manual_seed(4)
    hps = open_clip.create_model("diffalign-test-tiny-vit", pretrained=None)
    torch.save({"epoch": 1, "state_dict": hps.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return root


@pytest.fixture(scope="module")
def pairs():
    images, captions = generate_pairs(6, seed=5, split="train")
    return images, captions


def _load(name, weights):
    kwargs = {
        "pickscore": {"path": weights / "pickscore", "processor_path": weights / "processor"},
        "clip_score": {"path": weights / "clip"},
        "aesthetic": {"path": weights / "aesthetic-model.pth", "clip_path": weights / "clip"},
        "hpsv2": {"path": weights / "HPS_v2.1_compressed.pt",
                  "architecture": "diffalign-test-tiny-vit"},
    }.get(name, {})  # fmt: skip
    return load_reward(name, **kwargs)


MODEL_REWARDS = ["pickscore", "clip_score", "aesthetic", "hpsv2", "tiny_clip"]


def test_list_rewards_names_every_adapter():
    assert set(list_rewards()) == ALL_REWARDS


@pytest.mark.parametrize("name", sorted(ALL_REWARDS))
def test_scores_are_float_per_image_and_independent_of_batching(name, weights, pairs):
    reward = _load(name, weights)
    images, captions = pairs
    scores = reward(images, captions)
    assert scores.shape == (len(images),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    reward.batch_size = 4  # chunks of 4 and 2
    chunked = reward(images, captions)
    one_by_one = torch.cat([reward(images[i : i + 1], captions[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(chunked, scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_gradients_reach_the_images(name, weights, pairs):
    reward = _load(name, weights)
    assert reward.differentiable
    images = pairs[0].clone().requires_grad_(True)
    scores = reward(images, pairs[1])
    if name == "clip_score":  # max(cos, 0) has no gradient where the cosine is negative
        assert (scores > 0).any()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_rewards_resize_any_input_size(name, weights, pairs):
    reward = _load(name, weights)
    big = F.interpolate(pairs[0][:2], size=(48, 64), mode="nearest")
    assert reward(big, pairs[1][:2]).shape == (2,)


def _clip_embeddings(model, processor_folder, images, captions):
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(processor_folder)
    pixels = ImageTransform.from_clip_processor(processor)(images)
    tokens = processor.tokenizer(captions, padding="max_length", max_length=77,
                                 truncation=True, return_tensors="pt")  # fmt: skip
    image = model.get_image_features(pixel_values=pixels)
    text = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_pickscore_is_scaled_cosine_and_its_preference_is_a_softmax(weights, pairs):
    from transformers import CLIPModel

    images, captions = pairs
    image, text = _clip_embeddings(CLIPModel.from_pretrained(weights / "pickscore"),
                                   weights / "processor", images, captions)  # fmt: skip
    expected = LOGIT_SCALE * (image * text).sum(-1)
    reward = _load("pickscore", weights)
    torch.testing.assert_close(reward(images, captions), expected, atol=1e-4, rtol=1e-5)
    preference = reward.preference(images, captions[0])
    by_hand = torch.exp(LOGIT_SCALE * image @ text[0])
    torch.testing.assert_close(preference, by_hand / by_hand.sum(), atol=1e-5, rtol=1e-4)


def test_clip_score_is_hundred_times_positive_cosine(weights, pairs):
    from transformers import CLIPModel

    images, captions = pairs
    image, text = _clip_embeddings(CLIPModel.from_pretrained(weights / "clip"),
                                   weights / "clip", images, captions)  # fmt: skip
    cosine = (image * text).sum(-1)
    scores = _load("clip_score", weights)(images, captions)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), atol=1e-4, rtol=1e-5)
    swapped = _load("clip_score", weights)(images.flip(0), captions)
    assert (swapped >= 0).all()


def test_aesthetic_is_the_head_on_normalised_image_embeddings(weights, pairs):
    from transformers import CLIPModel, CLIPProcessor

    from diffalign.rewards.aesthetic import AestheticHead

    images = pairs[0]
    model = CLIPModel.from_pretrained(weights / "clip")
    processor = CLIPProcessor.from_pretrained(weights / "clip")
    pixels = ImageTransform.from_clip_processor(processor)(images)
    embeds = model.get_image_features(pixel_values=pixels)
    embeds = getattr(embeds, "pooler_output", embeds)
    head = AestheticHead(32)
    head.load_state_dict(torch.load(weights / "aesthetic-model.pth"))
    expected = head.eval()(embeds / embeds.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(_load("aesthetic", weights)(images, pairs[1]), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_hpsv2_is_the_cosine_of_open_clip_embeddings(weights, pairs):
    import open_clip

    images, captions = pairs
    model = open_clip.create_model("diffalign-test-tiny-vit", pretrained=None)
    model.load_state_dict(torch.load(weights / "HPS_v2.1_compressed.pt")["state_dict"])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    image = F.normalize(model.encode_image((images - mean) / std), dim=-1)  # already 32 px
    text = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-H-14")(captions)), dim=-1)
    scores = _load("hpsv2", weights)(images, captions)
    torch.testing.assert_close(scores, (image * text).sum(-1), atol=1e-5, rtol=1e-5)


def test_hpsv2_refuses_a_checkpoint_of_another_architecture(weights, tmp_path):
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="state_dict"):
        load_reward("hpsv2", path=tmp_path / "bad.pt", architecture="diffalign-test-tiny-vit")


def test_clip_preprocessing_matches_the_transformers_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 224},
                                   crop_size={"height": 224, "width": 224})  # fmt: skip
    transform = ImageTransform.from_clip_processor(processor)
    for shape in [(32, 32), (300, 500), (512, 512)]:
        image = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                              size=shape, mode="bilinear")  # fmt: skip
        image = (image * 255).round() / 255
        array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        expected = processor(images=[array], return_tensors="pt").pixel_values
        ours = transform(image)
        assert ours.shape == expected.shape == (1, 3, 224, 224)
        # PIL rounds its resized pixels to 8 bits: one level is 1 / 255 / std = 0.015
        assert (ours - expected).abs().max() < 0.02


def test_longest_edge_preprocessing_matches_open_clip():
    import open_clip

    reference = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    transform = ImageTransform(size=224, mode="longest_pad")
    image = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                          size=(48, 64), mode="bilinear")  # fmt: skip
    image = (image * 255).round() / 255
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    difference = (transform(image) - reference(pil)[None]).abs()
    assert difference.max() < 0.02
    # 48 x 64 becomes 168 x 224: 28 rows of zero padding above and below
    assert (transform(image)[..., :28, :] == transform(torch.zeros(1, 3, 1, 1))[..., :1, :1]).all()


def test_jpeg_rewards_follow_the_ddpo_definition():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 64, 64, generator=generator)
    flat = torch.full((2, 3, 64, 64), 0.5)
    incompressibility = load_reward("jpeg_incompressibility")
    assert (incompressibility(noise, "x") > incompressibility(flat, "x")).all()
    compressibility = load_reward("jpeg_compressibility")
    torch.testing.assert_close(compressibility(noise, "x"), -incompressibility(noise, "x"))
    buffer = io.BytesIO()
    array = (noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert incompressibility(noise[:1], "x").item() == pytest.approx(buffer.tell() / 1000)


def test_shapes_reward_scores_ground_truth_one_and_swapped_captions_low():
    images, captions = generate_pairs(16, seed=9, split="validation")
    reward = load_reward("shapes")
    assert (reward(images, captions) == 1.0).all()
    swapped = reward(images, captions[1:] + captions[:1])
    assert (swapped < 0.5).float().mean() >= 0.9
    assert set(reward.breakdown(images[:2], captions[:2])) >= {"colour", "relation", "total"}


def test_weighted_rewards_add_their_parts(pairs):
    images, captions = pairs
    assert parse_reward_spec("pickscore+0.2*aesthetic") == {"pickscore": 1.0, "aesthetic": 0.2}
    assert parse_reward_spec(" shapes - 1e-2 * jpeg_incompressibility ") == {
        "shapes": 1.0, "jpeg_incompressibility": -0.01,
    }  # fmt: skip
    combined = load_reward("shapes-0.01*jpeg_incompressibility")
    by_dict = load_reward({"shapes": 1.0, "jpeg_incompressibility": -0.01})
    assert isinstance(combined, WeightedReward) and not combined.differentiable
    expected = load_reward("shapes")(images, captions) - 0.01 * load_reward(
        "jpeg_incompressibility"
    )(images, captions)
    torch.testing.assert_close(combined(images, captions), expected)
    torch.testing.assert_close(by_dict(images, captions), expected)
    assert set(combined.breakdown(images, captions)) == {"shapes", "jpeg_incompressibility"}


@pytest.mark.parametrize(
    "spec, error",
    [("pickscor", "Did you mean 'pickscore'"), ("shapes+*2", "Cannot read"), ("", "empty")],
)
def test_bad_reward_specs_raise_clear_errors(spec, error):
    with pytest.raises((KeyError, ValueError), match=error):
        load_reward(spec)


def test_weighted_reward_arguments_go_per_component():
    with pytest.raises(TypeError, match="per component"):
        load_reward("shapes+jpeg_compressibility", quality=80)
    reward = load_reward("shapes+jpeg_compressibility", jpeg_compressibility={"quality": 80})
    assert reward.rewards["jpeg_compressibility"].quality == 80


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        (torch.rand(3, 32, 32), ["a"], "rank 3"),
        (torch.rand(1, 32, 32, 3), ["a"], "channels last"),
        (torch.rand(1, 1, 32, 32), ["a"], "3 colour channels"),
        (torch.rand(1, 3, 8, 8) * 2 - 1, ["a"], r"\[0, 1\]"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], "NaN"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], "divide uint8"),
        (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(images, prompts, message):
    with pytest.raises(ValueError, match=message):
        load_reward("jpeg_compressibility")(images, prompts)


class _SometimesNaN(Reward):
    name = "sometimes_nan"

    def score(self, images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        scores[0] = float("nan")
        return scores


def test_non_finite_scores_raise_or_are_dropped(caplog):
    images = torch.rand(3, 3, 8, 8)
    with pytest.raises(NonFiniteRewardError, match=r"indices \[0\]"):
        _SometimesNaN()(images, "x")
    scores = _SometimesNaN(nonfinite="drop")(images, "x")
    assert scores[0].isnan() and scores[1:].isfinite().all()
    assert "dropping 1 non-finite" in caplog.text


def test_missing_weights_error_names_the_model_files_and_both_remedies(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFALIGN_PICKSCORE_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as caught:
        load_reward("pickscore")
    message = str(caught.value)
    for part in ("yuvalkirstain/PickScore_v1", "config.json", "model.safetensors", "path=",
                 "DIFFALIGN_PICKSCORE_PATH", "HF_HUB_OFFLINE"):  # fmt: skip
        assert part in message
    with pytest.raises(WeightsNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_reward("hpsv2")


def test_weights_resolve_from_the_environment_and_the_hub_cache(monkeypatch, tmp_path, weights):
    import shutil

    from huggingface_hub import constants

    monkeypatch.setenv("DIFFALIGN_HPSV2_PATH", str(weights / "HPS_v2.1_compressed.pt"))
    assert load_reward("hpsv2", architecture="diffalign-test-tiny-vit").name == "hpsv2"
    snapshot = tmp_path / "models--openai--clip-vit-large-patch14" / "snapshots" / ("0" * 40)
    shutil.copytree(weights / "clip", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_reward("clip_score").input_size == 32


def test_an_incomplete_folder_names_what_it_lacks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors or pytorch_model.bin"):
        load_reward("clip_score", path=tmp_path)


def test_async_scoring_matches_sync_and_reports_the_failing_batch(pairs):
    images, captions = pairs
    reward = load_reward("shapes")
    with AsyncRewardScorer(reward) as scorer:
        futures = [scorer.submit(images[i : i + 2], captions[i : i + 2]) for i in (0, 2, 4)]
        scores = torch.cat(scorer.gather(futures))
    torch.testing.assert_close(scores, reward(images, captions))
    for enabled in (True, False):
        with AsyncRewardScorer(reward, enabled=enabled) as scorer:
            good = scorer.submit(images[:1], captions[:1])
            bad = scorer.submit(images[:1], ["a purple banana"])
            assert good.result().shape == (1,)
            with pytest.raises(RewardBatchError, match="batch 1") as caught:
                bad.result()
            assert caught.value.batch_index == 1


def test_bench_rewards_reports_images_per_second_and_missing_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from diffalign.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = ["bench", "rewards", "--rewards", "shapes,jpeg_compressibility,hpsv2", "--sizes",
            "32,64", "--num-images", "4", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())["results"]["rows"]
    by_name = {row["reward"]: row for row in rows}
    assert by_name["shapes"]["images_per_s_64"] > 0 and by_name["shapes"]["mean_score_64"] == 1.0
    assert by_name["hpsv2"]["weights"] == "weights not found"
    assert "images_per_s_32" not in by_name["hpsv2"]
    assert main(["bench", "rewards", "--rewards", "shapez", "--out", str(tmp_path)]) == 2


USER_REWARDS = """
import torch

from diffalign.rewards import Reward


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def prompt_length(images, prompts):
    return [float(len(p)) for p in prompts]


def one_score(images, prompts):
    return torch.zeros(1)


class Redness(Reward):
    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def score(self, images, prompts):
        return self.scale * images[:, 0].mean(dim=(1, 2))


TEMPERATURE = 3.0
"""


@pytest.fixture()
def user_rewards(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_your_own_function_or_class_is_a_reward_by_object_or_reference(user_rewards):
    images = torch.rand(5, 3, 8, 8)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    brightness = load_reward(f"{user_rewards}:brightness", batch_size=2)
    assert brightness.name == "brightness"
    torch.testing.assert_close(brightness(images, prompts), images.mean(dim=(1, 2, 3)))
    lengths = load_reward(f"{user_rewards}:prompt_length")(images, prompts)
    assert lengths.dtype == torch.float32 and lengths.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    redness = load_reward(f"{user_rewards}:Redness", scale=2.0)  # a class gets the arguments
    torch.testing.assert_close(redness(images, prompts), 2.0 * images[:, 0].mean(dim=(1, 2)))
    by_module = load_reward("diffalign.rewards.jpeg:JpegIncompressibility")
    jpeg = load_reward("jpeg_incompressibility")
    torch.testing.assert_close(by_module(images, prompts), jpeg(images, prompts))
    assert type(load_reward(type(jpeg))) is type(jpeg)  # a Reward class is built, not wrapped
    by_object = load_reward(lambda images, prompts: -images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(by_object(images, prompts), -images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="returned scores of shape \\(1,\\) for 5 images"):
        load_reward(f"{user_rewards}:one_score")(images, prompts)


@pytest.mark.parametrize(
    "reference, error, message",
    [("missing.py:brightness", ValueError, "No reward file missing.py"),
     ("no_such_module_anywhere:brightness", ValueError, "Cannot import 'no_such_module_any"),
     ("{file}:brightnes", ValueError, "defines no 'brightnes'; its .*brightness"),
     ("{file}:TEMPERATURE", TypeError, "is a float; a reward reference must name a function"),
     ("{file}:", ValueError, "write FILE.py:NAME")],
)  # fmt: skip
def test_bad_reward_references_name_the_problem(reference, error, message, user_rewards):
    with pytest.raises(error, match=message):
        load_reward(reference.format(file=user_rewards))
