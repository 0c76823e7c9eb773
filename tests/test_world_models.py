"""World pretraining, evaluation and the world command (fast settings; no retraining of assets)."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.models import build_tiny_vae, load_pipeline, sd_ddim_scheduler
from diffalign.world import evaluate
from diffalign.world.pretrain import (
    WorldPretrainConfig,
    finetune_decoder,
    pretrain_world,
    train_denoiser,
    train_vae,
    training_timesteps,
)


def test_vae_training_lowers_reconstruction_loss():
    config = WorldPretrainConfig(vae_steps=1, vae_batch_size=8)
    vae = build_tiny_vae(0, 32)
    first = train_vae(vae, config, quiet=True)["final_loss"]
    later = train_vae(vae, WorldPretrainConfig(vae_steps=40, vae_batch_size=8),
                      quiet=True)  # fmt: skip
    assert later["final_loss"] < 0.5 * first
    assert vae.config.scaling_factor == later["scaling_factor"] > 0


def test_pretrain_writes_a_loadable_stable_diffusion_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    config = WorldPretrainConfig(vae_steps=2, unet_steps=2, batch_size=4,
                                 vae_batch_size=4)  # fmt: skip
    pretrain_world(config, tmp_path, quiet=True)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["unet_steps"] == 2 and record["parameters"]["unet"] > 0
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipeline.unet.config.sample_size == 16 and pipeline.tokenizer.model_max_length == 77
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    images = evaluate.generate(pipeline, ["a red circle"], 2, steps=2, quiet=True)
    assert images.shape == (2, 3, 32, 32)


def test_heldout_prompts_are_distinct_and_heldout():
    from diffalign.world.grammar import parse_caption
    from diffalign.world.render import split_of

    prompts = evaluate.heldout_prompts(50)
    assert len(set(prompts)) == 50
    assert all(split_of(parse_caption(p)) == "heldout" for p in prompts)
    assert any(len(parse_caption(p).objects) == 1 for p in prompts)


def test_evaluate_prompts_on_ground_truth_is_perfect():
    from diffalign.world.render import generate_pairs

    images, captions = generate_pairs(6, seed=0, split="heldout")
    summary = evaluate.evaluate_prompts(images, captions, samples_per_prompt=1)
    assert summary["shapes_mean"] == 1.0 and summary["fraction_perfect"] == 1.0
    assert summary["breakdown"]["background"] == 1.0


def test_world_commands_on_a_saved_pipeline(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    args = [
        "world",
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(out),
        "--num-prompts",
        "3",
        "--samples-per-prompt",
        "1",
        "--steps",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert {"shapes_mean", "shapes_mean_single_object", "breakdown"} <= set(results)
    assert 0.0 <= results["shapes_mean"] <= 1.0 and results["num_prompts"] == 3
    out = tmp_path / "sample"
    args = [
        "world",
        "sample",
        "--model",
        str(tmp_path / "model"),
        "--prompt",
        "a red circle",
        "--num-images-per-prompt",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert (out / "grid.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["results"]["guidance_scale"] == 3.0


def test_decoder_finetuning_keeps_the_encoder_and_sharpens_reconstructions():
    vae = build_tiny_vae(0, 32)
    train_vae(vae, WorldPretrainConfig(vae_steps=20, vae_batch_size=8), quiet=True)
    encoder = {
        n: p.clone() for n, p in vae.named_parameters() if not n.startswith(("decoder", "post"))
    }
    config = WorldPretrainConfig(decoder_steps=40, vae_batch_size=8, decoder_learning_rate=1e-3)
    record = finetune_decoder(vae, config, quiet=True)
    assert record["reconstruction_psnr_db"] > record["reconstruction_psnr_db_before"] + 0.5
    for name, parameter in vae.named_parameters():
        assert not parameter.requires_grad
        if name in encoder:
            assert torch.equal(parameter, encoder[name]), name


def test_pretrain_can_replace_only_the_decoder_of_a_trained_model(tmp_path):
    from diffusers import StableDiffusionPipeline

    config = WorldPretrainConfig(vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4)
    pretrain_world(config, tmp_path / "base", quiet=True)
    record = json.loads((tmp_path / "base" / "training.json").read_text())
    record["sampling"] = {"guidance_scale": 4.5}
    (tmp_path / "base" / "training.json").write_text(json.dumps(record))
    decoder_only = WorldPretrainConfig(unet_steps=0, decoder_steps=3, vae_batch_size=4,
                                       init_from=str(tmp_path / "base"))  # fmt: skip
    pretrain_world(decoder_only, tmp_path / "new", quiet=True)
    base = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    new = StableDiffusionPipeline.from_pretrained(tmp_path / "new")
    for module in ("unet", "text_encoder"):
        kept = getattr(new, module).state_dict()
        for name, value in getattr(base, module).state_dict().items():
            assert torch.equal(value, kept[name]), (module, name)
    assert not torch.equal(base.vae.decoder.conv_out.weight, new.vae.decoder.conv_out.weight)
    assert torch.equal(base.vae.encoder.conv_in.weight, new.vae.encoder.conv_in.weight)
    saved = json.loads((tmp_path / "new" / "training.json").read_text())
    assert saved["vae"]["decoder"]["steps"] == 3 and saved["sampling"]["guidance_scale"] == 4.5


def test_pretrain_rejects_bad_settings(tmp_path):
    assert main(["world", "pretrain", "--out", str(tmp_path), "--set", "image_size=16"]) == 2
    assert main(["world", "pretrain", "--out", str(tmp_path), "--set", "unet_step=3"]) == 2
    assert main(["world", "pretrain", "--out", str(tmp_path), "--set", "unet_steps=0"]) == 2
    for bad, problem in ((["zero_terminal_snr=true"], "prediction_type"),
                         (["prediction_type=x0"], "prediction_type"),
                         (["high_noise_share=1.5"], "high_noise_share")):  # fmt: skip
        with pytest.raises(ConfigError, match=problem):
            WorldPretrainConfig.from_dict({}, bad)


class _ZeroLatentVAE:
    """Encodes every image to zero latents, so the clean part of every target is 0."""

    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, images):
        zeros = torch.zeros(len(images), 4, 16, 16)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator: zeros))


class _ZeroOutput(torch.nn.Module):
    """A trainable scale on its input that starts (and, at learning rate 0, stays) at 0."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, inputs, *_):
        if inputs.dtype == torch.long:  # token ids in: text states out
            return (torch.zeros(len(inputs), inputs.shape[1], 8) * self.scale,)
        return SimpleNamespace(sample=inputs * self.scale)


@pytest.mark.parametrize(
    "prediction_type, zero_terminal_snr, expected",
    [("epsilon", False, "one"), ("sample", False, "zero"), ("v_prediction", False, "alpha_bar"),
     ("v_prediction", True, "alpha_bar")],
)  # fmt: skip
def test_denoiser_loss_regresses_on_the_prediction_type_target(
    clip_tokenizer, prediction_type, zero_terminal_snr, expected
):
    # Latents are 0 and the UNet predicts 0, so the loss is the target's mean square: eps^2 ~ 1
    # for epsilon, exactly 0 for sample, alpha_bar(t) eps^2 ~ mean alpha_bar over t for v.
    config = WorldPretrainConfig(unet_steps=30, batch_size=64, learning_rate=0.0,
                                 prediction_type=prediction_type,
                                 zero_terminal_snr=zero_terminal_snr)  # fmt: skip
    scheduler = sd_ddim_scheduler(prediction_type, zero_terminal_snr)
    record = train_denoiser(_ZeroOutput(), _ZeroOutput(), clip_tokenizer, _ZeroLatentVAE(),
                            scheduler, config, quiet=True)  # fmt: skip
    want = {"one": 1.0, "zero": 0.0, "alpha_bar": scheduler.alphas_cumprod.mean().item()}
    assert abs(record["final_loss"] - want[expected]) < 0.03


def test_high_noise_share_moves_that_share_of_timesteps_to_the_noisiest_fifth():
    def draw(share):
        return training_timesteps(20_000, 1000, share, torch.Generator().manual_seed(0))

    uniform = torch.randint(0, 1000, (20_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(0.0), uniform)  # no extra draws: earlier runs replay exactly
    assert draw(1.0).min() >= 800 and draw(1.0).max() <= 999
    # Half drawn from the top fifth, the other half uniform: 0.5 + 0.5 * 0.2 = 0.6 up there.
    assert abs((draw(0.5) >= 800).float().mean().item() - 0.6) < 0.015


def test_pretrain_for_v_prediction_at_zero_terminal_snr_keeps_that_schedule(tmp_path):
    from diffusers import StableDiffusionPipeline

    config = WorldPretrainConfig(vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4,
                                 prediction_type="v_prediction",
                                 zero_terminal_snr=True)  # fmt: skip
    pretrain_world(config, tmp_path / "base", quiet=True)
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    scheduler = pipeline.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.alphas_cumprod[-1] == 0
    assert torch.isfinite(evaluate.generate(pipeline, ["a red circle"], 1, steps=2,
                                            quiet=True)).all()  # fmt: skip
    decoder_only = WorldPretrainConfig(unet_steps=0, decoder_steps=1, vae_batch_size=4,
                                       init_from=str(tmp_path / "base"))  # fmt: skip
    with pytest.raises(ConfigError, match="prediction_type=v_prediction zero_terminal_snr=True"):
        pretrain_world(decoder_only, tmp_path / "new", quiet=True)
    matching = replace(decoder_only, prediction_type="v_prediction", zero_terminal_snr=True)
    pretrain_world(matching, tmp_path / "new", quiet=True)
    kept = StableDiffusionPipeline.from_pretrained(tmp_path / "new").scheduler.config
    assert kept == scheduler.config


def test_pretrain_for_flow_matching_makes_a_flow_unet_that_world_sample_samples(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.flow import FlowSchedule

    config = WorldPretrainConfig(vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4,
                                 prediction_type="flow", flow_shift=2.0)  # fmt: skip
    _, record = pretrain_world(config, tmp_path / "flow", quiet=True)
    assert record["denoiser"]["final_loss"] > 0
    pipeline = load_pipeline(tmp_path / "flow")
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert FlowSchedule.from_scheduler(pipeline.scheduler).shift == 2.0
    argv = ["world", "sample", "--model", str(tmp_path / "flow"), "--prompt", "a red circle",
            "--num-images-per-prompt", "2", "--steps", "2", "--out", str(tmp_path / "s"),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "s" / "metrics.json").read_text())["results"]
    assert results["samples_per_prompt"] == 2 and 0 <= results["shapes_mean"] <= 1
    with pytest.raises(ConfigError, match="flow_shift > 0 and no zero_terminal_snr"):
        replace(config, zero_terminal_snr=True).validate()


def test_tiny_clip_training_step_and_saved_format(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from diffalign.world.clip import WorldClipConfig, build_processor, normalize, pretrain_clip

    config = WorldClipConfig(steps=3, batch_size=8)
    _, record = pretrain_clip(config, tmp_path, quiet=True)
    assert 0.0 <= record["heldout_retrieval_top1_of_16"] <= 1.0
    model = CLIPModel.from_pretrained(tmp_path)
    processor = CLIPProcessor.from_pretrained(tmp_path)
    assert processor.tokenizer("a photo of a cat").input_ids[:3] == [49406, 320, 1125]
    # The processor's pixels equal the training normalisation on 32x32 images.
    from diffalign.world.render import generate_pairs

    images, _ = generate_pairs(2, seed=0)
    arrays = [(img * 255).round().byte().permute(1, 2, 0).numpy() for img in images]
    pixels = processor.image_processor(images=arrays, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, normalize(images), atol=1e-5, rtol=1e-5)
    assert model.config.projection_dim == config.projection_dim
    assert build_processor().image_processor.crop_size["height"] == 32


def test_contrastive_loss_by_hand():
    from diffalign.world.clip import contrastive_loss

    image = torch.eye(2)
    text = torch.eye(2)
    # Logits 10*I: each row's cross-entropy is log(1 + e^-10).
    loss = contrastive_loss(image, text, torch.tensor(10.0).log())
    expected = torch.log1p(torch.exp(torch.tensor(-10.0))).item()
    assert abs(loss.item() - expected) < 1e-3 * expected


class _IdentityVAE:
    """encode / decode that hand the image back unchanged, as a VAE with a perfect decoder would."""

    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, images):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: images))

    def decode(self, latents):
        return SimpleNamespace(sample=latents)


def _two_phrase_share(prompts):
    from diffalign.world.grammar import parse_caption

    return sum(parse_caption(p).relation is not None for p in prompts) / len(prompts)


def test_reward_ceiling_by_hand():
    from diffalign.world.diagnose import reward_ceiling

    prompts = evaluate.heldout_prompts(12)
    share = _two_phrase_share(prompts)
    assert 0 < share < 1
    ceiling = reward_ceiling(_IdentityVAE(), prompts, samples_per_prompt=2)
    # Renderings score 1; a flipped relation halves the score of every other two-phrase image.
    assert ceiling["renderings_exact"] == ceiling["through_vae_exact"] == 1.0
    expected = 1 - 0.25 * share
    assert abs(ceiling["renderings_relations_at_chance"] - expected) < 1e-9
    assert abs(ceiling["through_vae_relations_at_chance"] - expected) < 1e-9


def test_composition_counts_found_objects_and_relations():
    from diffalign.world.diagnose import render_prompts

    prompts = [p for p in evaluate.heldout_prompts(30) if " of " in p or "above" in p][:4]
    for at_chance, relation in ((False, 1.0), (True, 0.5)):
        images = render_prompts(prompts, 2, relations_at_chance=at_chance)
        summary = evaluate.evaluate_prompts(images, prompts, samples_per_prompt=2)
        assert summary["two_phrase_objects_found"] == 1.0
        assert summary["relation_given_objects_found"] == relation
    blank = torch.full_like(images, 0.5)
    summary = evaluate.evaluate_prompts(blank, prompts, samples_per_prompt=2)
    assert summary["two_phrase_objects_found"] == 0.0
    assert summary["relation_given_objects_found"] is None


def test_relation_sensitivity_by_hand(clip_tokenizer):
    from diffalign.world.diagnose import relation_sensitivity

    def one_hot_encoder(ids):  # token states that only see their own token: no context
        return (torch.nn.functional.one_hot(ids, len(clip_tokenizer)).float(),)

    prompts = ["two red circles left of a blue square", "a green square above a red circle",
               "a yellow triangle"]  # fmt: skip
    result = relation_sensitivity(clip_tokenizer, one_hot_encoder, prompts)
    # One token changes in each (relation word; red -> green, green -> blue) of 10 and 9 tokens.
    expected = (2**0.5 / 10**0.5 + 2**0.5 / 9**0.5) / 2
    assert result["num_prompts"] == 2
    assert abs(result["relation_flip_change"] - expected) < 1e-6
    assert abs(result["colour_change"] - expected) < 1e-6
    with pytest.raises(ValueError, match="two phrases"):
        relation_sensitivity(clip_tokenizer, one_hot_encoder, ["a yellow triangle"])


class _LeftWordDenoiser:
    """A pipeline whose text states mark the word "left" and whose UNet predicts, everywhere,
    the number of "left" tokens in the caption, whatever the noisy input."""

    def __init__(self, tokenizer):
        left = tokenizer("left").input_ids[1]
        self.tokenizer, self.scheduler, self.vae = tokenizer, sd_ddim_scheduler(), _IdentityVAE()
        self.text_encoder = lambda ids: ((ids == left).float().unsqueeze(-1),)
        self.unet = lambda x, t, states: SimpleNamespace(
            sample=torch.zeros_like(x) + states.sum(dim=(1, 2)).view(-1, 1, 1, 1)
        )


def test_denoiser_sensitivity_by_hand(clip_tokenizer):
    from diffalign.world.diagnose import denoiser_sensitivity

    pipeline = _LeftWordDenoiser(clip_tokenizer)
    left = ["a red circle left of a blue square", "two green triangles left of a yellow circle"]
    right = [p.replace("left", "right") for p in left]
    # Noise n ~ N(0, 1) on 3072 latent values per image; the UNet predicts 1 for "left" captions
    # and 0 otherwise, so a sample's loss is mean((1 - n)^2) ~ 2 or mean(n^2) ~ 1: flipping
    # "left" to "right" changes it by mean(n^2) - mean((1 - n)^2) = -1 + 2 mean(n) ~ -1, the
    # other way by ~ +1, and a colour change not at all.
    for prompts, loss, increase in ((left, 2.0, -1.0), (right, 1.0, 1.0)):
        result = denoiser_sensitivity(pipeline, prompts + ["a yellow triangle"],
                                      samples_per_prompt=8)  # fmt: skip
        assert result["num_images"] == 16
        assert abs(result["loss"] - loss) < 0.05
        assert abs(result["relation_flip_loss_increase"] - increase) < 0.05
        assert result["relation_flip_loss_increase_stderr"] < 0.02  # 2 / sqrt(3072 * 16) = 0.009
        assert result["colour_change_loss_increase"] == 0.0
    with pytest.raises(ValueError, match="two phrases"):
        denoiser_sensitivity(pipeline, ["a yellow triangle"])


def test_denoiser_sensitivity_follows_the_prediction_type(clip_tokenizer):
    from diffusers import DDIMScheduler

    from diffalign.world.diagnose import denoiser_sensitivity, render_prompts

    pipeline = _LeftWordDenoiser(clip_tokenizer)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config,
                                                   prediction_type="sample")  # fmt: skip
    prompts = ["a red circle right of a blue square", "a green square below a red circle"]
    # No "left" in these captions: the UNet predicts 0, so against the clean latents (the
    # renderings themselves, through the identity VAE) the loss is their mean square.
    clean = render_prompts(prompts, samples_per_prompt=2) * 2 - 1
    result = denoiser_sensitivity(pipeline, prompts, samples_per_prompt=2)
    assert abs(result["loss"] - clean.pow(2).mean().item()) < 1e-6
    assert result["colour_change_loss_increase"] == 0.0


def test_world_diagnose_command(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    args = ["world", "diagnose", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "d"),
            "--num-prompts", "6", "--samples-per-prompt", "2", "--split", "validation",
            "--quiet"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "d" / "metrics.json").read_text())["results"]
    ceiling = results["reward_ceiling"]
    assert ceiling["renderings_exact"] == 1.0
    assert 0.0 <= ceiling["through_vae_exact"] <= 1.0
    assert results["split"] == "validation" and results["text_encoder"]["num_prompts"] >= 1
    assert results["denoiser"]["num_images"] == 2 * results["text_encoder"]["num_prompts"]
