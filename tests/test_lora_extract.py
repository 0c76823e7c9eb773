"""LoRA adapters extracted from fine-tuned models: worked values, exact recovery, what is left out.
The command on a real fully fine-tuned run: test_trainers.py."""

import copy

import pytest
import torch

from diffalign import lora, models
from diffalign.lora_extract import extract_lora, resize_lora

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


def _changes(module):
    """Each LoRA layer's change ``scale * B @ A``, flattened to a matrix, by path."""
    changes = {}
    for path, layer in lora.lora_layers(module).items():
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        changes[path] = layer.scaling["default"] * product.detach()
    return changes


def _three_directions():
    """The tiny pipeline with a rank-3 adapter (scale 2) on one layer whose change has singular
    values 3, 2 and 1."""
    pipe = models.build_tiny_pipeline(seed=0)
    lora.add_lora(pipe.unet, rank=3, alpha=6, target_modules=[QUERY])  # scale 2
    layer = _layer(pipe.unet)
    with torch.no_grad():  # scale * B @ A = diag(3, 2, 1) in the first three rows and columns
        layer.lora_B["default"].weight.zero_()[:3, :3] = torch.diag(torch.tensor([1.5, 1.0, 0.5]))
        layer.lora_A["default"].weight.zero_()[:3, :3] = torch.eye(3)
    return pipe


@pytest.mark.parametrize(("keep", "rank", "kept"), [(0.6, 1, 9 / 14), (0.9, 2, 13 / 14),
                                                    (0.95, 3, 1.0), (1.0, 3, 1.0)])  # fmt: skip
def test_resizing_by_share_keeps_the_fewest_directions_that_hold_it(keep, rank, kept):
    pipe = _three_directions()  # squared singular values 9, 4, 1 of 14
    report = resize_lora(pipe, rank=3, keep=keep)
    assert report.ranks == {f"unet.{QUERY}": rank} and report.kept == pytest.approx(kept)
    assert _layer(pipe.unet).r["default"] == rank
    assert f"keeps {100 * keep:g}% of its change (ranks {rank} to {rank})" in report.describe()


def test_resizing_keeps_each_layers_largest_directions_at_scale_one():
    pipe = _three_directions()
    report = resize_lora(pipe, rank=1)
    assert report.kept == pytest.approx(9 / 14) and report.already_small == 0
    resized = _layer(pipe.unet)
    assert (resized.r["default"], resized.scaling["default"]) == (1, 1.0)
    expected = torch.zeros_like(_changes(pipe.unet)[QUERY])
    expected[0, 0] = 3.0
    torch.testing.assert_close(_changes(pipe.unet)[QUERY], expected)


def test_resizing_a_whole_adapter_gives_the_best_approximation_per_layer():
    from peft import LoraConfig

    pipe = models.build_tiny_pipeline(seed=0)
    lora.add_lora(pipe.unet, rank=8, alpha=4, target_modules=["to_q", "to_k", "conv1"],
                  rank_pattern={"to_k": 2})  # fmt: skip
    pipe.text_encoder.add_adapter(LoraConfig(r=8, target_modules=["q_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in (pipe.unet, pipe.text_encoder):
            for name, weight in part.named_parameters():
                if "lora_" in name:
                    weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
    before = {part: _changes(getattr(pipe, part)) for part in ("unet", "text_encoder")}
    images = _images(pipe)
    same = resize_lora(pipe, rank=8)  # every layer already at most rank 8: the same adapter
    assert same.kept == pytest.approx(1.0) and same.already_small == len(same.layers) == 26
    torch.testing.assert_close(_images(pipe), images, atol=1e-5, rtol=1e-4)
    report = resize_lora(pipe, rank=3)
    assert 0.3 < report.kept < 1 and report.already_small == 8  # the rank-2 to_k layers
    for part, changes in before.items():
        for path, change in changes.items():
            left, values, right = torch.linalg.svd(change)
            best = (left[:, :3] * values[:3]) @ right[:3]
            torch.testing.assert_close(_changes(getattr(pipe, part))[path], best,
                                       atol=1e-5, rtol=1e-4)  # fmt: skip
    ranks = {layer.r["default"] for layer in lora.lora_layers(pipe.unet).values()}
    assert ranks == {2, 3}
    with pytest.raises(ValueError, match="rank must be >= 1"):
        resize_lora(pipe, rank=0)
    with pytest.raises(ValueError, match=r"keep is a share of each layer's change, in \(0, 1\]"):
        resize_lora(pipe, rank=2, keep=1.5)
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        resize_lora(pipe, rank=2, adapter_name="other")


def test_convert_resizes_a_lora_file(tmp_path, capsys):
    from safetensors import safe_open

    from diffalign.cli import main
    from diffalign.kohya_lora import save_kohya_lora

    base = tmp_path / "base"
    pipe = models.build_tiny_pipeline(seed=0)
    pipe.save_pretrained(base)
    lora.add_lora(pipe.unet, rank=8)
    perturb_lora(pipe.unet)
    kohya = save_kohya_lora(pipe, tmp_path / "rank8.safetensors")
    out = tmp_path / "rank2.safetensors"
    argv = ["convert", "--lora", str(kohya), "--model", str(base), "--lora-rank", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "resized 32 layers to rank <= 2" in capsys.readouterr().out
    with safe_open(str(out), "pt") as written:
        downs = [written.get_tensor(key) for key in written.keys()  # noqa: SIM118
                 if key.endswith("lora_down.weight")]  # fmt: skip
    assert len(downs) == 32 and {down.shape[0] for down in downs} == {2}
    with pytest.raises(SystemExit, match="--lora-rank is the rank of an adapter"):
        main(["convert", "--model", str(base), "--lora-rank", "2", "--out", str(tmp_path / "x")])
    assert main([*argv, "--lora-keep", "0.5", "--out", str(tmp_path / "shrunk")]) == 0
    assert "each to the rank that keeps 50% of its change" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--lora-keep picks each layer's rank when resizing"):
        main([*argv[:-2], "--lora-keep", "0.5", "--out", str(tmp_path / "x")])
