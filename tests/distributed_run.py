"""A whole AWM run on the built tiny pipeline, launched by the tests in 2 processes under DDP,
FSDP2 or DeepSpeed: sampling, evaluation, the guard, EMA and KL-EMA, checkpoints, resume and
``final/``.

Usage: ``distributed_run.py OUT ddp|fsdp|deepspeed lora|full|guard MAX_STEPS [resume] [bf16]
[ddpo] [from=CHECKPOINT]`` (``ddpo``: DDPO in place of AWM, without the KL terms; ``from=``: a
new run from another run's checkpoint); ``guard`` is LoRA
with a guard that trips at the first change (it watches the JPEG size and its negative, and one of
them falls).

accelerate turns FSDP on only on GPU-like devices; :func:`make_accelerator` sets its state to FSDP2
by hand on CPU, so that ``prepare`` shards the UNet with ``fully_shard`` over gloo: the code path a
GPU launch with ``fsdp_version: 2`` takes over nccl. The plugin reads the rest of its settings
(wrapping, resharding) from the ``FSDP_*`` variables that ``accelerate launch`` sets from a config.
Under ``deepspeed`` the trainer builds its accelerator itself, as ``diffalign train`` does, from the
``ACCELERATE_*`` variables that ``accelerate launch --use_deepspeed`` sets.
"""

import os
import sys

from diffalign.models import build_tiny_pipeline
from diffalign.pipelines.rollout import RolloutPipeline
from diffalign.rewards import load_reward
from diffalign.sharding import is_fsdp
from diffalign.train.awm import AWMTrainer
from diffalign.train.config import AWMConfig, DDPOConfig
from diffalign.train.ddpo import DDPOTrainer
from diffalign.train.deepspeed import inner_optimizer


def make_accelerator(strategy: str):
    """A CPU accelerator for ``ddp``, one set to FSDP2 for ``fsdp``, None (the trainer's own) for
    ``deepspeed``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if strategy == "deepspeed":
        return None
    if strategy == "ddp":
        return Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # both shared states, as accelerate does itself: AcceleratorState() copies PartialState's
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    return accelerator


def jpeg_size(images, prompts):
    """A check reward that falls when the JPEG reward rises (kB instead of minus kB)."""
    return -load_reward("jpeg_compressibility")(images, prompts)


def main(out: str, strategy: str, weights: str, max_steps: int, options: list[str]) -> None:
    accelerator = make_accelerator(strategy)
    guard = weights == "guard"
    pipeline = RolloutPipeline(**build_tiny_pipeline(seed=0).components,
                               requires_safety_checker=False)  # fmt: skip
    settings = dict(
        prompts_per_step=2, samples_per_prompt=2, sample_batch_size=2, num_inference_steps=3,
        guidance_scale=3.0, train_batch_size=2, num_heldout_prompts=2,
        heldout_samples_per_prompt=1, eval_every=1, save_every=1, log_with="none",
        progress=False, mixed_precision="bf16" if "bf16" in options else "no",
        reward="jpeg_compressibility", learning_rate=1e-2, adam_beta2=0.99, max_steps=max_steps,
        use_lora=weights != "full", ema_decay=0.5,
        heldout_extra_rewards=["jpeg_compressibility", f"{__file__}:jpeg_size"],
        max_heldout_drop=1e-7 if guard else 0.9,
    )  # fmt: skip
    if "ddpo" in options:
        config = DDPOConfig(**settings, clip_range=0.2, stat_min_count=2)
        trainer = DDPOTrainer(config, out, pipeline=pipeline, accelerator=accelerator)
    else:
        config = AWMConfig(**settings, beta_ema=0.1, beta_kl=0.1)
        trainer = AWMTrainer(config, out, pipeline=pipeline, accelerator=accelerator)
    assert is_fsdp(trainer.model) == (strategy == "fsdp")
    assert trainer.uses_deepspeed == (strategy == "deepspeed")
    sharded = {type(module).__name__ for module in trainer.denoiser.modules() if is_fsdp(module)}
    by_blocks = "FSDP_AUTO_WRAP_POLICY" in os.environ  # each block a unit, as the config asks
    assert ("FSDPBasicTransformerBlock" in sharded) == by_blocks, sharded
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
    optimizer = inner_optimizer(trainer.optimizer)
    assert type(optimizer).__name__ == ("DeepSpeedCPUAdam" if offload else "AdamW"), optimizer
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)  # the config's, not a default
    start = next((option.removeprefix("from=") for option in options
                  if option.startswith("from=")), None)  # fmt: skip
    trainer.train(resume="resume" in options, resume_from=start)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
