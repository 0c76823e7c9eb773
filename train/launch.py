"""Checks that a training launch will run as it is configured, made before any work.

accelerate accepts launches the trainers would run wrongly (a strategy that shards the model, or
processes that each run alone) and only warns about a tracker it cannot load; these turn each into
a :class:`~diffalign.config.ConfigError` that names the fix.
"""

from __future__ import annotations

import importlib.util
import os

from diffalign.config import ConfigError

SHARDED_STRATEGIES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
"""accelerate strategies that shard the model, which the trainers do not support yet."""


def check_launch(accelerator) -> None:
    """Refuse a launch the trainers would run wrongly: a strategy that shards the model (FSDP,
    DeepSpeed, Megatron-LM), or several launched processes that accelerate runs each on its own.

    Between optimizer steps the trainers sample rollouts with the whole UNet, outside the wrapped
    model's forward, and checkpoint its parameters by name: a sharded model has neither. Processes
    that do not know of each other would each train their own copy into the same run folder.
    """
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in SHARDED_STRATEGIES:
        raise ConfigError(
            f"diffalign's trainers do not support accelerate's {kind} strategy yet (it shards the "
            "UNet, which the rollouts sample with between optimizer steps). Run on one device, "
            "or with DDP over several (`accelerate launch --multi_gpu --num_processes N ...`, or "
            "distributed_type: MULTI_GPU in the accelerate config); with LoRA, the default, each "
            "process holds only a few MB of trainable state beyond the frozen model."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate runs "
            f"this one alone (distributed_type {kind}, e.g. from use_cpu: true with a GPU "
            "strategy): each would train its own copy into the same run folder. Launch them as "
            "one DDP job (`accelerate launch --multi_gpu --num_processes N`, or --cpu instead of "
            "--multi_gpu on CPUs), or launch one."
        )


def check_tracker(log_with: str) -> None:
    """Refuse a tracker whose package is missing (accelerate would only warn and drop it)."""
    if log_with != "none" and importlib.util.find_spec(log_with) is None:
        raise ConfigError(
            f"log_with={log_with} needs the {log_with} package: pip install {log_with}, or set "
            "log_with=none (metrics.jsonl is written either way)."
        )
