"""Schedule specs (``[name=]plain:G | static:G>K | pro:G>k1@c1>k2@c2[/rule][/window=a:b]``) and the
paper's settings.

``/window=a:b`` runs the schedule with the backend's ``sde_window`` [a, b): steps a..b-1 sample
stochastically and are the only ones trained, the others are the sampler's deterministic (ODE) step
(Flow-GRPO's "Fast" variant, MixGRPO). ``window_schedules`` are such windows on T = 10, alone (plain
GRPO) and composed with Pro-GRPO.

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
    window: tuple[int, int] | None = None  # the backend's sde_window while this schedule runs

    @property
    def kind(self) -> str:
        return self.spec.split(":", 1)[0]

    def describe(self, num_steps: int) -> str:
        s = self.schedule
        if s.final_keep is not None:
            text = f"{s.group_size} x {num_steps} steps, keep {s.final_keep} after the last ({s.rule})"
        elif not s.checkpoints:
            text = f"{s.group_size} x {num_steps} steps"
        else:
            parts = [str(s.group_size)] + [f"{k}@{c}" for c, k in zip(s.checkpoints, s.keep)]
            text = " -> ".join(parts) + f" ({s.rule})"
        return text + (f", SDE window [{self.window[0]}, {self.window[1]})" if self.window else "")

    def validate_steps(self, num_steps: int) -> None:
        """Checkpoints inside [0, T) and the window inside [0, T] (as the backends check it)."""
        self.schedule.validate_steps(num_steps)
        if self.window is not None and not 0 <= self.window[0] < self.window[1] <= num_steps:
            raise ValueError(f"schedule {self.name!r}: window [{self.window[0]}, {self.window[1]}) must satisfy "
                             f"0 <= start < end <= T = {num_steps}")


def trainable_steps_in(family: str, num_steps: int, window: tuple[int, int] | None = None) -> int:
    """How many steps of a trajectory the update can train (the backends' ``trainable_steps().sum()``,
    checked by a test): flow models every step but the last (its sigma_next = 0 makes it
    deterministic), SD1.5 (DDIM, eta > 0) every step; only those inside ``window`` when one is given."""
    last = num_steps - 1 if family in ("sd3", "flux") else num_steps
    start, end = window or (0, num_steps)
    return max(0, min(end, last) - start)


def parse_schedule(text: str) -> NamedSchedule:
    """``[name=]kind:sizes`` with kind ``plain:G``, ``static:G>K[/rule]`` or ``pro:G>k1@c1>k2@c2[/rule]``.

    ``c`` are 0-based step indices: ``k1@c1`` keeps k1 per prompt right after step c1.
    """
    name, spec = "", text.strip()
    eq, colon = spec.find("="), spec.find(":")
    if eq != -1 and (colon == -1 or eq < colon):  # 'name=' comes before the kind's ':', a window's '=' after
        name, spec = spec[:eq], spec[eq + 1:].strip()
    kind, _, body = spec.partition(":")
    rule, window = "ovf", None
    hint = (f"bad schedule {text!r} ({{}}); write e.g. 'plain:24', 'static:48>12', 'pro:48>24@5>12@7' or "
            f"'pro:48>24@5>12@7/topk', optionally '/window=2:4' (SDE window [2, 4)) and 'name=...'")
    body, *mods = body.split("/")
    for mod in mods:
        if mod.startswith("window="):
            try:
                a, b = (int(v) for v in mod[len("window="):].split(":"))
            except ValueError:
                raise ValueError(hint.format(f"window {mod!r} is not 'window=start:end'")) from None
            if not 0 <= a < b:
                raise ValueError(hint.format(f"window [{a}, {b}) needs 0 <= start < end"))
            window = (a, b)
        else:
            rule = mod
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
        raise ValueError(hint.format(err)) from None
    return NamedSchedule(name or spec, spec, sched, window)


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


def window_schedules(backend_family: str, T: int, group_scale: float = 1.0,
                     sizes: Sequence[int] = (2, 3)) -> list[NamedSchedule]:
    """Flow-GRPO-Fast-like SDE windows composed with Pro-GRPO, against plain GRPO without a window.

    Per window size n (stochastic, trained steps; Flow-GRPO-Fast trains 2) the window is
    [s, s + n) with s = round(0.2 T) (steps 2.. at T = 10: early, where Fast draws its start):
      ``plain-wN``        plain GRPO with the window (Flow-GRPO-Fast-like)
      ``pro-wN-inside``   G_max -> K pruned at the window's last step s + n - 1 (its preview has seen
                          the noise of the window's earlier steps, not of that step)
      ``pro-wN-after``    G_max -> K pruned at step s + n, the first ODE step after the window (its
                          preview has seen all of the window's noise; after it nothing is random)
      ``flash-wN-after``  G -> K at s + n: the expanded group is plain GRPO's G (Pro-GRPO "Flash"'s G_max)
    with the paper's plain G, G_max and K (24, 48, 12 for SD3.5-M and FLUX; 16, 48, 8 for SD1.5).
    The first schedule is plain GRPO without a window: the reference every ratio is taken against.
    """
    fam = PAPER[PAPER_FAMILY[backend_family]]
    sz = lambda g: _scale_size(g, group_scale)  # noqa: E731
    G, K = sz(fam["plain"]), sz(fam["static"][1])
    G_max = sz(fam["static"][0])
    start = round_half_up(0.2 * T)
    specs = [f"plain=plain:{G}"]
    for n in sizes:
        end = min(start + n, T)
        w = f"/window={start}:{end}"
        specs.append(f"plain-w{n}=plain:{G}{w}")
        specs.append(f"pro-w{n}-inside=pro:{G_max}>{K}@{end - 1}{w}")
        if end < T:  # a step after the window to prune at
            specs.append(f"pro-w{n}-after=pro:{G_max}>{K}@{end}{w}")
            if G > K:
                specs.append(f"flash-w{n}-after=pro:{G}>{K}@{end}{w}")
    return [parse_schedule(s) for s in specs]


def resolve_schedules(args: argparse.Namespace, T: int) -> list[NamedSchedule]:
    """``--schedule`` entries if given (a plain reference is added when none is), else the presets
    (``--windows``: ``window_schedules``; else ``paper_schedules``)."""
    if getattr(args, "windows", False):
        presets = window_schedules(args.backend, T, args.group_scale)
    else:
        presets = paper_schedules(args.backend, T, args.group_scale)
    if not args.schedule:
        chosen = presets
    else:
        chosen = [parse_schedule(s) for s in args.schedule]
        if not any(s.kind == "plain" for s in chosen):
            chosen.insert(0, presets[0])
    for s in chosen:
        s.validate_steps(T)
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"schedule names must be unique, got {names}")
    return chosen


def reference(schedules: Sequence[NamedSchedule]) -> NamedSchedule:
    """The plain-GRPO schedule every ratio is taken against (the first plain one without a window,
    else the first plain one)."""
    plain = [s for s in schedules if s.kind == "plain"]
    return next((s for s in plain if s.window is None), plain[0])
