"""Configs of the online RL trainers: the shared ``TrainConfig`` and one subclass per method.

Defaults are the papers' Stable Diffusion settings where they exist (DDPO: Black et al. 2023,
``ddpo-pytorch`` ``config/base.py``; AWM: Xue et al. 2025); recipes override them for the shipped
tiny model. Every field can be set from YAML or ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffalign.config import BaseConfig, ConfigError
from diffalign.lora import DEFAULT_LORA_TARGETS
from diffalign.rewards.function import reward_label
from diffalign.single_file import is_single_file
from diffalign.train.losses import AWM_WEIGHTINGS
from diffalign.train.lr_schedule import LR_SCHEDULES

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "none")
REWARD_BALANCES = ("sum", "advantages")
DDPO_STEP_WEIGHTINGS = ("uniform", "noise")


@dataclass
class TrainConfig(BaseConfig):
    """What every online trainer shares: model, reward, prompts, sampling, optimisation, I/O."""

    model: str = field(
        default="diffalign:tiny-shapes",
        metadata={"help": "pipeline folder, hub id, one-file .safetensors / .ckpt checkpoint, "
                          "or diffalign:tiny-shapes (shipped)"},
    )  # fmt: skip
    model_config: str | None = field(
        default=None,
        metadata={"help": "for a one-file model: a diffusers folder or hub id of its "
                          "architecture (configs, tokenizer, scheduler)"},
    )  # fmt: skip
    reward: str = field(
        default="shapes",
        metadata={"help": "reward name, weighted sum, or your own FILE.py:NAME / module:NAME"},
    )
    beta_kl: float = field(
        default=0.0,
        metadata={"help": "weight of the KL to the reference model (LoRA disabled, or a copy of "
                          "the starting weights under full fine-tuning); 0: none"},
    )  # fmt: skip
    reward_balance: str = field(
        default="sum",
        metadata={"help": "sum: advantages of the weighted sum; advantages: of a weighted sum's "
                          "components, each normalised on its own, then weighted"},
    )  # fmt: skip
    prompts: str = field(
        default="world:train", metadata={"help": "world:<split> or a text file, one per line"}
    )
    heldout_prompts: str = field(default="world:heldout", metadata={"help": "as prompts"})
    num_heldout_prompts: int = field(default=32, metadata={"help": "prompts in each evaluation"})
    heldout_samples_per_prompt: int = 2
    heldout_extra_rewards: list[str] = field(
        default_factory=list,
        metadata={
            "help": "more rewards (as reward) to log on held-out samples (reward-hacking "
            "checks, logged as heldout_<NAME>_mean)"
        },  # fmt: skip
    )
    max_heldout_drop: float = field(
        default=0.0,
        metadata={"help": "reward-hacking guard: stop when a heldout_extra_rewards score falls "
                          "by more than this share of its round-0 value, keeping the last "
                          "passing weights (0 = off)"},
    )  # fmt: skip
    keep_best: bool = field(
        default=False,
        metadata={"help": "final/ holds the weights of the best held-out evaluation (by "
                          "best_metric), not the last round's"},
    )  # fmt: skip
    best_metric: str = field(
        default="heldout_reward_mean",
        metadata={"help": "the held-out metric (higher is better) of keep_best and early "
                          "stopping: heldout_reward_mean, or heldout_<NAME>_mean of an extra "
                          "reward"},
    )  # fmt: skip
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "stop after this many held-out evaluations without a new best "
                          "best_metric (0 = off)"},
    )  # fmt: skip
    seed: int = 0
    max_steps: int = field(default=100, metadata={"help": "sampling + update rounds"})
    prompts_per_step: int = field(default=8, metadata={"help": "distinct prompts per round"})
    samples_per_prompt: int = field(default=4, metadata={"help": "images per prompt (group)"})
    sample_batch_size: int = field(
        default=16, metadata={"help": "images per pipeline call (rollouts, held-out evaluations)"}
    )
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str | None = field(
        default=None,
        metadata={"help": "CFG's negative prompt for rollouts, held-out evaluations and the "
                          "saved model's sampling (needs guidance_scale > 1); default: "
                          "diffusers' (the empty prompt; zeros for SDXL)"},
    )  # fmt: skip
    eta: float = field(
        default=1.0,
        metadata={"help": "DDIM eta of the rollouts (the SDE noise level on flow models)"},
    )
    resolution: int | None = field(default=None, metadata={"help": "default: the model's"})
    train_batch_size: int = field(default=4, metadata={"help": "samples per micro-batch"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step"}
    )
    learning_rate: float = 3e-4
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": "constant, constant_with_warmup, linear, cosine, cosine_with_restarts "
                          "or polynomial (diffusers'), stepped once per round"},
    )  # fmt: skip
    lr_warmup_steps: int = field(default=0, metadata={"help": "rounds of linear warmup from 0"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = field(default=False, metadata={"help": "needs bitsandbytes"})
    max_grad_norm: float = 1.0
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16; default: accelerate launch's, else no"}
    )
    use_lora: bool = field(default=True, metadata={"help": "LoRA (peft) or full fine-tuning"})
    lora_rank: int = 4
    lora_alpha: float | None = field(default=None, metadata={"help": "default: lora_rank"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "UNet layer-name suffixes that get LoRA (default: attention)"},
    )
    lora_rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "other ranks for some layers, by layer path or name suffix (peft's "
                          "rank_pattern)"},
    )  # fmt: skip
    lora_alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "other alphas for some layers (peft's alpha_pattern)"},
    )
    init_lora: str | None = field(
        default=None,
        metadata={"help": "start the adapter from this LoRA: a diffusers LoRA folder (a run's "
                          "lora/) or a .safetensors file (kohya's too); its ranks, alphas and "
                          "layers replace the lora_* settings; text-encoder layers stay frozen"},
    )  # fmt: skip
    gradient_checkpointing: bool = False
    cast_frozen_weights: bool = field(
        default=True,
        metadata={"help": "under fp16/bf16, keep untrained weights (VAE, text encoders, the "
                          "UNet's base under LoRA) in that dtype: half their memory"},
    )  # fmt: skip
    offload_text_encoders: bool = field(
        default=False,
        metadata={"help": "keep the frozen text encoders on the CPU and encode each round's "
                          "distinct prompts there: their GPU memory freed (SD3's T5-XXL: 9.5 GB "
                          "in bf16) for CPU time"},
    )  # fmt: skip
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of trained weights; 0 = off"})
    async_reward: bool = field(default=True, metadata={"help": "score while sampling"})
    eval_every: int = field(default=10, metadata={"help": "held-out evaluation and grid"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N rounds"})
    keep_checkpoints: int = 2
    log_with: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, none"})
    tracker_project: str | None = field(
        default=None,
        metadata={"help": "the trackers' project (wandb's project, tensorboard's folder in the "
                          "run); default: diffalign-<method>"},
    )  # fmt: skip
    run_name: str | None = field(
        default=None, metadata={"help": "the run's name in wandb (default: the --out folder's)"}
    )
    progress: bool = True
    push_to_hub: bool = field(
        default=False, metadata={"help": "upload final/ (and lora/) to the Hub at the end"}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "the Hub repository (default: the --out folder's name)"}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "create it private"})

    def with_launch_precision(self) -> TrainConfig:
        """A copy whose ``mixed_precision`` is the one a run trains in: this config's when set,
        else what ``accelerate launch`` asked for, else ``"no"``."""
        from diffalign.train.launch import resolve_mixed_precision

        return dataclasses.replace(
            self, mixed_precision=resolve_mixed_precision(self.mixed_precision)
        )

    def heldout_metrics(self) -> list[str]:
        """The means each held-out evaluation logs: the reward's, then each extra reward's."""
        extras = [f"heldout_{reward_label(spec)}_mean" for spec in self.heldout_extra_rewards]
        return ["heldout_reward_mean", *extras]

    def lora_options(self) -> dict[str, Any]:
        """The LoRA settings as :func:`diffalign.lora.add_lora`'s keyword arguments."""
        return lora_options(dataclasses.asdict(self))

    def validate(self) -> None:
        if self.init_lora is not None and not self.use_lora:
            raise ConfigError("init_lora starts a LoRA adapter: it needs use_lora=true.")
        if min([self.lora_rank, *self.lora_rank_pattern.values()]) < 1:
            raise ConfigError("LoRA ranks (lora_rank, lora_rank_pattern's) must be at least 1.")
        if self.model_config is not None and not is_single_file(self.model):
            raise ConfigError(
                f"model_config is for a one-file model (.safetensors / .ckpt); model is "
                f"{self.model!r}, which brings its own configs: leave model_config unset."
            )
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}.")
        if self.log_with not in TRACKERS:
            raise ConfigError(f"log_with must be one of {TRACKERS}.")
        if self.negative_prompt is not None and self.guidance_scale <= 1:
            raise ConfigError(
                f"negative_prompt is the unconditional side of classifier-free guidance, which "
                f"guidance_scale={self.guidance_scale} turns off: set guidance_scale > 1, or "
                "leave negative_prompt unset."
            )
        if self.beta_kl < 0:
            raise ConfigError(
                f"beta_kl must be >= 0 (0 turns the KL term off), got {self.beta_kl}."
            )
        if self.reward_balance not in REWARD_BALANCES:
            raise ConfigError(f"reward_balance must be one of {REWARD_BALANCES}, "
                              f"got {self.reward_balance!r}.")  # fmt: skip
        if self.reward_balance == "advantages" and len(_spec_terms(self.reward)) == 1:
            raise single_reward_to_balance(self.reward)
        positive = ("max_steps", "prompts_per_step", "samples_per_prompt", "sample_batch_size",
                    "num_inference_steps", "train_batch_size", "gradient_accumulation_steps",
                    "eval_every", "save_every", "num_heldout_prompts",
                    "heldout_samples_per_prompt")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ConfigError(f"lr_scheduler must be one of {LR_SCHEDULES}: {self.lr_scheduler!r}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}.")
        if self.max_heldout_drop < 0:
            raise ConfigError(f"max_heldout_drop must be >= 0 (0: off): {self.max_heldout_drop}")
        if self.max_heldout_drop > 0 and not self.heldout_extra_rewards:
            raise ConfigError(
                "max_heldout_drop guards the heldout_extra_rewards, and none are set: add the "
                'rewards to watch, e.g. --set "heldout_extra_rewards=[tiny_clip]" (clip_score or '
                "pickscore on real models), or turn the guard off with max_heldout_drop=0."
            )
        if self.early_stopping_patience < 0:
            raise ConfigError("early_stopping_patience must be >= 0 (0: off), got "
                              f"{self.early_stopping_patience}.")  # fmt: skip
        if self.best_metric not in self.heldout_metrics():
            choices = ", ".join(self.heldout_metrics())
            raise ConfigError(f"best_metric must be a held-out metric of this run, one of "
                              f"{choices}; got {self.best_metric!r}.")  # fmt: skip
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay must be in [0, 1) (0 turns the EMA off).")

    @property
    def samples_per_step(self) -> int:
        """Images sampled per round over all processes."""
        return self.prompts_per_step * self.samples_per_prompt


def single_reward_to_balance(reward: str) -> ConfigError:
    """The error for ``reward_balance: advantages`` on a reward of one component."""
    return ConfigError(
        f"reward_balance: advantages normalises each component of a weighted reward on its own, "
        f"but {reward!r} has one component; name several (e.g. 'pickscore+0.5*aesthetic') or "
        "set reward_balance: sum."
    )


def _spec_terms(spec: str) -> dict[str, float]:
    """The terms of a weighted-sum reward spec; {} for one that is not such a spec (a
    ``FILE.py:NAME`` reference: its reward is checked once loaded)."""
    from diffalign.rewards.registry import parse_reward_spec

    try:
        return parse_reward_spec(spec)
    except ValueError:
        return {}


@dataclass
class DDPOConfig(TrainConfig):
    """DDPO (PPO on the denoising chain); defaults from the paper's SD1.5 setup."""

    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip (log-probs are "
                                                               "per-dimension means)"})  # fmt: skip
    adv_clip_max: float = 5.0
    num_inner_epochs: int = 1
    timestep_fraction: float = field(default=1.0, metadata={"help": "share of steps trained"})
    train_cfg: bool = field(default=True, metadata={"help": "CFG when recomputing log-probs"})
    step_weighting: str = field(
        default="uniform",
        metadata={"help": "uniform, or noise: each step's loss times its noise level (std)"},
    )
    sde_window: int = field(
        default=0,
        metadata={"help": "0: every chain step stochastic and trainable (DDPO); k > 0: each "
                          "round samples k consecutive steps at a random place at eta, the "
                          "rest deterministically, and trains those k (Flow-GRPO-Fast style)"},
    )  # fmt: skip
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 32
    stat_min_count: int = 16

    def validate(self) -> None:
        super().validate()
        if self.eta <= 0:
            raise ConfigError("DDPO needs stochastic rollouts: set eta > 0 (the paper uses 1.0).")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError("timestep_fraction must be in (0, 1].")
        if self.num_inner_epochs < 1:
            raise ConfigError("num_inner_epochs must be >= 1.")
        if not 0 <= self.sde_window <= self.num_inference_steps:
            raise ConfigError(
                f"sde_window must be in [0, num_inference_steps = {self.num_inference_steps}] "
                f"(0: every step stochastic), got {self.sde_window}."
            )
        if self.step_weighting not in DDPO_STEP_WEIGHTINGS:
            raise ConfigError(
                f"step_weighting must be one of {DDPO_STEP_WEIGHTINGS}, "
                f"got {self.step_weighting!r}."
            )


@dataclass
class AWMConfig(TrainConfig):
    """AWM (advantage-weighted matching); defaults from the paper's SD3.5 PickScore setup."""

    num_train_timesteps: int = field(default=6, metadata={"help": "noise levels per sample"})
    timestep_fraction: float = field(
        default=0.9, metadata={"help": "train t below fraction * T, stratified"}
    )
    min_timestep_fraction: float = field(
        default=0.0,
        metadata={"help": "train t >= this share of T (0.5: the half that sets the layout)"},
    )
    beta_kl: float = field(default=1e-4, metadata={"help": "KL to the adapter-disabled model"})
    beta_ema: float = field(default=0.0, metadata={"help": "KL to a slow EMA of the weights"})
    kl_ema_decay: float = field(default=0.3, metadata={"help": "cap of the KL-EMA decay"})
    adv_clip_max: float = 5.0
    weighting: str = field(
        default="ghuber",
        metadata={"help": "ghuber (the paper's: the push on a badly denoised sample fades) or "
                          "uniform (plain mean squared error)"},
    )  # fmt: skip
    global_std: bool = field(default=True, metadata={"help": "advantages over the batch std"})
    advantage_std_floor: float = field(
        default=0.0,
        metadata={"help": "divide advantages by max(std, this), in reward units (0: plain std)"},
    )
    shared_noise: bool = field(
        default=False, metadata={"help": "one noise and timestep draw per prompt group"}
    )
    train_cfg: bool = field(
        default=False,
        metadata={"help": "match with the guided prediction the rollouts used (CFG > 1)"},
    )
    eta: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.num_train_timesteps < 1 or not 0 < self.timestep_fraction <= 1:
            raise ConfigError("num_train_timesteps must be >= 1, timestep_fraction in (0, 1].")
        if not 0 <= self.min_timestep_fraction < self.timestep_fraction:
            raise ConfigError(
                f"min_timestep_fraction must be in [0, timestep_fraction = "
                f"{self.timestep_fraction}), got {self.min_timestep_fraction}."
            )
        if self.weighting not in AWM_WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {AWM_WEIGHTINGS}, got {self.weighting!r}.")
        if self.advantage_std_floor < 0:
            raise ConfigError(
                f"advantage_std_floor must be >= 0 (reward units), got {self.advantage_std_floor}."
            )


def lora_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A run's LoRA settings (a config, or a checkpoint's saved one, as a mapping) as
    :func:`diffalign.lora.add_lora`'s keyword arguments; the patterns are absent from runs saved
    before they existed."""
    return {
        "rank": settings["lora_rank"],
        "alpha": settings["lora_alpha"],
        "target_modules": settings["lora_target_modules"],
        "rank_pattern": settings.get("lora_rank_pattern") or {},
        "alpha_pattern": settings.get("lora_alpha_pattern") or {},
    }
