"""The online RL training loop shared by DDPO and AWM.

One round: sample prompts, roll the policy out with the :class:`RolloutPipeline`, score the
images (asynchronously, while the next chunk samples), turn rewards into advantages over all
processes, and update the UNet with the method's loss. The loop owns accelerate (devices, mixed
precision, DDP, FSDP2 and DeepSpeed ZeRO-1/2), LoRA or full fine-tuning, AdamW, EMA, gradient
clipping and checkpointing, trackers, ``metrics.jsonl``, sample grids, held-out evaluation,
checkpoints and ``resume``.

Randomness is derived from ``(seed, round, process)`` for every round (prompts, noise, shuffles),
so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from diffalign.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffalign.config import ConfigError
from diffalign.ema import EMA
from diffalign.files import atomic_write_text
from diffalign.flow import is_flow_scheduler
from diffalign.models import denoiser_name, denoiser_of
from diffalign.pipelines.rollout import (
    Rollout,
    RolloutPipeline,
    SDXLRolloutPipeline,
    plain_pipeline,
    rollout_pipeline,
)
from diffalign.rewards import AsyncRewardScorer, Reward, load_reward, reward_components
from diffalign.rewards.function import reward_label
from diffalign.sampling import load_schedule
from diffalign.sharding import (
    copy_into,
    gathered,
    is_fsdp,
    reshard_after_every_forward,
    reshard_optimizer_state,
    unsharded_class,
)
from diffalign.train.advantages import mean_group_std
from diffalign.train.best import BestEvaluation
from diffalign.train.callbacks import TrainerCallback, any_asks_to_stop, as_callbacks
from diffalign.train.config import TrainConfig, single_reward_to_balance
from diffalign.train.deepspeed import (
    deepspeed_backward,
    deepspeed_bf16,
    fill_deepspeed_config,
    inner_optimizer,
    load_whole_optimizer_state,
    load_whole_weights,
    offloads_optimizer,
    whole_optimizer_state,
    whole_weights,
)
from diffalign.train.frozen import FrozenWeights, frozen_components
from diffalign.train.guard import GuardTrip, HackingGuard
from diffalign.train.hub import check_hub_access, hub_repo_id, push_run
from diffalign.train.launch import accelerator_options, check_launch, check_tracker, compiles
from diffalign.train.lr_schedule import build_lr_scheduler, current_lr
from diffalign.train.model_card import model_card
from diffalign.train.prompts import PromptSource
from diffalign.train.run_folder import (
    METRICS_FILE,
    changed_settings,
    describe_changes,
    keep_rounds_until,
    read_rows,
    refuse_existing_run,
    refuse_other_method,
)
from diffalign.train.trackers import log_grid, tracker_init_kwargs, tracker_settings

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import (
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

logger = logging.getLogger(__name__)


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed that depends on ``seed`` and ``parts`` (stable across runs and machines)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def load_training_pipeline(
    model: str, model_config: str | None = None
) -> RolloutPipeline | SDXLRolloutPipeline:
    """A :class:`RolloutPipeline` (its SDXL or SD3 counterpart for those models) from a folder, a
    hub id, ``diffalign:<shipped model>`` or a one-file checkpoint (whose configs, tokenizer and
    scheduler come from ``model_config``, see :func:`diffalign.models.load_pipeline`)."""
    from diffalign.models import load_pipeline
    from diffalign.world import resolve_shipped

    return load_pipeline(resolve_shipped(model), RolloutPipeline, config=model_config)


@dataclass
class RoundBatch:
    """One round's local samples with their rewards and advantages, and every process's
    rewards and prompts (for the round's metrics)."""

    rollout: Rollout
    rewards: Tensor
    advantages: Tensor
    all_rewards: Tensor
    all_prompts: list[str]
    all_reward_parts: Tensor | None = None
    """(N, K): each component's own score, for a weighted reward of K >= 2 components."""


def compiled_in_place(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a part of it was compiled in place (``nn.Module.compile``), so that
    calling it runs compiled code."""
    return any(part._compiled_call_impl is not None for part in module.modules())


def mean_diagnostics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each diagnostic over the micro-steps that reported it."""
    keys = {key for row in rows for key in row}
    return {
        key: sum(r[key] for r in rows if key in r) / sum(key in r for r in rows) for key in keys
    }


class Trainer:
    """Base of the online trainers; subclasses supply ``compute_advantages`` and ``train_on``.

    Args:
        config: the method's config.
        out: the run folder (``metrics.jsonl``, ``checkpoints/``, ``samples/``, ``final/``).
        pipeline: a ready pipeline, SD or SDXL (default: loaded from ``config.model``); any
            other than a rollout pipeline is wrapped in one over the same components.
        reward: a ready reward, or a function ``(images, prompts) -> scores`` (default:
            ``load_reward(config.reward)``).
        accelerator: a ready ``accelerate.Accelerator`` (default: built from the config).
        callbacks: :class:`~diffalign.train.callbacks.TrainerCallback` objects, or functions
            ``(trainer, row)`` called after every round (return True to stop the run).
    """

    method = "base"

    def __init__(
        self,
        config: TrainConfig,
        out: str | Path,
        pipeline: StableDiffusionPipeline
        | StableDiffusionXLPipeline
        | StableDiffusion3Pipeline
        | None = None,
        reward: Reward | Callable | None = None,
        accelerator: Accelerator | None = None,
        callbacks: Sequence[TrainerCallback | Callable] = (),
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        # so that config.yaml and a resume's check of changed settings hold the precision the
        # run trains in, also when accelerate launch chose it
        config = config.with_launch_precision()
        self.config, self.out = config, Path(out)
        self.callbacks = as_callbacks(callbacks)
        check_tracker(config.log_with)
        if config.push_to_hub:
            check_hub_access()
        self.hub_url: str | None = None
        tracker = None if config.log_with == "none" else config.log_with
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=tracker,
            project_dir=str(self.out),
            **accelerator_options(),
        )
        check_launch(self.accelerator)
        for key in ("prompts_per_step", "num_heldout_prompts"):  # each process takes a share
            if getattr(config, key) % self.accelerator.num_processes:
                raise ValueError(
                    f"{key} ({getattr(config, key)}) must be a multiple of the number of "
                    f"processes ({self.accelerator.num_processes})."
                )
        set_seed(config.seed)
        self.pipeline = rollout_pipeline(
            pipeline or load_training_pipeline(config.model, config.model_config)
        )
        self._reloadable = pipeline is None  # final/ can read the frozen weights again
        self.pipeline.set_progress_bar_config(disable=True)
        self.denoiser = denoiser_of(self.pipeline)  # the UNet, or SD3's transformer
        self._setup_model()
        self.pipeline.to(self.accelerator.device)
        if config.offload_text_encoders:
            self._offload_text_encoders()
        if self.reference_denoiser is not None:
            self.reference_denoiser.to(self.accelerator.device)
        self.reward = load_reward(config.reward if reward is None else reward)
        self.reward = self.reward.to(self.accelerator.device)
        self.reward_parts = reward_components(self.reward)
        if config.reward_balance == "advantages" and not self.reward_parts:
            raise single_reward_to_balance(config.reward)
        self.extra_rewards = {reward_label(spec): load_reward(spec).to(self.accelerator.device)
                              for spec in config.heldout_extra_rewards}  # fmt: skip
        self.train_prompts = PromptSource(config.prompts)
        self.heldout = PromptSource(config.heldout_prompts).fixed(config.num_heldout_prompts)
        self.schedule = load_schedule(self.pipeline.scheduler)
        self.guard = None
        if config.max_heldout_drop > 0:
            self.guard = HackingGuard(config.heldout_metrics()[1:], config.max_heldout_drop)
        self.guard_trip: GuardTrip | None = None
        self.best = None
        if config.keep_best or config.early_stopping_patience:
            self.best = BestEvaluation(config.best_metric, keep_weights=config.keep_best)
        self.step = 0
        self.samples_seen = 0
        self.grad_norms: list[float] = []  # this round's, one per optimizer step

    # ------------------------------------------------------------------ setup

    def _start_from_init_lora(self) -> None:
        """Set the LoRA settings (rank, alpha, targets, per-layer patterns) to the layout of the
        adapter the run starts from (``init_lora``), as peft's ``from_pretrained`` takes a saved
        adapter's config, saying what it changed; its text-encoder layers, if it has any, go
        into the text encoders as they are (frozen: the run trains the denoiser's)."""
        from diffalign.lora import layers_matching, load_text_encoder_lora, lora_layout

        config = self.config
        layout = lora_layout(self.pipeline, config.init_lora)
        if layout.text_encoders:
            load_text_encoder_lora(self.pipeline, config.init_lora)
            logger.warning("init_lora: the %s layers of %s stay as they are (frozen); the run "
                           "trains its %s layers.", " and ".join(layout.text_encoders),
                           config.init_lora, denoiser_name(self.pipeline))  # fmt: skip
        changes = {key: value for key, value in layout.settings().items()
                   if getattr(config, key) != value}  # fmt: skip
        if config.lora_alpha is None and layout.alpha == layout.rank:
            changes.pop("lora_alpha", None)  # None means alpha = rank already
        if layers_matching(self.denoiser, config.lora_target_modules) == layout.layers:
            changes.pop("lora_target_modules", None)  # the same layers, named otherwise
        if changes:
            said = ", ".join(f"{key}: {_short(getattr(config, key))} -> {_short(value)}"
                             for key, value in changes.items())  # fmt: skip
            logger.warning("init_lora: the run takes the layout of %s: %s.", config.init_lora, said)
            self.config = replace(config, **changes)

    def _setup_model(self) -> None:
        from diffalign.lora import add_lora, copy_lora_weights

        if self.config.use_lora and self.config.init_lora is not None:
            self._start_from_init_lora()
        config = self.config
        self.reference_denoiser = None  # the KL reference: the adapter-disabled network under
        if config.beta_kl > 0 and not config.use_lora:  # LoRA, else a copy, made before sharding
            self.reference_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        for frozen in frozen_components(self.pipeline).values():
            frozen.requires_grad_(False)
        if config.use_lora:
            add_lora(self.denoiser, **config.lora_options())
            if config.init_lora is not None:  # the KL reference stays the base model
                copy_lora_weights(self.pipeline, config.init_lora)
        else:
            self.denoiser.requires_grad_(True)
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()
        self._cast_frozen_weights()
        self._collect_trainable()
        optimizer = self._build_optimizer()
        if self.uses_deepspeed:
            fill_deepspeed_config(self._deepspeed_config(),
                                  config.train_batch_size, self.accelerator.num_processes,
                                  config.max_grad_norm)  # fmt: skip
        self.model, self.optimizer = self.accelerator.prepare(self.denoiser, optimizer)
        self._collect_trainable()  # FSDP2 replaces the parameters with sharded ones, in place
        reshard_after_every_forward(self.model)
        self.pipeline.chain_denoiser = self._compiled_for_chains()
        self.ema = EMA(self.trainable, config.ema_decay) if config.ema_decay > 0 else None
        self.lr_scheduler = build_lr_scheduler(
            inner_optimizer(self.optimizer),
            config.lr_scheduler,
            config.lr_warmup_steps,
            config.max_steps,
        )

    def _compiled_for_chains(self) -> torch.nn.Module | None:
        """Under accelerate's dynamo setting (``accelerate launch --dynamo_backend inductor``),
        a compiled wrapper of the denoiser (its weights, no copy) for the rollouts and held-out
        samples, compiled as accelerate compiles the model the losses run; None otherwise, and
        where accelerate compiled the denoiser itself in place (DeepSpeed; FSDP2's regional
        compilation), so that the chains run compiled already."""
        from accelerate.utils import compile_regions

        if not compiles(self.accelerator) or compiled_in_place(self.denoiser):
            return None
        plugin = self.accelerator.state.dynamo_plugin
        if plugin.use_regional_compilation:
            return compile_regions(self.denoiser, **plugin.to_kwargs())
        return torch.compile(self.denoiser, **plugin.to_kwargs())

    def _offload_text_encoders(self) -> None:
        """Keep the text encoders on the CPU, where the pipeline then encodes prompts (their
        embeddings come to the GPU); the denoiser and the VAE stay on the accelerator."""
        for name, module in frozen_components(self.pipeline).items():
            if name.startswith("text_encoder"):
                module.to("cpu")
        self.pipeline.text_encoder_device = torch.device("cpu")

    def frozen_weights_dtype(self) -> torch.dtype | None:
        """The dtype the untrained weights are kept in (``cast_frozen_weights`` under fp16 or
        bf16 mixed precision, where autocast runs), or None when they stay float32. DeepSpeed
        (its bf16 mode stores the whole module in bf16) and FSDP2 (its policy casts for
        compute) set dtypes their own way."""
        from accelerate.utils import DistributedType

        precision = self.accelerator.mixed_precision
        if not self.config.cast_frozen_weights or precision not in ("fp16", "bf16"):
            return None
        if not self.accelerator.native_amp:  # no autocast (fp16 on a CPU): weights meet float32
            return None
        if self.uses_deepspeed or self.accelerator.distributed_type == DistributedType.FSDP:
            return None
        return torch.float16 if precision == "fp16" else torch.bfloat16

    def _cast_frozen_weights(self) -> None:
        """Hold the untrained weights in :meth:`frozen_weights_dtype`, as diffusers' training
        scripts do (autocast computes in that dtype anyway); the trained ones stay float32, and
        ``final/`` gets the frozen ones' float32 values back (see :mod:`diffalign.train.frozen`)."""
        config = self.config
        reload = None
        if self._reloadable:
            reload = functools.partial(load_training_pipeline, config.model, config.model_config)
        self.frozen = FrozenWeights(self.pipeline, reload, source=config.model)
        dtype = self.frozen_weights_dtype()
        if dtype is None:
            return
        self.frozen.cast(dtype)
        if self.reference_denoiser is not None:  # never trained nor saved: no float32 copy kept
            self.reference_denoiser.to(dtype)
        self.pipeline.latents_dtype = torch.float32  # the chain stays float32 (log-probs)

    def reference(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A context giving the KL terms' reference network: the denoiser with its LoRA adapter
        disabled (no second copy in memory), or under full fine-tuning the frozen copy of the
        starting weights."""
        from diffalign.lora import adapters_disabled

        if self.reference_denoiser is not None:
            return contextlib.nullcontext(self.reference_denoiser)
        return adapters_disabled(self.denoiser)

    @functools.cached_property
    def uses_deepspeed(self) -> bool:
        """Whether accelerate runs DeepSpeed (ZeRO stage 1 or 2); asked on every backward, so
        computed once."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _deepspeed_config(self) -> dict:
        """The DeepSpeed config accelerate runs with (only under DeepSpeed)."""
        return self.accelerator.state.deepspeed_plugin.deepspeed_config

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context for the UNet's forwards (rollouts and losses).

        accelerate's own is empty under DeepSpeed, whose bf16 mode casts the module's weights to
        bf16 and leaves the inputs alone; autocast casts the inputs to match.
        """
        if self.uses_deepspeed and deepspeed_bf16(self._deepspeed_config()):
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def _collect_trainable(self) -> None:
        self.trainable = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in self.denoiser.named_parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, Tensor]:
        """The trained parameters by name (shards of them under FSDP2)."""
        return dict(zip(self.trainable_names, self.trainable, strict=True))

    def _build_optimizer(self):
        config = self.config
        optimizer_cls = torch.optim.AdamW
        if config.use_8bit_adam:
            if self.uses_deepspeed and offloads_optimizer(self._deepspeed_config()):
                raise ConfigError(
                    "use_8bit_adam and DeepSpeed's optimizer offload exclude each other: the "
                    "offload runs DeepSpeed's own CPU AdamW, which would replace the 8-bit one by "
                    "a 32-bit Adam. Set use_8bit_adam=false, or offload_optimizer_device none."
                )
            try:
                import bitsandbytes as bnb
            except ImportError as error:
                raise ConfigError(
                    "use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only), or "
                    "set use_8bit_adam=false."
                ) from error
            optimizer_cls = bnb.optim.AdamW8bit
        return optimizer_cls(
            self.trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )  # fmt: skip

    # ------------------------------------------------------------------ sampling

    @property
    def rank(self) -> int:
        """This process's index."""
        return self.accelerator.process_index

    def _sampling_kwargs(self) -> dict:
        config = self.config
        size = {"height": config.resolution, "width": config.resolution}
        negative = config.negative_prompt
        negative = {} if negative is None else {"negative_prompt": negative}
        return {"num_inference_steps": config.num_inference_steps,
                "guidance_scale": config.guidance_scale,
                **(size if config.resolution else {}), **negative}  # fmt: skip

    def sample_round(self, step: int) -> RoundBatch:
        """Roll out this process's share of the round's prompts, score them, get advantages."""
        from accelerate.utils import gather_object

        config = self.config
        prompts = self.train_prompts.sample(config.prompts_per_step, derive_seed(config.seed, step))
        local = prompts[self.rank :: self.accelerator.num_processes]
        expanded = [p for p in local for _ in range(config.samples_per_prompt)]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, step, self.rank, "roll"))
        rollouts, futures = [], []
        sampling = {**self._sampling_kwargs(), **self.rollout_options(step)}  # once per round
        with AsyncRewardScorer(self.score, enabled=config.async_reward) as scorer:
            for start in range(0, len(expanded), config.sample_batch_size):
                chunk = expanded[start : start + config.sample_batch_size]
                with self.autocast():
                    rollout = self.pipeline(chunk, eta=config.eta, generator=generator, **sampling)
                rollouts.append(rollout)
                futures.append(scorer.submit(rollout.images, rollout.prompts))
            scores = torch.cat(scorer.gather(futures)).to(self.accelerator.device)
        rollout = Rollout.concat(rollouts)
        all_scores = self.accelerator.gather(scores)
        all_rewards, all_parts = all_scores[:, 0], all_scores[:, 1:]
        all_prompts = gather_object(rollout.prompts)
        advantages = self.round_advantages(all_prompts, all_rewards, all_parts)
        size = len(rollout)
        local_advantages = advantages[self.rank * size : (self.rank + 1) * size]
        return RoundBatch(
            rollout, scores[:, 0], local_advantages.to(scores.device), all_rewards, all_prompts,
            all_parts if self.reward_parts else None,
        )  # fmt: skip

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B, 1 + K): the reward of each image, then (a weighted reward of K >= 2 components)
        each component's own score; the components are scored once."""
        if not self.reward_parts:
            return self.reward(images, prompts)[:, None]
        parts = self.reward.breakdown(images, prompts)
        total = self.reward.combine(parts)
        return torch.stack([total, *(parts[name] for name in self.reward_parts)], dim=1)

    def round_advantages(self, prompts: list[str], rewards: Tensor, parts: Tensor) -> Tensor:
        """The round's advantages: those of the reward (``reward_balance: sum``), or the
        weighted sum of each component's own advantages (``advantages``), so that a component
        with a wide spread does not drown the others (multi-reward balancing)."""
        if self.config.reward_balance == "sum":
            return self.compute_advantages(prompts, rewards)
        return sum(self.reward.weights[name] * self.compute_advantages(prompts, parts[:, k], name)
                   for k, name in enumerate(self.reward_parts))  # fmt: skip

    def rollout_options(self, step: int) -> dict:
        """A method's own arguments for round ``step``'s rollouts (the same on every process)."""
        return {}

    def compute_advantages(
        self, prompts: list[str], rewards: Tensor, key: str = "reward"
    ) -> Tensor:
        """Advantages of all processes' samples (same on every process); ``key`` names the
        reward component they are of (for methods that track statistics per reward)."""
        raise NotImplementedError

    def train_on(self, batch: RoundBatch, step: int) -> dict[str, float]:
        """Update the model on one round's samples; returns mean diagnostics incl. ``loss``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation

    def backward(self, loss: Tensor, sync: bool) -> None:
        """Backpropagate, skipping DDP's gradient all-reduce until the last micro-batch (under
        DeepSpeed, which steps inside its backward, stepping on the last one)."""
        if self.uses_deepspeed:
            deepspeed_backward(self.model, loss, sync)
            return
        skip_sync = not sync and self.accelerator.num_processes > 1
        context = self.accelerator.no_sync(self.model) if skip_sync else contextlib.nullcontext()
        with context:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> None:
        """Clip (when ``max_grad_norm`` > 0), step, zero the gradients and update the EMA; the
        gradient's norm before clipping goes into the round's ``grad_norm``."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)  # inf: measures only
        if norm is not None:
            self.grad_norms.append(float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()

    def micro_batches(self, count: int, generator: torch.Generator) -> list[list[Tensor]]:
        """Shuffled sample indices cut into micro-batches, grouped per optimizer step."""
        order = torch.randperm(count, generator=generator).split(self.config.train_batch_size)
        accumulation = self.config.gradient_accumulation_steps
        return [list(order[i : i + accumulation]) for i in range(0, len(order), accumulation)]

    # ------------------------------------------------------------------ evaluation

    def _ema_weights(self):
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out reward (deterministic DDIM, fixed seed) and a sample grid in ``samples/``."""
        from accelerate.utils import gather_object

        from diffalign.imaging import make_grid

        config = self.config
        local = self.heldout[self.rank :: self.accelerator.num_processes]
        expanded = [p for p in local for _ in range(config.heldout_samples_per_prompt)]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "heldout", self.rank))
        images, prompts = [], []
        self.denoiser.eval()
        with self._ema_weights():
            for start in range(0, len(expanded), config.sample_batch_size):  # as the rollouts
                chunk = expanded[start : start + config.sample_batch_size]
                with self.autocast():
                    rollout = self.pipeline(chunk, eta=0.0, generator=generator,
                                            **self._sampling_kwargs())  # fmt: skip
                images.append(rollout.images.cpu())  # the rewards move a batch at a time
                prompts += rollout.prompts
        self.denoiser.train()
        images = torch.cat(images)
        results = {"heldout_reward_mean": self.reward(images, prompts)}
        for name, reward in self.extra_rewards.items():
            results[f"heldout_{name}_mean"] = reward(images, prompts)
        device = self.accelerator.device
        gathered = {key: self.accelerator.gather(v.to(device)).float().mean().item()
                    for key, v in results.items()}  # fmt: skip
        all_prompts = gather_object(prompts)
        if self.accelerator.is_main_process:
            grid = make_grid(images[:16].cpu(), columns=config.heldout_samples_per_prompt * 4)
            path = self.out / "samples" / f"step-{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            (path.with_suffix(".txt")).write_text("\n".join(all_prompts[:16]) + "\n")
            log_grid(self.accelerator.trackers, grid, step)
        return gathered

    def _start_trackers(self, resumed: bool) -> None:
        """Start the trackers with the run's project, settings and (wandb) name and id."""
        config = self.config
        init_kwargs = {}
        if self.accelerator.is_main_process:  # the trackers live there; the id file too
            init_kwargs = tracker_init_kwargs(config.log_with, self.out, config.run_name, resumed)
        self.accelerator.init_trackers(config.tracker_project or f"diffalign-{self.method}",
                                       config=tracker_settings(config.to_dict()),
                                       init_kwargs=init_kwargs)  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """Everything a resumed run needs (the model's trainable weights, not the frozen ones),
        as whole tensors; with a sharded model a collective, called by every process."""
        if self.uses_deepspeed:  # the whole master weights and moments from their partitions
            weights = whole_weights(self.trainable)
            optimizer = whole_optimizer_state(self.optimizer, self.trainable)
        else:
            weights, optimizer = self.trainable, self.optimizer.state_dict()
        named = zip(self.trainable_names, weights, strict=True)
        states = {
            "trainable": {name: weight.detach() for name, weight in named},
            "optimizer": optimizer,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "progress": {"step": self.step, "samples_seen": self.samples_seen},
        }
        if self.ema is not None:
            states["ema"] = self.ema.state_dict()
        if self.guard is not None:
            states["guard"] = self.guard.state_dict()
        if self.best is not None:
            states["best"] = self.best.state_dict()
        return gathered({**states, **self.extra_states()})

    def extra_states(self) -> dict:
        """A method's own state for checkpoints (advantage trackers, KL-EMA weights)."""
        return {}

    def load_extra_states(self, states: dict) -> None:
        """Restore what :meth:`extra_states` returned."""

    def load_state(self, states: dict) -> None:
        """Restore what :meth:`state` returned."""
        if self.uses_deepspeed:
            load_whole_weights(
                self.trainable, [states["trainable"][n] for n in self.trainable_names]
            )
            load_whole_optimizer_state(self.optimizer, self.trainable, states["optimizer"])
        else:
            weights = self.named_trainable()
            for name, value in states["trainable"].items():
                copy_into(weights[name], value)
            self.optimizer.load_state_dict(states["optimizer"])
            reshard_optimizer_state(self.optimizer.optimizer)
        if "lr_scheduler" in states:  # checkpoints from before schedules resume at a constant lr
            self.lr_scheduler.load_state_dict(states["lr_scheduler"])
        if self.ema is not None and "ema" in states:
            self.ema.load_state_dict(states["ema"])
        self.load_extra_states(states)
        self.step = int(states["progress"]["step"])
        self.samples_seen = int(states["progress"]["samples_seen"])
        if self.guard is not None:
            self._load_guard(states.get("guard"))
        if self.best is not None and not self.best.load_state_dict(states.get("best") or {}):
            logger.warning("The best %s is tracked from this resumed run's first evaluation: "
                           "its checkpoint did not track it.", self.best.metric)  # fmt: skip

    def _load_guard(self, state: dict | None) -> None:
        if state is not None:
            self.guard.load_state_dict(state)
            return
        # the guard was off when this checkpoint was written: the resumed weights count as
        # passing, and falls are measured from the first evaluation after them
        self.guard.keep(int(self.step), self._evaluated_weights())
        logger.warning("The reward-hacking guard starts with this resumed run: it measures falls "
                       "from its first evaluation, not from round 0.")  # fmt: skip

    def save(self) -> Path | None:
        """Write ``checkpoints/checkpoint-<step>`` atomically (main process)."""
        path, states = None, self.state()
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.out / "checkpoints", self.step, states,
                                   self.config.to_dict(), self.config.keep_checkpoints,
                                   kind=self.method)  # fmt: skip
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of ``out`` if there is one; returns whether it did."""
        latest = latest_checkpoint(self.out / "checkpoints")
        if latest is None:
            return False
        self._load_checkpoint(latest)
        self._keep_rounds_until_step(self.metrics_path)
        return True

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Start this run from ``checkpoint``, a ``checkpoint-<step>`` folder of another run: its
        weights, optimizer, schedule, EMA, guard and trackers, at its round, as ``resume`` would
        continue that run. ``out`` starts with the source run's ``metrics.jsonl`` rows up to
        that round; the source run is left as it is."""
        path = Path(checkpoint)
        if path.resolve().parent == (self.out / "checkpoints").resolve():
            raise FileExistsError(
                f"{path} is a checkpoint of this run ({self.out}): going back to it would mix "
                f"its later rounds with the new ones. Start a new run from it in another folder "
                f"(--resume-from {path} --out NEW), or continue the latest with --resume."
            )
        refuse_existing_run(self.out)
        self.accelerator.wait_for_everyone()  # each process has looked before any writes
        self._load_checkpoint(path)
        self._keep_rounds_until_step(path.parent.parent / METRICS_FILE)

    def _load_checkpoint(self, path: Path) -> None:
        """Load the checkpoint at ``path`` and log the settings this run changes from it."""
        checkpoint = load_checkpoint(path)
        refuse_other_method(path, checkpoint.kind, self.method)
        self.load_state(checkpoint.states)
        changed = changed_settings(checkpoint.config, self.config.to_dict())
        if changed and self.accelerator.is_main_process:
            logger.warning("Resuming %s at round %d with changed settings: %s", path,
                           self.step, describe_changes(changed))  # fmt: skip

    def _keep_rounds_until_step(self, source: Path) -> None:
        """Write ``metrics.jsonl`` as the rows of ``source`` (a metrics file) up to the loaded
        round (main process)."""
        if self.accelerator.is_main_process:
            keep_rounds_until(source, self.metrics_path, self.step)

    @property
    def metrics_path(self) -> Path:
        """One JSON line per round."""
        return self.out / METRICS_FILE

    # ------------------------------------------------------------------ the loop

    def _log(self, row: dict) -> None:
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def train(self, resume: bool = False, resume_from: str | os.PathLike | None = None) -> Path:
        """Run to ``config.max_steps`` rounds (continuing the latest checkpoint with ``resume``,
        or starting from another run's ``checkpoint-<step>`` folder with ``resume_from``, see
        :meth:`resume_from`); returns the folder of the final pipeline. However the run ends,
        raising or not, its trackers are flushed and closed and its process group is
        destroyed."""
        config = self.config
        if resume and resume_from is not None:
            raise ValueError("Give resume (this run's latest checkpoint) or resume_from (another "
                             "run's checkpoint), not both.")  # fmt: skip
        try:
            final = self._train_rounds(resume, resume_from)
        finally:
            self.accelerator.end_training()
        if config.push_to_hub and self.accelerator.is_main_process:
            repo_id = hub_repo_id(self.out, config.hub_model_id)
            self.hub_url = push_run(self.out, repo_id, private=config.hub_private_repo)
        for callback in self.callbacks:
            callback.on_train_end(self, final)
        return final

    def _train_rounds(self, resume: bool, resume_from: str | os.PathLike | None) -> Path:
        """The rounds, from a fresh start or a checkpoint, then ``final/``."""
        from tqdm.auto import tqdm

        config = self.config
        if resume_from is not None:
            self.resume_from(resume_from)
        elif not resume:
            refuse_existing_run(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = resume_from is not None or (resume and self.resume())
        if self.accelerator.is_main_process:
            if not resumed:
                self.metrics_path.write_text("")
            config.to_yaml(self.out / "config.yaml")  # the settings the run goes on with
        if self.config.log_with != "none":
            self._start_trackers(resumed)
        if self.step == 0:
            row = {"step": 0, "samples_seen": 0, **self.evaluate(0)}
            self._watch(row)
            self._log(row)
        bar = tqdm(total=config.max_steps, initial=self.step, desc=f"{self.method}",
                   disable=not (config.progress and self.accelerator.is_main_process))  # fmt: skip
        while self.step < config.max_steps:
            row = self.run_round()
            self._log(row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("reward_mean", "heldout_reward_mean")
                             if k in row})  # fmt: skip
            if self.guard_trip is not None:
                self._stop_on_trip(self.guard_trip)
                break
            stop = any_asks_to_stop(self.callbacks, self, row)
            if stop:
                logger.warning("A callback stopped the run after round %d.", self.step)
            stop = stop or self._stalled(row)
            if stop or self.step % config.save_every == 0 or self.step == config.max_steps:
                self.save()
            if stop:
                break
        bar.close()
        self._restore_best()
        return self.save_final()

    def run_round(self) -> dict:
        """Sample, score and train one round (evaluating and guarding when it is due); returns
        the round's metrics row."""
        config = self.config
        started = time.perf_counter()
        learning_rate, self.grad_norms = current_lr(self.lr_scheduler), []
        batch = self.sample_round(self.step)
        diagnostics = self.train_on(batch, self.step)
        self.lr_scheduler.step()
        self.step += 1
        self.samples_seen += config.samples_per_step
        row = {"step": self.step, "samples_seen": self.samples_seen,
               "reward_mean": batch.all_rewards.float().mean().item(),
               "reward_std": batch.all_rewards.float().std(unbiased=False).item(),
               "reward_group_std": mean_group_std(batch.all_rewards, batch.all_prompts),
               **self._component_means(batch),
               **diagnostics, "learning_rate": learning_rate,
               "seconds": time.perf_counter() - started}  # fmt: skip
        if self.grad_norms:
            row["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        if self.step % config.eval_every == 0 or self.step == config.max_steps:
            row.update(self.evaluate(self.step))
            self.guard_trip = self._watch(row)
        return row

    def _component_means(self, batch: RoundBatch) -> dict[str, float]:
        """``reward_<component>_mean`` of each component of a weighted reward."""
        if batch.all_reward_parts is None:
            return {}
        return {f"reward_{name}_mean": batch.all_reward_parts[:, k].float().mean().item()
                for k, name in enumerate(self.reward_parts)}  # fmt: skip

    def _stalled(self, row: dict) -> bool:
        """Whether early stopping ends the run after this round: an evaluation round, and
        ``early_stopping_patience`` evaluations in a row without a new best."""
        patience = self.config.early_stopping_patience  # when set, self.best follows
        if not patience or self.best.metric not in row or self.best.since < patience:
            return False
        if self.accelerator.is_main_process:
            logger.warning("Early stopping after round %d: %d evaluations without beating %s.",
                           self.step, self.best.since, self.best.describe())  # fmt: skip
        return True

    def _restore_best(self) -> None:
        """With ``keep_best``, put back the weights of the best evaluation for ``final/``."""
        if self._kept_best() is None:
            return
        self.best.restore(self._weight_copies())
        if self.accelerator.is_main_process:
            logger.warning("final/ holds the weights of %s.", self.best.describe())

    def _weight_copies(self) -> list[list[Tensor]]:
        """Every copy of the trainable weights that a restore must set: live, and the EMA's."""
        return [self.trainable] + ([self.ema.shadow] if self.ema is not None else [])

    def _evaluated_weights(self) -> list[Tensor]:
        """The trainable weights as :meth:`evaluate` uses them (the EMA's when it is on)."""
        return self.ema.shadow if self.ema is not None else self.trainable

    def _watch(self, row: dict) -> GuardTrip | None:
        """Run the reward-hacking guard on an evaluation's ``row``, then (if it passed) follow
        the best evaluation; keep the weights as each asks, and return the guard's trip (also
        noted in ``row``) if there is one."""
        trip = None if self.guard is None else self.guard.check(row["step"], row)
        if trip is not None:
            row["stopped_by_guard"] = trip.key
            return trip
        if self.guard is not None:
            self.guard.keep(row["step"], self._evaluated_weights())
        if self.best is not None:
            self.best.observe(row["step"], row, self._evaluated_weights())
        return None

    def _stop_on_trip(self, trip: GuardTrip) -> None:
        """Put back the weights of the last evaluation that passed, for ``final/``. The tripping
        round is not checkpointed: a resume (with a looser guard) replays it from the last
        checkpoint, exactly, so a run that tripped in its last round cannot end on its weights."""
        self.guard.restore(self._weight_copies())
        if self.accelerator.is_main_process:
            logger.warning(trip.message())

    def save_final(self) -> Path:
        """Save ``final/`` (a standard StableDiffusionPipeline, StableDiffusionXLPipeline or
        StableDiffusion3Pipeline folder, LoRA merged, EMA weights when on, with a model card
        ``README.md``), ``lora/`` (the adapter alone: diffusers' format, and for a UNet kohya's
        one file for A1111 / ComfyUI) and ``reward_curve.png``."""
        from diffalign.kohya_lora import KOHYA_LORA_FILE, save_kohya_lora
        from diffalign.lora import has_lora, merge_every_lora, save_lora
        from diffalign.plots import plot_reward_curve

        final = self.out / "final"
        if self.ema is not None:
            self.ema.copy_to_model()
        self.frozen.restore(read_again=self.accelerator.is_main_process)
        denoiser = self._whole_denoiser()
        if self.accelerator.is_main_process:
            plain = plain_pipeline(self.pipeline, **{denoiser_name(self.pipeline): denoiser})
            if has_lora(denoiser):
                save_lora(plain, self.out / "lora")  # with init_lora's text-encoder layers
                if denoiser_name(plain) == "unet":  # SD3's stays in diffusers' format only
                    save_kohya_lora(plain, self.out / "lora" / KOHYA_LORA_FILE)
                merge_every_lora(plain)  # with init_lora's text-encoder layers
            plain.save_pretrained(final)
            self._record_sampling(final)
            rows = read_rows(self.metrics_path)
            plot_reward_curve(rows, self.out / "reward_curve.png",
                              title=f"{self.method}: {self.config.reward}")  # fmt: skip
            self._write_model_card(final, rows, plain)
        self.accelerator.wait_for_everyone()
        return final

    def _write_model_card(self, final: Path, rows: list[dict], plain) -> None:
        config = self.config
        repo_id = hub_repo_id(self.out, config.hub_model_id) if config.push_to_hub else None
        # diffusers' SD and SDXL pipelines cannot step a flow-matching UNet (SD3's can); a
        # folder saved without some components loads with them passed as None
        flow_unet = is_flow_scheduler(self.pipeline.scheduler) and denoiser_name(plain) == "unet"
        missing = [name for name, part in plain.components.items()
                   if part is None and name not in type(plain)._optional_components]  # fmt: skip
        card = model_card(self.method, config, rows, self.guard_trip, repo_id=repo_id,
                          flow=flow_unet, best=self._kept_best(),
                          pipeline_class=type(plain).__name__,
                          load_kwargs="".join(f", {name}=None" for name in missing))  # fmt: skip
        atomic_write_text(final / "README.md", card)

    def _kept_best(self) -> BestEvaluation | None:
        """The best evaluation when ``final/`` holds its weights (``keep_best``), else None."""
        return self.best if self.best is not None and self.best.weights is not None else None

    def _whole_denoiser(self):
        """The trained UNet (or transformer) with whole weights: itself (in float32), or under
        FSDP2 (on the main process; None elsewhere) an unsharded copy built from its gathered
        state dict."""
        denoiser = self.accelerator.unwrap_model(self.model)
        if self.uses_deepspeed:  # in bf16 under DeepSpeed's bf16 mode: saved in float32
            return denoiser.to(torch.float32)
        if not is_fsdp(denoiser):
            return denoiser
        state = self.accelerator.get_state_dict(self.model)  # a collective
        if not self.accelerator.is_main_process:
            return None
        copy = unsharded_class(denoiser).from_config(denoiser.config)
        if self.config.use_lora:
            from diffalign.lora import add_lora

            add_lora(copy, **self.config.lora_options())
        copy.load_state_dict(state)
        return copy.to(next(iter(state.values())).dtype)

    def _record_sampling(self, final: Path) -> None:
        """Write ``final/training.json`` with the run's config and the sampling settings it
        trained and evaluated with, so that ``world eval`` / ``sample`` default to them as they
        do for the shipped models."""
        sampling = {"guidance_scale": self.config.guidance_scale,
                    "negative_prompt": self.config.negative_prompt,
                    "num_inference_steps": self.config.num_inference_steps,
                    "chosen_on": f"the {self.method} run that trained this model"}  # fmt: skip
        record = {"config": self.config.to_dict(), "sampling": sampling}
        if self.guard_trip is not None:
            record["stopped_by_guard"] = self.guard_trip.to_dict()
        if (best := self._kept_best()) is not None:
            record["kept_best"] = {"step": best.step, "metric": best.metric, "value": best.value}
        atomic_write_text(final / "training.json", json.dumps(record, indent=1))


def _short(value: Any) -> str:
    """A setting's value for a log line: a per-layer pattern by its size."""
    return f"<{len(value)} layers>" if isinstance(value, dict) and value else str(value)
