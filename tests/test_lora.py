"""LoRA on SD-family pipelines (diffalign.lora): attach, switch off, merge, save, load, and a load
that fails leaving the pipeline as it was."""

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from diffalign import lora, models

from .conftest import unet_inputs
from .test_models import sample


def perturb_lora(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=gen))


def unet_output(unet):
    with torch.no_grad():
        return unet(*unet_inputs(unet)).sample


def test_lora_attach_disable_merge(tiny_unet):
    base = unet_output(tiny_unet)
    lora.add_lora(tiny_unet, rank=2)
    assert lora.has_lora(tiny_unet)
    trainable = [n for n, p in tiny_unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    torch.testing.assert_close(unet_output(tiny_unet), base)  # B starts at zero
    perturb_lora(tiny_unet)
    adapted = unet_output(tiny_unet)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lora.adapters_disabled(tiny_unet):
        torch.testing.assert_close(unet_output(tiny_unet), base)
    torch.testing.assert_close(unet_output(tiny_unet), adapted)  # back on after the block
    lora.merge_lora(tiny_unet)
    assert not lora.has_lora(tiny_unet)
    torch.testing.assert_close(unet_output(tiny_unet), adapted, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no LoRA"):
        lora.merge_lora(tiny_unet)


CONV_AND_ATTENTION = ("conv1", "conv2", "proj_in", "proj_out", "to_q", "to_out.0")


@pytest.mark.parametrize("targets", [lora.DEFAULT_LORA_TARGETS, CONV_AND_ATTENTION])
def test_lora_save_and_load_round_trip(targets, tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "base")
    lora.add_lora(tiny_pipeline.unet, rank=4, alpha=8, target_modules=targets)
    adapted = {n.split(".lora_")[0] for n, p in tiny_pipeline.unet.named_parameters()
               if p.requires_grad}  # fmt: skip
    suffix_of = {module: [t for t in targets if module.endswith(f".{t}")] for module in adapted}
    assert all(suffix_of.values())  # every adapted layer is a target ...
    assert {t for hits in suffix_of.values() for t in hits} == set(targets)  # ... and vice versa
    perturb_lora(tiny_pipeline.unet)
    expected = sample(tiny_pipeline)
    lora.save_lora(tiny_pipeline, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = models.load_pipeline(tmp_path / "base")
    lora.load_lora(fresh, tmp_path / "lora")
    torch.testing.assert_close(sample(fresh), expected)
    assert fresh.unet.peft_config["default"].lora_alpha == 8


def test_lora_bad_arguments(tiny_pipeline, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(tiny_pipeline.unet, rank=0)
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no Linear or Conv2d .*conv_shortcut"):
        lora.add_lora(tiny_pipeline.unet, rank=2, target_modules=["to_q", "to_qq"])
    with pytest.raises(ValueError, match="No LoRA target modules"):
        lora.add_lora(tiny_pipeline.unet, rank=2, target_modules=[])
    assert not lora.has_lora(tiny_pipeline.unet)  # nothing half-attached
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        lora.save_lora(tiny_pipeline, tmp_path)
    with pytest.raises(FileNotFoundError, match="No LoRA folder or file"):
        lora.load_lora(tiny_pipeline, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no LoRA weights"):
        lora.load_lora(tiny_pipeline, tmp_path / "empty")


def _lora_with_a_broken_text_encoder_part(tmp_path):
    """A LoRA of the tiny pipeline whose UNet part fits and whose text-encoder part has the
    wrong width: diffusers loads the UNet part before it fails on the text encoder."""
    pipe = models.build_tiny_pipeline(seed=0)
    lora.add_lora(pipe.unet, rank=4)
    pipe.text_encoder.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "out_proj"]))
    lora.save_lora(pipe, tmp_path / "broken")
    file = tmp_path / "broken" / "pytorch_lora_weights.safetensors"
    weights = load_file(file)
    for key, value in weights.items():
        if key.startswith("text_encoder.") and "lora_A" in key:
            weights[key] = torch.zeros(value.shape[0], value.shape[1] + 8)
    save_file(weights, file)
    return tmp_path / "broken"


def test_a_lora_that_fails_to_load_leaves_the_pipeline_as_it_was(tmp_path):
    broken = _lora_with_a_broken_text_encoder_part(tmp_path)
    pipe = models.build_tiny_pipeline(seed=0)
    before = sample(pipe)
    for _attempt in range(2):  # the second attempt meets the same error, not a name clash
        with pytest.raises(lora.LoraLayoutError, match="does not load into"):
            lora.load_lora(pipe, broken)
        assert not lora.has_lora(pipe.unet) and not lora.has_lora(pipe.text_encoder)
        assert not hasattr(pipe.unet, "peft_config")
    torch.testing.assert_close(sample(pipe), before)

    good = models.build_tiny_pipeline(seed=0)
    lora.add_lora(good.unet, rank=2)
    perturb_lora(good.unet)
    lora.save_lora(good, tmp_path / "good")
    lora.load_lora(pipe, tmp_path / "good", adapter_name="style")
    styled = sample(pipe)
    torch.testing.assert_close(styled, sample(good))
    with pytest.raises(lora.LoraLayoutError):
        lora.load_lora(pipe, broken)  # beside a loaded adapter: only its own layers go
    assert list(pipe.unet.peft_config) == ["style"] and not lora.has_lora(pipe.text_encoder)
    torch.testing.assert_close(sample(pipe), styled)


def test_loading_under_a_name_in_use_is_refused_as_such(tmp_path):
    pipe = models.build_tiny_pipeline(seed=0)
    lora.add_lora(pipe.unet, rank=2)
    lora.save_lora(pipe, tmp_path / "lora")
    with pytest.raises(ValueError, match="unet already has a LoRA adapter named 'default'"):
        lora.load_lora(pipe, tmp_path / "lora")
    lora.load_lora(pipe, tmp_path / "lora", adapter_name="second")
    assert set(pipe.unet.peft_config) == {"default", "second"}


def test_models_still_offers_the_lora_helpers():
    assert models.add_lora is lora.add_lora and models.LoraLayoutError is lora.LoraLayoutError
    with pytest.raises(AttributeError, match="no attribute 'add_loraa'"):
        models.add_loraa  # noqa: B018


@pytest.mark.parametrize(
    ("targets", "suffixes"),
    [
        (lora.DEFAULT_LORA_TARGETS, ("to_k", "to_out.0", "to_q", "to_v")),
        (CONV_AND_ATTENTION, ("conv1", "conv2", "proj_in", "proj_out", "to_out.0", "to_q")),
        # some of the to_q layers only: suffixes long enough to leave the others out
        (["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "attn2.to_k"],
         ("attn2.to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")),
    ],
)  # fmt: skip
def test_a_saved_adapters_layout_is_read_as_run_settings(targets, suffixes, tmp_path):
    saved = models.build_tiny_pipeline(seed=0)
    lora.add_lora(saved.unet, rank=4, alpha=8, target_modules=targets)
    lora.save_lora(saved, tmp_path / "lora")
    pipe = models.build_tiny_pipeline(seed=0)
    layout = lora.lora_layout(pipe, tmp_path / "lora")
    assert (layout.rank, layout.alpha, layout.target_modules) == (4, 8, suffixes)
    assert layout.layers == lora.layers_matching(saved.unet, targets)  # the same layers
    assert lora.layers_matching(pipe.unet, layout.target_modules) == layout.layers
    assert not lora.has_lora(pipe.unet)  # read, then taken out again


def test_the_text_encoder_part_of_a_lora_loads_alone_and_frozen(tmp_path):
    saved = models.build_tiny_pipeline(seed=0)
    lora.add_lora(saved.unet, rank=2)
    saved.text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "out_proj"]))
    perturb_lora(saved.text_encoder)
    lora.save_lora(saved, tmp_path / "lora")
    pipe = models.build_tiny_pipeline(seed=0)
    layout = lora.lora_layout(pipe, tmp_path / "lora")
    assert layout.text_encoders == ("text_encoder",) and layout.rank == 2
    assert not lora.has_lora(pipe.unet) and not lora.has_lora(pipe.text_encoder)
    assert lora.load_text_encoder_lora(pipe, tmp_path / "lora") == ("text_encoder",)
    assert not lora.has_lora(pipe.unet)
    layers = lora.lora_layers(pipe.text_encoder)
    assert len(layers) == 4 and not any(p.requires_grad for p in pipe.text_encoder.parameters())
    prompt = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = pipe.text_encoder(prompt)[0]
        torch.testing.assert_close(adapted, saved.text_encoder(prompt)[0])
        lora.merge_lora(pipe.text_encoder)  # a transformers model: merged through peft
        assert not lora.has_lora(pipe.text_encoder)
        torch.testing.assert_close(pipe.text_encoder(prompt)[0], adapted)
    with pytest.raises(lora.LoraLayoutError, match="adapts no layer of the unet"):
        encoder_only = models.build_tiny_pipeline(seed=0)
        encoder_only.text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
        lora.save_lora(encoder_only, tmp_path / "encoder_only")
        lora.lora_layout(models.build_tiny_pipeline(seed=0), tmp_path / "encoder_only")


def test_a_layout_keeps_the_layers_of_other_ranks_and_alphas(tmp_path):
    saved = models.build_tiny_pipeline(seed=0)
    lora.add_lora(saved.unet, rank=4, alpha=8, rank_pattern={"to_q": 2},
                  alpha_pattern={"attn2.to_k": 3})  # fmt: skip
    lora.save_lora(saved, tmp_path / "lora")
    layout = lora.lora_layout(models.build_tiny_pipeline(seed=0), tmp_path / "lora")
    to_q, attn2_to_k = (lora.layers_matching(saved.unet, [t]) for t in ("to_q", "attn2.to_k"))
    assert (layout.rank, layout.alpha) == (4, 8)  # what most layers have
    assert layout.rank_pattern == dict.fromkeys(sorted(to_q), 2)
    assert layout.alpha_pattern == dict.fromkeys(sorted(attn2_to_k), 3)
    rebuilt = models.build_tiny_pipeline(seed=0)  # the settings give the same adapter back
    lora.add_lora(rebuilt.unet, rank=layout.rank, alpha=layout.alpha,
                  target_modules=layout.target_modules, rank_pattern=layout.rank_pattern,
                  alpha_pattern=layout.alpha_pattern)  # fmt: skip
    for path, layer in lora.lora_layers(saved.unet).items():
        twin = lora.lora_layers(rebuilt.unet)[path]
        assert (twin.r["default"], twin.scaling["default"]) == (
            layer.r["default"], layer.scaling["default"])  # fmt: skip
