"""diffalign.pipelines: diffusers pipelines extended for alignment.

Rollouts with per-step log-probs, Diffusion Tree Sampling and few-step consistency sampling live
here, each as a subclass of the diffusers pipeline it extends. The step math they share is in
``diffalign.sampling``.
"""
