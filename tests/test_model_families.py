"""What SDXL and Stable Diffusion 3 share with SD 1.x in diffalign: both trainers, loading,
tree search, sampling and the rollout bench, each run on a tiny pipeline of the family built
offline. What is particular to a family is tested in ``test_sdxl.py`` and ``test_sd3.py``."""

import dataclasses
import json
from typing import NamedTuple

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from diffalign.cli import main
from diffalign.commands.sample import count_calls
from diffalign.lora import load_lora, merge_lora
from diffalign.models import (
    FAMILY_NAMES,
    UnsupportedModelError,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    denoiser_of,
    load_pipeline,
)
from diffalign.pipelines.chain import PipelineChain
from diffalign.pipelines.dts import DTSPipeline, SD3DTSPipeline, SDXLDTSPipeline, search_pipeline
from diffalign.pipelines.rollout import (
    RolloutPipeline,
    SD3RolloutPipeline,
    SDXLRolloutPipeline,
    rollout_pipeline,
)
from diffalign.train.awm import AWMTrainer
from diffalign.train.config import AWMConfig, DDPOConfig
from diffalign.train.ddpo import DDPOTrainer

from .test_trainers import SMALL, TINY

PROMPTS = ["a red circle", "a blue square"]


class Family(NamedTuple):
    name: str
    build: object
    diffusers_class: type
    rollout_class: type
    search_class: type
    load_kwargs: dict  # what diffusers needs to load the tiny folder (SD3: no T5 encoder)


FAMILIES = [
    Family("sdxl", build_tiny_sdxl_pipeline, StableDiffusionXLPipeline, SDXLRolloutPipeline,
           SDXLDTSPipeline, {}),
    Family("sd3", build_tiny_sd3_pipeline, StableDiffusion3Pipeline, SD3RolloutPipeline,
           SD3DTSPipeline, {"text_encoder_3": None, "tokenizer_3": None}),
]  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES, ids=[family.name for family in FAMILIES])
def family(request):
    return request.param


@pytest.fixture()
def tiny(family):
    return family.build(seed=0)


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{family.name}")
    family.build(seed=0).save_pretrained(path)
    return path


def test_rollouts_at_eta_0_are_the_diffusers_pipelines_images(family, tiny):
    reference = family.diffusers_class(**tiny.components)
    reference.set_progress_bar_config(disable=True)
    deterministic = {}
    if family.name == "sdxl":  # SDXL ships Euler; rollouts replace it with DDIM, same config
        reference.scheduler = DDIMScheduler.from_config(tiny.scheduler.config)
        deterministic = {"eta": 0.0}  # SD3's diffusers pipeline has Euler steps only
    expected = reference(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **deterministic,
    ).images
    pipeline = rollout_pipeline(tiny)
    pipeline.set_progress_bar_config(disable=True)
    rollout = pipeline(PROMPTS, num_inference_steps=4, guidance_scale=3.0, eta=0.0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert type(pipeline) is family.rollout_class
    torch.testing.assert_close(rollout.images, expected, atol=1e-6, rtol=0)
    assert rollout.pooled_prompt_embeds.shape == rollout.negative_pooled_prompt_embeds.shape
    picked = rollout.select([1]).conditioning()
    assert torch.equal(picked.pooled, rollout.pooled_prompt_embeds[1:])


def test_ddpo_recomputes_the_rollouts_log_probs_and_trains(tiny, tmp_path):
    config = DDPOConfig(max_steps=1, **{**SMALL, "stat_min_count": 2, "train_batch_size": 4})
    trainer = DDPOTrainer(config, tmp_path, pipeline=tiny)
    assert trainer.denoiser is denoiser_of(tiny)
    batch = trainer.sample_round(0)
    count, steps = len(batch.rollout), len(batch.rollout.timesteps)
    with torch.no_grad():
        recomputed = sum(
            trainer.transition_log_probs(
                batch.rollout, torch.arange(count), torch.full((count,), k)
            )  # fmt: skip
            for k in range(steps)
        )
    # the training forward sees the conditioning the rollout was sampled with (CFG and the added
    # conditioning: pooled embeddings, SDXL's time ids): with any of it wrong they would differ
    torch.testing.assert_close(recomputed, batch.rollout.log_probs.sum(1))
    before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters()
              if p.requires_grad}  # fmt: skip
    metrics = trainer.train_on(batch, 0)
    assert metrics["loss"] == metrics["loss"]  # not NaN
    after = dict(trainer.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_an_awm_update_fits_the_favoured_samples_better(tiny, tmp_path):
    settings = {"train_batch_size": 4, "beta_kl": 0.0, "learning_rate": 1e-3,
                "num_train_timesteps": 1}  # fmt: skip
    trainer = AWMTrainer(AWMConfig(max_steps=1, **{**SMALL, **settings}), tmp_path, pipeline=tiny)
    batch = trainer.sample_round(0)
    count = len(batch.rollout)
    advantages = torch.tensor([1.0, -1.0]).repeat(count // 2)
    batch = dataclasses.replace(batch, advantages=advantages)
    noise = torch.randn(batch.rollout.latents[:, -1].shape,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    timesteps = torch.full((1,), 500)  # mid-chain (flow: the shifted time 0.75)

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


def test_a_trained_run_saves_a_diffusers_folder_and_checkpoints(family, folder, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "awm", "--recipe", "tiny-jpeg", *TINY, "--set", f"model={folder}",
            "save_every=2", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    loader = family.diffusers_class
    final = loader.from_pretrained(run / "final", **family.load_kwargs)
    card = (run / "final" / "README.md").read_text()
    extra = "".join(f", {name}=None" for name in family.load_kwargs)
    assert f'{loader.__name__}.from_pretrained("path/to/this/folder"{extra})' in card
    base = loader.from_pretrained(folder, **family.load_kwargs)
    trained = denoiser_of(final).state_dict()
    changed = [
        n for n, w in trained.items() if not torch.equal(w, denoiser_of(base).state_dict()[n])
    ]
    assert changed  # the LoRA was merged into the saved denoiser
    load_lora(base, run / "lora")  # lora/ holds the adapter alone, in diffusers' format
    merge_lora(denoiser_of(base))
    for name, weight in trained.items():
        torch.testing.assert_close(denoiser_of(base).state_dict()[name], weight, atol=1e-6, rtol=0)
    resumed = load_pipeline(run / "checkpoints" / "checkpoint-00000002", RolloutPipeline)
    assert type(resumed) is family.rollout_class
    for name, weight in trained.items():
        torch.testing.assert_close(denoiser_of(resumed).state_dict()[name], weight, atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


def test_load_pipeline_picks_the_counterpart_of_the_class_asked_for(family, folder):
    assert type(load_pipeline(folder, RolloutPipeline)) is family.rollout_class
    assert type(load_pipeline(folder, DTSPipeline)) is family.search_class
    assert type(load_pipeline(folder, StableDiffusionPipeline)) is family.diffusers_class

    class OnlySD(StableDiffusionPipeline):
        pass

    expected = (
        rf"is {FAMILY_NAMES[family.name]} \({family.diffusers_class.__name__}\), which OnlySD"
    )
    with pytest.raises(UnsupportedModelError, match=expected):
        load_pipeline(folder, OnlySD)


def test_tree_search_conditions_as_rollouts_do_and_counts_its_rows(family, tiny):
    rollout = rollout_pipeline(tiny)
    rollout.set_progress_bar_config(disable=True)
    sampled = rollout("a red circle", num_inference_steps=2, guidance_scale=3.0, decode=False)
    chain = PipelineChain(tiny, "a red circle", lambda images, prompts: images.mean((1, 2, 3)),
                          num_inference_steps=2, guidance_scale=3.0)  # fmt: skip
    for mine, theirs in [
        (chain.conditioning, sampled.conditioning()),
        (chain.negative_conditioning, sampled.negative_conditioning()),
    ]:
        for name in ("embeds", "pooled", "time_ids"):
            if getattr(theirs, name) is None:
                assert getattr(mine, name) is None
            else:
                torch.testing.assert_close(getattr(mine, name), getattr(theirs, name))
    searcher = search_pipeline(tiny)
    searcher.set_progress_bar_config(disable=True)
    calls = count_calls(denoiser_of(searcher))  # [calls, rows]
    out = searcher("a red circle", lambda images, prompts: images.mean((1, 2, 3)),
                   budget_nfe=32, sampler="dts-star", num_inference_steps=4,
                   guidance_scale=3.0, output_type="pt", batch_size=2)  # fmt: skip
    assert type(searcher) is family.search_class
    assert 24 <= calls[1] == out.stats[0]["nfe"] <= 32 and out.images.shape == (1, 3, 32, 32)


def test_sample_command_searches_a_folder(folder, tmp_path):
    argv = ["sample", "--model", str(folder), "--sampler", "best-of-n", "--reward",
            "jpeg_compressibility", "--budget-nfe", "16", "--steps", "4", "--guidance-scale",
            "3", "--prompt", "a red circle", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    records = json.loads((tmp_path / "samples.json").read_text())
    assert [r["nfe"] for r in records] == [16.0] and records[0]["reward"] is not None


def test_bench_rollout_times_a_folder_against_its_diffusers_pipeline(folder, tmp_path):
    argv = ["bench", "rollout", "--model", str(folder), "--batch-size", "2", "--steps", "2",
            "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert results["throughput_ratio_vs_diffusers"] > 0
    assert results["ddpo_step_images_per_s"] > 0 and results["awm_step_images_per_s"] > 0
