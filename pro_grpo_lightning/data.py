"""Prompts: the only data an online RL run needs.

Each training batch is a list of ``prompts_per_step`` prompt strings; the module expands each
into a group, and a prompt's whole group stays on its rank (expand-and-prune needs no cross-rank
traffic). Under DDP the sampler shards each epoch's permutation itself: global batch b is
``order[b * P * W : (b + 1) * P * W]`` and rank r takes its r-th slice of P, so W ranks with P
prompts see exactly the batches of one process with W * P prompts (in rank order). It subclasses
``DistributedSampler`` so Lightning never wraps or replaces it, whatever ``use_distributed_sampler``
says. Held-out prompts (``val_prompts`` / ``test_prompts``) become (prompt, image) items with fixed
noise seeds, sharded round-robin without padding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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
        try:
            with open(prompts, encoding="utf-8") as f:
                out = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"prompts={prompts!r}: not UTF-8 text (byte {err.start}: {err.reason}); "
                             f"save the file as UTF-8") from None
    else:
        raise FileNotFoundError(f"prompts={prompts!r} is neither a built-in set "
                                f"{sorted(PROMPT_SETS) + ['shapes', 'shapes_heldout']} "
                                f"nor an existing text file")
    if not out:
        raise ValueError(f"prompts={prompts!r} gives no prompts")
    return out


class ResumableShuffleSampler(DistributedSampler):
    """A fresh permutation per epoch from (seed, epoch), sharded by batch, with a one-shot skip.

    Epoch e's order is ``randperm(num_items)`` from (seed, e). With ``batch_size`` P and
    ``num_replicas`` W, global batch b is ``order[b*P*W : (b+1)*P*W]`` and this rank yields its
    slice ``[rank*P : (rank+1)*P]`` of each; incomplete global batches are dropped, so every rank
    yields the same number of batches. ``skip`` items are dropped from the next iteration only
    (mid-epoch resume). Lightning calls ``set_epoch`` before each epoch.

    A ``DistributedSampler`` subclass so Lightning leaves it alone under DDP (it only injects a
    sampler into loaders whose sampler is not one).
    """

    def __init__(self, num_items: int, seed: int, batch_size: int = 1, num_replicas: int = 1,
                 rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside num_replicas {num_replicas}")
        if batch_size * num_replicas > num_items:
            raise ValueError(f"a global batch of {batch_size} prompts x {num_replicas} ranks needs at "
                             f"least {batch_size * num_replicas} prompts, got {num_items}: lower "
                             f"data.prompts_per_step or the device count, or add prompts")
        super().__init__(range(num_items), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.num_items, self.batch_size = num_items, batch_size
        self.num_batches = num_items // (batch_size * num_replicas)  # per rank and epoch
        self.num_samples = self.num_batches * batch_size
        self.skip = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() != self.num_replicas:
            raise RuntimeError(
                f"ResumableShuffleSampler was built for {self.num_replicas} rank(s) but the process group "
                f"has {dist.get_world_size()}: build it in train_dataloader() from trainer.world_size "
                f"and trainer.global_rank (PromptDataModule does)")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=gen)  # [N]
        P, W = self.batch_size, self.num_replicas
        mine = order[: self.num_batches * P * W].view(self.num_batches, W, P)[:, self.rank]  # [nb, P]
        skip, self.skip = self.skip, 0
        return iter(mine.flatten().tolist()[skip:])


class ShardedSequentialSampler(DistributedSampler):
    """Items rank, rank + W, rank + 2W, ... in order: no shuffling, no padding, no duplicates.

    Ranks may get one item more or less; evaluation gathers its per-item rows at the end, so
    nothing per batch needs the ranks in lockstep.
    """

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_items), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_items = num_items
        self.num_samples = len(range(rank, num_items, num_replicas))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.num_replicas))


class EvalItems(Dataset):
    """(prompt, image) pairs of a held-out set; each carries its own noise seed.

    Item (i, j) is image j of prompt i, seeded ``mix_seed(eval_seed, i, j)``: its image depends on
    nothing else (batch size, rank count, training RNG).
    """

    def __init__(self, prompts: Sequence[str], images_per_prompt: int, eval_seed: int) -> None:
        from .noise import mix_seed

        self.prompts = list(prompts)
        self.images_per_prompt = images_per_prompt
        self.seeds = [[mix_seed(eval_seed, i, j) for j in range(images_per_prompt)]
                      for i in range(len(self.prompts))]

    def __len__(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = divmod(k, self.images_per_prompt)
        return {"prompt": self.prompts[i], "prompt_index": i, "image_index": j, "seed": self.seeds[i][j]}


def _collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"prompts": [it["prompt"] for it in items],
            "prompt_index": torch.tensor([it["prompt_index"] for it in items], dtype=torch.long),
            "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
            "seeds": [it["seed"] for it in items]}


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
    """Shuffled training prompts, ``prompts_per_step`` per rollout and rank; held-out prompt sets.

    Args:
        prompts: a built-in set name, a text file (one prompt per line) or a list.
        prompts_per_step: P, prompts per rollout on each rank (each becomes a group); the global
            batch is P x the number of ranks.
        seed: shuffling seed (data order is part of a resumable run).
        val_prompts: held-out prompts scored by ``validate`` and during fit (set name, file or
            list; None: no validation).
        test_prompts: the prompts of ``test`` (None: no test set).
        eval_images_per_prompt: images per held-out prompt.
        eval_seed: fixes the noise of every held-out image (same images for the same weights).
        eval_batch_size: held-out images per sampling batch (per rank); does not change results.
    """

    def __init__(self, prompts: list[str] | str = "animals", prompts_per_step: int = 2, seed: int = 0,
                 num_workers: int = 0, val_prompts: list[str] | str | None = None,
                 test_prompts: list[str] | str | None = None, eval_images_per_prompt: int = 2,
                 eval_seed: int = 2024, eval_batch_size: int = 8) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.prompts = load_prompts(prompts)
        if prompts_per_step > len(self.prompts):
            raise ValueError(f"prompts_per_step={prompts_per_step} exceeds the {len(self.prompts)} prompts given")
        if eval_images_per_prompt < 1:
            raise ValueError(f"eval_images_per_prompt must be >= 1, got {eval_images_per_prompt}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.num_workers = num_workers
        self.val_prompts = None if val_prompts is None else load_prompts(val_prompts)
        self.test_prompts = None if test_prompts is None else load_prompts(test_prompts)
        self.eval_images_per_prompt = eval_images_per_prompt
        self.eval_seed = eval_seed
        self.eval_batch_size = eval_batch_size

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches of it processed) as the trainer counts them, for the loader's state."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch, processed

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_world()
        sampler = ResumableShuffleSampler(len(self.prompts), self.seed, batch_size=self.prompts_per_step,
                                          num_replicas=world_size, rank=rank)
        return ResumableDataLoader(PromptDataset(self.prompts), batch_size=self.prompts_per_step,
                                   sampler=sampler, drop_last=True, collate_fn=_collate,
                                   num_workers=self.num_workers, progress=self._progress)

    def _eval_loader(self, prompts: list[str] | None, stage: str) -> DataLoader | list:
        if prompts is None:
            trainer = self.trainer
            fn = getattr(getattr(trainer, "state", None), "fn", None)
            if fn is not None and str(getattr(fn, "value", fn)) == stage:
                raise ValueError(f"`{stage}` needs held-out prompts: set data.{'val' if stage == 'validate' else 'test'}"
                                 f"_prompts (a set name, a text file or a list)")
            # No held-out set during fit: an empty loader is how a datamodule says "no validation";
            # Lightning's warning about it would only confuse.
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        rank, world_size = self._rank_world()
        items = EvalItems(prompts, self.eval_images_per_prompt, self.eval_seed)
        return DataLoader(items, batch_size=self.eval_batch_size, collate_fn=_collate_eval,
                          sampler=ShardedSequentialSampler(len(items), world_size, rank),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_prompts, "validate")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_prompts, "test")
