"""LoRA adapters as one kohya-layout file (A1111 / ComfyUI): names, round trips, refusals, CLI.
A training run's own kohya file: test_trainers.py."""

import logging

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from diffalign import lora, models
from diffalign.cli import main
from diffalign.kohya_lora import kohya_lora_names, kohya_lora_state_dict, save_kohya_lora

from .test_lora import perturb_lora
from .test_single_file import _tiny_sd2_pipeline, _tiny_sd3_pipeline, _tiny_sdxl_pipeline

CONV_AND_ATTENTION = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "proj_in", "proj_out",
                      "to_q", "to_k", "to_v", "to_out.0", "ff.net.2")  # fmt: skip


def _images(pipeline):
    return pipeline("a red circle", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def _adapted(build, tmp_path, targets=lora.DEFAULT_LORA_TARGETS):
    """A tiny pipeline saved as the base under ``tmp_path/base``, then given a LoRA adapter
    (rank 4, alpha 8) with non-zero up weights."""
    pipe = build()
    pipe.save_pretrained(tmp_path / "base")
    lora.add_lora(pipe.unet, rank=4, alpha=8, target_modules=targets)
    perturb_lora(pipe.unet)
    return pipe


def _same_adapter(one, other):
    mine, theirs = get_peft_model_state_dict(one.unet), get_peft_model_state_dict(other.unet)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(value, theirs[key]) for key, value in mine.items())


@pytest.mark.parametrize("targets", [lora.DEFAULT_LORA_TARGETS, CONV_AND_ATTENTION])
def test_an_sd_adapter_is_written_under_kohya_names_and_reads_back_the_same(targets, tmp_path):
    pipe = _adapted(models.build_tiny_pipeline, tmp_path, targets)
    path = save_kohya_lora(pipe, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    # SD 1.x: diffusers' layer paths, dots as underscores, as kohya's sd-scripts writes them
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert torch.equal(state[f"{name}.lora_down.weight"], to_q.lora_A["default"].weight)
    assert torch.equal(state[f"{name}.lora_up.weight"], to_q.lora_B["default"].weight)
    assert state[f"{name}.alpha"].item() == 8.0 and state[f"{name}.alpha"].dim() == 0
    assert len(state) == 3 * len(kohya_lora_names(pipe)["unet"])  # down, up and alpha each
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    fresh = models.load_pipeline(tmp_path / "base")
    base_images = _images(fresh)
    lora.load_lora(fresh, path)  # diffusers' kohya reader
    _same_adapter(fresh, pipe)
    assert fresh.unet.peft_config["default"].lora_alpha == 8
    torch.testing.assert_close(_images(fresh), _images(pipe))
    assert not torch.allclose(_images(fresh), base_images)  # the adapter does change the images


def test_an_sdxl_adapter_is_written_under_the_original_unet_names_and_reads_back(tmp_path):
    pipe = _adapted(_tiny_sdxl_pipeline, tmp_path, (*CONV_AND_ATTENTION, "conv_in", "conv_out"))
    names = set(kohya_lora_names(pipe)["unet"].values())
    # SDXL: the original UNet's names, as kohya trains SDXL on it
    assert "lora_unet_input_blocks_0_0" in names  # conv_in
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_3_0_skip_connection" in names
    assert "lora_unet_middle_block_0_emb_layers_1" in names
    assert "lora_unet_output_blocks_1_0_in_layers_2" in names
    assert "lora_unet_out_2" in names  # conv_out
    assert not any("down_blocks" in name or "up_blocks" in name for name in names)
    path = save_kohya_lora(pipe, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    fresh = lora.load_lora(models.load_pipeline(tmp_path / "base"), path)
    _same_adapter(fresh, pipe)
    torch.testing.assert_close(_images(fresh), _images(pipe))


def test_full_size_sdxl_layers_get_the_names_of_kohya_sdxl_loras():
    from diffalign.benchmarks.rollout import build_sdxl_random_pipeline

    pipe = build_sdxl_random_pipeline(device="meta")  # names only, no memory
    lora.add_lora(pipe.unet, rank=4)
    names = kohya_lora_names(pipe)["unet"]
    assert len(names) == 70 * 2 * 4  # SDXL's 70 transformer blocks, two attentions, q/k/v/out
    unet = pipe.unet
    where = {  # a diffusers layer and the entry an SDXL LoRA trained by sd-scripts has for it
        unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q:
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        unet.down_blocks[2].attentions[1].transformer_blocks[9].attn2.to_k:
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
        unet.mid_block.attentions[0].transformer_blocks[9].attn2.to_out[0]:
            "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        unet.up_blocks[0].attentions[2].transformer_blocks[0].attn1.to_v:
            "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_v",
        unet.up_blocks[1].attentions[2].transformer_blocks[1].attn2.to_q:
            "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_q",
    }  # fmt: skip
    path_of = {module: path for path, module in unet.named_modules()}
    for module, name in where.items():
        assert names[path_of[module]] == name


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoder_layers_travel_with_the_unet_s_in_both_formats(family, tmp_path):
    from peft import LoraConfig

    build = {"sd": models.build_tiny_pipeline, "sdxl": _tiny_sdxl_pipeline}[family]
    pipe = _adapted(build, tmp_path)  # a LoRA from elsewhere may adapt the text encoders too
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for index, name in enumerate(encoders):
        # all four projections, as kohya's LoRAs have: diffusers' reader tells the old format
        # of their text-encoder entries by the out_proj ones
        targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
        getattr(pipe, name).add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
        perturb_lora(getattr(pipe, name), seed=index + 1)
    names = kohya_lora_names(pipe)
    assert sorted(names) == sorted(["unet", *encoders])
    prefixes = {"sd": ["lora_te_"], "sdxl": ["lora_te1_", "lora_te2_"]}[family]
    for name, prefix in zip(encoders, prefixes, strict=True):  # as kohya and ComfyUI name them
        assert f"{prefix}text_model_encoder_layers_0_self_attn_q_proj" in names[name].values()
    kohya = save_kohya_lora(pipe, tmp_path / "adapter.safetensors")
    lora.save_lora(pipe, tmp_path / "folder")
    for saved in (kohya, tmp_path / "folder"):
        fresh = lora.load_lora(models.load_pipeline(tmp_path / "base"), saved)
        for name in ["unet", *encoders]:
            mine = get_peft_model_state_dict(getattr(pipe, name))
            theirs = get_peft_model_state_dict(getattr(fresh, name))
            assert mine.keys() == theirs.keys(), (saved, name)
            assert all(torch.equal(value, theirs[key]) for key, value in mine.items())
        torch.testing.assert_close(_images(fresh), _images(pipe))
    # sampling commands merge every adapted component
    from diffalign.commands.sample import load_sampling_pipeline

    merged = load_sampling_pipeline(str(tmp_path / "base"), "cpu", torch.float32,
                                    loras=[(str(kohya), 1.0)])  # fmt: skip
    base = models.load_pipeline(tmp_path / "base")
    for name in ["unet", *encoders]:
        assert not lora.has_lora(getattr(merged, name))
        state, base_state = getattr(merged, name).state_dict(), getattr(base, name).state_dict()
        query = next(key for key in state if key.endswith(("0.self_attn.q_proj.weight",
                                                           "0.attn1.to_q.weight")))  # fmt: skip
        assert not torch.equal(state[query], base_state[query])  # the adapter is in the weights


def test_sd2_files_name_their_base_model():
    pipe = _tiny_sd2_pipeline()
    lora.add_lora(pipe.unet, rank=2)
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v" in set(
        kohya_lora_names(pipe)["unet"].values()
    )
    from diffalign.kohya_lora import kohya_family

    assert kohya_family(pipe) == "sd2"


def test_what_cannot_be_written_is_refused_with_the_way_out(tmp_path):
    from peft import LoraConfig

    pipe = models.build_tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match="no LoRA adapter named 'default'"):
        kohya_lora_state_dict(pipe)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA.*save_lora"):
        save_kohya_lora(pipe, tmp_path / "dora.safetensors")
    sd3 = _tiny_sd3_pipeline()
    lora.add_lora(sd3.transformer, rank=2)
    with pytest.raises(models.UnsupportedModelError, match="SD3.*save_lora"):
        save_kohya_lora(sd3, tmp_path / "sd3.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_kohya_lora(pipe, tmp_path / "lora.pt")
    assert not list(tmp_path.glob("*"))  # nothing half-written


def test_convert_turns_a_lora_folder_into_a_kohya_file_and_back(tmp_path, capsys):
    pipe = _adapted(models.build_tiny_pipeline, tmp_path)
    lora.save_lora(pipe, tmp_path / "lora")
    base, kohya, back = tmp_path / "base", tmp_path / "kohya.safetensors", tmp_path / "back"
    convert = ["convert", "--model", str(base), "--lora"]
    assert main([*convert, str(tmp_path / "lora"), "--out", str(kohya)]) == 0
    assert "LoRA adapter: 32 layers of the unet (rank 4, alpha 8)" in capsys.readouterr().out
    with safe_open(str(kohya), framework="pt") as handle:
        assert set(kohya_lora_state_dict(pipe)) == set(handle.keys())
    half = tmp_path / "half.safetensors"
    assert (
        main([*convert, str(tmp_path / "lora"), "--save-precision", "fp16", "--out", str(half)])
        == 0
    )
    with safe_open(str(half), framework="pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()  # noqa: SIM118
                if key.endswith(".weight")} == {"F16"}  # fmt: skip
    assert main([*convert, str(kohya), "--out", str(back)]) == 0  # kohya -> diffusers' folder
    assert (back / "pytorch_lora_weights.safetensors").is_file()
    _same_adapter(lora.load_lora(models.load_pipeline(base), back), pipe)
    with pytest.raises(SystemExit, match="needs the base model it adapts: add --model"):
        main(["convert", "--lora", str(kohya), "--out", str(tmp_path / "again.safetensors")])
    with pytest.raises(SystemExit, match="give --model .* or --lora"):
        main(["convert", "--out", str(back)])


def test_sample_and_eval_apply_a_lora_file_to_the_base_model(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from diffalign.world import shipped_model_path

    pipe = models.load_pipeline(shipped_model_path())
    lora.add_lora(pipe.unet, rank=4, alpha=4)
    perturb_lora(pipe.unet)
    kohya = save_kohya_lora(pipe, tmp_path / "adapter.safetensors")
    lora.merge_lora(pipe.unet)
    pipe.save_pretrained(tmp_path / "merged")
    # one CFG scale for all: the merged folder lacks the one the shipped model records
    common = ["--prompt", "a red circle", "--steps", "2", "--guidance-scale", "4.5", "--quiet"]
    shipped, adapter = "diffalign:tiny-shapes", ["--lora", str(kohya)]
    runs = {"lora": [shipped, *adapter], "merged": [str(tmp_path / "merged")], "base": [shipped],
            "off": [shipped, *adapter, "--lora-scale", "0"],
            "half": [shipped, *adapter, "--lora-scale", "0.5"],
            # two halves of one adapter stack to the whole of it
            "halves": [shipped, *adapter, str(kohya), "--lora-scale", "0.5", "0.5"]}  # fmt: skip
    for name, model in runs.items():
        assert main(["sample", "--model", *model, *common, "--out", str(tmp_path / name)]) == 0
    grid = {name: np.asarray(Image.open(tmp_path / name / "grid.png"), dtype=np.int16)
            for name in runs}  # fmt: skip
    assert np.abs(grid["lora"] - grid["merged"]).max() <= 1  # merged on load: float rounding
    assert np.abs(grid["halves"] - grid["lora"]).max() <= 1
    assert np.abs(grid["lora"] - grid["base"]).max() > 10
    assert np.array_equal(grid["off"], grid["base"])  # at strength 0 the weights are the base's
    assert np.abs(grid["half"] - grid["base"]).max() > 0 and not np.array_equal(
        grid["half"], grid["lora"]
    )
    recorded = json.loads((tmp_path / "half" / "metrics.json").read_text())["results"]
    assert (recorded["lora"], recorded["lora_scale"]) == ([str(kohya)], [0.5])
    with pytest.raises(SystemExit, match="give one --lora-scale per --lora \\(2 adapters, 1 sc"):
        main(["sample", "--model", *runs["halves"][:-1], *common, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--lora-scale is the strength of --lora: give --lora"):
        main(["sample", "--model", "diffalign:tiny-shapes", "--lora-scale", "0.5", *common,
              "--out", str(tmp_path / "refused")])  # fmt: skip
    evaluate = ["eval", "--model", "diffalign:tiny-shapes", "--lora", str(kohya), "--baseline",
                "diffalign:tiny-shapes", "--prompts", "world:heldout", "--num-prompts", "2",
                "--metrics", "tiny-clip", "--steps", "2", "--quiet"]  # fmt: skip
    results = {}
    for name, extra in (("one", []), ("both", ["--baseline-lora", str(kohya)])):
        assert main([*evaluate, *extra, "--out", str(tmp_path / name)]) == 0
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())["results"]
    assert results["one"]["tiny_clip_mean"] != results["one"]["baseline"]["tiny_clip_mean"]
    assert results["both"]["tiny_clip_mean"] == results["both"]["baseline"]["tiny_clip_mean"]
    assert results["both"]["tiny_clip_mean"] == results["one"]["tiny_clip_mean"]
    assert (results["one"]["lora"], results["one"]["baseline_lora"]) == ([str(kohya)], None)
    assert (
        f"model: diffalign:tiny-shapes + LoRA {kohya};"
        in (tmp_path / "one" / "report.md").read_text()
    )
    with pytest.raises(SystemExit, match="--baseline-lora adapts --baseline"):
        main([*evaluate[:5], "--baseline-lora", str(kohya), *evaluate[7:], "--out", "x"])


def test_an_adapter_to_start_from_must_fit_the_one_it_fills(tmp_path):
    from peft import LoraConfig

    pipe = _adapted(models.build_tiny_pipeline, tmp_path)  # rank 4, alpha 8
    kohya = save_kohya_lora(pipe, tmp_path / "adapter.safetensors")
    run = models.build_tiny_pipeline(seed=0)
    lora.add_lora(run.unet, rank=4, alpha=8)
    lora.copy_lora_weights(run, kohya)
    _same_adapter(run, pipe)
    trainable = {name for name, p in run.unet.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in pipe.unet.named_parameters() if ".lora_" in name}
    other_scale = models.build_tiny_pipeline(seed=0)
    lora.add_lora(other_scale.unet, rank=4, alpha=4)
    with pytest.raises(lora.LoraLayoutError, match="the run's adapter: set lora_alpha=8 "):
        lora.copy_lora_weights(other_scale, kohya)
    assert list(other_scale.unet.peft_config) == ["default"]  # the loaded copy is gone again
    mixed = models.build_tiny_pipeline(seed=0)  # LoCon-style: other ranks on some layers
    targets = list(lora.DEFAULT_LORA_TARGETS)
    mixed.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                      rank_pattern={"to_q": 2}))  # fmt: skip
    perturb_lora(mixed.unet)
    save_kohya_lora(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(lora.LoraLayoutError, match=r"set lora_rank_pattern=<8 layers> \("):
        lora.copy_lora_weights(run, tmp_path / "mixed.safetensors")  # one rank everywhere
    layout = lora.lora_layout(models.build_tiny_pipeline(seed=0), tmp_path / "mixed.safetensors")
    same_pattern = models.build_tiny_pipeline(seed=0)
    lora.add_lora(same_pattern.unet, rank=layout.rank, alpha=layout.alpha,
                  target_modules=layout.target_modules, rank_pattern=layout.rank_pattern,
                  alpha_pattern=layout.alpha_pattern)  # fmt: skip
    lora.copy_lora_weights(same_pattern, tmp_path / "mixed.safetensors")
    _same_adapter(same_pattern, mixed)
    pipe.text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_lora(pipe, tmp_path / "with_text_encoder")
    fresh = models.build_tiny_pipeline(seed=0)
    lora.add_lora(fresh.unet, rank=4, alpha=8)
    lora.copy_lora_weights(fresh, tmp_path / "with_text_encoder")  # the UNet's part alone
    _same_adapter(fresh, pipe)
    assert not lora.has_lora(fresh.text_encoder)


def test_an_sd3_run_starts_from_a_saved_transformer_adapter(tmp_path):
    pipe = models.build_tiny_sd3_pipeline(seed=0)
    lora.add_lora(pipe.transformer, rank=2, alpha=4)
    perturb_lora(pipe.transformer)
    lora.save_lora(pipe, tmp_path / "lora")  # diffusers' format: the one SD3 adapters keep
    run = models.build_tiny_sd3_pipeline(seed=0)
    lora.add_lora(run.transformer, rank=2, alpha=4)
    lora.copy_lora_weights(run, tmp_path / "lora")
    mine = get_peft_model_state_dict(pipe.transformer)
    theirs = get_peft_model_state_dict(run.transformer)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(value, theirs[key]) for key, value in mine.items())
    assert any(value.abs().max() > 0 for key, value in theirs.items() if "lora_B" in key)


def test_a_lora_made_for_another_base_model_is_refused_in_a_line(tmp_path, capsys):
    xl = _tiny_sdxl_pipeline()
    lora.add_lora(xl.unet, rank=2)
    kohya = save_kohya_lora(xl, tmp_path / "sdxl.safetensors")
    lora.save_lora(xl, tmp_path / "sdxl")
    logged = []  # what diffusers' adapter loader logs (its own handler writes to stderr)
    catcher = logging.Handler()
    catcher.emit = logged.append
    logging.getLogger("diffusers.loaders.peft").addHandler(catcher)
    try:
        for adapter in (kohya, tmp_path / "sdxl"):  # no matching layers; layers of other widths
            with pytest.raises(lora.LoraLayoutError, match="another base model"):
                lora.load_lora(models.build_tiny_pipeline(seed=0), adapter)
    finally:
        logging.getLogger("diffusers.loaders.peft").removeHandler(catcher)
    assert not [record for record in logged if "size mismatch" in record.getMessage()]
    argv = ["sample", "--model", "diffalign:tiny-shapes", "--lora", str(kohya), "--prompt", "a",
            "--steps", "2", "--quiet", "--out", str(tmp_path / "refused")]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "does not load into this StableDiffusionPipeline" in error and "Traceback" not in error


def _scales(pipeline):
    """Every LoRA layer's (rank, scale), by component and path."""
    return {(name, path): (layer.r["default"], round(layer.scaling["default"], 6))
            for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)
            for path, layer in lora.lora_layers(module).items()}  # fmt: skip


@pytest.mark.parametrize("build", [models.build_tiny_pipeline, _tiny_sdxl_pipeline])
def test_a_kohya_file_whose_alpha_varies_by_layer_loads_at_each_layers_alpha(build, tmp_path):
    from peft import LoraConfig

    pipe = build()  # as kohya's resized LoRAs: the alpha follows the rank, layer by layer
    pipe.save_pretrained(tmp_path / "base")
    lora.add_lora(pipe.unet, rank=8, alpha=8, target_modules=CONV_AND_ATTENTION,
                  rank_pattern={"to_q": 2, "conv1": 2}, alpha_pattern={"to_q": 2, "to_out.0": 4,
                                                                       "conv1": 3})  # fmt: skip
    encoder_lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "out_proj"],
                              alpha_pattern={"q_proj": 1})  # fmt: skip
    pipe.text_encoder.add_adapter(encoder_lora)
    perturb_lora(pipe.unet)
    kohya = save_kohya_lora(pipe, tmp_path / "resized.safetensors")
    loaded = lora.load_lora(models.load_pipeline(tmp_path / "base"), kohya)
    assert _scales(loaded) == _scales(pipe)  # diffusers alone gives to_q, to_out.0, q_proj 8 / 4
    assert len({scale for _, scale in _scales(pipe).values()}) == 4
    torch.testing.assert_close(_images(loaded), _images(pipe))
    lora.save_lora(loaded, tmp_path / "diffusers")  # its config now says so too
    again = lora.load_lora(models.load_pipeline(tmp_path / "base"), tmp_path / "diffusers")
    assert _scales(again) == _scales(pipe)
