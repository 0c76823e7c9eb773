"""``DTSPipeline``: reward-aligned sampling at inference time, with every search under one budget.

The pipeline extends diffusers' ``StableDiffusionPipeline`` (it loads the same folders;
``SDXLDTSPipeline`` does the same for ``StableDiffusionXLPipeline``) with search samplers that
spend an NFE budget per prompt on a stochastic DDIM chain (eta > 0):

- ``"dts"``: Diffusion Tree Sampling; its images sample ``p(x) exp(lambda r(x))``;
- ``"dts-star"``: DTS*, UCT search for the highest reward (anytime);
- ``"best-of-n"``: ``budget // (steps x rows)`` independent chains, the best kept;
- ``"smc"``: sequential Monte Carlo with that many particles (FK steering).

All four run on a :class:`~diffalign.pipelines.chain.PipelineChain`, which counts UNet rows (CFG
doubles them) and reward calls the same way, so equal budgets are equal compute.

Example::

    pipe = DTSPipeline.from_pretrained("path/to/sd15")
    out = pipe("a cat", reward="aesthetic", budget_nfe=2000, sampler="dts-star")
    out.images[0].save("cat.png"); print(out.rewards, out.stats[0]["nfe"])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from torch import Tensor

from diffalign.choices import SEARCH_SAMPLERS
from diffalign.pipelines.baselines import SMC_POTENTIALS, best_of_n, smc
from diffalign.pipelines.chain import DenoisingChain, PipelineChain
from diffalign.pipelines.rollout import over_components
from diffalign.pipelines.tree import SearchResult, TreeSettings, tree_search

if TYPE_CHECKING:
    import numpy as np
    from diffusers import DiffusionPipeline


@dataclass
class SearchOptions:
    """How a search sampler spends its budget (shared by the pipeline, ``sample`` and ``bench``).

    ``inverse_temperature`` (lambda) tilts DTS's target and weighs SMC's resampling; the tree's
    other knobs are in ``tree`` (its ``mode`` is set from the sampler name).
    """

    sampler: str = "dts-star"
    budget_nfe: int = 1000
    inverse_temperature: float = 10.0
    tree: TreeSettings | None = None
    smc_potential: str = "max"
    smc_resample_every: int = 5
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.sampler not in SEARCH_SAMPLERS:
            raise ValueError(f"sampler must be one of {SEARCH_SAMPLERS}, got {self.sampler!r}.")
        if self.smc_potential not in SMC_POTENTIALS:
            raise ValueError(f"smc_potential must be one of {SMC_POTENTIALS}.")
        if self.budget_nfe < 1:
            raise ValueError(f"budget_nfe must be positive, got {self.budget_nfe}.")

    def tree_settings(self) -> TreeSettings:
        """The tree settings for this sampler (DTS samples, DTS* searches)."""
        mode = "search" if self.sampler == "dts-star" else "sample"
        base = self.tree or TreeSettings(rollouts_per_batch=self.batch_size)
        return replace(base, mode=mode, inverse_temperature=self.inverse_temperature)


def run_search(
    chain: DenoisingChain,
    options: SearchOptions,
    num_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SearchResult:
    """Spend ``options.budget_nfe`` on ``chain`` with ``options.sampler``; ``num_samples`` out."""
    chain.check_budget(options.budget_nfe)
    if options.sampler in ("dts", "dts-star"):
        return tree_search(chain, options.budget_nfe, options.tree_settings(), num_samples, seed,
                           progress)  # fmt: skip
    chains = options.budget_nfe // chain.step_cost(chain.num_steps)
    if options.sampler == "best-of-n":
        return best_of_n(chain, chains, options.batch_size, num_samples, seed)
    return smc(chain, chains, options.inverse_temperature, options.smc_potential,
               options.smc_resample_every, num_samples, seed)  # fmt: skip


@dataclass
class SearchPipelineOutput(BaseOutput):
    """Images (prompt-major), their rewards, the prompt of each and one stats dict per prompt."""

    images: list | Tensor
    rewards: Tensor
    prompts: list[str]
    stats: list[dict]


def _resolve_reward(reward: str | Callable, device: torch.device) -> Callable:
    if isinstance(reward, str):
        from diffalign.rewards import load_reward

        return load_reward(reward).to(device)
    if not callable(reward):
        raise TypeError("reward must be a reward name or a callable (images, prompts) -> scores.")
    return reward


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _as_output_type(images: Tensor, output_type: str) -> list | Tensor | np.ndarray:
    """Decoded (B, 3, H, W) images in [0, 1] (or latents) as diffusers returns them: PIL
    images, a (B, H, W, 3) float array, the tensor itself, or for ``"latent"`` the latents."""
    if output_type == "pil":
        from diffalign.imaging import to_pil

        return [to_pil(image) for image in images]
    if output_type == "np":
        return images.float().permute(0, 2, 3, 1).numpy()
    return images


def _check_search_kwargs(search_kwargs: dict) -> None:
    """Raise a TypeError naming what the search call takes in place of an unknown keyword."""
    unknown = sorted(set(search_kwargs) - _SEARCH_KWARGS)
    if "generator" in unknown:
        raise TypeError(
            "The search pipelines take seed=INT, not generator: every chain draws its noise "
            "from its own stream derived from the seed (prompt i: seed + i), so that samplers "
            "compared at one seed start from the same chains."
        )
    if unknown:
        raise TypeError(
            f"Unexpected keyword arguments {unknown}; besides the named ones, the search call "
            f"takes {sorted(_SEARCH_KWARGS)} (see SearchOptions)."
        )


# the SearchOptions fields that the search call has no named parameter for
_SEARCH_KWARGS = {field.name for field in fields(SearchOptions)} - {
    "sampler", "budget_nfe", "inverse_temperature", "tree"
}  # fmt: skip


class _SearchCall:
    """The search call of the DTS pipelines, mixed in before diffusers' SD, SDXL or SD3
    pipeline."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        reward: str | Callable[[Tensor, list[str]], Tensor],
        budget_nfe: int = 1000,
        sampler: str = "dts-star",
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        inverse_temperature: float = 10.0,
        tree_settings: TreeSettings | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        **search_kwargs,
    ) -> SearchPipelineOutput | tuple:
        """Search each prompt's chain within ``budget_nfe`` UNet rows and return the images.

        ``reward`` is a registered reward name (``"pickscore"``, ``"shapes"``, a weighted sum)
        or a callable scoring images in [0, 1]. Extra keyword arguments (``smc_potential``,
        ``smc_resample_every``, ``batch_size``) go to :class:`SearchOptions`. Prompt ``i``'s
        chains draw their noise from streams derived from ``seed + i`` (there is no
        ``generator``: one stream per chain keeps the samplers' comparisons paired). With
        ``return_dict=False`` the output is the tuple ``(images, rewards, prompts, stats)``.
        ``output_type`` is ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"`` (the
        chosen latents, undecoded), as in diffusers.
        """
        _check_search_kwargs(search_kwargs)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("Give at least one prompt.")
        options = SearchOptions(sampler, budget_nfe, inverse_temperature, tree_settings,
                                **search_kwargs)  # fmt: skip
        score = _resolve_reward(reward, self._execution_device)
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        images, rewards, stats = [], [], []
        for index, text in enumerate(prompts):
            chain = PipelineChain(self, text, score, num_inference_steps, guidance_scale, eta,
                                  negative_prompt, height, width)  # fmt: skip
            result = run_search(chain, options, num_images_per_prompt, seed + index, progress)
            latents = result.latents.to(self._execution_device)
            images.append((latents if output_type == "latent" else chain.decode(latents)).cpu())
            rewards.append(result.rewards)
            stats.append(result.stats.to_dict())
        repeated = [p for p in prompts for _ in range(num_images_per_prompt)]
        output = SearchPipelineOutput(_as_output_type(torch.cat(images), output_type),
                                      torch.cat(rewards), repeated, stats)  # fmt: skip
        return output if return_dict else output.to_tuple()


class DTSPipeline(_SearchCall, StableDiffusionPipeline):
    """Stable Diffusion with inference-time alignment: DTS, DTS*, best-of-N and SMC."""


class SDXLDTSPipeline(_SearchCall, StableDiffusionXLPipeline):
    """SDXL with inference-time alignment: DTS, DTS*, best-of-N and SMC, as
    :class:`DTSPipeline`."""


class SD3DTSPipeline(_SearchCall, StableDiffusion3Pipeline):
    """Stable Diffusion 3 with inference-time alignment: DTS, DTS*, best-of-N and SMC, as
    :class:`DTSPipeline`, on the flow-matching chain of Flow-GRPO's SDE step."""


# their counterparts for SDXL and SD3 folders (models.family_counterpart, load_pipeline)
DTSPipeline.sdxl_pipeline_class = SDXLDTSPipeline
DTSPipeline.sd3_pipeline_class = SD3DTSPipeline


def search_pipeline(pipeline: DiffusionPipeline) -> DTSPipeline | SDXLDTSPipeline | SD3DTSPipeline:
    """The DTS pipeline (SD, SDXL or SD3, whichever ``pipeline`` is) over ``pipeline``'s
    components."""
    return over_components(pipeline, DTSPipeline)
