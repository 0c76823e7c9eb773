"""``diffalign eval --images DIR``: measure a folder of images made elsewhere, sampling nothing.

The images are read a batch of one size at a time (:class:`diffalign.fid.ImageFolder`), in name
order. Rewards score each image against its prompt: ``--prompts FILE`` (one line per image, in
name order), else the ``samples.json`` that ``diffalign sample`` writes beside its ``images/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from diffalign.fid import ImageFolder
    from diffalign.metrics import ImageScores, MetricScorer


def open_folder(path: str | Path, flag: str) -> ImageFolder:
    """The images of the folder given to ``flag``; exits with the reason when it is not one."""
    from diffalign.fid import ImageFolder

    if not Path(path).is_dir():
        raise SystemExit(f"error: {flag} {path} is not a folder.")
    try:
        return ImageFolder(path)
    except ValueError as error:
        raise SystemExit(f"error: {flag}: {error}") from None


def folder_prompts(folder: ImageFolder, prompts_file: str | None) -> list[str] | None:
    """The prompt of each image of ``folder`` in name order: from ``prompts_file`` (one line
    per image), else from ``samples.json`` beside the folder, else None."""
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"error: --prompts {prompts_file} is not a file (with --images it "
                             "holds one prompt per image, in name order).")  # fmt: skip
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(prompts) != len(folder):
            raise SystemExit(f"error: --prompts {prompts_file} holds {len(prompts)} prompts for "
                             f"the {len(folder)} images of {folder.folder}; give one per image, "
                             "in name order.")  # fmt: skip
        return prompts
    samples = folder.folder.parent / "samples.json"
    if not samples.is_file():
        return None
    by_file = {record["file"]: record["prompt"] for record in json.loads(samples.read_text())}
    missing = [f.name for f in folder.files if f.name not in by_file]
    if missing:
        raise SystemExit(f"error: {samples} has no prompt for {missing[0]} (and "
                         f"{len(missing) - 1} more); pass --prompts FILE.")  # fmt: skip
    return [by_file[f.name] for f in folder.files]


def score_folder(folder: ImageFolder, prompts: list[str] | None, scorer: MetricScorer,
                 args: argparse.Namespace) -> tuple[ImageScores, torch.Tensor]:  # fmt: skip
    """The scores of the folder's images in name order (``--batch-size`` images a batch) and
    the images of its grid (the first, of the first batch's size)."""
    import torch
    from tqdm.auto import tqdm

    from diffalign.imaging import GridCollector
    from diffalign.metrics import ImageScores

    grid, parts, order = GridCollector(1), [], []
    with tqdm(total=len(folder), desc=f"images in {folder.folder}", unit="image",
              disable=args.quiet) as bar:  # fmt: skip
        for positions, images in folder.batches(args.batch_size):
            texts = [prompts[i] if prompts else "" for i in positions.tolist()]
            parts.append(scorer.score(images, texts))
            grid.add(images)
            order.append(positions)
            bar.update(len(images))
    scores = ImageScores.concatenate(parts)
    return scores.select(torch.argsort(torch.cat(order))), grid.images()
