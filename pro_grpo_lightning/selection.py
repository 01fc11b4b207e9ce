"""Per-group subset selection: which k of each group's G trajectories to keep, all groups at once.

Rules (``SELECTION_RULES``):
    "ovf":      Optimal Variance Filtering (Pro-GRPO paper): the k-subset of largest reward variance.
    "random":   a uniform k-subset per group (the paper's random-k ablation).
    "topk":     the k highest scores.
    "extremes": ceil(k/2) highest + floor(k/2) lowest (DanceGRPO's best-of-N: top 4 + bottom 4 of 24).
    "none":     the first k indices; needs no scores.

Every rule returns long indices ``[P, k]``, ascending within each group, so survivors keep their
original relative order. Non-finite scores (a reward that returned NaN or inf) are never selected
over finite ones: every rule chooses among the finite scores of a group, and only a group with
fewer than k finite scores keeps some non-finite ones (the lowest indices among them).
Ties are broken by one convention everywhere: trajectories are ordered by (score, original index)
ascending (a stable sort), "lowest" is the head of that order and "highest" its tail, so among
equal scores the later index counts as higher.
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


def _finite_first(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort each group with non-finite scores last: (sorted key [P, G], order [P, G],
    finite-in-sorted-order [P, G] bool, n_eff [P, 1]). The candidates of a group are its first
    ``n_eff = max(n_finite, k)`` sorted positions: all its finite scores (then, only if fewer than
    k, the non-finite ones in index order)."""
    valid = torch.isfinite(scores) if scores.is_floating_point() else torch.ones_like(scores, dtype=torch.bool)
    key = scores.masked_fill(~valid, float("inf")) if scores.is_floating_point() else scores  # [P, G]
    key_sorted, order = torch.sort(key, dim=1, stable=True)  # [P, G], [P, G]
    valid_sorted = torch.gather(valid, 1, order)  # [P, G]
    n_eff = valid.sum(1, keepdim=True).clamp(min=k)  # [P, 1]
    return key_sorted, order, valid_sorted, n_eff


def _outer_positions(best_i: Tensor, n_eff: Tensor, k: int) -> Tensor:
    """Sorted positions of "the best_i lowest and the k - best_i highest of the first n_eff":
    slot j < best_i takes position j, slot j >= best_i position n_eff - k + j. [P, k]."""
    j = torch.arange(k, device=n_eff.device)  # [k] slot in the kept subset
    return torch.where(j < best_i, j, n_eff - k + j)  # [P, k]


def ovf_indices(scores: Tensor, k: int) -> Tensor:
    """Optimal Variance Filtering: per group, the indices of the k-subset of largest variance.

    scores: [P, G]. Returns long [P, k], ascending within each group.

    Exact in O(G log G) per group: for scalars the maximum-variance k-subset is always the i lowest
    plus the k-i highest for some i in 0..k (proved in docs/algorithm.md, section 5;
    tests/test_selection.py checks it by brute force). So sort each group
    once and score all k+1 splits with prefix sums of x and x^2, vectorised over groups and splits.
    Arithmetic is float64, on values centred by the group median, to keep ``k*sum(x^2) - sum(x)^2``
    free of cancellation. Splits whose variance ties the best within float64 rounding count as tied;
    ties go to the smallest i (fewest lowest), so all-equal scores keep the last k indices.
    """
    _check_scores(scores)
    num_groups, group_size = scores.shape
    _check_k(k, group_size)
    x_sorted, order, finite, n_eff = _finite_first(scores.to(torch.float64), k)  # [P, G] x3, [P, 1]
    # Centre by the median of the finite scores: exact zeros for constant groups, small magnitudes
    # otherwise. Non-finite positions count as 0 (they are only candidates when a group has < k).
    n_finite = finite.sum(1, keepdim=True)  # [P, 1]
    centre = torch.gather(x_sorted, 1, (n_finite // 2).clamp(max=group_size - 1))  # [P, 1]
    centre = torch.where(n_finite > 0, centre, torch.zeros_like(centre))  # [P, 1]
    x_sorted = torch.where(finite, x_sorted - centre, torch.zeros_like(x_sorted))  # [P, G]
    zero = x_sorted.new_zeros(num_groups, 1)  # [P, 1]
    csum = torch.cat([zero, x_sorted.cumsum(1)], dim=1)  # [P, G+1]
    csum2 = torch.cat([zero, (x_sorted**2).cumsum(1)], dim=1)  # [P, G+1]

    i = torch.arange(k + 1, device=scores.device)  # [k+1] number taken from the bottom
    hi_start = n_eff - k + i  # [P, k+1] the top k-i are sorted positions hi_start..n_eff-1
    total, total2 = torch.gather(csum, 1, n_eff), torch.gather(csum2, 1, n_eff)  # [P, 1]
    s1 = csum[:, i] + total - torch.gather(csum, 1, hi_start)  # [P, k+1] sum of the split's values
    s2 = csum2[:, i] + total2 - torch.gather(csum2, 1, hi_start)  # [P, k+1] sum of their squares
    spread = k * s2 - s1**2  # [P, k+1] = k^2 * population variance

    # Rounding bound for k*s2 - s1^2 (each O(k * eps * k * max x^2)); splits within it are ties.
    max_sq = (x_sorted**2).amax(dim=1, keepdim=True)  # [P, 1]
    tol = 4 * (k + 1) * k * torch.finfo(torch.float64).eps * max_sq  # [P, 1]
    is_best = spread >= spread.amax(dim=1, keepdim=True) - tol  # [P, k+1]
    best_i = torch.where(is_best, i, k + 1).amin(dim=1, keepdim=True)  # [P, 1] smallest tied i
    pos = _outer_positions(best_i, n_eff, k)  # [P, k]
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
        if scores is not None and scores.is_floating_point():  # finite scores first (uniforms < 2)
            noise = noise.masked_fill(~torch.isfinite(scores), 2.0)  # [P, G]
        return noise.argsort(dim=1, stable=True)[:, :k].sort(dim=1).values  # [P, k]
    # by (score, index) ascending among the finite scores; non-finite ones after them
    _, order, _, n_eff = _finite_first(scores, k)  # [P, G], [P, 1]
    n_low = 0 if rule == "topk" else k // 2  # "extremes": floor(k/2) lowest, ceil(k/2) highest
    best_i = torch.full_like(n_eff, n_low)  # [P, 1]
    return torch.gather(order, 1, _outer_positions(best_i, n_eff, k)).sort(dim=1).values  # [P, k]


def flat_indices(local: Tensor, group_size: int) -> Tensor:
    """Local indices [P, k] of a group-major batch of P*group_size rows -> flat row indices [P*k].

    Row of trajectory g in group p is ``p * group_size + g``; the result stays group-major, so
    ``batch[flat_indices(idx, G)]`` is again a group-major batch of P groups of k.
    """
    if local.ndim != 2:
        raise ValueError(f"flat_indices: local must be [P, k], got shape {tuple(local.shape)}")
    offsets = torch.arange(local.shape[0], device=local.device).unsqueeze(1) * group_size  # [P, 1]
    return (offsets + local).reshape(-1)  # [P*k]
