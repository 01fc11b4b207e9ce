"""Group schedules: how many trajectories each prompt starts with and when they are pruned.

A schedule is data. The rollout reads four things from it: ``group_size`` (G_max, trajectories
per prompt at the start), ``checkpoints`` (0-based indices of the denoising steps whose x0 preview
is scored; pruning happens right after that step, so the survivors alone run steps c+1..T-1),
``keep`` (the group size after each checkpoint, strictly decreasing) and ``final_keep`` (an
optional selection on the *true* rewards after the last step: static OVF). The three classes
below are the paper's method and its two baselines; they differ only in which fields they set,
so every ablation is a run of the same rollout code.

Validated in ``__init__``, before any model loads; ``validate_steps(T)`` is called once T is known.
"""

from __future__ import annotations

from .selection import SELECTION_RULES


class GroupSchedule:
    """Base class. Use ``ProGRPOSchedule``, ``PlainGRPOSchedule`` or ``StaticOVFSchedule``.

    Args:
        group_size: G_max, trajectories each prompt starts with.
        checkpoints: 0-based denoising steps after which the group is pruned (by its x0 previews'
            rewards); strictly increasing.
        keep: the group size after each checkpoint, one per checkpoint, strictly decreasing.
        final_keep: after the last step, keep this many trajectories by their true rewards
            (static OVF); None: no final selection.
        rule: how survivors are chosen, one of ``selection.SELECTION_RULES`` ("ovf": Optimal
            Variance Filtering, "random", "topk", "extremes", "none").
    """

    def __init__(self, group_size: int, checkpoints: list[int] | None = None,
                 keep: list[int] | None = None, final_keep: int | None = None,
                 rule: str = "ovf") -> None:
        self.group_size = int(group_size)
        self.checkpoints = [int(c) for c in (checkpoints or [])]
        self.keep = [int(k) for k in (keep or [])]
        self.final_keep = None if final_keep is None else int(final_keep)
        self.rule = rule
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"{name}: unknown rule {self.rule!r}; choose one of {SELECTION_RULES}")
        if len(self.checkpoints) != len(self.keep):
            raise ValueError(f"{name}: {len(self.checkpoints)} checkpoints but {len(self.keep)} "
                             f"keep sizes; give one size per checkpoint")
        if any(b <= a for a, b in zip(self.checkpoints, self.checkpoints[1:])):
            raise ValueError(f"{name}: checkpoints must be strictly increasing, got {self.checkpoints}")
        if self.checkpoints and self.checkpoints[0] < 0:
            raise ValueError(f"{name}: checkpoints must be >= 0, got {self.checkpoints}")
        sizes = [self.group_size, *self.keep] + ([self.final_keep] if self.final_keep is not None else [])
        for a, b in zip(sizes, sizes[1:]):
            if b >= a:
                raise ValueError(f"{name}: group sizes must strictly shrink at each selection, got "
                                 f"{' -> '.join(map(str, sizes))}")
        if self.final_size < 2:
            raise ValueError(f"{name}: the final group size must be >= 2 (advantages need a spread), "
                             f"got {self.final_size} from {' -> '.join(map(str, sizes))}")

    @property
    def final_size(self) -> int:
        """K: trajectories per prompt that are trained on."""
        if self.final_keep is not None:
            return self.final_keep
        return self.keep[-1] if self.keep else self.group_size

    def sizes(self) -> list[int]:
        """Group sizes: at the start, after each checkpoint (and after the final selection)."""
        extra = [self.final_keep] if self.final_keep is not None else []
        return [self.group_size, *self.keep, *extra]

    def validate_steps(self, num_steps: int) -> None:
        """Checkpoints must be denoising steps of a T-step trajectory: inside [0, T)."""
        bad = [c for c in self.checkpoints if not 0 <= c < num_steps]
        if bad:
            raise ValueError(f"{type(self).__name__}: checkpoints {bad} are outside [0, {num_steps}) "
                             f"for a {num_steps}-step sampler (checkpoints are 0-based step indices)")

    def group_sizes_per_step(self, num_steps: int) -> list[int]:
        """Live trajectories per prompt at each of the T denoiser calls."""
        self.validate_steps(num_steps)
        live, out, it = self.group_size, [], iter(zip(self.checkpoints, self.keep))
        nxt = next(it, None)
        for t in range(num_steps):
            out.append(live)
            if nxt is not None and nxt[0] == t:
                live = nxt[1]
                nxt = next(it, None)
        return out

    def nfe_per_prompt(self, num_steps: int) -> int:
        """Denoiser calls (per sample, CFG counted once) one prompt's group costs."""
        return sum(self.group_sizes_per_step(num_steps))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sizes={' -> '.join(map(str, self.sizes()))}, "
                f"checkpoints={self.checkpoints}, rule={self.rule!r})")


class ProGRPOSchedule(GroupSchedule):
    """Expand and prune: start at ``group_size`` = G_max, prune to ``keep[i]`` after step ``checkpoints[i]``.

    Paper, SD3.5-M "Standard": group_size 48, keep [24, 12]; SD-v1.4: 48, keep [32, 8].

    Args:
        group_size: G_max, trajectories each prompt starts with.
        checkpoints: 0-based denoising steps after which the group is pruned; at least one.
        keep: the group size after each checkpoint (one per checkpoint, strictly decreasing); the
            last one is K, the trajectories trained on.
        rule: how survivors are chosen from the previews' rewards (``selection.SELECTION_RULES``).
    """

    def __init__(self, group_size: int, checkpoints: list[int], keep: list[int], rule: str = "ovf") -> None:
        if not checkpoints:
            raise ValueError("ProGRPOSchedule: give at least one checkpoint (for no pruning use PlainGRPOSchedule)")
        super().__init__(group_size, checkpoints, keep, None, rule)


class PlainGRPOSchedule(GroupSchedule):
    """The baseline: G trajectories per prompt, all run to the end and all trained on.

    Args:
        group_size: G, trajectories per prompt.
    """

    def __init__(self, group_size: int) -> None:
        super().__init__(group_size, [], [], None, "none")


class StaticOVFSchedule(GroupSchedule):
    """Post-sampling selection: run ``group_size`` trajectories to the end, score them with the
    true reward, keep ``final_keep`` by ``rule`` (the paper's OVF observation, no early stop).

    Args:
        group_size: trajectories each prompt runs to the end.
        final_keep: K, trajectories kept (and trained on) by their true rewards.
        rule: how they are chosen (``selection.SELECTION_RULES``; "ovf" by default).
    """

    def __init__(self, group_size: int, final_keep: int, rule: str = "ovf") -> None:
        super().__init__(group_size, [], [], final_keep, rule)
