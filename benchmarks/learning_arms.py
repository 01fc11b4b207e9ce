"""The learning-efficiency benchmark's arms: schedule specs, the presets, and their checks.

An arm is a group schedule under a name, ``[name=]plain:G | static:G>K | pro:G>k1@c1>k2@c2[/rule]``
(``benchmarks.schedules.parse_schedule``). The first ``plain:`` arm is the reference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .schedules import NamedSchedule, parse_schedule, round_half_up, scale_checkpoints

ARM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def spec_of(s: Any) -> str:
    """The spec text of a ``GroupSchedule`` (inverse of ``parse_schedule`` for the three classes)."""
    from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule, StaticOVFSchedule

    rule = "" if s.rule == "ovf" else f"/{s.rule}"
    if isinstance(s, PlainGRPOSchedule):
        return f"plain:{s.group_size}"
    if isinstance(s, StaticOVFSchedule):
        return f"static:{s.group_size}>{s.final_keep}{rule}"
    if isinstance(s, ProGRPOSchedule):
        return f"pro:{s.group_size}>" + ">".join(f"{k}@{c}" for k, c in zip(s.keep, s.checkpoints)) + rule
    raise ValueError(f"no spec for {s!r}")


def schedule_init(s: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a schedule, for ``--model.schedule``."""
    from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule, StaticOVFSchedule

    if isinstance(s, PlainGRPOSchedule):
        args: dict[str, Any] = {"group_size": s.group_size}
    elif isinstance(s, StaticOVFSchedule):
        args = {"group_size": s.group_size, "final_keep": s.final_keep, "rule": s.rule}
    elif isinstance(s, ProGRPOSchedule):
        args = {"group_size": s.group_size, "checkpoints": list(s.checkpoints), "keep": list(s.keep), "rule": s.rule}
    else:
        raise ValueError(f"unsupported schedule class {type(s).__name__}")
    return {"class_path": f"{type(s).__module__}.{type(s).__name__}", "init_args": args}


def rescale_keep(sizes: Sequence[int], new_gmax: int) -> list[int]:
    """The keep sizes of a schedule ``sizes`` = [G, k_1, ..., K] moved to a new G_max, K unchanged:
    k_i' = round(K + (k_i - K) (G' - K) / (G - K)), then forced strictly between G' and K."""
    g, *keep = sizes
    K = keep[-1]
    if new_gmax < K + len(keep):
        raise ValueError(f"G_max {new_gmax} cannot shrink through {len(keep)} checkpoints to K = {K}")
    out = [K if i == len(keep) - 1 else round_half_up(K + (k - K) * (new_gmax - K) / max(g - K, 1))
           for i, k in enumerate(keep)]
    for i in range(len(out) - 1):  # strictly below the previous size ...
        out[i] = min(out[i], (new_gmax if i == 0 else out[i - 1]) - 1)
    for i in range(len(out) - 2, -1, -1):  # ... and strictly above the next
        out[i] = max(out[i], out[i + 1] + 1)
    return out


def base_pro(base: Any, T: int) -> Any:
    """The config's schedule if it is Pro-GRPO; otherwise a Pro-GRPO schedule at its K:
    G_max = round(8K/3), keep round((G_max + K)/2) then K after steps 0.4 T and 0.6 T (rounded)."""
    from pro_grpo_lightning.schedules import ProGRPOSchedule

    if isinstance(base, ProGRPOSchedule):
        return base
    K = base.final_size
    g = max(round_half_up(8 * K / 3), K + 2)
    mid = max(K + 1, min(g - 1, round_half_up((g + K) / 2)))
    return ProGRPOSchedule(g, scale_checkpoints([4, 6], 10, T), [mid, K])


PRESETS = ("main", "gmax", "checkpoints", "paper")


def preset_arms(preset: str, T: int, base: Any) -> list[str]:
    """Arm specs of a preset, from T and the config's schedule ``base`` (K = its final size).

    main: grpo (plain:K), static OVF (static:G_max>K) and the config's Pro-GRPO schedule.
    paper: main plus plain GRPO at 2K (``grpo<2K>``): the paper's own comparison trains Pro-GRPO's
        K = 12 against Flow-GRPO's G = 24, so its final group sizes differ (unequal K is allowed).
    gmax: Pro-GRPO with G_max in {K + #checkpoints, 2K, config's G_max, 4K}, same checkpoints and K
        (intermediate sizes rescaled by ``rescale_keep``); plus grpo. K = 6: {8, 12, 16, 24}.
    checkpoints: the config's sizes with the checkpoints early / middle / late: the paper's SD-v1.4
        ablation (10, 20), (20, 30), (30, 40) of T = 50, scaled to T (``schedules.scale_checkpoints``);
        T = 10: (2, 4), (4, 6), (6, 8). Plus grpo.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    pro = base_pro(base, T)
    K, G, m = pro.final_size, pro.group_size, len(pro.checkpoints)
    arms = [f"grpo=plain:{K}"]
    if preset in ("main", "paper"):
        arms += [f"static=static:{G}>{K}", f"pro={spec_of(pro)}"]
        if preset == "paper":
            arms.append(f"grpo{2 * K}=plain:{2 * K}")
    elif preset == "gmax":
        for g in sorted({K + m, 2 * K, G, 4 * K}):
            keep = rescale_keep(pro.sizes(), g)
            arms.append(f"gmax{g}=pro:{g}>" + ">".join(f"{k}@{c}" for k, c in zip(keep, pro.checkpoints)))
    else:
        seen = set()
        for label, start in (("early", 10), ("middle", 20), ("late", 30)):
            paper = [start + (round_half_up(10 * j / (m - 1)) if m > 1 else 0) for j in range(m)]
            cks = scale_checkpoints(paper, 50, T)
            spec = f"pro:{G}>" + ">".join(f"{k}@{c}" for k, c in zip(pro.keep, cks))
            if spec not in seen:
                seen.add(spec)
                arms.append(f"ck-{label}={spec}")
    return arms


def resolve_arms(texts: Sequence[str], T: int | None, allow_unequal_k: bool = False) -> list[NamedSchedule]:
    """Parse and check arm specs: valid schedules, unique file-safe names, a plain-GRPO reference, one
    final group size K, and (unless ``T`` is None, i.e. before the config is read) checkpoints inside [0, T)."""
    arms = [parse_schedule(t) for t in texts]
    if not arms:
        raise ValueError("no arms: give --arms or --preset")
    for a in arms:
        if not ARM_NAME.match(a.name):
            raise ValueError(f"arm name {a.name!r} must be letters, digits, '_', '-', '.', '+' "
                             f"(it names files): write e.g. 'pro=pro:16>10@4>6@6'")
        if T is not None:
            a.schedule.validate_steps(T)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    if not any(a.kind == "plain" for a in arms):
        raise ValueError(f"no plain-GRPO arm among {names}: the first 'plain:G' arm is the reference "
                         f"whose final reward is the target; add e.g. 'grpo=plain:6'")
    ks = {a.name: a.schedule.final_size for a in arms}
    if len(set(ks.values())) > 1 and not allow_unequal_k:
        raise ValueError(f"arms must train the same final group size K to be compared, got {ks} "
                         f"(--allow-unequal-k to compare anyway)")
    return arms
