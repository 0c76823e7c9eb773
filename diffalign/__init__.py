"""diffalign: align diffusion models with rewards and human preferences.

The package extends Hugging Face diffusers pipelines. Its parts:

- ``diffalign.sampling``: the math of one denoising step (DDIM with log-probs, inversion, flows).
- ``diffalign.attention``: one switch for fused attention (xformers / torch SDPA / classic).
- ``diffalign.models``: loading, saving and LoRA for Stable-Diffusion-family pipelines.
- ``diffalign.config`` and ``diffalign.checkpoint``: typed configs and atomic checkpoints.
- ``diffalign.pipelines``, ``diffalign.rewards``, ``diffalign.train``: the three pillars.

Submodules import their heavy dependencies (torch, diffusers) themselves, so ``import diffalign``
stays cheap and the command line starts fast.
"""

__version__ = "0.1.0.dev0"
