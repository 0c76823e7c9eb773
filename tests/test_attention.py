"""The fused-attention switch: same outputs on every backend, safe fusion, a clean way back."""

import pytest
import torch

from diffalign import attention, models
from diffalign.attention import enable_fused_attention, has_fused_qkv, unfuse_qkv

from .conftest import requires_cuda, unet_inputs


def unet_output(unet, seed=0):
    with torch.no_grad():
        return unet(*unet_inputs(unet, seed=seed)).sample


def processor_names(model):
    return {type(m.processor).__name__ for m in attention._diffusers_attention_modules(model)}


@pytest.mark.parametrize("backend,fuse", [("sdpa", False), ("sdpa", True), ("auto", False)])
def test_unet_backends_match_classic(tiny_unet, backend, fuse):
    enable_fused_attention(tiny_unet, "classic")
    assert processor_names(tiny_unet) == {"AttnProcessor"}
    reference = unet_output(tiny_unet)
    report = enable_fused_attention(tiny_unet, backend, fuse_qkv=fuse)
    assert report.backend == "sdpa" and report.fused_qkv == fuse and report.modules == 8
    expected = {"FusedAttnProcessor2_0"} if fuse else {"AttnProcessor2_0"}
    assert processor_names(tiny_unet) == expected
    torch.testing.assert_close(unet_output(tiny_unet), reference, atol=1e-5, rtol=1e-5)


def test_vae_and_text_encoder_backends_match(tiny_pipeline, clip_tokenizer):
    vae, text_encoder = tiny_pipeline.vae, tiny_pipeline.text_encoder
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = clip_tokenizer(
        ["a red circle", "two blue squares"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    outputs = {}
    for backend in ("classic", "sdpa"):
        enable_fused_attention(vae, backend, fuse_qkv=backend == "sdpa")
        report = enable_fused_attention(text_encoder, backend)
        assert (
            text_encoder.config._attn_implementation
            == {"classic": "eager", "sdpa": "sdpa"}[backend]
        )
        assert report.library == "transformers" and report.modules == 2
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
            outputs[backend] = (latents, vae.decode(latents).sample, text_encoder(ids)[0])
    for a, b in zip(outputs["classic"], outputs["sdpa"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pipeline_switch_reports_each_component(tiny_pipeline):
    reports = enable_fused_attention(tiny_pipeline, "sdpa", fuse_qkv=True)
    assert set(reports) == {"unet", "vae", "text_encoder"}
    assert reports["unet"].fused_qkv and reports["vae"].fused_qkv
    assert not reports["text_encoder"].fused_qkv  # transformers models are never fused
    assert "fused QKV" in str(reports["unet"])


def test_unfuse_folds_trained_weights_back_and_saves_standard_layout(tiny_unet, tmp_path):
    original_keys = set(tiny_unet.state_dict())
    enable_fused_attention(tiny_unet, "sdpa", fuse_qkv=True)
    assert has_fused_qkv(tiny_unet)
    with torch.no_grad():  # "train" the fused layers: the change must survive unfusing
        for module in attention._diffusers_attention_modules(tiny_unet):
            for name in ("to_qkv", "to_kv"):
                if hasattr(module, name):
                    getattr(module, name).weight.mul_(1.5)
    fused_output = unet_output(tiny_unet)
    assert unfuse_qkv(tiny_unet) == 8
    assert not has_fused_qkv(tiny_unet)
    assert processor_names(tiny_unet) == {"AttnProcessor2_0"}
    torch.testing.assert_close(unet_output(tiny_unet), fused_output, atol=1e-5, rtol=1e-5)
    tiny_unet.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(saved) == original_keys
    assert not any("to_qkv" in key or "to_kv" in key for key in saved)


def test_switching_backend_after_fusion_unfuses_first(tiny_unet):
    enable_fused_attention(tiny_unet, "sdpa", fuse_qkv=True)
    enable_fused_attention(tiny_unet, "classic")
    assert not has_fused_qkv(tiny_unet)


def test_fusion_is_refused_while_lora_sits_on_qkv(tiny_unet):
    models.add_lora(tiny_unet, rank=2)
    with pytest.raises(ValueError, match="LoRA"):
        enable_fused_attention(tiny_unet, "sdpa", fuse_qkv=True)
    assert not has_fused_qkv(tiny_unet)
    report = enable_fused_attention(tiny_unet, "sdpa")  # plain SDPA is fine with LoRA
    assert report.modules == 8


def test_custom_processors_are_left_alone(tiny_unet):
    class MyProcessor:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    first = attention._diffusers_attention_modules(tiny_unet)[0]
    first.set_processor(MyProcessor())
    report = enable_fused_attention(tiny_unet, "sdpa")
    assert report.skipped == 1 and report.modules == 7
    assert isinstance(first.processor, MyProcessor)


def test_bad_requests_raise_clear_errors(tiny_unet, tiny_pipeline):
    with pytest.raises(ValueError, match="choose one of"):
        enable_fused_attention(tiny_unet, "flash")
    with pytest.raises(ValueError, match="xformers"):
        enable_fused_attention(tiny_unet, "xformers")  # CPU model (or xformers missing)
    with pytest.raises(ValueError, match="no xformers"):
        enable_fused_attention(tiny_pipeline.text_encoder, "xformers")
    with pytest.raises(ValueError, match="'sdpa' backend"):
        enable_fused_attention(tiny_unet, "classic", fuse_qkv=True)
    with pytest.raises(ValueError, match="no attention modules"):
        enable_fused_attention(torch.nn.Linear(2, 2))


def test_auto_never_picks_xformers_on_cpu():
    assert attention.resolve_backend("auto", "cpu") == "sdpa"


@requires_cuda
def test_xformers_matches_sdpa_on_cuda(tiny_unet):
    pytest.importorskip("xformers")
    unet = tiny_unet.cuda()
    inputs = [x.cuda() for x in unet_inputs(unet)]
    with torch.no_grad():
        enable_fused_attention(unet, "sdpa")
        reference = unet(*inputs).sample
        assert enable_fused_attention(unet, "auto").backend == "xformers"
        torch.testing.assert_close(unet(*inputs).sample, reference, atol=1e-4, rtol=1e-4)
