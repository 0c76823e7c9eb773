"""Where training and held-out prompts come from: the shapes world's splits or a text file."""

from __future__ import annotations

import random
from pathlib import Path

from diffalign.config import ConfigError

WORLD_PREFIX = "world:"
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "prompt_lists"


class PromptSource:
    """Prompts from ``world:<split>`` (fresh captions of that split), ``builtin:<name>`` (a list
    shipped in ``diffalign/train/prompt_lists``, e.g. ``builtin:animals``) or a text file.

    ``sample(count, seed)`` is deterministic by seed, so every process and every resumed run
    draws the same prompts for the same round.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.lines: list[str] | None = None
        if spec.startswith(WORLD_PREFIX):
            from diffalign.world.render import SPLITS

            self.split = spec.removeprefix(WORLD_PREFIX)
            if self.split not in SPLITS:
                raise ConfigError(f"Unknown world split {self.split!r} in {spec!r}; use {SPLITS}.")
            return
        path = Path(spec).expanduser()
        if spec.startswith(BUILTIN_PREFIX):
            path = BUILTIN_DIR / f"{spec.removeprefix(BUILTIN_PREFIX)}.txt"
            if not path.is_file():
                names = sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))
                raise ConfigError(f"No built-in prompt list {spec!r}; available: {names}.")
        if not path.is_file():
            raise ConfigError(
                f"Prompt source {spec!r} is not world:<split>, builtin:<name> or an existing file."
            )
        self.lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not self.lines:
            raise ConfigError(f"The prompt file {path} has no prompts.")

    def sample(self, count: int, seed: int) -> list[str]:
        """``count`` prompts (distinct when the source has enough)."""
        if self.lines is None:
            from diffalign.world.evaluate import heldout_prompts

            return heldout_prompts(count, seed=seed, split=self.split)
        rng = random.Random(seed)
        if count <= len(self.lines):
            return rng.sample(self.lines, count)
        return [rng.choice(self.lines) for _ in range(count)]

    def fixed(self, count: int) -> list[str]:
        """A fixed evaluation set: the first ``count`` prompts (files) or a seeded draw (world)."""
        if self.lines is not None:
            return self.lines[:count]
        return self.sample(count, seed=0)
