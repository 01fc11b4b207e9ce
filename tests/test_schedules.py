import pytest

from pro_grpo_lightning.schedules import (GroupSchedule, PlainGRPOSchedule, ProGRPOSchedule,
                                          StaticOVFSchedule)


def test_paper_schedules_sizes_and_nfe():
    s = ProGRPOSchedule(48, [5, 7], [24, 12])
    assert s.sizes() == [48, 24, 12] and s.final_size == 12
    # steps 0..5 at 48, steps 6..7 at 24, steps 8..9 at 12
    assert s.group_sizes_per_step(10) == [48] * 6 + [24] * 2 + [12] * 2
    assert s.nfe_per_prompt(10) == 48 * 6 + 24 * 2 + 12 * 2
    plain = PlainGRPOSchedule(24)
    assert plain.final_size == 24 and plain.nfe_per_prompt(10) == 240
    static = StaticOVFSchedule(24, 12)
    assert static.final_size == 12 and static.nfe_per_prompt(10) == 240
    assert static.sizes() == [24, 12]


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=8, checkpoints=[1, 2], keep=[8, 4]), "strictly shrink"),
    (dict(group_size=8, checkpoints=[1, 2], keep=[4, 6]), "strictly shrink"),
    (dict(group_size=8, checkpoints=[2, 1], keep=[6, 4]), "strictly increasing"),
    (dict(group_size=8, checkpoints=[1], keep=[6, 4]), "one size per checkpoint"),
    (dict(group_size=8, checkpoints=[1], keep=[1]), "final group size must be >= 2"),
    (dict(group_size=8, checkpoints=[-1], keep=[4]), ">= 0"),
    (dict(group_size=4, checkpoints=[1], keep=[6]), "strictly shrink"),  # K larger than the group
    (dict(group_size=8, checkpoints=[1], keep=[4], rule="best"), "unknown rule"),
])
def test_bad_schedules_fail_with_clear_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupSchedule(**kwargs)


def test_checkpoints_must_be_inside_the_trajectory():
    s = ProGRPOSchedule(8, [2, 4], [6, 4])
    s.validate_steps(5)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        s.validate_steps(4)


def test_baselines_validate_too():
    with pytest.raises(ValueError, match="must be >= 2"):
        PlainGRPOSchedule(1)
    with pytest.raises(ValueError, match="strictly shrink"):
        StaticOVFSchedule(8, 8)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        ProGRPOSchedule(8, [], [])
