"""LoRA adapters extracted from fine-tuned models: worked values, exact recovery, what is left out.
The command on a real fully fine-tuned run: test_trainers.py."""

import copy

import pytest
import torch

from diffalign import lora, models
from diffalign.lora_extract import extract_lora

from .test_lora import perturb_lora

QUERY = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _images(pipeline):
    return pipeline("a red circle", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def _layer(unet, path=QUERY):
    return dict(unet.named_modules())[path]


def test_a_change_of_three_directions_keeps_its_largest_at_rank_one():
    base_unet = models.build_tiny_unet(seed=0)
    tuned = copy.deepcopy(base_unet)
    change = torch.zeros_like(_layer(tuned).weight)
    change[0, 0], change[1, 1], change[2, 2] = 3.0, 2.0, 1.0  # singular values 3, 2, 1
    with torch.no_grad():
        _layer(tuned).weight.add_(change)
    original = _layer(base_unet).weight.detach().clone()
    report = extract_lora(tuned, base_unet, rank=1)
    assert report.layers == [QUERY] and report.left_out == []
    assert report.kept == pytest.approx(9 / 14)  # 3^2 of 3^2 + 2^2 + 1^2
    lora.merge_lora(base_unet)
    moved = _layer(base_unet).weight.detach() - original
    expected = torch.zeros_like(change)
    expected[0, 0] = 3.0  # the closest rank-1 matrix keeps the largest direction alone
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_a_lora_fine_tune_is_recovered_exactly_and_a_smaller_rank_keeps_part(tmp_path):
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # linear and 3x3 conv layers
    tuned = models.build_tiny_pipeline(seed=0)
    lora.add_lora(tuned.unet, rank=4, alpha=4, target_modules=targets)
    perturb_lora(tuned.unet)
    expected = _images(tuned)
    lora.merge_lora(tuned.unet)  # as a fully fine-tuned model: the change is in the weights
    for rank, kept in ((4, 1.0), (6, 1.0), (2, None)):
        base = models.build_tiny_pipeline(seed=0)
        report = extract_lora(tuned.unet, base.unet, rank=rank)
        assert len(report.layers) == sum(1 for path, module in tuned.unet.named_modules()
                                         if path.endswith(targets))  # fmt: skip
        if kept is None:
            assert 0.3 < report.kept < 0.9
            assert not torch.allclose(_images(base), expected, atol=1e-3)
        else:
            assert report.kept == pytest.approx(kept)
            torch.testing.assert_close(_images(base), expected, atol=1e-4, rtol=0)
    lora.save_lora(base, tmp_path / "lora")  # written as any adapter is
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_what_no_lora_holds_is_reported_and_bad_inputs_are_refused():
    base = models.build_tiny_unet(seed=0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.conv_norm_out.weight.add_(0.1)  # a norm: no LoRA holds it
        _layer(tuned).weight.add_(0.01)
    report = extract_lora(tuned, copy.deepcopy(base), rank=2)
    assert report.left_out == ["conv_norm_out.weight"]
    assert "1 changed tensors no LoRA holds are left out (conv_norm_out.weight)" in (
        report.describe()
    )
    with pytest.raises(ValueError, match="rank must be >= 1"):
        extract_lora(tuned, copy.deepcopy(base), rank=0)
    with pytest.raises(ValueError, match="no change to extract"):
        extract_lora(copy.deepcopy(base), copy.deepcopy(base), rank=2)
    other = models.build_tiny_unet(seed=0, cross_attention_dim=48)
    with pytest.raises(ValueError, match="differ in architecture"):
        extract_lora(tuned, other, rank=2)
