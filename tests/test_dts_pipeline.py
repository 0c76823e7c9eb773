"""DTSPipeline, `diffalign sample --sampler ...` and `diffalign bench dts` on tiny real models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo import register_backend

from diffalign.cli import main
from diffalign.pipelines.dts import SEARCH_SAMPLERS, DTSPipeline, SearchOptions
from diffalign.world.evaluate import heldout_prompts

from .conftest import requires_cuda


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture()
def dts_pipeline(tiny_pipeline):
    pipeline = DTSPipeline(**tiny_pipeline.components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def count_rows(unet) -> list[int]:
    rows = [0]
    unet.register_forward_pre_hook(lambda _m, args: rows.__setitem__(0, rows[0] + len(args[0])))
    return rows


@pytest.mark.parametrize("sampler", SEARCH_SAMPLERS)
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_nfe_accounting_equals_the_unet_rows_evaluated(dts_pipeline, sampler, guidance_scale):
    rows = count_rows(dts_pipeline.unet)
    out = dts_pipeline(["a red circle", "a blue square"], brightness, budget_nfe=50,
                       sampler=sampler, num_inference_steps=4, guidance_scale=guidance_scale,
                       num_images_per_prompt=2, output_type="pt", batch_size=3)  # fmt: skip
    spent = [s["nfe"] for s in out.stats]
    assert rows[0] == sum(spent)
    assert all(s <= 50 for s in spent)
    assert out.images.shape == (4, 3, 32, 32) and out.rewards.shape == (4,)
    assert out.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    rows_per_chain = 4 * (2 if guidance_scale > 1 else 1)
    assert all(s["reward_calls"] >= 50 // rows_per_chain for s in out.stats)


@pytest.mark.parametrize("sampler", SEARCH_SAMPLERS)
def test_flow_models_are_searched_on_their_own_schedule(sampler):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.flow import FlowSchedule
    from diffalign.models import build_tiny_pipeline
    from diffalign.pipelines.chain import PipelineChain

    pipeline = DTSPipeline(**build_tiny_pipeline(seed=0, flow_shift=3.0).components,
                           requires_safety_checker=False)  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    rows = count_rows(pipeline.unet)
    out = pipeline("a red circle", brightness, budget_nfe=32, sampler=sampler,
                   num_inference_steps=4, guidance_scale=3.0, eta=0.7, output_type="pt",
                   batch_size=2)  # fmt: skip
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)  # not made DDIM
    assert rows[0] == out.stats[0]["nfe"] <= 32
    chain = PipelineChain(pipeline, "a red circle", brightness, 4, 3.0, eta=0.7)
    assert isinstance(chain.schedule, FlowSchedule)
    assert chain.timesteps[0] == 1000.0 and chain.next_timesteps[-1] == 0.0  # noise to clean


@pytest.mark.parametrize("sampler", ["dts-star", "best-of-n"])
def test_returned_rewards_are_the_rewards_of_the_returned_images(dts_pipeline, sampler):
    out = dts_pipeline("a red circle", brightness, budget_nfe=64, sampler=sampler,
                       num_inference_steps=4, guidance_scale=2.0, output_type="pt")  # fmt: skip
    torch.testing.assert_close(out.rewards, brightness(out.images, None), atol=1e-5, rtol=0)
    assert out.rewards[0] == pytest.approx(out.stats[0]["best_reward"][-1], abs=1e-6)


def test_dts_star_beats_a_single_chain_on_the_same_prompt(dts_pipeline):
    one = dts_pipeline("a red circle", brightness, budget_nfe=8, sampler="best-of-n",
                       num_inference_steps=4, guidance_scale=2.0, output_type="pt")  # fmt: skip
    searched = dts_pipeline("a red circle", brightness, budget_nfe=160, sampler="dts-star",
                            num_inference_steps=4, guidance_scale=2.0,
                            output_type="pt")  # fmt: skip
    assert searched.stats[0]["samples"] > 20
    assert searched.rewards[0] > one.rewards[0]


def test_at_one_seed_dts_star_starts_from_best_of_ns_chains(dts_pipeline):
    # Paired comparisons: until the tree has values to branch on, its rollouts are best-of-N's.
    kwargs = dict(budget_nfe=16, num_inference_steps=4, guidance_scale=2.0, output_type="pt",
                  batch_size=2, seed=3)  # fmt: skip
    plain = dts_pipeline("a red circle", brightness, sampler="best-of-n", **kwargs)
    tree = dts_pipeline("a red circle", brightness, sampler="dts-star", **kwargs)
    assert tree.stats[0]["samples"] == plain.stats[0]["samples"] == 2
    assert tree.stats[0]["best_reward"] == pytest.approx(plain.stats[0]["best_reward"], abs=1e-6)
    other = dts_pipeline("a red circle", brightness, sampler="dts-star", **{**kwargs, "seed": 4})
    assert other.stats[0]["best_reward"][-1] != pytest.approx(tree.stats[0]["best_reward"][-1])


def test_saved_folders_load_as_dts_pipelines(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = DTSPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a red circle", "shapes", budget_nfe=12, sampler="dts", num_inference_steps=3,
                 guidance_scale=2.0)  # fmt: skip
    assert isinstance(loaded, DTSPipeline) and out.images[0].size == (32, 32)


def test_bad_search_inputs_raise_clear_errors(dts_pipeline):
    with pytest.raises(ValueError, match="sampler must be one of"):
        SearchOptions(sampler="beam")
    with pytest.raises(ValueError, match="eta must be > 0"):
        dts_pipeline("x", brightness, budget_nfe=40, num_inference_steps=4, eta=0.0)
    with pytest.raises(ValueError, match="below one full chain"):
        dts_pipeline("x", brightness, budget_nfe=5, num_inference_steps=4, guidance_scale=2.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        dts_pipeline([], brightness)
    with pytest.raises(TypeError, match="take seed=INT, not generator"):
        dts_pipeline("x", brightness, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"\['num_particles'\].*'smc_potential'"):
        dts_pipeline("x", brightness, num_particles=4)


def test_outputs_come_as_diffusers_gives_them_tuple_array_or_latents(dts_pipeline):
    kwargs = {"budget_nfe": 8, "num_inference_steps": 2, "guidance_scale": 1.0,
              "output_type": "pt", "sampler": "best-of-n"}  # fmt: skip
    output = dts_pipeline("a red circle", brightness, **kwargs)
    images, rewards, prompts, stats = dts_pipeline("a red circle", brightness, return_dict=False,
                                                   **kwargs)  # fmt: skip
    assert torch.equal(images, output.images) and torch.equal(rewards, output.rewards)
    assert (prompts, stats) == (output.prompts, output.stats)
    as_array = dts_pipeline("a red circle", brightness, **{**kwargs, "output_type": "np"})
    assert np.array_equal(as_array.images, output.images.permute(0, 2, 3, 1).numpy())
    latents = dts_pipeline("a red circle", brightness, **{**kwargs, "output_type": "latent"})
    assert latents.images.shape == (1, 4, 16, 16)  # the tiny model: 32 px images
    assert torch.equal(latents.rewards, output.rewards)
    with pytest.raises(ValueError, match="output_type must be one of"):
        dts_pipeline("a red circle", brightness, **{**kwargs, "output_type": "numpy"})


def test_sample_command_searches_and_writes_samples_json(tmp_path):
    out = tmp_path / "dts"
    args = ["sample", "--model", "diffalign:tiny-random", "--prompt", "a red circle", "--prompt",
            "a blue square", "--sampler", "dts-star", "--reward", "shapes", "--budget-nfe", "24",
            "--steps", "3", "--guidance-scale", "2", "--num-images-per-prompt", "2", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert all(0 <= s["reward"] <= 1 and s["nfe"] == 12 for s in samples)
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert results["nfe"] == 48 and len(results["search"]) == 2
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 4
    # searches that stop short of the budget by different amounts: each image has its own cost
    uneven = tmp_path / "uneven"
    assert main([*args[:12], "26", *args[13:-1], str(uneven)]) == 0
    searches = json.loads((uneven / "metrics.json").read_text())["results"]["search"]
    spent = [search["nfe"] for search in searches]
    assert spent[0] != spent[1]  # 26 and 24 on this model and seed
    records = json.loads((uneven / "samples.json").read_text())
    assert [record["nfe"] for record in records] == [spent[0] / 2] * 2 + [spent[1] / 2] * 2
    # one prompt a batch: each prompt's search keeps its seed, so the same images and records
    batched = tmp_path / "batched"
    assert main([*args[:-1], str(batched), "--batch-size", "2"]) == 0
    assert json.loads((batched / "samples.json").read_text()) == samples
    again = json.loads((batched / "metrics.json").read_text())["results"]
    assert again["search"] == results["search"]
    for name in (f"000{i}.png" for i in range(4)):
        pixels = [np.asarray(Image.open(folder / "images" / name)) for folder in (out, batched)]
        assert np.array_equal(*pixels)


def test_sample_command_passes_the_tree_settings(tmp_path):
    out = tmp_path / "dts"
    args = ["sample", "--model", "diffalign:tiny-random", "--prompt", "a red circle", "--sampler",
            "dts-star", "--reward", "shapes", "--budget-nfe", "36", "--steps", "3",
            "--guidance-scale", "2", "--quiet", "--branch-step", "1", "--widening-c", "2",
            "--widening-alpha", "0", "--expansion", "shallowest", "--tree-batch-size", "1",
            "--exploration", "0.5", "--inverse-temperature", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    tree = results["tree_settings"]
    assert (tree["mode"], tree["branch_step"], tree["exploration"]) == ("search", 1, 0.5)
    assert (tree["rollouts_per_batch"], tree["inverse_temperature"]) == (1, 0.0)
    # 2 chains of 6 NFEs (CFG doubles the rows), then 6 continuations from step 1 of 4 NFEs each
    assert results["search"][0]["nfe_at"] == [6, 12, 16, 20, 24, 28, 32, 36]
    assert (tree["max_nodes"], tree["storage_device"]) == (100_000, None)
    with pytest.raises(SystemExit, match="--branch-step must lie below --steps"):
        main([*args[:-2], "--branch-step", "3", "--out", str(out)])
    with pytest.raises(SystemExit, match="storage_device must name a torch device.*'gpu'"):
        main([*args[:-2], "--tree-storage-device", "gpu", "--out", str(out)])


def test_sample_command_caps_the_tree_and_stores_it_where_asked(tmp_path):
    out = tmp_path / "capped"
    args = ["sample", "--model", "diffalign:tiny-random", "--prompt", "a red circle", "--sampler",
            "dts-star", "--reward", "shapes", "--budget-nfe", "60", "--steps", "3",
            "--guidance-scale", "2", "--quiet", "--tree-batch-size", "1", "--max-nodes", "7",
            "--tree-storage-device", "cpu", "--out", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="stopped at max_nodes=7"):
        assert main(args) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert (results["tree_settings"]["max_nodes"], results["tree_settings"]["storage_device"]) == (
        7,
        "cpu",
    )
    search = results["search"][0]
    assert search["stopped"] == "max_nodes" and search["tree_nodes"] <= 7
    assert search["nfe"] < 60  # short of the budget


GRAPHS = []  # the graphs dynamo handed to the backend below


@register_backend(name="diffalign_test_counting")
def _counting_backend(graph, example_inputs):
    """A torch.compile backend that records each traced graph and runs it as it is."""
    GRAPHS.append(graph)
    return graph.forward


def test_sample_compiled_gives_the_images_and_counts_of_the_module_it_compiles(tmp_path):
    GRAPHS.clear()
    args = ["sample", "--model", "diffalign:tiny-random", "--prompt", "a red circle", "--sampler",
            "dts-star", "--reward", "shapes", "--budget-nfe", "26", "--steps", "3",
            "--guidance-scale", "2", "--tree-batch-size", "2", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert not GRAPHS
    compiled = tmp_path / "compiled"
    assert main([*args, "--compile", "diffalign_test_counting", "--out", str(compiled)]) == 0
    assert GRAPHS  # dynamo traced the UNet and handed it to the backend
    results = {name: json.loads((tmp_path / name / "metrics.json").read_text())["results"]
               for name in ("eager", "compiled")}  # fmt: skip
    assert results["compiled"]["compile_backend"] == "diffalign_test_counting"
    assert results["compiled"]["nfe"] == results["eager"]["nfe"] == 24  # counted through it
    assert results["compiled"]["search"] == results["eager"]["search"]
    pixels = [np.asarray(Image.open(tmp_path / name / "images" / "0000.png"))
              for name in ("eager", "compiled")]  # fmt: skip
    assert np.array_equal(*pixels)


@requires_cuda
def test_sampling_compiled_by_inductor_on_cuda_matches_eager_sampling(tmp_path):
    args = ["sample", "--model", "diffalign:tiny-shapes", "--prompt", "a red circle above a blue "
            "square", "--steps", "4", "--num-images-per-prompt", "4", "--device", "cuda",
            "--dtype", "fp32", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--compile", "inductor", "--out", str(tmp_path / "compiled")]) == 0
    results = {name: json.loads((tmp_path / name / "metrics.json").read_text())["results"]
               for name in ("eager", "compiled")}  # fmt: skip
    assert results["compiled"]["nfe"] == results["eager"]["nfe"] == 4 * 4 * 2
    for index in range(4):
        pixels = [np.asarray(Image.open(tmp_path / name / "images" / f"000{index}.png"), float)
                  for name in ("eager", "compiled")]  # fmt: skip
        assert np.abs(pixels[0] - pixels[1]).max() <= 2  # inductor's kernels round differently


REFUSING_COMMANDS = [["sample", "--prompt", "x"], ["eval", "--prompts", "x", "--metrics", "fid"],
                     ["bench", "dts"], ["bench", "rollout"]]  # fmt: skip


@pytest.mark.parametrize("command", REFUSING_COMMANDS)
def test_an_unknown_compile_backend_is_refused_before_any_model_loads(tmp_path, command):
    argv = [*command, "--compile", "inductr", "--out", str(tmp_path)]
    if command[0] != "bench":
        argv += ["--model", "does/not-exist"]
    with pytest.raises(SystemExit, match="--compile: 'inductr' is not a torch.compile backend.*"
                                         "inductor"):  # fmt: skip
        main(argv)


def test_sample_command_rejects_search_without_reward_or_budget(tmp_path, capsys):
    args = ["sample", "--model", "diffalign:tiny-random", "--prompt", "x", "--sampler", "dts",
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit, match="needs --reward and --budget-nfe"):
        main(args)


def test_bench_dts_writes_the_ratio_the_curves_and_the_plot(tmp_path):
    args = ["bench", "dts", "--num-prompts", "1", "--steps", "3", "--n", "4", "--budgets", "2,4",
            "--split", "validation", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert results["settings"]["split"] == "validation"
    assert results["prompts"] == heldout_prompts(1, split="validation")
    assert "nfe_ratio_dts_star_vs_best_of_n" in results
    assert set(results["curves"]) == {"best-of-n", "dts-star", "smc", "dts"}
    assert results["curves"]["smc"]["nfe"] == [2 * results["nfe_per_chain"],
                                               4 * results["nfe_per_chain"]]  # fmt: skip
    assert results["best_of_n_nfe"] == 4 * results["nfe_per_chain"]
    assert (tmp_path / "reward_vs_nfe.png").is_file()


def test_bench_dts_passes_the_tree_settings_and_can_skip_the_curves(tmp_path, monkeypatch):
    import diffalign.pipelines.dts as dts_module

    seen, etas, original = [], set(), dts_module.run_search

    def recording_search(chain, options, *args):
        seen.append(options)
        etas.add(chain.eta)
        return original(chain, options, *args)

    monkeypatch.setattr(dts_module, "run_search", recording_search)
    args = ["bench", "dts", "--num-prompts", "1", "--steps", "3", "--n", "4", "--no-curves",
            "--exploration", "0.25", "--widening-alpha", "0.7", "--eta", "0.5", "--quiet",
            "--branch-step", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert set(results["curves"]) == {"best-of-n", "dts-star"}
    assert results["settings"]["exploration"] == 0.25 and not results["settings"]["curves"]
    assert [o.sampler for o in seen] == ["best-of-n", "dts-star"]
    assert etas == {0.5} and results["settings"]["eta"] == 0.5
    tree = seen[1].tree_settings()
    assert (tree.mode, tree.exploration, tree.widening_alpha) == ("search", 0.25, 0.7)
    assert tree.branch_step == 1 and results["settings"]["branch_step"] == 1
    with pytest.raises(SystemExit, match="--branch-step must lie below --steps"):
        main([*args[:-4], "--branch-step", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="widening"):
        main([*args[:-2], "--widening-alpha", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--eta must be > 0"):
        main([*args[:-2], "--eta", "0", "--out", str(tmp_path)])


def test_bench_dts_speed_only_times_both_samplers_on_their_unet_batches(tmp_path):
    args = ["bench", "dts", "--speed-only", "--steps", "3", "--n", "4", "--batch-size", "2",
            "--guidance-scale", "2", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    rows = results["unet_rows_per_call"]
    assert rows["best-of-n"] == 4  # 2 chains per batch, CFG doubles the rows
    assert 0 < rows["dts-star"] <= 4
    for key in ("nfe_per_second", "first_run_nfe_per_second"):
        assert all(speed > 0 for speed in results[key].values())
    speeds = results["nfe_per_second"]
    assert results["tree_overhead"] == pytest.approx(1 - speeds["dts-star"] / speeds["best-of-n"])
    assert results["repeats"] == 3
    # the tree settings reach the tree: one rollout in flight is one chain (2 CFG rows) a call
    one = tmp_path / "one"
    assert main([*args[:-1], str(one), "--tree-batch-size", "1", "--repeats", "1"]) == 0
    results = json.loads((one / "metrics.json").read_text())["results"]
    assert results["unet_rows_per_call"] == {"best-of-n": 4, "dts-star": 2}
    assert results["settings"]["repeats"] == 1
    assert "compiled_nfe_per_second" not in results


def test_bench_dts_speed_only_times_a_compiled_unet_beside_the_eager_one(tmp_path):
    GRAPHS.clear()
    args = ["bench", "dts", "--speed-only", "--steps", "2", "--n", "2", "--batch-size", "2",
            "--guidance-scale", "2", "--repeats", "1", "--compile", "diffalign_test_counting",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert GRAPHS
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert results["settings"]["compile_backend"] == "diffalign_test_counting"
    assert results["compiled_unet_rows_per_call"] == results["unet_rows_per_call"]
    for sampler, ratio in results["nfe_ratio_compiled_vs_eager"].items():
        compiled, eager = (results[k][sampler] for k in ("compiled_nfe_per_second",
                                                          "nfe_per_second"))  # fmt: skip
        assert ratio == pytest.approx(compiled / eager)
    speeds = results["compiled_nfe_per_second"]
    assert results["compiled_tree_overhead"] == pytest.approx(
        1 - speeds["dts-star"] / speeds["best-of-n"]
    )
