"""SDXL: rollouts, both trainers, tree search and loading, on a tiny SDXL pipeline built offline."""

import dataclasses
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffalign.cli import main
from diffalign.models import (
    UnsupportedModelError,
    build_tiny_sdxl_pipeline,
    load_lora,
    load_pipeline,
    merge_lora,
)
from diffalign.pipelines.chain import PipelineChain
from diffalign.pipelines.conditioning import Conditioning
from diffalign.pipelines.dts import DTSPipeline, SDXLDTSPipeline, search_pipeline
from diffalign.pipelines.rollout import RolloutPipeline, SDXLRolloutPipeline, rollout_pipeline
from diffalign.train.awm import AWMTrainer
from diffalign.train.config import AWMConfig, DDPOConfig
from diffalign.train.ddpo import DDPOTrainer

from .test_dts_pipeline import count_rows
from .test_trainers import SMALL, TINY

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture()
def sdxl():
    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_sdxl_rollouts_at_eta_0_are_diffusers_sdxl_images(sdxl):
    reference = StableDiffusionXLPipeline(**sdxl.components)
    reference.scheduler = DDIMScheduler.from_config(sdxl.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        eta=0.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    pipeline = rollout_pipeline(sdxl)
    pipeline.set_progress_bar_config(disable=True)
    rollout = pipeline(PROMPTS, num_inference_steps=4, guidance_scale=3.0, eta=0.0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert isinstance(pipeline, SDXLRolloutPipeline)
    torch.testing.assert_close(rollout.images, expected, atol=1e-6, rtol=0)
    assert rollout.pooled_prompt_embeds.shape == rollout.negative_pooled_prompt_embeds.shape
    assert rollout.add_time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    picked = rollout.select([1])
    assert isinstance(picked.conditioning(), Conditioning)
    assert torch.equal(picked.conditioning().pooled, rollout.pooled_prompt_embeds[1:])


def test_ddpo_recomputes_the_sdxl_rollouts_log_probs_and_trains(sdxl, tmp_path):
    config = DDPOConfig(max_steps=1, **{**SMALL, "stat_min_count": 2, "train_batch_size": 4})
    trainer = DDPOTrainer(config, tmp_path, pipeline=sdxl)
    batch = trainer.sample_round(0)
    count, steps = len(batch.rollout), len(batch.rollout.timesteps)
    with torch.no_grad():
        recomputed = sum(
            trainer.transition_log_probs(
                batch.rollout, torch.arange(count), torch.full((count,), k)
            )  # fmt: skip
            for k in range(steps)
        )
    # the training forward sees the conditioning the rollout was sampled with (CFG, pooled
    # embeddings and time ids): with any of them wrong the log-probs would differ
    torch.testing.assert_close(recomputed, batch.rollout.log_probs.sum(1))
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    metrics = trainer.train_on(batch, 0)
    assert metrics["loss"] == metrics["loss"]  # not NaN
    after = dict(trainer.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_an_awm_update_on_sdxl_fits_the_favoured_samples_better(sdxl, tmp_path):
    settings = {"train_batch_size": 4, "beta_kl": 0.0, "learning_rate": 1e-3,
                "num_train_timesteps": 1}  # fmt: skip
    config = AWMConfig(max_steps=1, **{**SMALL, **settings})
    trainer = AWMTrainer(config, tmp_path, pipeline=sdxl)
    batch = trainer.sample_round(0)
    count = len(batch.rollout)
    advantages = torch.tensor([1.0, -1.0]).repeat(count // 2)
    batch = dataclasses.replace(batch, advantages=advantages)
    final = batch.rollout.latents[:, -1]
    noise = torch.randn(final.shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.full((1,), 500)

    @torch.no_grad()
    def errors() -> torch.Tensor:  # each sample's denoising error, conditioned as it was sampled
        rollout = batch.rollout
        return torch.tensor([
            trainer.sample_loss(rollout.latents[i : i + 1, -1], rollout.conditioning([i]),
                                torch.ones(1), timesteps, noise[i : i + 1],
                                rollout.negative_conditioning([i]), rollout.guidance_scale,
                                ).diagnostics["mse"]
            for i in range(count)
        ])  # fmt: skip

    before = errors()
    trainer.train_on(batch, 0)
    gain = before - errors()
    assert (advantages * gain).sum() > 0  # fits A > 0 samples better, A < 0 ones worse


def test_a_trained_sdxl_run_saves_a_diffusers_sdxl_folder_and_checkpoints(sdxl_folder, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "awm", "--recipe", "tiny-jpeg", *TINY, "--set", f"model={sdxl_folder}",
            "save_every=2", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    final = StableDiffusionXLPipeline.from_pretrained(run / "final")
    assert "StableDiffusionXLPipeline.from_pretrained" in (run / "final" / "README.md").read_text()
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    changed = [n for n, w in final.unet.state_dict().items()
               if not torch.equal(w, base.unet.state_dict()[n])]  # fmt: skip
    assert changed  # the LoRA was merged into the saved UNet
    load_lora(base, run / "lora")  # lora/ holds the adapter alone, in diffusers' format
    merge_lora(base.unet)
    for name, weight in final.unet.state_dict().items():
        torch.testing.assert_close(base.unet.state_dict()[name], weight, atol=1e-6, rtol=0)
    resumed = load_pipeline(run / "checkpoints" / "checkpoint-00000002", RolloutPipeline)
    assert isinstance(resumed, SDXLRolloutPipeline)
    for name, weight in final.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[name], weight, atol=1e-5, rtol=1e-4)


def test_load_pipeline_picks_the_sdxl_counterpart_of_the_class_asked_for(sdxl_folder):
    assert type(load_pipeline(sdxl_folder, RolloutPipeline)) is SDXLRolloutPipeline
    assert type(load_pipeline(sdxl_folder, DTSPipeline)) is SDXLDTSPipeline
    assert type(load_pipeline(sdxl_folder, StableDiffusionPipeline)) is StableDiffusionXLPipeline

    class OnlySD(StableDiffusionPipeline):
        pass

    with pytest.raises(UnsupportedModelError, match="SDXL pipeline, which OnlySD does not run"):
        load_pipeline(sdxl_folder, OnlySD)


def test_the_sdxl_refiner_is_refused_with_what_runs(sdxl_folder, tmp_path):
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    index = json.loads((sdxl_folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="SDXL refiner"):
        load_pipeline(refiner, RolloutPipeline)


def test_tree_search_on_sdxl_conditions_as_rollouts_do_and_counts_its_rows(sdxl):
    rollout = rollout_pipeline(sdxl)
    rollout.set_progress_bar_config(disable=True)
    sampled = rollout("a red circle", num_inference_steps=2, guidance_scale=3.0, decode=False)
    chain = PipelineChain(sdxl, "a red circle", lambda images, prompts: images.mean((1, 2, 3)),
                          num_inference_steps=2, guidance_scale=3.0)  # fmt: skip
    for mine, theirs in [
        (chain.conditioning, sampled.conditioning()),
        (chain.negative_conditioning, sampled.negative_conditioning()),
    ]:
        for name in ("embeds", "pooled", "time_ids"):
            torch.testing.assert_close(getattr(mine, name), getattr(theirs, name))
    searcher = search_pipeline(sdxl)
    searcher.set_progress_bar_config(disable=True)
    rows = count_rows(searcher.unet)
    out = searcher("a red circle", lambda images, prompts: images.mean((1, 2, 3)),
                   budget_nfe=32, sampler="dts-star", num_inference_steps=4,
                   guidance_scale=3.0, output_type="pt", batch_size=2)  # fmt: skip
    assert isinstance(searcher, SDXLDTSPipeline)
    assert 24 <= rows[0] == out.stats[0]["nfe"] <= 32 and out.images.shape == (1, 3, 32, 32)


def test_sample_command_searches_an_sdxl_folder(sdxl_folder, tmp_path):
    argv = ["sample", "--model", str(sdxl_folder), "--sampler", "best-of-n", "--reward",
            "jpeg_compressibility", "--budget-nfe", "16", "--steps", "4", "--guidance-scale",
            "3", "--prompt", "a red circle", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    records = json.loads((tmp_path / "samples.json").read_text())
    assert [r["nfe"] for r in records] == [16.0] and records[0]["reward"] is not None


def test_a_float16_sdxl_vae_decodes_in_float32_and_stays_float16(sdxl):
    from diffalign.pipelines.rollout import decode_latents

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sdxl.vae.to(torch.float16)
    images = decode_latents(sdxl, latents)
    assert sdxl.vae.dtype == torch.float16 and images.dtype == torch.float32
    sdxl.vae.to(torch.float32)  # the same (float16-rounded) weights, decoding in float32
    expected = decode_latents(sdxl, latents)
    torch.testing.assert_close(images, expected, atol=0, rtol=0)


def test_the_sdxl_random_benchmark_model_has_sdxl_base_sizes_and_its_parts_fit():
    from diffalign.benchmarks.rollout import build_sdxl_random_pipeline
    from diffalign.pipelines.conditioning import encode_conditioning
    from diffalign.pipelines.rollout import guided_noise_prediction

    meta = torch.device("meta")  # shapes only: no memory, no arithmetic
    pipeline = build_sdxl_random_pipeline(meta)
    sizes = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
             for name in ("unet", "text_encoder", "text_encoder_2")}  # fmt: skip
    assert sizes["unet"] == 2_567_463_684 and sizes["text_encoder_2"] == 694_659_840
    conditioning, negative = encode_conditioning(pipeline, PROMPTS, meta, 1, True, None, 1024, 1024)
    assert conditioning.embeds.shape == (2, 77, 2048) and conditioning.pooled.shape == (2, 1280)
    latents = torch.zeros(2, 4, 128, 128, device=meta)
    timestep = torch.tensor(999, device=meta)
    prediction = guided_noise_prediction(
        pipeline.unet, latents, timestep, conditioning, negative, 5.0
    )
    assert prediction.shape == latents.shape


def test_bench_rollout_times_an_sdxl_folder_against_diffusers_sdxl(sdxl_folder, tmp_path):
    argv = ["bench", "rollout", "--model", str(sdxl_folder), "--batch-size", "2", "--steps", "2",
            "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    results = metrics["results"]
    assert results["throughput_ratio_vs_diffusers"] > 0
    assert results["ddpo_step_images_per_s"] > 0 and results["awm_step_images_per_s"] > 0
