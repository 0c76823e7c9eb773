"""What a Stable Diffusion denoiser sees besides the latent and the timestep: SD 1.x/2.x, SDXL
and SD3.

SD 1.x/2.x UNets read the text encoder's token states (``encoder_hidden_states``). SDXL's also
read the second text encoder's pooled embedding and six "time ids" (original size, crop corner,
target size), passed as ``added_cond_kwargs``. SD3's transformer reads token states and a pooled
embedding (``pooled_projections``), no time ids. :class:`Conditioning` holds any of them for a
batch and calls the denoiser with them (:meth:`Conditioning.predict`), so that rollouts, trainers
and tree search call every model the same way; :func:`encode_conditioning` builds it from prompts
with the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.models import pipeline_family

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from torch import nn


@dataclass
class Conditioning:
    """A batch's denoiser conditioning.

    Attributes:
        embeds: (B, L, D) text token states (``encoder_hidden_states``).
        pooled: (B, P) the pooled text embedding of SDXL and SD3, or None for SD 1.x/2.x.
        time_ids: (B, 6) SDXL's size and crop ids; None for SD 1.x/2.x and SD3.

    Which fields are set says which model reads it: SD 1.x/2.x (``embeds`` alone), SDXL (all
    three) or SD3 (``embeds`` and ``pooled``).
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.time_ids is not None and self.pooled is None:
            raise ValueError("SDXL conditioning needs pooled embeddings with its time ids.")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def for_transformer(self) -> bool:
        """Whether this is SD3's conditioning (a pooled embedding without time ids)."""
        return self.pooled is not None and self.time_ids is None

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward`` (SD 1.x/2.x and SDXL)."""
        if self.for_transformer:
            raise ValueError("This is SD3's conditioning; a UNet reads SD or SDXL conditioning.")
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def predict(self, model: nn.Module, latents: Tensor, timestep: Tensor | float) -> Tensor:
        """``model``'s output at ``latents`` and ``timestep`` (one value or one per row) under
        this conditioning: a UNet called as diffusers' SD / SDXL pipelines call it, or SD3's
        transformer as ``StableDiffusion3Pipeline`` calls it (keywords, a timestep per row)."""
        if not self.for_transformer:
            return model(latents, timestep, **self.unet_kwargs(), return_dict=False)[0]
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(len(latents))
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=self.embeds,
                     pooled_projections=self.pooled, return_dict=False)[0]  # fmt: skip

    def _map(self, change) -> Conditioning:
        pooled = None if self.pooled is None else change(self.pooled)
        time_ids = None if self.time_ids is None else change(self.time_ids)
        return Conditioning(change(self.embeds), pooled, time_ids)

    def select(self, index: Tensor | Sequence[int] | slice) -> Conditioning:
        """The rows at ``index``."""
        return self._map(lambda tensor: tensor[index])

    def to(self, device: torch.device | str) -> Conditioning:
        """The same conditioning on ``device``."""
        return self._map(lambda tensor: tensor.to(device))

    def expand(self, rows: int) -> Conditioning:
        """A one-row conditioning repeated (as a view) for ``rows`` rows."""
        return self._map(lambda tensor: tensor.expand(rows, *tensor.shape[1:]))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Join along the batch (all SD-style or all SDXL-style)."""

        def joined(name: str) -> Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(joined("embeds"), joined("pooled"), joined("time_ids"))


def as_conditioning(value: Tensor | Conditioning) -> Conditioning:
    """``value`` itself, or text token states alone wrapped as SD 1.x/2.x conditioning."""
    return value if isinstance(value, Conditioning) else Conditioning(value)


def sdxl_time_ids(
    pipeline: DiffusionPipeline,
    height: int,
    width: int,
    rows: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """SDXL's time ids for images generated at ``height`` x ``width`` without cropping, as
    diffusers' ``StableDiffusionXLPipeline`` makes them by default, one row per sample."""
    encoder_2 = getattr(pipeline, "text_encoder_2", None)
    projection = encoder_2.config.projection_dim if encoder_2 is not None else None
    size = (height, width)
    ids = pipeline._get_add_time_ids(
        size, (0, 0), size, dtype, text_encoder_projection_dim=projection
    )
    return ids.to(device).expand(rows, -1)


def encode_conditioning(
    pipeline: DiffusionPipeline,
    prompt: str | list[str] | None,
    device: torch.device,
    num_images_per_prompt: int,
    use_cfg: bool,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    **precomputed: Tensor | None,
) -> tuple[Conditioning, Conditioning | None]:
    """The conditioning for ``prompt`` and, with ``use_cfg``, for the negative prompt (None
    without), from the pipeline's own ``encode_prompt`` (SD 1.x/2.x, SDXL or SD3; SDXL's and
    SD3's ``prompt`` feeds all their text encoders), on ``device``.

    A prompt list that repeats prompts (a round of prompt groups) is encoded once per distinct
    prompt. The text encoders run where ``pipeline.text_encoder_device`` says when it is set
    (a trainer that keeps them on the CPU), ``device`` otherwise.

    ``precomputed`` passes ``encode_prompt``'s embedding arguments on (``prompt_embeds``,
    ``negative_prompt_embeds``, and for SDXL and SD3 ``pooled_prompt_embeds`` and
    ``negative_pooled_prompt_embeds``). ``height`` and ``width`` (SDXL's time ids) default to
    the UNet's sample size in pixels.
    """
    precomputed = {key: value for key, value in precomputed.items() if value is not None}
    repeats = not precomputed and not isinstance(negative_prompt, list)
    if repeats and isinstance(prompt, list) and len(set(prompt)) < len(prompt):
        row_of = {text: row for row, text in enumerate(dict.fromkeys(prompt))}
        positive, negative = encode_conditioning(pipeline, list(row_of), device, 1, use_cfg,
                                                 negative_prompt, height, width)  # fmt: skip
        rows = torch.tensor([row_of[text] for text in prompt], device=device)
        rows = rows.repeat_interleave(num_images_per_prompt)
        return positive.select(rows), None if negative is None else negative.select(rows)
    encoder_device = getattr(pipeline, "text_encoder_device", None) or device
    positive, negative = _encode(pipeline, prompt, encoder_device, num_images_per_prompt, use_cfg,
                                 negative_prompt, height, width, precomputed)  # fmt: skip
    if torch.device(encoder_device) != torch.device(device):
        positive, negative = positive.to(device), None if negative is None else negative.to(device)
    return positive, negative


def negative_prompts(
    prompt: str | list[str] | None, negative_prompt: str | list[str] | None
) -> str | list[str] | None:
    """``negative_prompt`` in the form of ``prompt``: one negative prompt for a list of prompts
    becomes a list of it, which diffusers' SD ``encode_prompt`` insists on (a ``TypeError``
    otherwise; SDXL and SD3 repeat it themselves)."""
    if isinstance(negative_prompt, str) and isinstance(prompt, list):
        return [negative_prompt] * len(prompt)
    return negative_prompt


def _encode(pipeline, prompt, device, num_images_per_prompt, use_cfg, negative_prompt, height,
            width, precomputed: dict) -> tuple[Conditioning, Conditioning | None]:  # fmt: skip
    """:func:`encode_conditioning` by the pipeline's ``encode_prompt``, every prompt as given."""
    family = pipeline_family(pipeline)
    negative_prompt = negative_prompts(prompt, negative_prompt)
    if family == "sd":
        embeds, negative = pipeline.encode_prompt(
            prompt, device, num_images_per_prompt, use_cfg, negative_prompt, **precomputed
        )
        return Conditioning(embeds), Conditioning(negative) if use_cfg else None
    second_prompts = {"prompt_2": None, "prompt_3": None} if family == "sd3" else {}
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompt=prompt, **second_prompts, device=device,
        num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=use_cfg,
        negative_prompt=negative_prompt, **precomputed,
    )  # fmt: skip
    if family == "sd3":
        positive = Conditioning(embeds, pooled)
        return positive, Conditioning(negative, negative_pooled) if use_cfg else None
    size = pipeline.default_sample_size * pipeline.vae_scale_factor
    time_ids = sdxl_time_ids(pipeline, height or size, width or size, len(embeds), embeds.dtype,
                             device)  # fmt: skip
    positive = Conditioning(embeds, pooled, time_ids)
    return positive, Conditioning(negative, negative_pooled, time_ids) if use_cfg else None
