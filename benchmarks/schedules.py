"""Schedule specs (``[name=]plain:G | static:G>K | pro:G>k1@c1>k2@c2[/rule]``) and the paper's settings.

The paper's schedules (Ge et al., "Expand and Prune", CVPR 2026, arXiv 2512.15347; see
docs/algorithm.md, "Shipped configs and the paper's settings"): SD3.5-M at T = 10 against
Flow-GRPO's G = 24, and SD-v1.4 at T = 50 against DanceGRPO's G = 16. ``paper_schedules`` moves
their checkpoints to another T and scales their group sizes for toy runs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pro_grpo_lightning.schedules import GroupSchedule, PlainGRPOSchedule, ProGRPOSchedule, StaticOVFSchedule


@dataclass
class NamedSchedule:
    """A schedule under a display name, with the spec text it came from."""

    name: str
    spec: str
    schedule: GroupSchedule

    @property
    def kind(self) -> str:
        return self.spec.split(":", 1)[0]

    def describe(self, num_steps: int) -> str:
        s = self.schedule
        if s.final_keep is not None:
            return f"{s.group_size} x {num_steps} steps, keep {s.final_keep} after the last ({s.rule})"
        if not s.checkpoints:
            return f"{s.group_size} x {num_steps} steps"
        parts = [str(s.group_size)] + [f"{k}@{c}" for c, k in zip(s.checkpoints, s.keep)]
        return " -> ".join(parts) + f" ({s.rule})"


def parse_schedule(text: str) -> NamedSchedule:
    """``[name=]kind:sizes`` with kind ``plain:G``, ``static:G>K[/rule]`` or ``pro:G>k1@c1>k2@c2[/rule]``.

    ``c`` are 0-based step indices: ``k1@c1`` keeps k1 per prompt right after step c1.
    """
    name, _, spec = text.rpartition("=")
    spec = spec.strip()
    kind, _, body = spec.partition(":")
    rule = "ovf"
    if "/" in body:
        body, rule = body.split("/", 1)
    try:
        if kind == "plain":
            sched: GroupSchedule = PlainGRPOSchedule(int(body))
        elif kind == "static":
            g, k = body.split(">")
            sched = StaticOVFSchedule(int(g), int(k), rule=rule)
        elif kind == "pro":
            first, *rest = body.split(">")
            keep, ckpts = [], []
            for item in rest:
                k, c = item.split("@")
                keep.append(int(k))
                ckpts.append(int(c))
            sched = ProGRPOSchedule(int(first), ckpts, keep, rule=rule)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except ValueError as err:
        raise ValueError(f"bad schedule {text!r} ({err}); write e.g. 'plain:24', 'static:48>12', "
                         f"'pro:48>24@5>12@7' or 'pro:48>24@5>12@7/topk', optionally 'name=...'") from None
    return NamedSchedule(name or spec, spec, sched)


#: The paper's schedules at the paper's T; per backend family.
PAPER = {
    # SD3.5-M, T = 10, vs Flow-GRPO G = 24: "Standard" 48 -> 24 -> 12 and "Flash" 24 -> 16 -> 12 at {5, 7}
    "sd35": dict(T=10, plain=24, static=(48, 12),
                 pro={"pro-standard": (48, [(24, 5), (12, 7)]), "pro-flash": (24, [(16, 5), (12, 7)])}),
    # SD-v1.4, T = 50, vs DanceGRPO G = 16: 48 -> 32 -> 8 at {30, 40}
    "sd14": dict(T=50, plain=16, static=(48, 8), pro={"pro-paper": (48, [(32, 30), (8, 40)])}),
}
PAPER_FAMILY = {"sd15": "sd14", "sd3": "sd35", "flux": "sd35"}


def round_half_up(x: float) -> int:
    """round(x) with halves up (Python's round sends halves to even)."""
    return int(math.floor(x + 0.5))


def scale_checkpoints(checkpoints: Sequence[int], paper_T: int, T: int) -> list[int]:
    """Paper step indices to a T-step sampler: ``round(c * T / paper_T)``, kept strictly increasing in [0, T-1)."""
    out: list[int] = []
    for c in checkpoints:
        v = min(max(round_half_up(c * T / paper_T), 0), T - 2 if T >= 2 else 0)
        if out and v <= out[-1]:
            v = out[-1] + 1
        out.append(v)
    if out and out[-1] >= T:
        raise ValueError(f"cannot place checkpoints {list(checkpoints)} (of T={paper_T}) in T={T} steps")
    return out


def _scale_size(g: int, scale: float) -> int:
    return max(2, round_half_up(g * scale))


def paper_schedules(backend_family: str, T: int, group_scale: float = 1.0,
                    custom: bool = True) -> list[NamedSchedule]:
    """Plain GRPO, static OVF, the paper's Pro-GRPO schedule(s) with checkpoints scaled to T, and a
    custom one (``pro-early``: one prune, G_max -> K right after step round(0.2 T)).

    ``group_scale`` multiplies every group size (rounded, >= 2), e.g. 0.25 for toy runs.
    """
    fam = PAPER[PAPER_FAMILY[backend_family]]
    sz = lambda g: _scale_size(g, group_scale)  # noqa: E731
    specs = [f"plain=plain:{sz(fam['plain'])}"]
    g, k = fam["static"]
    specs.append(f"static-ovf=static:{sz(g)}>{sz(k)}")
    first_pro = None
    for name, (g0, steps) in fam["pro"].items():
        cks = scale_checkpoints([c for _, c in steps], fam["T"], T)
        body = ">".join(f"{sz(kk)}@{c}" for (kk, _), c in zip(steps, cks))
        specs.append(f"{name}=pro:{sz(g0)}>{body}")
        first_pro = first_pro or (g0, steps[-1][0])
    if custom and first_pro:
        c = min(max(round_half_up(0.2 * T), 0), T - 2)
        specs.append(f"pro-early=pro:{sz(first_pro[0])}>{sz(first_pro[1])}@{c}")
    return [parse_schedule(s) for s in specs]


def resolve_schedules(args: argparse.Namespace, T: int) -> list[NamedSchedule]:
    """``--schedule`` entries if given (a plain reference is added when none is), else the presets."""
    presets = paper_schedules(args.backend, T, args.group_scale)
    if not args.schedule:
        chosen = presets
    else:
        chosen = [parse_schedule(s) for s in args.schedule]
        if not any(s.kind == "plain" for s in chosen):
            chosen.insert(0, presets[0])
    for s in chosen:
        s.schedule.validate_steps(T)
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"schedule names must be unique, got {names}")
    return chosen


def reference(schedules: Sequence[NamedSchedule]) -> NamedSchedule:
    """The plain-GRPO schedule every ratio is taken against (the first plain one)."""
    return next(s for s in schedules if s.kind == "plain")
