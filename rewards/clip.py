"""CLIP-based rewards on transformers ``CLIPModel`` folders: PickScore, CLIP score and tiny-clip.

Each loads the model and its processor from folders in the Hugging Face layout (as
``save_pretrained`` writes them and the hub holds them), preprocesses images the way that
processor does but differentiably, and tokenises prompts with the processor's tokenizer, padded
to 77 tokens and truncated.

- ``pickscore``: ``logit_scale.exp() * cos(image, text)`` with ``yuvalkirstain/PickScore_v1`` and
  the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (typical SD1.5 means are about 21-23);
  ``PickScore.preference`` gives the softmax preference among candidates for one prompt.
- ``clip_score``: ``100 * max(cos(image, text), 0)`` with ``openai/clip-vit-large-patch14``, the
  common definition (torchmetrics, Hessel et al. 2021 with w = 100).
- ``tiny_clip``: the PickScore formula on the shipped ``assets/tiny-clip`` of the shapes world.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffalign.rewards.base import Reward
from diffalign.rewards.preprocess import ImageTransform
from diffalign.rewards.weights import WeightsSpec, missing_files, resolve_weights

if TYPE_CHECKING:
    from typing import Any

    from torch import nn
    from transformers import CLIPModel, CLIPProcessor, ProcessorMixin

CLIP_MAX_TOKENS = 77
MODEL_FILES = ("config.json", "model.safetensors|pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json|processor_config.json", "tokenizer.json|vocab.json")


def pooled(output: Any) -> torch.Tensor:
    """The embedding tensor of ``get_image_features`` / ``get_text_features`` in any version."""
    return getattr(output, "pooler_output", output)


def load_clip_folder(
    folder: str | os.PathLike, processor_folder: str | os.PathLike | None = None
) -> tuple[CLIPModel, CLIPProcessor]:
    """A frozen ``CLIPModel`` and its processor; refuses checkpoints with missing weights."""
    from transformers import CLIPModel, CLIPProcessor

    model, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
    incomplete = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if incomplete:
        raise ValueError(
            f"The CLIP checkpoint in {folder} does not fit its config: {len(incomplete)} weights "
            f"missing or of the wrong shape (e.g. {incomplete[0]}); re-download the model."
        )
    processor = CLIPProcessor.from_pretrained(processor_folder or folder)
    return model.eval().requires_grad_(False), processor


class ClipReward(Reward):
    """Base of the CLIP similarity rewards: embeddings in, ``formula(cosine, logit_scale)`` out.

    Args:
        path: the CLIP model folder (else ``DIFFALIGN_<NAME>_PATH``, the HF cache, the hub).
        processor_path: the processor folder when it is not inside the model folder.
        model, processor: an already loaded ``CLIPModel`` and ``CLIPProcessor`` to use instead.
        batch_size, nonfinite: see :class:`~diffalign.rewards.base.Reward`.
    """

    differentiable = True
    weights: WeightsSpec
    processor_weights: WeightsSpec | None = None

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        processor_path: str | os.PathLike | None = None,
        *,
        model: nn.Module | None = None,
        processor: ProcessorMixin | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if model is None:
            folder = self.resolve_model(path)
            processor_folder = self.resolve_processor(folder, processor_path)
            model, processor = load_clip_folder(folder, processor_folder)
        elif processor is None:
            raise ValueError("Pass the model's CLIPProcessor along with model=.")
        self.model = model
        self.tokenizer = processor.tokenizer
        self.transform = ImageTransform.from_clip_processor(processor)
        self.input_size = self.transform.crop or self.transform.size
        self.freeze()

    def resolve_model(self, path: str | os.PathLike | None) -> os.PathLike:
        """The model folder, by the shared weights resolution order."""
        return resolve_weights(self.weights, path)

    def resolve_processor(
        self, folder: str | os.PathLike, processor_path: str | os.PathLike | None
    ) -> os.PathLike:
        """The processor folder: explicit, else inside the model folder, else its own repo."""
        spec = self.processor_weights
        if processor_path is not None or (spec and os.environ.get(spec.env_var)):
            return resolve_weights(spec, processor_path)
        if spec is None or not missing_files(folder, PROCESSOR_FILES):
            return folder
        return resolve_weights(spec)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of images in [0, 1]."""
        pixels = self.transform(images)
        return F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (77 tokens, truncated)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True,
            max_length=min(CLIP_MAX_TOKENS, self.model.config.text_config.max_position_embeddings),
            return_tensors="pt",
        ).to(self.device)  # fmt: skip
        features = self.model.get_text_features(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        )
        return F.normalize(pooled(features), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt."""
        return (self.embed_images(images) * self.embed_text(prompts)).sum(-1)

    def formula(self, cosine: torch.Tensor) -> torch.Tensor:
        """Turn cosines into the reward (PickScore's scaled logit by default)."""
        return self.model.logit_scale.exp() * cosine

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.formula(self.cosine(images, prompts))


class PickScore(ClipReward):
    """PickScore: ``logit_scale.exp() * cos(image, text)`` with PickScore_v1 (CLIP ViT-H/14)."""

    name = "pickscore"
    weights = WeightsSpec("pickscore", "yuvalkirstain/PickScore_v1", MODEL_FILES)
    processor_weights = WeightsSpec(
        "pickscore_processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", PROCESSOR_FILES
    )

    def preference(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Probability that each candidate image is preferred, for one prompt (sums to 1)."""
        return torch.softmax(self(images, prompt), dim=0)


class TinyClip(PickScore):
    """The PickScore formula on the shapes world's shipped tiny CLIP (``assets/tiny-clip``)."""

    name = "tiny_clip"
    weights = WeightsSpec("tiny_clip", "assets/tiny-clip", MODEL_FILES + PROCESSOR_FILES)
    processor_weights = None

    def resolve_model(self, path: str | os.PathLike | None) -> os.PathLike:
        from diffalign.world import shipped_model_path

        if path is None and not os.environ.get(self.weights.env_var):
            path = shipped_model_path("tiny-clip")
        return resolve_weights(self.weights, path)


class ClipScore(ClipReward):
    """CLIP score ``100 * max(cos(image, text), 0)`` with CLIP ViT-L/14 by default."""

    name = "clip_score"
    weights = WeightsSpec("clip_score", "openai/clip-vit-large-patch14", MODEL_FILES)

    def formula(self, cosine: torch.Tensor) -> torch.Tensor:
        return 100 * cosine.clamp(min=0)
