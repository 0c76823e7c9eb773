"""diffalign.rewards: reward adapters behind one contract, and their registry.

A reward is an ``nn.Module`` with ``forward(images, prompts) -> Tensor[B]`` over float images in
[0, 1] of shape (B, 3, H, W), any size: each adapter resizes and normalises as its model was
trained. Build one by name, or a weighted sum::

    from diffalign.rewards import load_reward, list_rewards

    reward = load_reward("shapes")
    combined = load_reward("pickscore+0.2*aesthetic")

Model weights resolve the same way for every adapter (``path=``, then ``DIFFALIGN_<NAME>_PATH``,
then the Hugging Face cache, then the hub when reachable); nothing is loaded at import time.
"""

from __future__ import annotations

from diffalign.rewards.async_scoring import AsyncRewardScorer, RewardBatchError
from diffalign.rewards.base import NonFiniteRewardError, Reward, check_images, check_prompts
from diffalign.rewards.registry import (
    RewardInfo,
    UnknownRewardError,
    WeightedReward,
    list_rewards,
    load_reward,
    parse_reward_spec,
    register_reward,
    reward_components,
    reward_info,
)
from diffalign.rewards.weights import WeightsNotFoundError, WeightsSpec, resolve_weights


def _lazy(module: str, cls: str):
    """A factory that imports the adapter only when the reward is built."""

    def factory(**kwargs) -> Reward:
        from importlib import import_module

        return getattr(import_module(f"diffalign.rewards.{module}"), cls)(**kwargs)

    factory.__name__ = f"load_{cls}"
    return factory


_BUILTINS = (
    ("jpeg_compressibility", "jpeg", "JpegCompressibility",
     "minus JPEG size in kB at quality 95 (DDPO)", "-", "-", False),
    ("jpeg_incompressibility", "jpeg", "JpegIncompressibility",
     "JPEG size in kB at quality 95 (DDPO)", "-", "-", False),
    ("aesthetic", "aesthetic", "Aesthetic",
     "LAION improved aesthetic predictor, about 1-10",
     "MLP on CLIP ViT-L/14 image embeddings",
     "trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth + openai/clip-vit-large-patch14",
     True),
    ("pickscore", "clip", "PickScore",
     "logit_scale.exp() * cos(image, text), about 18-23",
     "PickScore_v1 (CLIP ViT-H/14)",
     "yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor", True),
    ("clip_score", "clip", "ClipScore", "100 * max(cos(image, text), 0)",
     "CLIP ViT-L/14", "openai/clip-vit-large-patch14", True),
    ("hpsv2", "hps", "HPSv2", "HPSv2.1 cosine, about 0.2-0.35",
     "open_clip ViT-H-14", "xswu/HPSv2 HPS_v2.1_compressed.pt", True),
    ("shapes", "shapes", "ShapesReward", "shapes-world correctness in [0, 1]",
     "programmatic", "-", False),
    ("tiny_clip", "clip", "TinyClip", "PickScore formula on the shapes world's tiny CLIP",
     "tiny CLIP (shipped)", "shipped in diffalign/assets/tiny-clip", True),
)  # fmt: skip

for _name, _module, _cls, _description, _model, _weights, _grad in _BUILTINS:
    register_reward(_name, _lazy(_module, _cls), _description, _model, _weights, _grad)

__all__ = [
    "AsyncRewardScorer",
    "NonFiniteRewardError",
    "Reward",
    "RewardBatchError",
    "RewardInfo",
    "UnknownRewardError",
    "WeightedReward",
    "WeightsNotFoundError",
    "WeightsSpec",
    "check_images",
    "check_prompts",
    "list_rewards",
    "load_reward",
    "parse_reward_spec",
    "register_reward",
    "reward_components",
    "reward_info",
    "resolve_weights",
]
