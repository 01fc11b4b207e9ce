"""Selection rules: OVF against brute force over all k-subsets, tie determinism, each rule's values."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pro_grpo_lightning.selection import SELECTION_RULES, flat_indices, ovf_indices, select_indices


def exact_var(values) -> Fraction:
    """Population variance in exact rational arithmetic (Fraction(float) is exact)."""
    xs = [Fraction(v) for v in values]
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def brute_force(row: list[float], k: int) -> list[tuple[Fraction, tuple[int, ...]]]:
    """Every k-subset with its exact variance, best first."""
    subsets = [(exact_var([row[i] for i in c]), c) for c in itertools.combinations(range(len(row)), k)]
    return sorted(subsets, key=lambda vc: vc[0], reverse=True)


score_values = st.one_of(
    st.floats(-10, 10, allow_subnormal=False, width=32),  # mostly distinct
    st.integers(-3, 3).map(float),  # many ties
)


@st.composite
def groups_and_k(draw):
    num_groups = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 9))
    k = draw(st.integers(1, group_size))
    rows = draw(st.lists(st.lists(score_values, min_size=group_size, max_size=group_size),
                         min_size=num_groups, max_size=num_groups))
    return rows, k


@settings(max_examples=100, deadline=None)
@given(groups_and_k())
def test_ovf_matches_brute_force(data):
    rows, k = data
    scores = torch.tensor(rows, dtype=torch.float64)
    idx = ovf_indices(scores, k)
    assert idx.dtype == torch.long and idx.shape == (len(rows), k)
    assert torch.equal(idx, ovf_indices(scores, k))  # deterministic
    for row, got in zip(rows, idx.tolist()):
        assert got == sorted(set(got)) and all(0 <= i < len(row) for i in got)
        ranked = brute_force(row, k)
        best_var, best_subset = ranked[0]
        achieved = exact_var([row[i] for i in got])
        assert float(best_var - achieved) <= 1e-12 * (1 + float(best_var))
        unique = len(ranked) == 1 or ranked[1][0] < best_var * (1 - Fraction(1, 10**9))
        if unique:
            assert tuple(got) == best_subset


def test_ovf_known_values_and_original_order():
    # {0, 1, 10} (var 20.2) beats {0, 3, 10} (17.6), {2, 3, 10} and {0, 1, 2}.
    assert ovf_indices(torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]), 3).tolist() == [[0, 1, 4]]
    assert ovf_indices(torch.tensor([[10.0, 2.0, 0.0, 3.0, 1.0]]), 3).tolist() == [[0, 2, 4]]
    assert ovf_indices(torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]), 2).tolist() == [[0, 4]]


def test_ovf_ties_are_deterministic():
    # All equal: every split ties, the smallest i (0 lowest, k highest) wins and the stable sort
    # makes "highest" the last indices.
    scores = torch.full((2, 6), 0.3)
    assert ovf_indices(scores, 3).tolist() == [[3, 4, 5], [3, 4, 5]]
    # Splits i = 1 and i = 2 select the same values {0, 5, 10}: i = 1 wins, keeping index 2 (the
    # later of the tied 5s counts as higher). Also with values whose prefix sums round differently.
    assert ovf_indices(torch.tensor([[0.0, 5.0, 5.0, 10.0]]), 3).tolist() == [[0, 2, 3]]
    assert ovf_indices(torch.tensor([[0.1, 0.7, 0.7, 1.3]]), 3).tolist() == [[0, 2, 3]]
    assert ovf_indices(torch.tensor([[1.3, 0.7, 0.1, 0.7]]), 3).tolist() == [[0, 2, 3]]


def test_ovf_batched_equals_per_group():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(16, 9, generator=g)
    scores[3] = 2.0  # a constant group inside the batch
    batched = ovf_indices(scores, 4)
    rows = torch.cat([ovf_indices(scores[p : p + 1], 4) for p in range(16)])
    assert torch.equal(batched, rows)


def test_ovf_large_offset_no_cancellation():
    # Rewards like 24.0 +- 1e-6 (PickScore scale, tiny spread): the median centring keeps it exact.
    row = [24.0 + d for d in (3e-7, -1e-6, 2e-7, 9e-7, 0.0, -4e-7)]
    got = ovf_indices(torch.tensor([row], dtype=torch.float64), 3).tolist()[0]
    assert tuple(got) == brute_force(row, 3)[0][1]


def test_ovf_full_group_and_integer_scores():
    assert ovf_indices(torch.tensor([[5, 1, 3]]), 3).tolist() == [[0, 1, 2]]
    assert ovf_indices(torch.tensor([[5, 1, 3]]), 2).tolist() == [[0, 1]]


# --------------------------------------------------------------------------------------------- rules
SCORES = torch.tensor([[0.5, 0.9, 0.1, 0.7, 0.3, 0.8], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])


def test_rules_tuple():
    assert SELECTION_RULES == ("ovf", "random", "topk", "extremes", "none")


def test_rule_none():
    idx = select_indices(None, 3, "none", num_groups=2, group_size=5)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]] and idx.dtype == torch.long
    assert torch.equal(select_indices(SCORES, 2, "none"), torch.tensor([[0, 1], [0, 1]]))


def test_rule_topk():
    assert select_indices(SCORES, 3, "topk").tolist() == [[1, 3, 5], [0, 1, 2]]
    # Ties: among equal scores the later index counts as higher.
    assert select_indices(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, "topk").tolist() == [[1, 2]]


def test_rule_extremes():
    # k = 4: 2 highest + 2 lowest; k = 3: ceil(3/2) = 2 highest + 1 lowest.
    assert select_indices(SCORES, 4, "extremes").tolist() == [[1, 2, 4, 5], [0, 1, 4, 5]]
    assert select_indices(SCORES, 3, "extremes").tolist() == [[1, 2, 5], [0, 1, 5]]
    # All equal: disjoint halves of the stable order, never a repeated index.
    assert select_indices(torch.zeros(1, 4), 4, "extremes").tolist() == [[0, 1, 2, 3]]


def test_rule_ovf_dispatch():
    assert torch.equal(select_indices(SCORES, 3, "ovf"), ovf_indices(SCORES, 3))


def test_rule_random_reproducible_and_covering():
    def draw(seed: int) -> torch.Tensor:
        return select_indices(None, 3, "random", num_groups=2000, group_size=6,
                              generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2000, 3) and a.dtype == torch.long
    assert (a[:, 1:] > a[:, :-1]).all() and a.min() >= 0 and a.max() < 6  # ascending, distinct
    assert len({tuple(r) for r in a.tolist()}) == 20  # all C(6, 3) subsets occur
    freq = torch.bincount(a.flatten(), minlength=6).double() / 2000
    assert torch.allclose(freq, torch.full((6,), 0.5, dtype=torch.float64), atol=0.05)
    # With scores given, the shape comes from them and the scores are ignored.
    assert select_indices(SCORES, 2, "random", generator=torch.Generator().manual_seed(0)).shape == (2, 2)


def test_selection_validation():
    with pytest.raises(ValueError, match="ovf.*random.*topk.*extremes.*none"):
        select_indices(SCORES, 2, "bottomk")
    with pytest.raises(ValueError, match="k=7.*G=6"):
        select_indices(SCORES, 7, "topk")
    with pytest.raises(ValueError, match="k=0.*G=6"):
        ovf_indices(SCORES, 0)
    with pytest.raises(ValueError, match="needs scores"):
        select_indices(None, 2, "ovf", num_groups=2, group_size=6)
    with pytest.raises(ValueError, match="num_groups and group_size"):
        select_indices(None, 2, "none", group_size=6)
    with pytest.raises(ValueError, match="group_size=5"):
        select_indices(SCORES, 2, "ovf", group_size=5)
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        ovf_indices(torch.rand(6), 2)


def test_flat_indices():
    local = torch.tensor([[0, 2], [1, 3], [0, 1]])
    assert flat_indices(local, 4).tolist() == [0, 2, 5, 7, 8, 9]
    batch = torch.arange(12).reshape(12, 1) * 10  # group-major rows of 3 groups x 4
    assert batch[flat_indices(local, 4)].flatten().tolist() == [0, 20, 50, 70, 80, 90]
