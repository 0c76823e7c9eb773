"""Names the command line offers as choices, in a module free of heavy imports.

Building ``diffalign``'s parser runs every command's ``add_arguments``; taking the choice lists
from here rather than from the modules that implement them (which import torch and diffusers)
keeps ``diffalign --help`` fast. Those modules re-export the names they implement.
"""

ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "classic")
"""``diffalign.attention.enable_fused_attention``'s backends."""

SEARCH_SAMPLERS: tuple[str, ...] = ("best-of-n", "smc", "dts", "dts-star")
"""The samplers of ``diffalign.pipelines.dts`` that spend an NFE budget on a reward."""

ATTENTION_BENCH_MODELS: tuple[str, ...] = ("tiny-unet", "sd15-down-block", "sd15-unet")
"""What ``diffalign bench attention`` can time (``diffalign.benchmarks.attention``)."""
