"""The weights a run never trains, kept in half precision while it trains.

Under fp16 or bf16 mixed precision autocast computes the VAE, the text encoders and (under LoRA)
the denoiser's base weights in half precision anyway, so diffusers' training scripts store them
that way and save the memory. A run's ``final/`` must still hold their float32 values: they are
read again from the model the run loaded, or put back from float32 copies kept on the CPU when
the pipeline was passed in ready-made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffalign.models import denoiser_name, denoiser_of

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

FROZEN_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def frozen_components(pipeline: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's components that are never trained, by name."""
    return {name: getattr(pipeline, name) for name in FROZEN_COMPONENTS
            if getattr(pipeline, name, None) is not None}  # fmt: skip


def frozen_tensors(pipeline: DiffusionPipeline) -> list[tuple[tuple[str, str], Tensor]]:
    """The untrained floating-point tensors of the frozen components and the denoiser (its base
    weights under LoRA), each with (component, name in the plain model)."""
    parts = {**frozen_components(pipeline), denoiser_name(pipeline): denoiser_of(pipeline)}
    found = []
    for component, module in parts.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not tensor.requires_grad:
                found.append(((component, name.replace(".base_layer", "")), tensor))
    return found


class FrozenWeights:
    """Casts a pipeline's untrained weights to half precision and puts their float32 values back.

    Args:
        pipeline: the pipeline being trained (its trained parameters already require grad).
        reload: a function that loads the run's model again, for the original float32 values
            (None: the pipeline was passed in, so float32 copies are kept on the CPU at cast).
        source: how the log names what ``reload`` reads.
    """

    def __init__(self, pipeline: DiffusionPipeline,
                 reload: Callable[[], DiffusionPipeline] | None = None,
                 source: str = "the model") -> None:  # fmt: skip
        self.pipeline, self.reload, self.source = pipeline, reload, source
        self.dtype: torch.dtype | None = None
        """The dtype the weights are held in now; None while they are float32."""
        self._float32: list[tuple[Tensor, Tensor]] = []

    @property
    def copies(self) -> int:
        """How many float32 copies are held on the CPU (none when the model can be read again)."""
        return len(self._float32)

    def cast(self, dtype: torch.dtype) -> None:
        """Hold every untrained weight in ``dtype``."""
        for _, tensor in frozen_tensors(self.pipeline):
            if self.reload is None:
                self._float32.append((tensor, tensor.detach().cpu().clone()))
            tensor.data = tensor.data.to(dtype)
        self.dtype = dtype

    def restore(self, read_again: bool = True) -> None:
        """Put the float32 values back (before saving). ``read_again=False`` skips reading the
        model again (a process that does not save); the copies kept at cast are put back
        either way."""
        if self.dtype is not None and self.reload is not None and read_again:
            self._float32 = self._reread()
        for tensor, value in self._float32:
            tensor.data = value.to(tensor.device)
        self._float32 = []
        self.dtype = None

    def _reread(self) -> list[tuple[Tensor, Tensor]]:
        """Each cast tensor with its float32 value read again; if that fails, with its own value
        in float32 (rounded once), and a warning that says so."""
        frozen = frozen_tensors(self.pipeline)
        try:
            original = self.reload()
        except (OSError, ValueError) as error:
            logger.warning("final/ keeps the frozen weights as trained (%s, saved as float32): "
                           "reading %s again for their original values failed: %s",
                           self.dtype, self.source, error)  # fmt: skip
            return [(tensor, tensor.detach().float()) for _, tensor in frozen]
        values = {}
        for component in {component for (component, _), _ in frozen}:
            module = getattr(original, component)
            values[component] = {**dict(module.named_parameters()),
                                 **dict(module.named_buffers())}  # fmt: skip
        return [(tensor, values[component][name].detach()) for (component, name), tensor in frozen]
