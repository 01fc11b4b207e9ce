"""Per-group subset selection: which k of each group's G trajectories to keep, all groups at once.

Rules (``SELECTION_RULES``):
    "ovf":      Optimal Variance Filtering (Pro-GRPO paper): the k-subset of largest reward variance.
    "random":   a uniform k-subset per group (the paper's random-k ablation).
    "topk":     the k highest scores.
    "extremes": ceil(k/2) highest + floor(k/2) lowest (DanceGRPO's best-of-N: top 4 + bottom 4 of 24).
    "none":     the first k indices; needs no scores.

Every rule returns long indices ``[P, k]``, ascending within each group, so survivors keep their
original relative order. Ties are broken by one convention everywhere: trajectories are ordered
by (score, original index) ascending (a stable sort), "lowest" is the head of that order and
"highest" its tail, so among equal scores the later index counts as higher.
"""

from __future__ import annotations

import torch
from torch import Tensor

SELECTION_RULES = ("ovf", "random", "topk", "extremes", "none")


def _check_k(k: int, group_size: int) -> None:
    if not 1 <= k <= group_size:
        raise ValueError(f"selection: need 1 <= k <= G, got k={k} with G={group_size} trajectories per group")


def _check_scores(scores: Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"selection: scores must be [P, G], got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("selection: scores contain NaN or inf; check the reward model's output")


def ovf_indices(scores: Tensor, k: int) -> Tensor:
    """Optimal Variance Filtering: per group, the indices of the k-subset of largest variance.

    scores: [P, G]. Returns long [P, k], ascending within each group.

    Exact in O(G log G) per group: for scalars the maximum-variance k-subset is always the i lowest
    plus the k-i highest for some i in 0..k (a known max-variance down-sampling result, cited in
    ALGORITHM.md section 2; tests/test_selection.py checks it by brute force). So sort each group
    once and score all k+1 splits with prefix sums of x and x^2, vectorised over groups and splits.
    Arithmetic is float64, on values centred by the group median, to keep ``k*sum(x^2) - sum(x)^2``
    free of cancellation. Splits whose variance ties the best within float64 rounding count as tied;
    ties go to the smallest i (fewest lowest), so all-equal scores keep the last k indices.
    """
    _check_scores(scores)
    num_groups, group_size = scores.shape
    _check_k(k, group_size)
    x = scores.to(torch.float64)  # [P, G]
    x_sorted, order = torch.sort(x, dim=1, stable=True)  # [P, G], [P, G]
    # Centre by the median: exact zeros for constant groups, small magnitudes otherwise.
    x_sorted = x_sorted - x_sorted[:, group_size // 2 : group_size // 2 + 1]  # [P, G]
    zero = x_sorted.new_zeros(num_groups, 1)  # [P, 1]
    csum = torch.cat([zero, x_sorted.cumsum(1)], dim=1)  # [P, G+1]
    csum2 = torch.cat([zero, (x_sorted**2).cumsum(1)], dim=1)  # [P, G+1]

    i = torch.arange(k + 1, device=scores.device)  # [k+1] number taken from the bottom
    hi_start = group_size - k + i  # [k+1] the top k-i are sorted positions hi_start..G-1
    s1 = csum[:, i] + csum[:, -1:] - csum[:, hi_start]  # [P, k+1] sum of the split's values
    s2 = csum2[:, i] + csum2[:, -1:] - csum2[:, hi_start]  # [P, k+1] sum of their squares
    spread = k * s2 - s1**2  # [P, k+1] = k^2 * population variance

    # Rounding bound for k*s2 - s1^2 (each O(k * eps * k * max x^2)); splits within it are ties.
    max_sq = (x_sorted**2).amax(dim=1, keepdim=True)  # [P, 1]
    tol = 4 * (k + 1) * k * torch.finfo(torch.float64).eps * max_sq  # [P, 1]
    is_best = spread >= spread.amax(dim=1, keepdim=True) - tol  # [P, k+1]
    best_i = torch.where(is_best, i, k + 1).amin(dim=1, keepdim=True)  # [P, 1] smallest tied i

    j = torch.arange(k, device=scores.device)  # [k] slot in the kept subset
    # Slot j < i takes sorted position j (bottom); slot j >= i takes position G-k+j (top).
    pos = torch.where(j < best_i, j, group_size - k + j)  # [P, k]
    return torch.gather(order, 1, pos).sort(dim=1).values  # [P, k]


def select_indices(scores: Tensor | None, k: int, rule: str, *, group_size: int | None = None,
                   num_groups: int | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """Pick k of each group's G trajectories by ``rule``; returns long [P, k], ascending per group.

    scores: [P, G] (proxy or true rewards). Required for "ovf", "topk" and "extremes"; for
    "random" and "none" it may be None, then P and G come from ``num_groups`` and ``group_size``
    (and the device from ``device``, default cpu). Given both, they must agree.
    generator: seeds the "random" rule (it must live on the output device).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"select_indices: unknown rule {rule!r}; choose one of {SELECTION_RULES}")
    if scores is not None:
        _check_scores(scores)
        if (num_groups is not None and num_groups != scores.shape[0]) or (
            group_size is not None and group_size != scores.shape[1]
        ):
            raise ValueError(f"select_indices: scores have shape {tuple(scores.shape)} but "
                             f"num_groups={num_groups}, group_size={group_size}")
        num_groups, group_size = scores.shape
        device = scores.device
    elif rule in ("ovf", "topk", "extremes"):
        raise ValueError(f"select_indices: rule {rule!r} needs scores")
    elif num_groups is None or group_size is None:
        raise ValueError(f"select_indices: rule {rule!r} without scores needs num_groups and group_size")
    _check_k(k, group_size)
    device = torch.device("cpu") if device is None else device

    if rule == "ovf":
        return ovf_indices(scores, k)
    if rule == "none":
        return torch.arange(k, device=device).expand(num_groups, k).clone()  # [P, k]
    if rule == "random":
        # argsort of iid uniforms is a uniform random permutation; its first k a uniform k-subset.
        noise = torch.rand(num_groups, group_size, generator=generator, device=device)  # [P, G]
        return noise.argsort(dim=1, stable=True)[:, :k].sort(dim=1).values  # [P, k]
    order = torch.sort(scores, dim=1, stable=True).indices  # [P, G] by (score, index) ascending
    n_low = 0 if rule == "topk" else k // 2  # "extremes": floor(k/2) lowest, ceil(k/2) highest
    picked = torch.cat([order[:, :n_low], order[:, group_size - (k - n_low):]], dim=1)  # [P, k]
    return picked.sort(dim=1).values  # [P, k]


def flat_indices(local: Tensor, group_size: int) -> Tensor:
    """Local indices [P, k] of a group-major batch of P*group_size rows -> flat row indices [P*k].

    Row of trajectory g in group p is ``p * group_size + g``; the result stays group-major, so
    ``batch[flat_indices(idx, G)]`` is again a group-major batch of P groups of k.
    """
    if local.ndim != 2:
        raise ValueError(f"flat_indices: local must be [P, k], got shape {tuple(local.shape)}")
    offsets = torch.arange(local.shape[0], device=local.device).unsqueeze(1) * group_size  # [P, 1]
    return (offsets + local).reshape(-1)  # [P*k]
