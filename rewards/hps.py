"""HPSv2.1: the Human Preference Score v2.1, an open_clip ViT-H-14 fine-tuned on HPD v2.

The checkpoint (``HPS_v2.1_compressed.pt`` from ``xswu/HPSv2``) holds the whole model's state dict
under ``"state_dict"``, so the architecture is built without pretrained weights and the checkpoint
is loaded strictly. The score is the cosine of the normalised image and text embeddings, as
HPSv2's own scorer computes it (typical values 0.2-0.35). Images are resized the way HPSv2
evaluates: longest edge to 224 with bicubic filtering, zero padding to a square, CLIP
normalisation.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffalign.rewards.base import Reward
from diffalign.rewards.preprocess import ImageTransform
from diffalign.rewards.weights import WeightsSpec, load_state_dict_file, resolve_weights

if TYPE_CHECKING:
    from torch import nn

HPS_ARCHITECTURE = "ViT-H-14"


class _QuietRootLogger:
    """open_clip warns on the root logger that it built random weights; we load them next."""

    def __enter__(self) -> None:
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        logging.root.setLevel(self.level)


def build_open_clip(architecture: str) -> torch.nn.Module:
    """An open_clip model of ``architecture`` with random weights (nothing is downloaded)."""
    import open_clip

    with _QuietRootLogger():
        return open_clip.create_model(architecture, pretrained=None)


class HPSv2(Reward):
    """HPSv2.1 score: cosine of open_clip ViT-H-14 embeddings with the HPS v2.1 checkpoint.

    Args:
        path: the checkpoint file (else ``DIFFALIGN_HPSV2_PATH``, the HF cache, the hub).
        architecture: the open_clip model name the checkpoint belongs to.
        model: an already built open_clip model of that architecture to use instead.
        batch_size, nonfinite: see :class:`~diffalign.rewards.base.Reward`.
    """

    name = "hpsv2"
    differentiable = True
    weights = WeightsSpec("hpsv2", "xswu/HPSv2", ("HPS_v2.1_compressed.pt",), is_folder=False)

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        architecture: str = HPS_ARCHITECTURE,
        *,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        import open_clip

        super().__init__(**kwargs)
        if model is None:
            checkpoint = resolve_weights(self.weights, path)
            model = build_open_clip(architecture)
            model.load_state_dict(load_state_dict_file(checkpoint), strict=True)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(architecture)
        cfg = getattr(self.model.visual, "preprocess_cfg", {})
        size = self.model.visual.image_size
        self.input_size = size[0] if isinstance(size, tuple) else size
        self.transform = ImageTransform(
            size=self.input_size, mode="longest_pad", interpolation="bicubic",
            **{k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg},
        )  # fmt: skip
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = F.normalize(self.model.encode_image(self.transform(images)), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)
        return (image * text).sum(-1)
