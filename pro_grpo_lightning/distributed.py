"""The few cross-rank reductions Pro-GRPO needs under DDP (and nothing when running alone).

Groups never span ranks (expand-and-prune is local), so the hot path has no collectives. What is
reduced, and why:
  - reward normalisation statistics ("batch"/"running" modes) over the global batch, so the mix
    of several rewards is the one a single process with the same global batch would use;
  - the global advantage std (``advantages.std: global``, in the module);
  - logged metrics, once per rollout in two collectives: means over ranks (equal batch sizes, so
    the global mean), sums for counts, max/min for extremes;
  - evaluation tables, gathered once per evaluation (ranks may hold different numbers of items;
    torchmetrics' ``gather_all_tensors``). The held-out means are taken from the gathered rows, which
    the table needs anyway, rather than by a ``MeanMetric`` (a second collective for the same numbers);
    the rollout metrics are reduced together in two collectives rather than one per metric.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from .rewards.combine import RewardSet


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order ([W * B, ...])."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate [n_r, C] tensors of all ranks, in rank order, when n_r may differ (torchmetrics'
    ``gather_all_tensors`` pads to the longest, gathers and trims)."""
    _, size = world()
    if size == 1:
        return rows
    return torch.cat(gather_all_tensors(rows))  # [sum n_r, C]


def reduce_metrics(means: dict[str, float | Tensor], sums: dict[str, float | Tensor] | None = None,
                   maxes: dict[str, float | Tensor] | None = None,
                   mins: dict[str, float | Tensor] | None = None,
                   device: torch.device | None = None) -> dict[str, Tensor]:
    """Every metric reduced over ranks in two collectives; plain float32 scalars when alone.

    Every rank must pass the same keys in the same order (they do: ranks run the same schedule).
    """
    sums, maxes, mins = sums or {}, maxes or {}, mins or {}
    _, size = world()

    def stack(d: dict[str, float | Tensor], sign: float = 1.0) -> Tensor:
        return torch.stack([sign * torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                            for v in d.values()]) if d else torch.zeros(0, device=device)

    add = torch.cat([stack(means), stack(sums)])  # [n_mean + n_sum]
    top = torch.cat([stack(maxes), stack(mins, -1.0)])  # [n_max + n_min]
    if size > 1:
        dist.all_reduce(add, op=dist.ReduceOp.SUM)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        add[: len(means)] /= size
    out: dict[str, Tensor] = {}
    values = list(add) + list(top[: len(maxes)]) + list(-top[len(maxes):])
    for k, v in zip([*means, *sums, *maxes, *mins], values):
        out[k] = v
    return out


class RankSyncedRewardSet(RewardSet):
    """``RewardSet`` whose "batch"/"running" statistics come from the global batch under DDP.

    The scores of all ranks are gathered (a [W * B, n] tensor), normalised exactly as one process
    would normalise the global batch, and each rank keeps its rows; the running statistics are
    therefore identical on every rank. Alone, or in "none" mode, it is ``RewardSet``. Every call
    is a collective: ranks call it in lockstep (the rollout does: same schedule everywhere).
    """

    def _normalize(self, scores: Tensor, update_stats: bool) -> Tensor:
        rank, size = world()
        if self.normalize == "none" or size == 1:
            return super()._normalize(scores, update_stats)
        full = super()._normalize(all_gather_cat(scores), update_stats)  # [W*B, n]
        B = scores.shape[0]
        return full[rank * B:(rank + 1) * B]

