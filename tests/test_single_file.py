"""One-file original-layout checkpoints: written by diffalign, read back through diffusers."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import save_file
from torch import nn

from diffalign.lora import add_lora
from diffalign.models import (
    ModelNotAvailableError,
    UnsupportedModelError,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd3_transformer,
    build_tiny_sdxl_pipeline,
    build_tiny_text_encoder,
    build_tiny_unet,
    load_pipeline,
)
from diffalign.pipelines.rollout import RolloutPipeline
from diffalign.single_file import (
    ldm_state_dict,
    save_single_file,
    single_file_family,
    unet_to_ldm,
)
from diffalign.world import shipped_model_path

COMPONENTS = ("unet", "vae", "text_encoder")


def _assert_same_weights(one, other):
    for name in COMPONENTS:
        mine, theirs = getattr(one, name).state_dict(), getattr(other, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), f"{name}.{key}"


def _rollout_images(pipe):
    generator = torch.Generator().manual_seed(3)
    out = pipe("a red circle", num_inference_steps=3, eta=0.0, generator=generator)
    return out.images


@pytest.mark.parametrize("model", ["random-tiny", "tiny-shapes"])
def test_diffusers_reads_the_written_file_back_to_the_same_pipeline(model, tmp_path):
    folder = tmp_path / "folder"
    if model == "random-tiny":
        build_tiny_pipeline(seed=1).save_pretrained(folder)
    else:
        folder = shipped_model_path(model)
    pipe = load_pipeline(folder, RolloutPipeline)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    again = load_pipeline(path, RolloutPipeline, config=str(folder))
    assert isinstance(again, RolloutPipeline)
    _assert_same_weights(pipe, again)
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
    assert again.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert torch.equal(_rollout_images(again), _rollout_images(pipe))


def test_the_file_uses_the_original_names_that_other_tools_look_for():
    pipe = build_tiny_pipeline(seed=0)
    state = ldm_state_dict(pipe)
    assert CHECKPOINT_KEY_NAMES["clip"] in state  # how diffusers recognises SD 1.x's CLIP
    assert "model.diffusion_model.time_embed.0.weight" in state
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "first_stage_model.decoder.norm_out.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions
    assert len(state) == sum(len(getattr(pipe, c).state_dict()) for c in COMPONENTS)
    # diffusers' own converters take each part back to the diffusers names and tensors
    unet_prefix = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    assert back.keys() == pipe.unet.state_dict().keys() and len(unet_prefix) == len(state)
    vae = convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))
    assert all(torch.equal(vae[k], v) for k, v in pipe.vae.state_dict().items())


def test_what_cannot_be_written_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ValueError, match="identity"):  # SD3's CLIP-L projection: no place for it
        ldm_state_dict(build_tiny_sd3_pipeline(seed=0))
    pipe = build_tiny_pipeline(seed=0)
    with pytest.raises(UnsupportedModelError, match="CLIP text encoders"):
        ldm_state_dict(
            StableDiffusionPipeline(**{**pipe.components, "text_encoder": nn.Linear(1, 1)})
        )
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    add_lora(pipe.unet, rank=2)
    with pytest.raises(ValueError, match="merge_lora"):
        save_single_file(pipe, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="class_embedding"):  # a part SD 1.x does not have
        unet_to_ldm({"class_embedding.linear_1.weight": torch.zeros(1)}, layers_per_block=1)


def test_a_file_without_configs_offline_names_the_config_it_needs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = save_single_file(build_tiny_pipeline(seed=0), tmp_path / "model.safetensors")
    with pytest.raises(ModelNotAvailableError, match="config=FOLDER"):
        load_pipeline(path, RolloutPipeline)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        load_pipeline(path, RolloutPipeline, config=str(tmp_path / "no-such-folder"))


def test_the_family_is_read_from_the_key_names(tmp_path):
    def file_with(key):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        save_file({key: torch.zeros(1)}, path)
        return path

    assert single_file_family(file_with("model.diffusion_model.out.0.weight")) == "sd"
    assert single_file_family(file_with("conditioner.embedders.1.model.ln_final.weight")) == "sdxl"
    assert single_file_family(file_with("model.diffusion_model.joint_blocks.0.x")) == "sd3"


def test_convert_writes_a_folder_as_one_file_and_back(tmp_path):
    from diffalign.cli import main

    folder = shipped_model_path("tiny-shapes")
    one_file, back = tmp_path / "tiny.safetensors", tmp_path / "back"
    assert main(["convert", "--model", str(folder), "--out", str(one_file)]) == 0
    assert single_file_family(one_file) == "sd"
    args = ["convert", "--model", str(one_file), "--model-config", str(folder), "--out", str(back)]
    assert main(args) == 0
    _assert_same_weights(load_pipeline(folder), load_pipeline(back))
    with pytest.raises(SystemExit, match="--model-config is for a one-file --model"):
        main(["convert", "--model", str(folder), "--config", str(folder), "--out", str(back)])
    with pytest.raises(SystemExit, match=r"FILE\.safetensors"):
        main(["convert", "--model", str(folder), "--out", str(tmp_path / "tiny.ckpt")])


def test_convert_writes_half_precision_files_on_request(tmp_path):
    from safetensors import safe_open

    from diffalign.cli import main

    folder = shipped_model_path("tiny-shapes")
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    assert main(["convert", "--model", str(folder), "--out", str(full)]) == 0
    assert main(["convert", "--model", str(folder), "--save-precision", "fp16",
                 "--out", str(half)]) == 0  # fmt: skip
    with safe_open(str(half), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    assert dtypes <= {"F16", "I64"}  # every weight in half precision (position ids stay ints)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    back = load_pipeline(half, config=str(folder))
    original = load_pipeline(folder)
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(back, name).state_dict()
        for key, value in getattr(original, name).state_dict().items():
            if value.is_floating_point():
                assert torch.equal(theirs[key].half(), value.half()), (name, key)


def test_a_run_trains_from_a_one_file_model_and_its_checkpoints_load(tmp_path):
    from diffalign.cli import main

    folder = shipped_model_path("tiny-shapes")
    one_file = save_single_file(load_pipeline(folder), tmp_path / "tiny.safetensors")
    run = tmp_path / "run"
    argv = ["train", "awm", "--recipe", "tiny-shapes", "--set", f"model={one_file}",
            f"model_config={folder}", "max_steps=1", "prompts_per_step=2", "samples_per_prompt=2",
            "num_inference_steps=3", "train_batch_size=2", "num_heldout_prompts=2",
            "heldout_samples_per_prompt=1", "eval_every=1", "save_every=1", "log_with=none",
            "progress=false", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    final = load_pipeline(run / "final")
    from_checkpoint = load_pipeline(run / "checkpoints" / "checkpoint-00000001")  # base: the file
    _assert_same_weights(final, from_checkpoint)
    base = load_pipeline(folder).unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in final.unet.state_dict().items())


def test_a_pickled_ckpt_in_the_original_layout_loads_as_well(tmp_path):
    pipe = build_tiny_pipeline(seed=2)
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    torch.save({"state_dict": ldm_state_dict(pipe)}, tmp_path / "model.ckpt")  # as the original
    _assert_same_weights(pipe, load_pipeline(tmp_path / "model.ckpt", config=str(folder)))


def test_full_size_sd15_gets_the_names_and_shapes_of_the_original_file():
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from diffalign.benchmarks.rollout import build_sd15_random_pipeline
    from diffalign.single_file import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, vae_to_ldm

    pipe = build_sd15_random_pipeline(device="meta")  # shapes only, no memory
    unet = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    vae = vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))
    state = {
        **{UNET_PREFIX + k: v for k, v in unet.items()},
        **{VAE_PREFIX + k: v for k, v in vae.items()},
        CHECKPOINT_KEY_NAMES["clip"]: torch.empty(77, 768, device="meta"),
    }
    assert infer_diffusers_model_type(state) == "v1"  # what diffusers makes of the file
    # names and shapes as they are in SD 1.5's own checkpoint
    shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (
            320,
            768,
        ),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert len(unet) == 686 and len(vae) == 248  # one to one: no tensor dropped or merged
    back = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    assert back.keys() == pipe.unet.state_dict().keys()
    assert TEXT_ENCODER_PREFIX + "text_model." in CHECKPOINT_KEY_NAMES["clip"]


def test_commands_sample_a_one_file_model_with_its_model_config(tmp_path):
    from PIL import Image

    from diffalign.cli import main

    folder = shipped_model_path("tiny-shapes")
    one_file = save_single_file(load_pipeline(folder), tmp_path / "tiny.safetensors")
    # no --guidance-scale: the file's is the one recorded in its config folder, as the folder's
    common = ["--prompt", "a red circle", "--steps", "2", "--device", "cpu", "--quiet"]
    for name, model in (("folder", [str(folder)]),
                        ("file", [str(one_file), "--model-config", str(folder)])):  # fmt: skip
        assert main(["sample", "--model", *model, *common, "--out", str(tmp_path / name)]) == 0
    images = [np.asarray(Image.open(tmp_path / name / "grid.png")) for name in ("folder", "file")]
    assert np.array_equal(*images)
    world = ["world", "sample", "--model", str(one_file), "--model-config", str(folder), "--prompt",
             "a red circle", "--num-images-per-prompt", "1", "--steps", "2", "--quiet"]  # fmt: skip
    assert main([*world, "--out", str(tmp_path / "world")]) == 0
    # a folder brings its own configs: the flag is refused, naming it, before anything loads
    refusals = [
        ["sample", "--model", str(folder), "--model-config", str(folder), *common],
        ["eval", "--model", str(one_file), "--baseline", str(folder), "--baseline-config",
         str(folder), "--prompts", "world:heldout", "--metrics", "shapes"],
        ["bench", "rollout", "--model", "diffalign:tiny-shapes", "--model-config", str(folder)],
        ["bench", "dts", "--model", str(folder), "--model-config", str(folder)],
        ["world", "eval", "--model-config", str(folder)],
    ]  # fmt: skip
    for argv in refusals:
        flag = "--baseline" if "--baseline" in argv else "--model"
        with pytest.raises(SystemExit, match=f"{flag}-config is for a one-file {flag} "):
            main([*argv, "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def _tiny_sdxl_pipeline():
    """The tiny SDXL pipeline with text encoders of different widths, as SDXL's (768 and 1280):
    diffusers tells the two apart by width when it reads a file."""
    from diffusers import StableDiffusionXLPipeline

    tiny = build_tiny_sdxl_pipeline(seed=4)
    second = build_tiny_text_encoder(seed=5, hidden_size=48, with_projection=True)
    unet = build_tiny_unet(seed=4, sample_size=16, cross_attention_dim=32 + 48, pooled_dim=48)
    return StableDiffusionXLPipeline(**{**tiny.components, "text_encoder_2": second, "unet": unet})


def _tiny_sd3_pipeline():
    """The tiny SD3 pipeline with text encoders of different widths, as SD3's, an identity
    projection on the first, as SD3's CLIP-L (the original has none), and a tiny T5 encoder
    (weights only: its tokenizer cannot be built offline)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    tiny = build_tiny_sd3_pipeline(seed=7)
    clip_l = build_tiny_text_encoder(seed=7, hidden_size=32, with_projection=True)
    torch.nn.init.eye_(clip_l.text_projection.weight)
    clip_g = build_tiny_text_encoder(seed=8, hidden_size=48, with_projection=True)
    transformer = build_tiny_sd3_transformer(seed=7, joint_attention_dim=80, pooled_dim=80)
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1))
    parts = {"text_encoder": clip_l, "text_encoder_2": clip_g, "text_encoder_3": t5,
             "transformer": transformer}  # fmt: skip
    return StableDiffusion3Pipeline(**{**tiny.components, **parts})


def _tiny_sd2_pipeline():
    """The tiny SD pipeline with an OpenCLIP-style text encoder (``gelu``), as SD 2.x's."""
    from transformers import CLIPTextModel

    pipe = build_tiny_pipeline(seed=6)
    config = pipe.text_encoder.config
    config.hidden_act = "gelu"
    torch.manual_seed(6)
    pipe.text_encoder = CLIPTextModel(config)
    return pipe


FAMILIES = {  # a tiny pipeline, the names diffusers knows its text encoders by, its class
    "sdxl": (_tiny_sdxl_pipeline, ["clip_sdxl", "open_clip_sdxl"], "SDXLRolloutPipeline"),
    "sd2": (_tiny_sd2_pipeline, ["open_clip"], "RolloutPipeline"),
    "sd3": (_tiny_sd3_pipeline, ["clip_sd3", "open_clip_sd3", "t5"], "SD3RolloutPipeline"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_sd2_sdxl_and_sd3_files_use_the_original_names_and_read_back(family, tmp_path):
    build, names, pipeline_class = FAMILIES[family]
    pipe = build()
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    state = ldm_state_dict(pipe)
    known = {**CHECKPOINT_KEY_NAMES, "t5": "text_encoders.t5xxl.transformer.shared.weight"}
    assert all(known[name] in state for name in names)  # how diffusers knows them
    assert CHECKPOINT_KEY_NAMES["clip"] not in state
    denoiser = "transformer" if family == "sd3" else "unet"
    encoders = {"sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
                "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"]}[family]  # fmt: skip
    tensors = sum(len(getattr(pipe, name).state_dict()) for name in [denoiser, "vae", *encoders])
    # attentions whose q, k and v the original keeps as one (6 tensors become 2): OpenCLIP's
    # blocks (SD 2's encoder, SDXL's second), or the MMDiT's image and text streams
    if family == "sd3":
        joined = 2 * pipe.transformer.config.num_layers
    else:
        joined = getattr(pipe, encoders[-1]).config.num_hidden_layers
    assert len(state) == tensors - 4 * joined
    assert single_file_family(path) == {"sd2": "sd"}.get(family, family)
    again = load_pipeline(path, RolloutPipeline, config=str(folder))
    assert type(again).__name__ == pipeline_class
    for name in [denoiser, "vae", *encoders]:
        mine, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(value, theirs[key]) for key, value in mine.items()), name
    for name in set(encoders) - {"text_encoder_3"}:  # CLIP's activation: OpenCLIP or OpenAI
        assert getattr(again, name).config.hidden_act == getattr(pipe, name).config.hidden_act


def test_full_size_sdxl_gets_the_names_and_shapes_of_the_original_file():
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from diffalign.benchmarks.rollout import build_sdxl_random_pipeline
    from diffalign.single_file import UNET_PREFIX, clip_to_open_clip

    pipe = build_sdxl_random_pipeline(device="meta")  # shapes only, no memory
    unet = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    second = clip_to_open_clip(pipe.text_encoder_2.state_dict())
    state = {
        **{UNET_PREFIX + k: v for k, v in unet.items()},
        **{"conditioner.embedders.1.model." + k: v for k, v in second.items()},
    }
    assert infer_diffusers_model_type(state) == "xl_base"  # what diffusers makes of the file
    # names and shapes as they are in SDXL base 1.0's own checkpoint
    shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (
            640,
            2048,
        ),
        "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert len(unet) == len(pipe.unet.state_dict())  # one to one: no tensor dropped or merged
    assert len(second) == 4 + 1 + 32 * 12  # embeddings, final norm; projection; 12 per block
    back = convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    assert back.keys() == pipe.unet.state_dict().keys()


def test_full_size_sd35_medium_gets_the_names_and_shapes_of_the_original_file():
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    from diffalign.benchmarks.rollout import build_sd35_random_pipeline
    from diffalign.single_file import UNET_PREFIX, sd3_transformer_to_ldm

    transformer = build_sd35_random_pipeline(device="meta").transformer  # shapes only
    mmdit = sd3_transformer_to_ldm(transformer.state_dict())
    state = {UNET_PREFIX + k: v for k, v in mmdit.items()}
    assert infer_diffusers_model_type(state) == "sd35_medium"  # what diffusers makes of the file
    # names and shapes as they are in SD 3.5 Medium's own checkpoint
    shapes = {
        "pos_embed": (1, 384 * 384, 1536),
        "x_embedder.proj.weight": (1536, 16, 2, 2),
        "context_embedder.weight": (1536, 4096),
        "y_embedder.mlp.0.weight": (1536, 2048),
        "t_embedder.mlp.2.weight": (1536, 1536),
        "joint_blocks.0.x_block.attn.qkv.weight": (3 * 1536, 1536),
        "joint_blocks.0.x_block.attn2.qkv.bias": (3 * 1536,),  # the dual attention (0 to 12)
        "joint_blocks.0.x_block.attn.ln_q.weight": (64,),
        "joint_blocks.0.x_block.adaLN_modulation.1.weight": (9 * 1536, 1536),
        "joint_blocks.13.x_block.adaLN_modulation.1.weight": (6 * 1536, 1536),
        "joint_blocks.22.context_block.attn.qkv.weight": (3 * 1536, 1536),
        "joint_blocks.23.context_block.adaLN_modulation.1.weight": (2 * 1536, 1536),
        "final_layer.adaLN_modulation.1.weight": (2 * 1536, 1536),
        "final_layer.linear.weight": (2 * 2 * 16, 1536),
    }
    for key, shape in shapes.items():
        assert tuple(mmdit[key].shape) == shape, key
    assert "joint_blocks.23.context_block.attn.proj.weight" not in mmdit  # the last is pre-only
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    assert back.keys() == transformer.state_dict().keys()
