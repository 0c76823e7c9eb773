"""Score one batch while the next is sampled: a small thread-pool executor for trainers.

Reward models release the GIL inside PyTorch kernels, and programmatic rewards (JPEG, shapes)
spend their time in C code, so a worker thread overlaps scoring with the sampler's UNet calls.
With ``enabled=False`` the same API scores synchronously, which keeps trainers simple.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from diffalign.rewards.base import Reward


class RewardBatchError(RuntimeError):
    """Scoring one submitted batch failed; ``batch_index`` says which."""

    def __init__(self, batch_index: int, error: BaseException) -> None:
        super().__init__(f"Scoring batch {batch_index} failed: {type(error).__name__}: {error}")
        self.batch_index = batch_index


class AsyncRewardScorer:
    """Submit (images, prompts) batches and get futures of their scores.

    Args:
        reward: the reward to call (no gradients are recorded).
        max_workers: scoring threads; one keeps the GPU queue simple and is usually enough.
        enabled: when False, ``submit`` scores at once and returns a finished future.

    Example::

        with AsyncRewardScorer(reward) as scorer:
            futures = [scorer.submit(sample(batch), prompts) for batch in batches]
            scores = scorer.gather(futures)
    """

    def __init__(self, reward: Reward, max_workers: int = 1, enabled: bool = True) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}.")
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers, "diffalign-reward") if enabled else None
        self._submitted = 0

    def _score(self, images: torch.Tensor, prompts: list[str], batch_index: int) -> torch.Tensor:
        try:
            with torch.no_grad():
                return self.reward(images, prompts)
        except Exception as error:
            raise RewardBatchError(batch_index, error) from error

    def submit(
        self, images: torch.Tensor, prompts: Sequence[str], batch_index: int | None = None
    ) -> Future:
        """Queue a batch; the images are copied, so the caller may reuse its buffers."""
        index = self._submitted if batch_index is None else batch_index
        self._submitted += 1
        images, prompts = images.detach().clone(), list(prompts)
        if self._pool is not None:
            return self._pool.submit(self._score, images, prompts, index)
        future: Future = Future()
        try:
            future.set_result(self._score(images, prompts, index))
        except RewardBatchError as error:
            future.set_exception(error)
        return future

    @staticmethod
    def gather(futures: Iterable[Future]) -> list[torch.Tensor]:
        """The futures' scores in order (raises the first batch's error)."""
        return [future.result() for future in futures]

    def shutdown(self) -> None:
        """Wait for queued batches and stop the worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncRewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
