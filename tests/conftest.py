"""Shared fixtures: tiny real components, built offline with fixed seeds."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from .forked_launch import launch_forked

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")


def launch_two_processes(script: Path | str, *args, env: dict[str, str] | None = None,
                         processes: int = 2, torchrun: bool = False) -> None:  # fmt: skip
    """Run ``script ARGS`` (or ``-m MODULE ARGS``) in 2 (or ``processes``) CPU processes
    (gloo), 1 thread each, with ``env`` added to the environment: forked from a server that has
    imported the libraries (:mod:`tests.forked_launch`), or with torch.distributed.run when
    ``torchrun`` is asked for, CUDA is present or ``DIFFALIGN_TEST_TORCHRUN`` is set."""
    with socket.socket() as sock:  # a free port, so that tests never meet a stale rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a process that aborts in C++ (once seen: "terminate called without an active exception",
    # rank 1, at start-up) prints every thread's Python stack, to show where
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    if not (torchrun or cuda_available() or os.environ.get("DIFFALIGN_TEST_TORCHRUN")):
        log_dir = Path(tempfile.mkdtemp(prefix="launch-"))
        launch_forked([str(script), *map(str, args)], env, processes, port, log_dir)
        shutil.rmtree(log_dir)
        return
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                    f"--master_port={port}", str(script), *map(str, args)],
                   check=True, env=env, timeout=600)  # fmt: skip


@pytest.fixture(scope="session")
def clip_tokenizer():
    from diffalign.models import build_clip_tokenizer

    return build_clip_tokenizer()


@pytest.fixture()
def tiny_pipeline():
    from diffalign.models import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture()
def tiny_unet():
    from diffalign.models import build_tiny_unet

    return build_tiny_unet(seed=0).eval()


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    """Random latents, timesteps and text states that fit ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.tensor([999, 10][:batch] + [500] * max(0, batch - 2))
    return latents, timesteps, states
