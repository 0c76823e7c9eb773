"""The LAION improved aesthetic predictor, as DDPO uses it.

A small MLP (768 → 1024 → 128 → 64 → 16 → 1, no activations, dropout off at inference) reads
the L2-normalised image embedding of CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) and
predicts a 1-10 rating. The head file is ``aesthetic-model.pth`` from
``trl-lib/ddpo-aesthetic-predictor`` (the same weights as LAION's
``sac+logos+ava1-l14-linearMSE.pth``); any state dict with the keys ``layers.{0,2,4,6,7}`` loads.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.rewards.base import Reward
from diffalign.rewards.clip import MODEL_FILES, PROCESSOR_FILES, load_clip_folder, pooled
from diffalign.rewards.preprocess import ImageTransform
from diffalign.rewards.weights import WeightsSpec, load_state_dict_file, resolve_weights

if TYPE_CHECKING:
    from transformers import ProcessorMixin


class AestheticHead(nn.Module):
    """The predictor's MLP; layer indices match the released state dicts."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Ratings of L2-normalised image embeddings, shape (B,)."""
        return self.layers(embeddings).squeeze(-1)


def load_head(file: os.PathLike) -> AestheticHead:
    """The predictor's MLP from its weights file."""
    state = load_state_dict_file(file)
    if "layers.0.weight" not in state:
        raise ValueError(
            f"The aesthetic head file {file} has keys {sorted(state)[:4]}..., expected "
            "layers.0.weight ... layers.7.bias (the LAION improved aesthetic predictor's MLP)."
        )
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head


class Aesthetic(Reward):
    """LAION aesthetic score (about 1-10) from CLIP ViT-L/14 image embeddings.

    Args:
        path: the head's weights file (else ``DIFFALIGN_AESTHETIC_PATH``, the HF cache, the hub).
        clip_path: the CLIP ViT-L/14 folder (else ``DIFFALIGN_AESTHETIC_CLIP_PATH``, the HF
            cache, the hub).
        head, clip, processor: already loaded parts to use instead (all three together).
        batch_size, nonfinite: see :class:`~diffalign.rewards.base.Reward`.
    """

    name = "aesthetic"
    differentiable = True
    weights = WeightsSpec(
        "aesthetic", "trl-lib/ddpo-aesthetic-predictor", ("aesthetic-model.pth",), is_folder=False
    )
    clip_weights = WeightsSpec(
        "aesthetic_clip", "openai/clip-vit-large-patch14", MODEL_FILES + PROCESSOR_FILES
    )

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        clip_path: str | os.PathLike | None = None,
        *,
        head: AestheticHead | None = None,
        clip: nn.Module | None = None,
        processor: ProcessorMixin | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if head is None or clip is None or processor is None:
            head = load_head(resolve_weights(self.weights, path))
            clip, processor = load_clip_folder(resolve_weights(self.clip_weights, clip_path))
        self.head, self.clip = head, clip
        self.transform = ImageTransform.from_clip_processor(processor)
        self.input_size = self.transform.crop or self.transform.size
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = pooled(self.clip.get_image_features(pixel_values=self.transform(images)))
        return self.head(F.normalize(embeddings, dim=-1))
