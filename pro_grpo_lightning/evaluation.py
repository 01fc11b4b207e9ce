"""Held-out evaluation: one path from prompts to a table, used by validation, test and the shapes task.

    items    every (prompt, image) pair of a held-out set, image j of prompt i seeded
             ``mix_seed(eval_seed, i, j)`` (``EvalItems``), sharded over ranks without padding
             (``ShardedSequentialSampler``) and batched by ``collate_items``;
    sample   ``sample_items``: the policy's own T stochastic steps, each item's initial latent and
             step noise drawn from its own seeded generator, so an image depends on its seed and
             the weights only, never on the batch size, the rank count or the training RNG;
    score    ``eval_scores``: the raw (never normalised) training rewards, their weighted sum
             ("total") and the evaluation-only rewards, one row per item;
    gather   ``gather_items``: every rank's rows, in (prompt, image) order whatever the sharding;
    write    ``write_eval_table``: ``<root>/eval/<stage>_step<N>.csv`` (one row per image) and
             ``.md`` (mean per prompt).

``ProGRPOModule``'s ``validation_step`` / ``test_step`` / ``predict_step`` (``eval_batch``) and
``tasks.shapes_eval.evaluate_shapes`` all sample through ``sample_items``, so "held-out score"
means one thing everywhere. At an epoch's end ``finish_eval`` gathers, logs and writes; the
training loop asks for a stop on its last batch (``final_batch``) so that Lightning evaluates the
final weights too.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .backends.base import DiffusionBackend
from .distributed import gather_rows
from .logs import log_eval
from .noise import mix_seed
from .rewards.base import Reward
from .rewards.combine import RewardSet
from .rollout import chunked
from .steps import draw_noise

#: The evaluation column holding the weighted sum of the raw training rewards.
EVAL_TOTAL = "total"


# ---- items ---------------------------------------------------------------------------------------
class EvalItems(Dataset):
    """(prompt, image) pairs of a held-out set; each carries its own noise seed.

    Item (i, j) is image j of prompt i, seeded ``mix_seed(eval_seed, i, j)``: its image depends on
    nothing else (batch size, rank count, training RNG).
    """

    def __init__(self, prompts: Sequence[str], images_per_prompt: int, eval_seed: int,
                 metadata: Sequence[dict] | None = None) -> None:
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        self.prompts = list(prompts)
        self.metadata = None if metadata is None else list(metadata)
        self.images_per_prompt = images_per_prompt
        self.seeds = [[mix_seed(eval_seed, i, j) for j in range(images_per_prompt)]
                      for i in range(len(self.prompts))]

    def __len__(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = divmod(k, self.images_per_prompt)
        return {"prompt": self.prompts[i], "prompt_index": i, "image_index": j, "seed": self.seeds[i][j],
                "metadata": None if self.metadata is None else self.metadata[i]}


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

    def __iter__(self):
        return iter(range(self.rank, self.num_items, self.num_replicas))


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of ``EvalItems``: prompts, metadata (None when the set has none) and seeds as lists,
    indices as [B] long tensors."""
    metadata = [it.get("metadata") for it in items]
    return {"prompts": [it["prompt"] for it in items],
            "metadata": None if all(m is None for m in metadata) else metadata,
            "prompt_index": torch.tensor([it["prompt_index"] for it in items], dtype=torch.long),
            "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
            "seeds": [it["seed"] for it in items]}


def eval_loader(prompts: Sequence[str], images_per_prompt: int, eval_seed: int, batch_size: int,
                rank: int = 0, world_size: int = 1, num_workers: int = 0,
                metadata: Sequence[dict] | None = None) -> DataLoader:
    """The held-out items of ``prompts`` (and their ``metadata``), this rank's share, ``batch_size`` per batch."""
    items = EvalItems(prompts, images_per_prompt, eval_seed, metadata)
    return DataLoader(items, batch_size=batch_size, collate_fn=collate_items,
                      sampler=ShardedSequentialSampler(len(items), world_size, rank), num_workers=num_workers)


# ---- sampling ------------------------------------------------------------------------------------
@torch.no_grad()
def sample_items(backend: DiffusionBackend, prompts: Sequence[str], seeds: Sequence[int],
                 sample_batch_size: int | None = None) -> Tensor:
    """One image per (prompt, seed) from the current policy: [B, 3, H, W] in [0, 1].

    Item i's initial latent and step noise come from its own generator seeded ``seeds[i]``, so an
    image depends on its seed only, not on the batch it is drawn in. Not the training hot path:
    the per-item draws are B small ``randn`` calls per step next to one batched denoiser call.
    ``sample_batch_size``: rows per denoiser / decode call (``RolloutSettings``; None: all).
    """
    device = backend.device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    cond = backend.encode_prompts(list(prompts))
    x = torch.cat([backend.initial_latents(1, g) for g in gens])  # [B, *latent]
    B = x.shape[0]
    for t in range(backend.num_steps):
        noise = torch.cat([draw_noise((1, *x.shape[1:]), x.device, g) for g in gens])  # [B, *latent]
        idx = torch.full((B,), t, device=x.device, dtype=torch.long)  # [B]
        x = chunked(lambda *a: backend.step(*a[:3], noise=a[3]).next_latents, B, sample_batch_size,
                    x, idx, cond, noise)  # [B, *latent]
    return chunked(backend.decode, B, sample_batch_size, x)  # [B, 3, H, W]


# ---- scoring -------------------------------------------------------------------------------------
def eval_columns(rewards: RewardSet, eval_rewards: Sequence[Reward] = ()) -> list[str]:
    """The score columns, in ``eval_scores``' order: "total", the training rewards, the eval rewards."""
    names = [EVAL_TOTAL, *rewards.names, *(r.name for r in eval_rewards)]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"eval_rewards {clash} share a name with a training reward (or the column "
                         f"{EVAL_TOTAL!r}): give them another `name`")
    return names


@torch.no_grad()
def eval_scores(rewards: RewardSet, eval_rewards: Sequence[Reward], images: Tensor,
                prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> dict[str, Tensor]:
    """The weighted sum of the raw training rewards ("total"), then every training and
    evaluation reward's raw score, each [B] (the order of ``eval_columns``).

    Raw, not normalised: an item's score must not depend on what else is evaluated with it.
    """
    scores = {r.name: r(images, prompts, metadata) for r in rewards.rewards}  # each [B]
    total = sum(w * scores[n] for n, w in zip(rewards.names, rewards.weights))
    scores = {EVAL_TOTAL: total, **scores}
    scores.update({r.name: r(images, prompts, metadata) for r in eval_rewards})
    return scores


def item_rows(batch: dict[str, Any], scores: dict[str, Tensor], device: torch.device) -> Tensor:
    """[B, 2 + S] float rows of one batch: prompt index, image index, then the scores."""
    cols = [batch["prompt_index"].to(device).float(), batch["image_index"].to(device).float()]
    return torch.stack(cols + [v.float().to(device) for v in scores.values()], 1)  # [B, 2 + S]


def gather_items(rows: Sequence[Tensor], num_scores: int, device: torch.device) -> Tensor:
    """Every rank's item rows [N, 2 + S], sorted by (prompt, image) whatever the sharding.

    A collective under DDP: every rank calls it, with its own (possibly empty) list of batches.
    """
    local = torch.cat(list(rows)) if rows else torch.zeros(0, 2 + num_scores, device=device)  # [n_r, 2 + S]
    out = gather_rows(local)  # [N, 2 + S]
    out = out[torch.argsort(out[:, 1], stable=True)]  # by image, then stably by prompt:
    return out[torch.argsort(out[:, 0], stable=True)]  # (prompt, image) order


def text_scores(module: Any, images: Tensor, prompts: list[str]) -> list[float] | None:
    """The weighted total of the raw training rewards of ``images`` (one per prompt, no metadata:
    the logged sample grid's captions), or None when a reward cannot score a prompt from its text
    alone (``Reward.validate_prompts``)."""
    try:
        for reward in module.rewards.rewards:
            reward.validate_prompts(prompts, None)
    except ValueError:
        return None
    return eval_scores(module.rewards, [], images.to(module.device), prompts)[EVAL_TOTAL].float().cpu().tolist()


# ---- tables --------------------------------------------------------------------------------------
def write_eval_table(stage: str, step: int, rows: Tensor, names: Sequence[str],
                     prompts: Sequence[str] | None, root: str, metadata: Sequence[dict] | None = None) -> str:
    """``<root>/eval/<stage>_step<N>.csv`` (one row per image; a ``metadata`` JSON column when
    the prompt set has metadata) and ``.md`` (mean per prompt).

    rows: [N, 2 + S] from ``gather_items``; names: the S score columns. Returns the path without
    extension.
    """
    out_dir = os.path.join(root, "eval")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{stage}_step{step:06d}")
    return write_score_table(base, f"{stage} at step {step}", rows, names, prompts, metadata)


def write_score_table(base: str, title: str, rows: Tensor, names: Sequence[str], prompts: Sequence[str] | None,
                      metadata: Sequence[dict] | None = None) -> str:
    """``<base>.csv`` (one row per image) and ``<base>.md`` (``# <title>``, mean per prompt); returns ``base``."""
    data = rows.cpu().tolist()
    text = (lambda i: prompts[i]) if prompts is not None else (lambda i: str(i))
    with open(base + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        meta = [] if metadata is None else ["metadata"]
        w.writerow(["prompt_index", "prompt", *meta, "image_index", *names])
        for row in data:
            i = int(row[0])
            meta = [] if metadata is None else [json.dumps(metadata[i], sort_keys=True)]
            w.writerow([i, text(i), *meta, int(row[1]), *(f"{v:.6g}" for v in row[2:])])
    by_prompt: dict[int, list[list[float]]] = {}
    for row in data:
        by_prompt.setdefault(int(row[0]), []).append(row[2:])
    lines = [f"# {title} ({len(data)} images, "
             f"{len(by_prompt)} prompts)", "", "| prompt | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for i, vals in sorted(by_prompt.items()):
        col_means = [sum(c) / len(c) for c in zip(*vals)]
        lines.append(f"| {text(i)} | " + " | ".join(f"{v:.4f}" for v in col_means) + " |")
    overall = rows[:, 2:].mean(0).tolist()
    lines.append("| **mean** | " + " | ".join(f"**{v:.4f}**" for v in overall) + " |")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return base


# ---- the LightningModule's evaluation hooks ------------------------------------------------------
def eval_batch(module: Any, batch: dict[str, Any], sample_batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """One batch of items (``collate_items``) sampled and scored with ``module``'s policy and rewards:
    images [B, 3, H, W] and item rows [B, 2 + S] (``item_rows``, columns ``module.eval_names``)."""
    module.configure_model()
    images = sample_items(module.backend, batch["prompts"], batch["seeds"], sample_batch_size)  # [B, 3, H, W]
    scores = eval_scores(module.rewards, module.eval_rewards, images, batch["prompts"], batch.get("metadata"))
    return images, item_rows(batch, scores, module.device)  # [B, 3, H, W], [B, 2 + S]


def finish_eval(module: Any, stage: str, rows: Sequence[Tensor], images: list[tuple[Tensor, Tensor]]) -> float | None:
    """The end of an evaluation epoch of ``stage`` ("val", "test", "val_ema"...): gather every
    rank's item ``rows``, log the means as ``<stage>/<column>``, and on rank 0 write the table and
    log the image grid (``images``: per batch, the first image of each prompt and its item row), at
    ``module.trained_steps()``. Returns the held-out total (None when nothing was scored).

    A collective under DDP: every rank calls it, with its own (possibly empty) batches.
    """
    trainer, names = module.trainer, module.eval_names
    rows = gather_items(rows, len(names), module.device)  # [N, 2 + S], every rank
    dataloaders = trainer.val_dataloaders if stage.startswith("val") else trainer.test_dataloaders
    dataset = getattr(dataloaders, "dataset", None)
    # A sanity check over the *whole* held-out set (``num_sanity_val_steps: -1``) is the
    # evaluation of the starting policy: log it, so curves start at the baseline. A partial
    # one (Lightning's default, 2 batches) is not a score of anything: dropped.
    starting_point = (trainer.sanity_checking and dataset is not None
                      and rows.shape[0] == len(dataset) > 0)
    if rows.shape[0] == 0 or (trainer.sanity_checking and not starting_point):
        return None
    root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank
    means = rows[:, 2:].mean(0)  # [S]
    metrics = {f"{stage}/{n}": means[i] for i, n in enumerate(names)}
    fitting = trainer.state.fn == "fit"
    if not starting_point:  # for callbacks (checkpoint monitor, progress bar) and the return value of
        # trainer.validate/test. During fit not for the loggers: Lightning would log them at the
        # training batch counter, one behind the trained step, so logs.log_eval logs them instead.
        module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=rows.shape[0], logger=not fitting)
    total = float(means[names.index(EVAL_TOTAL)])
    if stage.startswith("val") and hasattr(module, "record_held_out"):  # for the export's model card
        module.record_held_out(stage, module.trained_steps(), {n: float(means[i]) for i, n in enumerate(names)})
    if module.global_rank != 0:
        return total
    write_eval_table(stage, module.trained_steps(), rows, names, getattr(dataset, "prompts", None), root,
                     getattr(dataset, "metadata", None))
    log_eval(module, stage, metrics, images, module.trained_steps(), f"{stage}/{EVAL_TOTAL}",
             scalars=fitting or starting_point, prompts=getattr(dataset, "prompts", None))
    return total


def final_batch(trainer: Any, batch_idx: int) -> bool:
    """Whether training batch ``batch_idx`` is the run's last: ``max_steps`` optimizer steps done,
    or the last batch of the last of ``max_epochs``. Asking for a stop there makes Lightning run
    the validation loop once more (its "stop requested" rule), so the final weights are evaluated
    too; without held-out prompts that loop is empty and costs nothing."""
    last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                  and trainer.current_epoch + 1 >= trainer.max_epochs
                  and batch_idx + 1 >= trainer.num_training_batches)
    return last_step or last_epoch
