"""One DDPO round on a fixed global batch, run by ``test_trainers`` in 1 and in 2 processes
(``distributed_step.py OUT ddp|fsdp sd|sdxl|sd3``: DDP, or FSDP2 as
``distributed_run.make_accelerator`` sets it; the tiny SD, SDXL or SD3 pipeline).

Every process builds the same tiny pipeline and the same global rollout (fixed seed), keeps its
share, and takes one optimizer step; rank 0 saves the gradient that step used (after DDP's
all-reduce), the trained weights, the gathered rewards and the advantages, for the test to compare
with the single-process run. Gradients are compared because AdamW's first step is nearly
independent of the gradient's scale and would hide a batch-size error.
"""

import sys

import torch
from distributed_run import make_accelerator  # a sibling: this file runs as a script

from diffalign.models import build_tiny_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline
from diffalign.pipelines.rollout import rollout_pipeline
from diffalign.sharding import whole
from diffalign.train.config import DDPOConfig
from diffalign.train.ddpo import DDPOTrainer
from diffalign.train.trainer import RoundBatch


def main(out: str, strategy: str, model: str) -> None:
    accelerator = make_accelerator(strategy)
    world, rank = accelerator.num_processes, accelerator.process_index
    builders = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline,
                "sd3": build_tiny_sd3_pipeline}  # fmt: skip
    build = builders[model]
    pipeline = rollout_pipeline(build(seed=0))
    config = DDPOConfig(
        prompts_per_step=2, samples_per_prompt=4, num_inference_steps=3, guidance_scale=3.0,
        train_batch_size=8 // world, timestep_fraction=1.0, clip_range=0.2, stat_min_count=2,
        log_with="none", progress=False, reward="jpeg_compressibility", learning_rate=1e-2,
    )  # fmt: skip
    trainer = DDPOTrainer(config, out, pipeline=pipeline, accelerator=accelerator)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a red circle"] * 4 + ["two blue squares"] * 4
    rollout = pipeline(prompts, num_inference_steps=3, guidance_scale=3.0, eta=1.0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    local = rollout.select(slice(rank * 8 // world, (rank + 1) * 8 // world))
    rewards = trainer.reward(local.images, local.prompts)
    all_rewards = accelerator.gather(rewards)
    from accelerate.utils import gather_object

    all_prompts = gather_object(local.prompts)
    advantages = trainer.compute_advantages(all_prompts, all_rewards)
    share = advantages[rank * len(local) : (rank + 1) * len(local)]
    gradients = {}
    step = trainer.optimizer_step

    def record_then_step() -> None:  # the averaged gradient, before clipping and AdamW
        gradients.update({n: whole(p.grad).clone() for n, p in trainer.named_trainable().items()})
        step()

    trainer.optimizer_step = record_then_step
    trainer.train_on(RoundBatch(local, rewards, share, all_rewards, all_prompts), step=0)
    weights = {n: whole(p.detach()) for n, p in trainer.named_trainable().items()}
    if accelerator.is_main_process:
        result = {"weights": weights, "gradients": gradients, "rewards": all_rewards,
                  "advantages": advantages}  # fmt: skip
        suffix = ("-fsdp" if strategy == "fsdp" else "") + ("" if model == "sd" else f"-{model}")
        torch.save(result, f"{out}/result-{world}{suffix}.pt")
    accelerator.wait_for_everyone()
    # gloo's worker threads outlive a process group left to the interpreter's exit, which then
    # aborts now and then ("terminate called without an active exception"); the trainers' own
    # train() ends this way too
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])  # OUT ddp|fsdp sd|sdxl|sd3
