"""Prompts: the only data an online RL run needs.

A prompt set is a list of prompts, each with an optional metadata dict that travels with it to
every reward (e.g. a GenEval item's objects, counts and colours). ``load_prompt_set`` reads the
built-in sets and the file formats in ``PROMPT_FORMATS``; anything else is refused with one line.

Each training batch is a ``PromptBatch`` of ``prompts_per_step`` prompts; the module expands each
into a group, and a prompt's whole group stays on its rank (expand-and-prune needs no cross-rank
traffic). Under DDP the sampler shards each epoch's permutation itself: global batch b is
``order[b * P * W : (b + 1) * P * W]`` and rank r takes its r-th slice of P, so W ranks with P
prompts see exactly the batches of one process with W * P prompts (in rank order). It subclasses
``DistributedSampler`` so Lightning never wraps or replaces it, whatever ``use_distributed_sampler``
says. Held-out prompts (``val_prompts`` / ``test_prompts``) become (prompt, image) items with fixed
noise seeds, sharded round-robin without padding (``evaluation.eval_loader``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .evaluation import eval_loader
from .noise import mix_seed

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


#: Prompt files ``load_prompt_set`` reads, by extension.
PROMPT_FORMATS = {
    ".txt": "one prompt a line",
    ".jsonl": "one JSON object a line with a 'prompt' field, the other fields its metadata "
              "(Flow-GRPO's GenEval *_metadata.jsonl as is)",
    ".json": "a list of prompt strings or of such objects",
    ".csv": "a header with a 'prompt' column, the other columns metadata",
}
Metadata = dict[str, Any]

#: The longest prompt accepted, in characters. Text encoders read at most 77 (CLIP) or 512 (T5)
#: tokens, about 300 and 2,500 characters of English; a prompt 4x past T5's window is not a prompt
#: but a file read wrongly (a binary or a whole document on one line), and would be cut silently.
MAX_PROMPT_CHARS = 10_000


@dataclass
class PromptBatch:
    """A training batch: P prompts and, when the prompt set has metadata, one dict per prompt."""

    prompts: list[str]
    metadata: list[Metadata] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


class PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[str], metadata: Sequence[Metadata] | None = None) -> None:
        self.prompts = list(prompts)
        self.metadata = None if metadata is None else list(metadata)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[str, Metadata | None]:
        return self.prompts[i], None if self.metadata is None else self.metadata[i]


def _collate(batch: list[tuple[str, Metadata | None]]) -> PromptBatch:
    prompts = [p for p, _ in batch]
    metadata = [m for _, m in batch]
    return PromptBatch(prompts, None if all(m is None for m in metadata) else metadata)


def _item(obj: Any, where: str) -> tuple[str, Metadata]:
    """One prompt item: a string, or an object with a string ``prompt`` (the rest is metadata)."""
    if isinstance(obj, str):
        return obj, {}
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: expected an object with a string 'prompt' field, got {got}")
    meta = {k: v for k, v in obj.items() if k != "prompt"}
    return obj["prompt"], meta


def _read_prompt_file(path: str) -> list[tuple[str, Metadata]]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPT_FORMATS:
        accepted = "; ".join(f"{k} ({v})" for k, v in PROMPT_FORMATS.items())
        raise ValueError(f"prompts file {path!r}: unsupported format {ext or '(no extension)'!r}; accepted: {accepted}")
    try:
        with open(path, encoding="utf-8", newline="" if ext == ".csv" else None) as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if ext == ".txt":
        return [(line.strip(), {}) for line in text.splitlines() if line.strip()]
    if ext == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            items.append(_item(obj, f"{path}:{n}"))
        return items
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts or objects, got {type(data).__name__}")
        return [_item(obj, f"{path}: item {i}") for i, obj in enumerate(data)]
    # .csv: every value is a string (CSV has no types); empty cells are left out of the metadata
    rows = csv.DictReader(io.StringIO(text))  # quoted cells may span lines
    if rows.fieldnames is None or "prompt" not in rows.fieldnames:
        raise ValueError(f"{path}: expected a header with a 'prompt' column, got {rows.fieldnames}")
    return [(r["prompt"].strip(), {k: v for k, v in r.items() if k != "prompt" and k is not None and v not in ("", None)})
            for r in rows if (r["prompt"] or "").strip()]


def load_prompt_set(prompts: Sequence[str | Metadata] | str) -> tuple[list[str], list[Metadata] | None]:
    """(prompts, metadata or None): from a list (strings, or objects with a 'prompt' field), a
    built-in set name, or a file in one of ``PROMPT_FORMATS``. Metadata is None when no item has any.

    The built-in ``shapes`` sets carry each prompt's parsed attributes (count, colour, shape,
    position), so the shapes reward reads them instead of parsing the text.
    """
    if not isinstance(prompts, str):
        items = [_item(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    elif prompts in ("shapes", "shapes_heldout"):  # the procedural task's train / held-out prompts
        from .tasks.shapes import ShapeSpec, shapes_prompts

        texts = shapes_prompts("train" if prompts == "shapes" else "heldout", seed=None)
        items = [(t, ShapeSpec.parse(t).metadata()) for t in texts]
    elif prompts in PROMPT_SETS:
        items = [(p, {}) for p in PROMPT_SETS[prompts]]
    elif os.path.isfile(prompts):
        items = _read_prompt_file(prompts)
    else:
        raise FileNotFoundError(f"prompts={prompts!r} is neither a built-in set "
                                f"{sorted(PROMPT_SETS) + ['shapes', 'shapes_heldout']} "
                                f"nor an existing file ({', '.join(PROMPT_FORMATS)})")
    if not items:
        raise ValueError(f"prompts={prompts!r} gives no prompts")
    texts = [p for p, _ in items]
    check_prompt_texts(texts, prompts if isinstance(prompts, str) else "prompts")
    metadata = [m for _, m in items]
    return texts, (metadata if any(metadata) else None)


def check_prompt_texts(texts: Sequence[str], source: str) -> None:
    """Refuse (one line naming ``source`` and the prompt's index) a prompt with a NUL byte or longer
    than ``MAX_PROMPT_CHARS``: signs of a binary or wrongly read file, not of a prompt. Duplicated
    prompts are allowed (a weighted prompt set repeats prompts on purpose) but reported once."""
    for i, text in enumerate(texts):
        if "\x00" in text:
            raise ValueError(f"prompts {source!r}: prompt {i} holds a NUL byte: is this a binary file?")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts {source!r}: prompt {i} is {len(text):,} characters long (at most "
                             f"{MAX_PROMPT_CHARS:,}: text encoders read 77 or 512 tokens)")
    repeats = len(texts) - len(set(texts))
    if repeats:
        counts: dict[str, int] = {}
        for text in texts:
            counts[text] = counts.get(text, 0) + 1
        text, n = max(counts.items(), key=lambda kv: kv[1])
        warnings.warn(f"prompts {source!r}: {repeats} of {len(texts)} prompts are duplicates (e.g. "
                      f"{text[:60]!r} {n} times); each copy is sampled as often as any other prompt",
                      stacklevel=3)


def load_prompts(prompts: Sequence[str | Metadata] | str) -> list[str]:
    """The prompt strings of ``load_prompt_set`` (without metadata)."""
    return load_prompt_set(prompts)[0]


def validate_prompt_set(rewards: Sequence[Any], prompts: Sequence[str],
                        metadata: Sequence[Metadata] | None, what: str) -> None:
    """Let each reward that declares ``validate_prompts`` refuse prompts it cannot score (one line)."""
    for reward in rewards:
        check = getattr(reward, "validate_prompts", None)
        if check is not None:
            try:
                check(prompts, metadata)
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from None


class ResumableShuffleSampler(DistributedSampler):
    """A fresh permutation per epoch from (seed, epoch), sharded by batch, with a one-shot skip.

    Epoch e's order is ``randperm(num_items)`` from ``mix_seed(seed, e)``. With ``batch_size`` P and
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

    def skip_next(self, items: int) -> None:
        """Drop the first ``items`` of the next iteration only (resuming mid-epoch)."""
        self.skip = int(items)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() != self.num_replicas:
            raise RuntimeError(
                f"ResumableShuffleSampler was built for {self.num_replicas} rank(s) but the process group "
                f"has {dist.get_world_size()}: build it in train_dataloader() from trainer.world_size "
                f"and trainer.global_rank (PromptDataModule does)")
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=gen)  # [N]
        P, W = self.batch_size, self.num_replicas
        mine = order[: self.num_batches * P * W].view(self.num_batches, W, P)[:, self.rank]  # [nb, P]
        skip, self.skip = self.skip, 0
        return iter(mine.flatten().tolist()[skip:])


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
        sampler.skip_next(state["batches_done"] * self.batch_size)


class PromptDataModule(pl.LightningDataModule):
    """Shuffled training prompts, ``prompts_per_step`` per rollout and rank; held-out prompt sets.

    Args:
        prompts: a built-in set name, a prompt file (``PROMPT_FORMATS``: .txt, .jsonl, .json,
            .csv) or a list of strings or of objects with a ``prompt`` field (the rest is metadata).
        prompts_per_step: P, prompts per rollout on each rank (each becomes a group); the global
            batch is P x the number of ranks.
        seed: shuffling seed (data order is part of a resumable run).
        num_workers: DataLoader worker processes (prompts are cheap: 0, the main process, is enough).
        val_prompts: held-out prompts scored by ``validate`` and during fit (set name, file or
            list; None: no validation).
        test_prompts: the prompts of ``test`` (None: no test set).
        eval_images_per_prompt: images per held-out prompt.
        eval_seed: fixes the noise of every held-out image (same images for the same weights).
        eval_batch_size: held-out images per sampling batch (per rank); does not change results.
        predict_prompts: the prompts of ``predict`` (set name, file or list; None: ``val_prompts``).
        predict_images_per_prompt: images per prompt in ``predict`` (None: ``eval_images_per_prompt``);
            image j of prompt i has the seed it has in evaluation.
    """

    def __init__(self, prompts: list[str | dict[str, Any]] | str = "animals", prompts_per_step: int = 2,
                 seed: int = 0, num_workers: int = 0,
                 val_prompts: list[str | dict[str, Any]] | str | None = None,
                 test_prompts: list[str | dict[str, Any]] | str | None = None, eval_images_per_prompt: int = 2,
                 eval_seed: int = 2024, eval_batch_size: int = 8,
                 predict_prompts: list[str | dict[str, Any]] | str | None = None,
                 predict_images_per_prompt: int | None = None) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.prompts, self.metadata = load_prompt_set(prompts)
        if prompts_per_step > len(self.prompts):
            raise ValueError(f"prompts_per_step={prompts_per_step} exceeds the {len(self.prompts)} prompts given")
        if eval_images_per_prompt < 1:
            raise ValueError(f"eval_images_per_prompt must be >= 1, got {eval_images_per_prompt}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.num_workers = num_workers
        self.val_prompts, self.val_metadata = (None, None) if val_prompts is None else load_prompt_set(val_prompts)
        self.test_prompts, self.test_metadata = (None, None) if test_prompts is None else load_prompt_set(test_prompts)
        if predict_images_per_prompt is not None and predict_images_per_prompt < 1:
            raise ValueError(f"predict_images_per_prompt must be >= 1, got {predict_images_per_prompt}")
        self.predict_prompts, self.predict_metadata = ((None, None) if predict_prompts is None
                                                       else load_prompt_set(predict_prompts))
        self.predict_images_per_prompt = predict_images_per_prompt or eval_images_per_prompt
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
        return ResumableDataLoader(PromptDataset(self.prompts, self.metadata), batch_size=self.prompts_per_step,
                                   sampler=sampler, drop_last=True, collate_fn=_collate,
                                   num_workers=self.num_workers, progress=self._progress)

    def validate_prompts(self, rewards: Sequence[Any]) -> None:
        """Every prompt set through each reward's ``validate_prompts`` (the module calls this in
        ``setup``, before any weights load)."""
        for what, prompts, metadata in (("data.prompts", self.prompts, self.metadata),
                                        ("data.val_prompts", self.val_prompts, self.val_metadata),
                                        ("data.test_prompts", self.test_prompts, self.test_metadata),
                                        ("data.predict_prompts", self.predict_prompts, self.predict_metadata)):
            if prompts is not None:
                validate_prompt_set(rewards, prompts, metadata, what)

    def _eval_loader(self, prompts: list[str] | None, metadata: list[Metadata] | None,
                     stage: str) -> DataLoader | list:
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
        return eval_loader(prompts, self.eval_images_per_prompt, self.eval_seed, self.eval_batch_size,
                           rank=rank, world_size=world_size, num_workers=self.num_workers,
                           metadata=metadata)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_prompts, self.val_metadata, "validate")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_prompts, self.test_metadata, "test")

    def predict_set(self) -> tuple[list[str], list[Metadata] | None]:
        """(prompts, metadata) of ``predict``: ``predict_prompts``, else the held-out ``val_prompts``."""
        if self.predict_prompts is not None:
            return self.predict_prompts, self.predict_metadata
        if self.val_prompts is not None:
            return self.val_prompts, self.val_metadata
        raise ValueError("`predict` needs prompts: set data.predict_prompts (a set name, a prompt file or a list) "
                         "or data.val_prompts")

    def predict_dataloader(self) -> DataLoader:
        """The evaluation's items (same seeds: ``eval_seed``) of the predict prompts, sharded over ranks."""
        prompts, metadata = self.predict_set()
        rank, world_size = self._rank_world()
        return eval_loader(prompts, self.predict_images_per_prompt, self.eval_seed, self.eval_batch_size,
                           rank=rank, world_size=world_size, num_workers=self.num_workers, metadata=metadata)
