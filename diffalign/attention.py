"""One switch for fused attention in every model diffalign runs.

``enable_fused_attention(model, backend="auto")`` works on diffusers models (UNets and VAEs with
the legacy ``Attention`` class; SD3's MMDiT, whose joint attention over image and text tokens has
its own processors; transformers such as FLUX whose attention goes through diffusers' attention
dispatcher), on transformers models (CLIP text and vision towers) and on whole pipelines (each
component in turn). Backends:

- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (CUDA only; diffusers models only).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient /
  math kernels chosen by torch).
- ``"classic"``: the explicit ``softmax(QK^T / sqrt(d)) V`` with the full attention matrix
  (diffusers has no classic joint-attention processor: SD3's joint attention stays on SDPA and
  is reported as left as it was).
- ``"auto"``: xformers when the model sits on CUDA and xformers runs there (an xformers built for
  another torch imports but has no kernels: then SDPA), else SDPA, else classic.

``fuse_qkv=True`` additionally concatenates the query/key/value projections of self-attention
(key/value of cross-attention) into one matrix product (SDPA backend, diffusers models). It is
refused while LoRA adapters sit on those projections, because the fused copy would silently drop
the adapters. ``unfuse_qkv`` is the clean way back: it folds the (possibly trained) fused weights
into the original projections and deletes the fused layers, so ``save_pretrained`` writes the
standard layout.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffalign.choices import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

BACKENDS = ATTENTION_BACKENDS
_FUSED_LAYERS = ("to_qkv", "to_kv", "to_added_qkv")


@dataclass
class AttentionReport:
    """What ``enable_fused_attention`` did to one model.

    Attributes:
        backend: the backend now in use (never ``"auto"``).
        fused_qkv: whether the projections were fused.
        modules: how many attention modules were switched.
        skipped: attention modules left as they were (custom processors such as IP-Adapter or
            added-KV ones, or a non-default softmax scale that only the classic path honours).
        library: ``"diffusers"`` or ``"transformers"``.
    """

    backend: str
    fused_qkv: bool
    modules: int
    skipped: int
    library: str

    def __str__(self) -> str:
        fused = " + fused QKV" if self.fused_qkv else ""
        skipped = f", {self.skipped} left as they were" if self.skipped else ""
        return f"{self.backend}{fused} on {self.modules} {self.library} attention modules{skipped}"


def xformers_available() -> bool:
    """Whether the xformers package is installed (it only has CUDA kernels)."""
    return importlib.util.find_spec("xformers") is not None


@functools.cache
def xformers_problem(device: str = "cuda") -> str | None:
    """Why xformers cannot run on ``device`` (a CUDA device), or ``None`` when it can.

    Installed is not enough: an xformers wheel built for another torch imports with a warning
    and then has no kernels. One tiny attention call on the device finds out (once per device).
    """
    if not xformers_available():
        return "xformers is not installed: `pip install diffalign[xformers]`"
    try:
        import xformers
        import xformers.ops

        query = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(query, query, query)
    except Exception as error:  # noqa: BLE001 - any failure means "cannot run", with its reason
        version = getattr(sys.modules.get("xformers"), "__version__", "?")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (
            f"xformers {version} cannot run with torch {torch.__version__} "
            f"({type(error).__name__}: {first_line[:200]}); install the xformers build made for "
            "this torch"
        )
    return None


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def resolve_backend(backend: str, device: torch.device | str, library: str = "diffusers") -> str:
    """Turn a requested backend into the one that will run, or raise a clear error.

    ``"auto"`` never fails; an explicit backend that cannot run here raises ``ValueError``
    naming the reason and the alternative.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}.")
    on_cuda = torch.device(device).type == "cuda"
    has_sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    if backend == "auto":
        if library == "diffusers" and on_cuda and xformers_problem(str(device)) is None:
            return "xformers"
        return "sdpa" if has_sdpa else "classic"
    if backend == "xformers":
        if library != "diffusers":
            raise ValueError("transformers models have no xformers attention; use 'sdpa'.")
        if not xformers_available():
            raise ValueError(f"{xformers_problem()}, or use 'sdpa'.")
        if not on_cuda:
            raise ValueError("xformers has no CPU kernels: move the model to CUDA, or use 'sdpa'.")
        problem = xformers_problem(str(device))
        if problem:
            raise ValueError(f"{problem}, or use 'sdpa'.")
    if backend == "sdpa" and not has_sdpa:
        raise ValueError("This torch has no scaled_dot_product_attention; use 'classic'.")
    return backend


# --------------------------------------------------------------------------- diffusers models


def _diffusers_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of both diffusers styles: the legacy ``Attention`` class (SD1.x/2.x/XL
    UNets, VAEs) and ``AttentionModuleMixin`` modules that dispatch by backend name (FLUX...)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def _uses_dispatch(module: nn.Module) -> bool:
    """Whether the module's processor picks its kernel through diffusers' attention dispatcher."""
    return hasattr(module.processor, "_attention_backend")


def _standard_processor_types() -> tuple[type, ...]:
    from diffusers.models import attention_processor as ap

    return (
        ap.AttnProcessor,
        ap.AttnProcessor2_0,
        ap.XFormersAttnProcessor,
        ap.FusedAttnProcessor2_0,
    )


def _joint_processor_types() -> tuple[type, ...]:
    """Processors of joint (image + text token) attention, SD3's MMDiT."""
    from diffusers.models import attention_processor as ap

    return (ap.JointAttnProcessor2_0, ap.XFormersJointAttnProcessor, ap.FusedJointAttnProcessor2_0)


def _is_joint(module: nn.Module) -> bool:
    return isinstance(module.processor, _joint_processor_types())


def _lora_on_projections(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    projections = [getattr(module, name, None) for name in names]
    return any(isinstance(layer, BaseTunerLayer) for layer in projections)


def _new_processor(backend: str, fuse_qkv: bool, joint: bool = False):
    from diffusers.models import attention_processor as ap

    if joint:  # no classic joint processor exists (_switchable keeps those modules as they are)
        if backend == "xformers":
            return ap.XFormersJointAttnProcessor()
        return ap.FusedJointAttnProcessor2_0() if fuse_qkv else ap.JointAttnProcessor2_0()
    if backend == "classic":
        return ap.AttnProcessor()
    if backend == "xformers":
        return ap.XFormersAttnProcessor()
    return ap.FusedAttnProcessor2_0() if fuse_qkv else ap.AttnProcessor2_0()


def _dispatch_backend(backend: str):
    """diffusers' dispatcher name for a backend; "classic" is torch's math kernel, which, like
    the classic processor, materialises the full attention matrix."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = {"sdpa": "native", "classic": "_native_math", "xformers": "xformers"}
    return AttentionBackendName(names[backend])


def _switchable(module: nn.Module, backend: str) -> bool:
    """A module is switched only when it dispatches by backend or runs a standard processor,
    and (for the legacy SDPA paths, which ignore ``attn.scale``) uses the default softmax scale;
    joint attention has SDPA and xformers processors, no classic one."""
    if _uses_dispatch(module):
        return True
    if _is_joint(module):
        return backend != "classic"
    if not isinstance(module.processor, _standard_processor_types()):
        return False
    return backend == "classic" or getattr(module, "scale_qk", True)


def _fold_fused_weights(module: nn.Module) -> bool:
    """Copy fused projection weights back into the separate ones and delete the fused layers."""
    layouts = {
        "to_qkv": ("to_q", "to_k", "to_v"),
        "to_kv": ("to_k", "to_v"),
        "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    }
    folded = False
    for fused_name, parts in layouts.items():
        fused = getattr(module, fused_name, None)
        if fused is None:
            continue
        with torch.no_grad():
            targets = [getattr(module, name) for name in parts]
            sizes = [t.weight.shape[0] for t in targets]
            for target, weight in zip(targets, fused.weight.split(sizes), strict=True):
                target.weight.copy_(weight)
            if fused.bias is not None:
                for target, bias in zip(targets, fused.bias.split(sizes), strict=True):
                    target.bias.copy_(bias)
        delattr(module, fused_name)
        folded = True
    module.fused_projections = False
    return folded


def has_fused_qkv(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` holds fused projection layers."""
    return any(
        getattr(module, name, None) is not None
        for module in _diffusers_attention_modules(model)
        for name in _FUSED_LAYERS
    )


def unfuse_qkv(model: nn.Module) -> int:
    """Undo QKV fusion: fold the fused weights (trained or not) back into ``to_q/to_k/to_v``,
    delete the fused layers and return to the SDPA processor. Returns the number of modules
    unfused. Safe to call on a model that was never fused (returns 0)."""
    from diffusers.models import attention_processor as ap

    unfused = {ap.FusedAttnProcessor2_0: ap.AttnProcessor2_0,
               ap.FusedJointAttnProcessor2_0: ap.JointAttnProcessor2_0}  # fmt: skip
    count = 0
    for module in _diffusers_attention_modules(model):
        if _fold_fused_weights(module):
            count += 1
        back = unfused.get(type(module.processor))
        if not _uses_dispatch(module) and back is not None:
            module.set_processor(back())
    if hasattr(model, "original_attn_processors"):
        model.original_attn_processors = None
    return count


def _enable_diffusers(model: nn.Module, backend: str, fuse_qkv: bool) -> AttentionReport:
    modules = _diffusers_attention_modules(model)
    if fuse_qkv:
        if backend != "sdpa":
            raise ValueError(f"fuse_qkv is implemented for the 'sdpa' backend, not {backend!r}.")
        if any(_lora_on_projections(module) for module in modules):
            raise ValueError(
                "Refusing to fuse QKV while LoRA adapters sit on to_q/to_k/to_v: the fused layer "
                "would bypass them. Merge the adapter first (diffalign.lora.merge_lora) or "
                "enable attention without fuse_qkv."
            )
    unfuse_qkv(model)
    switched = skipped = 0
    for module in modules:
        if not _switchable(module, backend):
            skipped += 1
            continue
        if fuse_qkv and getattr(module, "_supports_qkv_fusion", True):
            module.fuse_projections()
        if _uses_dispatch(module):
            module.processor._attention_backend = _dispatch_backend(backend)
        else:
            module.set_processor(_new_processor(backend, fuse_qkv, _is_joint(module)))
        switched += 1
    return AttentionReport(backend, fuse_qkv and switched > 0, switched, skipped, "diffusers")


# --------------------------------------------------------------------------- transformers models


def _enable_transformers(model: nn.Module, backend: str) -> AttentionReport:
    implementation = {"sdpa": "sdpa", "classic": "eager"}[backend]
    model.set_attn_implementation(implementation)
    modules = sum(1 for name, _ in model.named_modules() if name.endswith("self_attn"))
    return AttentionReport(backend, False, modules, 0, "transformers")


# --------------------------------------------------------------------------- the switch


def _library_of(model: nn.Module) -> str | None:
    if hasattr(model, "set_attn_implementation"):
        return "transformers"
    if _diffusers_attention_modules(model):
        return "diffusers"
    return None


def enable_fused_attention(
    model: nn.Module | DiffusionPipeline, backend: str = "auto", fuse_qkv: bool = False
) -> AttentionReport | dict[str, AttentionReport]:
    """Switch every attention module of ``model`` to ``backend`` and report what was chosen.

    Args:
        model: a diffusers model, a transformers model, or a diffusers pipeline (each component
            with attention is switched; the result is then a dict ``{component: report}``).
        backend: ``"auto"``, ``"xformers"``, ``"sdpa"`` or ``"classic"`` (see the module doc).
        fuse_qkv: also fuse the QKV projections of diffusers attention (SDPA only; refused while
            LoRA sits on q/k/v). transformers components are never fused.

    Raises:
        ValueError: an explicit backend that cannot run here, or fusion that is not safe.
    """
    components = getattr(model, "components", None)
    if isinstance(components, dict):
        reports = {}
        for name, component in components.items():
            if isinstance(component, nn.Module) and _library_of(component) is not None:
                reports[name] = enable_fused_attention(component, backend, fuse_qkv)
        return reports
    library = _library_of(model)
    if library is None:
        raise ValueError(f"{type(model).__name__} has no attention modules diffalign can switch.")
    if fuse_qkv and backend == "auto" and library == "diffusers":
        backend = "sdpa"  # the only backend with a fused-projection kernel
    chosen = resolve_backend(backend, _model_device(model), library)
    if library == "transformers":
        return _enable_transformers(model, chosen)
    return _enable_diffusers(model, chosen, fuse_qkv)
