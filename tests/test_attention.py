"""The fused-attention switch: same outputs on every backend, safe fusion, a clean way back."""

import pytest
import torch

from diffalign import attention, lora, models
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
    lora.add_lora(tiny_unet, rank=2)
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


def test_an_xformers_that_cannot_run_is_skipped_by_auto_and_named_when_asked_for(monkeypatch):
    problem = "xformers 0.0.35 cannot run with torch 2.11.0 (NotImplementedError: no kernel)"
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    monkeypatch.setattr(attention, "xformers_problem", lambda device="cuda": problem)
    assert attention.resolve_backend("auto", "cuda") == "sdpa"
    with pytest.raises(ValueError, match=r"cannot run with torch 2\.11\.0.*or use 'sdpa'"):
        attention.resolve_backend("xformers", "cuda")


@requires_cuda
def test_xformers_matches_sdpa_on_cuda(tiny_unet):
    problem = attention.xformers_problem("cuda")
    if problem:
        pytest.skip(problem)
    unet = tiny_unet.cuda()
    inputs = [x.cuda() for x in unet_inputs(unet)]
    with torch.no_grad():
        enable_fused_attention(unet, "sdpa")
        reference = unet(*inputs).sample
        assert enable_fused_attention(unet, "auto").backend == "xformers"
        torch.testing.assert_close(unet(*inputs).sample, reference, atol=1e-4, rtol=1e-4)


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip


def flux_output(model):
    gen = torch.Generator().manual_seed(0)
    tokens, text = 16, 8
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, tokens, 4, generator=gen),
            encoder_hidden_states=torch.randn(1, text, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=torch.randn(tokens, 3, generator=gen),
            txt_ids=torch.zeros(text, 3),
        ).sample


def test_dispatching_transformer_backends_match_and_unfuse_cleanly(tmp_path):
    model = tiny_flux()
    original_keys = set(model.state_dict())
    enable_fused_attention(model, "classic")
    backends = {
        m.processor._attention_backend for m in attention._diffusers_attention_modules(model)
    }
    assert {b.value for b in backends} == {"_native_math"}
    reference = flux_output(model)
    report = enable_fused_attention(model, "sdpa", fuse_qkv=True)
    assert report.modules == 2 and report.fused_qkv and has_fused_qkv(model)
    torch.testing.assert_close(flux_output(model), reference, atol=1e-5, rtol=1e-5)
    assert unfuse_qkv(model) == 2 and not has_fused_qkv(model)
    torch.testing.assert_close(flux_output(model), reference, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == original_keys


def tiny_sd3_transformer():
    model = models.build_tiny_sd3_transformer(seed=0).eval()
    with torch.no_grad():  # its output projection starts at zero: give every layer a say
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator()))
    return model


def sd3_output(model, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 4, 16, 16, generator=gen).to(device),
            encoder_hidden_states=torch.randn(2, 20, 64, generator=gen).to(device),
            pooled_projections=torch.randn(2, 64, generator=gen).to(device),
            timestep=torch.tensor([500.0, 500.0], device=device),
        ).sample


def test_sd3_joint_attention_fuses_and_unfuses_cleanly_and_has_no_classic_path():
    model = tiny_sd3_transformer()
    original_keys = set(model.state_dict())
    reference = sd3_output(model)
    report = enable_fused_attention(model, "sdpa", fuse_qkv=True)
    assert report.modules == 2 and report.fused_qkv and has_fused_qkv(model)
    assert processor_names(model) == {"FusedJointAttnProcessor2_0"}
    torch.testing.assert_close(sd3_output(model), reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the fused text-stream projection is the one in use
        model.transformer_blocks[0].attn.to_added_qkv.weight.mul_(1.5)
    assert not torch.allclose(sd3_output(model), reference, atol=1e-4)
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_added_qkv.weight.div_(1.5)
    assert unfuse_qkv(model) == 2 and not has_fused_qkv(model)
    assert processor_names(model) == {"JointAttnProcessor2_0"}
    torch.testing.assert_close(sd3_output(model), reference, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == original_keys
    classic = enable_fused_attention(model, "classic")
    assert classic.modules == 0 and classic.skipped == 2  # said, not pretended


def test_sd3_fusion_is_refused_while_lora_sits_on_the_text_projections():
    model = lora.add_lora(tiny_sd3_transformer(), rank=2, target_modules=["add_q_proj"])
    with pytest.raises(ValueError, match="LoRA adapters"):
        enable_fused_attention(model, "sdpa", fuse_qkv=True)


@requires_cuda
def test_sd3_xformers_matches_sdpa_on_cuda():
    problem = attention.xformers_problem("cuda")
    if problem:
        pytest.skip(problem)
    model = tiny_sd3_transformer().cuda()
    enable_fused_attention(model, "sdpa")
    reference = sd3_output(model, "cuda")
    assert enable_fused_attention(model, "xformers").modules == 2
    assert processor_names(model) == {"XFormersJointAttnProcessor"}
    torch.testing.assert_close(sd3_output(model, "cuda"), reference, atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fused_attention_trains_on_cuda(tiny_unet, dtype):
    reference = unet_output(tiny_unet)  # fp32 on CPU
    unet = tiny_unet.to("cuda", dtype)
    enable_fused_attention(unet, "sdpa", fuse_qkv=True)
    latents, timesteps, states = (x.to("cuda") for x in unet_inputs(unet))
    output = unet(latents.to(dtype), timesteps, states.to(dtype)).sample
    output.float().pow(2).mean().backward()
    assert all(
        p.grad is not None for p in unet.parameters() if p.requires_grad and "to_qkv" in str(p)
    )
    torch.testing.assert_close(output.detach().float().cpu(), reference, atol=5e-2, rtol=5e-2)
