"""Prompts: the only data an online RL run needs.

Each training batch is a list of ``prompts_per_step`` prompt strings; the module expands each
into a group. Lightning's distributed sampler splits prompts across ranks, so a prompt's whole
group stays on one rank (expand-and-prune needs no cross-rank traffic).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: Built-in prompt sets, so a run needs no data file.
PROMPT_SETS: dict[str, list[str]] = {
    "animals": [
        "a cat", "a dog", "a horse", "a cow", "a sheep", "a pig", "a goat", "a rabbit", "a fox",
        "a wolf", "a bear", "a deer", "a lion", "a tiger", "an elephant", "a giraffe", "a zebra",
        "a monkey", "a panda", "a koala", "an owl", "a parrot", "a duck", "a frog",
    ],
    "colors": [
        "a red square", "a green circle", "a blue triangle", "a yellow star", "a white cloud",
        "a black cat", "an orange sunset", "a purple flower", "a pink heart", "a brown dog",
        "a grey stone", "a golden coin",
    ],
}


class PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


def _collate(batch: list[str]) -> list[str]:
    return list(batch)


def load_prompts(prompts: Sequence[str] | str) -> list[str]:
    """A list as given; a name from PROMPT_SETS; or a path to a text file (one prompt a line)."""
    if not isinstance(prompts, str):
        out = [p for p in prompts]
    elif prompts in ("shapes", "shapes_heldout"):  # the procedural task's train / held-out prompts
        from .tasks.shapes import shapes_prompts

        out = shapes_prompts("train" if prompts == "shapes" else "heldout", seed=None)
    elif prompts in PROMPT_SETS:
        out = list(PROMPT_SETS[prompts])
    elif os.path.isfile(prompts):
        with open(prompts, encoding="utf-8") as f:
            out = [line.strip() for line in f if line.strip()]
    else:
        raise FileNotFoundError(f"prompts={prompts!r} is neither a built-in set "
                                f"{sorted(PROMPT_SETS) + ['shapes', 'shapes_heldout']} "
                                f"nor an existing text file")
    if not out:
        raise ValueError(f"prompts={prompts!r} gives no prompts")
    return out


class ResumableShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch), and a one-shot skip for resuming.

    Lightning calls ``set_epoch`` before each epoch; the order is therefore a pure function of
    (seed, epoch), and ``skip`` items are dropped from the next iteration only (mid-epoch resume).
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch, self.skip = num_items, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=gen).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning recognises as resumable (it has ``state_dict``/``load_state_dict``).

    The state is read from the trainer's own progress counters (batches processed in the current
    epoch), not from the iterator, which Lightning prefetches one batch ahead.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._progress()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, ResumableShuffleSampler)
        sampler.set_epoch(state["epoch"])
        sampler.skip = state["batches_done"] * self.batch_size


class PromptDataModule(pl.LightningDataModule):
    """Shuffled prompts, ``prompts_per_step`` per rollout.

    Args:
        prompts: a built-in set name, a text file (one prompt per line) or a list.
        prompts_per_step: P, prompts per rollout on each rank (each becomes a group).
        seed: shuffling seed (data order is part of a resumable run).
    """

    def __init__(self, prompts: list[str] | str = "animals", prompts_per_step: int = 2, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.prompts = load_prompts(prompts)
        if prompts_per_step > len(self.prompts):
            raise ValueError(f"prompts_per_step={prompts_per_step} exceeds the {len(self.prompts)} prompts given")
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.num_workers = num_workers

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches of it processed) as the trainer counts them, for the loader's state."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch, processed

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableShuffleSampler(len(self.prompts), self.seed)
        return ResumableDataLoader(PromptDataset(self.prompts), batch_size=self.prompts_per_step,
                                   sampler=sampler, drop_last=True, collate_fn=_collate,
                                   num_workers=self.num_workers, progress=self._progress)
