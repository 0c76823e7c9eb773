"""Multi-process CPU runs forked from a server that has already imported the heavy libraries.

A ``torch.distributed.run`` launch spends about 9 of its 10 seconds importing torch, diffusers,
transformers and diffalign in every process, and the distributed tests launch some 40 times. Here
a ``multiprocessing`` fork server imports them once (:data:`PRELOAD`); each launch forks its
processes from it, hands each the environment ``torch.distributed.run`` would (rank, world size,
rendezvous address) and runs the script or module as ``__main__``. Every process is still a new
one: nothing trained, no process group and no accelerate state is shared between launches.

Only without CUDA: a process forked after CUDA has been touched cannot use it, so on a machine
with a GPU the tests launch with ``torch.distributed.run`` as before (see ``conftest``).
"""

import faulthandler
import multiprocessing
import os
import runpy
import sys
import time
from pathlib import Path

# imported once by the fork server; not deepspeed, which picks its accelerator when imported
PRELOAD = ["tests.distributed_run", "diffalign.cli", "diffalign.train.awm", "diffalign.train.ddpo"]
POLL_SECONDS = 0.05
GRACE_SECONDS = 10  # how long the others may run on after one process failed

_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run_as_main(argv: list[str], environment: dict[str, str], log: str) -> None:
    """In the forked process: the launch's environment and output file, then the script."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.environ.clear()
    os.environ.update(environment)
    faulthandler.enable()
    import torch

    torch.set_num_threads(int(environment.get("OMP_NUM_THREADS", "1")))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).parent))  # as `python SCRIPT` puts it first
        runpy.run_path(argv[0], run_name="__main__")


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def launch_forked(argv: list[str], environment: dict[str, str], processes: int, port: int,
                  log_dir: Path, timeout: float = 600) -> None:  # fmt: skip
    """Run ``argv`` (``SCRIPT ARGS`` or ``-m MODULE ARGS``) in ``processes`` forked processes
    that meet at ``127.0.0.1:port``, as ``torch.distributed.run --nproc_per_node=processes``
    would; raise with the failed processes' output when one exits non-zero or the launch times
    out. Each process writes its output to ``log_dir/rank-<i>.log``."""
    context = _fork_server()
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for rank in range(processes):
        rendezvous = {"RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "WORLD_SIZE": processes,
                      "LOCAL_WORLD_SIZE": processes, "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": port}  # fmt: skip
        env = {**environment, **{key: str(value) for key, value in rendezvous.items()}}
        log = log_dir / f"rank-{rank}.log"
        log.write_text("")
        process = context.Process(target=_run_as_main, args=(argv, env, str(log)))
        process.start()
        started.append((process, log))
    _wait(started, timeout)


def _wait(started, timeout: float) -> None:
    processes = [process for process, _ in started]
    deadline, failed_at = time.monotonic() + timeout, None
    while any(process.is_alive() for process in processes):
        now = time.monotonic()
        if failed_at is None and any(process.exitcode for process in processes):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + GRACE_SECONDS):
            break
        time.sleep(POLL_SECONDS)
    timed_out = any(process.is_alive() for process in processes) and failed_at is None
    _stop(processes)
    failures = [(rank, process.exitcode, log) for rank, (process, log) in enumerate(started)
                if process.exitcode != 0]  # fmt: skip
    if failures:
        reason = f"timed out after {timeout:.0f} s" if timed_out else "failed"
        tails = "\n".join(f"--- rank {rank} (exit code {code}), {log}:\n{log.read_text()[-4000:]}"
                          for rank, code, log in failures)  # fmt: skip
        raise RuntimeError(f"forked launch {reason}:\n{tails}")
