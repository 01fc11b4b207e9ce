"""Learning efficiency: does Pro-GRPO reach plain GRPO's final held-out reward in less wall time?

    python -m benchmarks.learning_efficiency [--config configs/quickstart.yaml]
        [--preset main|gmax|checkpoints] [--arms "grpo=plain:6" "pro=pro:16>10@4>6@6" ...]
        [--seeds 5] [--budget-s 600] [--snapshot-every-s 60] [--eval-samples 2] [--eval-prompts N]
        [--jobs 2] [--max-rollouts N] [--set KEY=VALUE ...] [--out DIR] [--list-arms]

Every arm (a group schedule, ``[name=]plain:G | static:G>K | pro:G>k1@c1>k2@c2``) trains the shapes
task's policy from the same pretrained model for the same wall-clock TRAINING budget, at the same
final (trained) group size K, once per seed. One (arm, seed) run is one subprocess with one torch
thread; ``--jobs`` run at a time, seed-major (seed 0 of every arm, then seed 1, ...) so the load of
a shared machine spreads evenly over the arms.

A run: the module and datamodule come from the config through ``LightningCLI(run=False)`` with the
arm's schedule and the seed (``seed_everything``, ``model.seed``, ``data.seed``) overriding it, no
logger, no checkpoints. A callback measures training wall time (``perf_counter`` from
``on_train_start``, i.e. after the weights are loaded, minus the time the callback itself spends),
records every rollout, and keeps a CPU copy of the trainable (LoRA) weights at t = 0, every
``--snapshot-every-s`` seconds of training time, at the last rollout that ended within the budget
and at the end. It stops training at the first rollout that ends past the budget (or at
``--max-rollouts``). Then, outside the budget, every snapshot is scored on the held-out prompts
with fixed noise (``evaluate_shapes(..., seed=1000)``: every snapshot of every arm sees the same
noise). Written to ``<out>/runs/<arm>_seed<k>.json``; a run whose file exists with the same
settings is skipped, so an interrupted benchmark resumes.

Aggregation (pure functions below): each seed's held-out reward is a step function of training wall
time (and of rollouts): the last snapshot at or before t. Over seeds: mean and a 95% t-interval.
Final reward = the curve at the budget (the last snapshot whose rollout ended within it).
Target = the reference (first ``plain:``) arm's final mean; an arm's time to target = the first
snapshot time at which its seed-mean curve reaches it; speed-up = budget / that time, with a
bootstrap interval over seeds (both arms resampled). Difference of final rewards vs the reference:
Welch t-interval. Times to target are only as fine as the snapshots (an upper bound, rounded up to
the next snapshot of some seed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import common as C  # noqa: E402

NAME = "learning_efficiency"
REPO = C.ROOT.parent
#: the shapes-task config, by its old and its new name (the first that exists is the default)
DEFAULT_CONFIG = "configs/quickstart.yaml"
SHAPES_REWARD = "pro_grpo_lightning.rewards.shapes.ShapesReward"
EVAL_SEED = 1000  # the held-out noise of every snapshot of every arm
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
GRID_POINTS = 201  # resolution of the curves written to the JSON and plotted
EPS = 1e-12  # "reaches the target": mean >= target - EPS (float noise of equal means)
#: --set keys the benchmark controls itself
RESERVED = ("model.schedule", "seed_everything", "model.seed", "data.seed")

# ---- statistics ---------------------------------------------------------------------------------------
#: Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (the standard table, e.g. NIST/SEMATECH
#: e-Handbook of Statistical Methods, section 1.3.6.7.2). Used for integer df <= 30; other df (Welch's
#: fractional df, df > 30) are computed by ``t_quantile`` below, which the tests check against this table.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of ``t_cdf`` for p in (0.5, 1): bisection to 1e-10."""
    if not 0.5 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


def t975(df: float) -> float:
    """t_{0.975, df}: the table for integer df in 1..30, computed otherwise."""
    if float(df).is_integer() and 1 <= df <= len(T975):
        return T975[int(df) - 1]
    return t_quantile(0.975, df)


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval (df = n - 1) of ``values``; lo/hi None for n < 2."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    m = sum(vals) / n
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "sd": sd}


def welch_interval(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with a 95% Welch t-interval (Welch-Satterthwaite df); lo/hi None if a side has < 2."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return {"diff": None, "lo": None, "hi": None, "df": None, "se": None}
    ma, mb = sum(a) / na, sum(b) / nb
    diff = ma - mb
    if na < 2 or nb < 2:
        return {"diff": diff, "lo": None, "hi": None, "df": None, "se": None}
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    qa, qb = va / na, vb / nb
    se = math.sqrt(qa + qb)
    if se == 0.0:
        return {"diff": diff, "lo": diff, "hi": diff, "df": None, "se": 0.0}
    df = (qa + qb) ** 2 / (qa ** 2 / (na - 1) + qb ** 2 / (nb - 1))
    half = t975(df) * se
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "df": df, "se": se}


# ---- curves ---------------------------------------------------------------------------------------------
Curve = Sequence[tuple[float, float]]  # (x, y) snapshots of one seed, x non-decreasing


def step_value(points: Curve, x: float) -> float | None:
    """y of the last point with px <= x (a step function); None before the first point."""
    out = None
    for px, py in points:
        if px <= x:
            out = py
        else:
            break
    return out


def resample(points: Curve, grid: Sequence[float], until: float | None = None) -> list[float | None]:
    """``step_value`` at every grid point; None past ``until`` (the seed's last observed x) if given."""
    return [None if until is not None and g > until else step_value(points, g) for g in grid]


def mean_curve(curves: Sequence[Curve], grid: Sequence[float],
               until: Sequence[float | None] | None = None) -> dict[str, list]:
    """Per grid point: mean and 95% t-interval over seeds; None where any seed has no value."""
    until = until or [None] * len(curves)
    cols = [resample(c, grid, u) for c, u in zip(curves, until)]
    out: dict[str, list] = {"x": list(grid), "mean": [], "lo": [], "hi": [], "n": []}
    for i in range(len(grid)):
        vals = [col[i] for col in cols]
        s = mean_ci([v for v in vals if v is not None]) if all(v is not None for v in vals) else mean_ci([])
        for k in ("mean", "lo", "hi", "n"):
            out[k].append(s[k])
    return out


def time_to_target(curves: Sequence[Curve], target: float, budget: float) -> float | None:
    """First x <= budget at which the seed-mean step function reaches ``target`` (exact: checked at
    every seed's breakpoints); None if it never does."""
    xs = sorted({x for c in curves for x, _ in c if x <= budget})
    for x in xs:
        vals = [step_value(c, x) for c in curves]
        if any(v is None for v in vals):
            continue
        if sum(vals) / len(vals) >= target - EPS:
            return x
    return None


def speedup(budget: float, t: float | None) -> float | None:
    """budget / time to target (inf if reached at t = 0, None if never)."""
    if t is None:
        return None
    return math.inf if t <= 0 else budget / t


def nearest_rank(sorted_vals: Sequence[float], q: float) -> float:
    """The q-quantile by the nearest-rank rule (no interpolation: works with inf and sentinels)."""
    n = len(sorted_vals)
    return sorted_vals[min(n - 1, max(0, math.ceil(q * n) - 1))]


def bootstrap_speedup(ref_finals: Sequence[float], curves: Sequence[Curve], budget: float,
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Percentile bootstrap over seeds of the speed-up: resample the reference's final rewards (the
    target) and the arm's seed curves with replacement, ``samples`` times, ``random.Random(seed)``.

    Returns {lo, hi} (2.5 / 97.5 % by nearest rank; a bound that falls on a sample which never reached
    the target is None with ``lo_reached``/``hi_reached`` False), ``never_frac`` (share of samples that
    never reach it) and ``samples``. Speed-ups of reached samples are >= 1; "never" sorts below them.
    """
    if not ref_finals or not curves:
        return {"lo": None, "hi": None, "never_frac": None, "samples": 0, "lo_reached": None, "hi_reached": None}
    rng = random.Random(seed)
    nr, na = len(ref_finals), len(curves)
    vals: list[float] = []
    never = 0
    for _ in range(samples):
        target = sum(ref_finals[rng.randrange(nr)] for _ in range(nr)) / nr
        pick = [curves[rng.randrange(na)] for _ in range(na)]
        s = speedup(budget, time_to_target(pick, target, budget))
        if s is None:
            never += 1
            vals.append(-1.0)  # sentinel below every reached speed-up (>= 1)
        else:
            vals.append(s)
    vals.sort()
    lo, hi = nearest_rank(vals, 0.025), nearest_rank(vals, 0.975)
    return {"lo": None if lo < 0 else lo, "hi": None if hi < 0 else hi, "lo_reached": lo >= 0,
            "hi_reached": hi >= 0, "never_frac": never / samples, "samples": samples, "seed": seed}


# ---- arms ----------------------------------------------------------------------------------------------
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
    out = [K if i == len(keep) - 1 else C._round(K + (k - K) * (new_gmax - K) / max(g - K, 1))
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
    g = max(C._round(8 * K / 3), K + 2)
    mid = max(K + 1, min(g - 1, C._round((g + K) / 2)))
    return ProGRPOSchedule(g, C.scale_checkpoints([4, 6], 10, T), [mid, K])


PRESETS = ("main", "gmax", "checkpoints", "paper")


def preset_arms(preset: str, T: int, base: Any) -> list[str]:
    """Arm specs of a preset, from T and the config's schedule ``base`` (K = its final size).

    main: grpo (plain:K), static OVF (static:G_max>K) and the config's Pro-GRPO schedule.
    paper: main plus plain GRPO at 2K (``grpo<2K>``): the paper's own comparison trains Pro-GRPO's
        K = 12 against Flow-GRPO's G = 24, so its final group sizes differ (unequal K is allowed).
    gmax: Pro-GRPO with G_max in {K + #checkpoints, 2K, config's G_max, 4K}, same checkpoints and K
        (intermediate sizes rescaled by ``rescale_keep``); plus grpo. K = 6: {8, 12, 16, 24}.
    checkpoints: the config's sizes with the checkpoints early / middle / late: the paper's SD-v1.4
        ablation (10, 20), (20, 30), (30, 40) of T = 50, scaled to T (``common.scale_checkpoints``);
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
            paper = [start + (C._round(10 * j / (m - 1)) if m > 1 else 0) for j in range(m)]
            cks = C.scale_checkpoints(paper, 50, T)
            spec = f"pro:{G}>" + ">".join(f"{k}@{c}" for k, c in zip(pro.keep, cks))
            if spec not in seen:
                seen.add(spec)
                arms.append(f"ck-{label}={spec}")
    return arms


def resolve_arms(texts: Sequence[str], T: int, allow_unequal_k: bool = False) -> list[C.NamedSchedule]:
    """Parse and check arm specs (before any model loads): valid schedules with checkpoints inside
    [0, T), unique file-safe names, a plain-GRPO reference, and one final group size K."""
    arms = [C.parse_schedule(t) for t in texts]
    if not arms:
        raise ValueError("no arms: give --arms or --preset")
    for a in arms:
        if not ARM_NAME.match(a.name):
            raise ValueError(f"arm name {a.name!r} must be letters, digits, '_', '-', '.', '+' "
                             f"(it names files): write e.g. 'pro=pro:16>10@4>6@6'")
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


# ---- config ----------------------------------------------------------------------------------------------
def resolve_config(path: str) -> tuple[str, Path]:
    """(the name recorded in the settings: relative to the repository when inside it, the absolute path);
    a relative path is looked up from the working directory, then from the repository root."""
    p = Path(path)
    if not p.is_absolute() and not p.is_file() and (REPO / p).is_file():
        p = REPO / p
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    p = p.resolve()
    try:
        return p.relative_to(REPO).as_posix(), p
    except ValueError:
        return str(p), p


def _set_dotted(cfg: dict, key: str, value: str) -> None:
    import yaml

    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = yaml.safe_load(value)


def parse_sets(sets: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for s in sets:
        key, eq, value = s.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key:
            raise ValueError(f"--set {s!r}: write KEY=VALUE, e.g. --set data.prompts_per_step=4")
        if any(key == r or key.startswith(r + ".") for r in RESERVED):
            raise ValueError(f"--set {key}: the benchmark sets {key.split('.')[0] if key.startswith('seed') else key} "
                             f"itself (arms via --arms/--preset, seeds via --seeds)")
        out.append((key, value))
    return out


def read_config(path: str, sets: Sequence[tuple[str, str]]) -> tuple[int, Any, dict]:
    """(T, the config's schedule object, the config dict with ``--set`` applied) without loading a model."""
    import yaml

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    for k, v in sets:
        _set_dotted(cfg, k, v)
    model = cfg.get("model") or {}
    backend = model.get("backend") or {}
    T = (backend.get("init_args") or {}).get("num_steps")
    if T is None and "class_path" in backend:  # the backend class's default
        mod, _, cls = backend["class_path"].rpartition(".")
        T = inspect.signature(getattr(importlib.import_module(mod), cls)).parameters["num_steps"].default
    if not isinstance(T, int):
        raise ValueError(f"{path}: cannot read T (model.backend.init_args.num_steps)")
    rewards = model.get("rewards") or []
    rewards = rewards if isinstance(rewards, list) else [rewards]
    if not any(isinstance(r, dict) and r.get("class_path") == SHAPES_REWARD for r in rewards):
        raise ValueError(f"{path}: not a shapes-task config (no {SHAPES_REWARD} among model.rewards); "
                         f"the held-out evaluation scores the shapes task")
    sched = model.get("schedule")
    if not sched or "class_path" not in sched:
        raise ValueError(f"{path}: no model.schedule (class_path + init_args) to derive the presets from")
    mod, _, cls = sched["class_path"].rpartition(".")
    schedule = getattr(importlib.import_module(mod), cls)(**(sched.get("init_args") or {}))
    return T, schedule, cfg


# ---- one run (the worker) -------------------------------------------------------------------------------
def make_recorder(budget_s: float, every_s: float, max_rollouts: int | None,
                  clock: Callable[[], float] = time.perf_counter):
    """A Lightning callback recording the training wall time, the per-rollout log and weight snapshots
    (see the module docstring). Built in a function so that importing this file needs no Lightning."""
    import lightning.pytorch as pl

    def trainable(module: Any) -> dict[str, Any]:
        return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}

    class BudgetRecorder(pl.Callback):
        def __init__(self) -> None:
            self.snapshots: list[dict[str, Any]] = []
            self.rows: list[dict[str, Any]] = []
            self.stopped_by = "data"  # "budget" | "max_rollouts" | "data" (epochs ran out)
            self.excluded = 0.0
            self._prev: dict[str, Any] | None = None  # state after the last rollout, if not snapshotted

        def wall(self, now: float) -> float:
            return now - self.t0 - self.excluded

        def _snap(self, kind: str, rollouts: int, wall: float, params: dict[str, Any]) -> None:
            self.snapshots.append({"kind": kind, "rollouts": rollouts, "wall_s": wall,
                                   "within_budget": wall <= budget_s, "params": params})

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.t0 = clock()
            enter = clock()
            self.next_snap = every_s
            self._snap("start", int(module.rollouts_done), 0.0, trainable(module))
            self.excluded += clock() - enter

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            enter = clock()
            wall = self.wall(enter)
            r = int(module.rollouts_done)
            row: dict[str, Any] = {"rollouts": r, "wall_s": wall}
            for src in (trainer.callback_metrics, trainer.logged_metrics):
                for key, val in src.items():
                    if (key == "reward/mean" or key.startswith(("compute/", "time/"))) and key not in row:
                        row[key] = float(val)
            self.rows.append(row)
            if wall > budget_s:
                # this rollout ended past the budget: the weights of the budget are the previous ones
                if self._prev is not None:
                    self._snap("budget", **self._prev)
                self._snap("end", r, wall, trainable(module))
                self.stopped_by, trainer.should_stop = "budget", True
                self._prev = None
            elif max_rollouts is not None and r >= max_rollouts:
                self._snap("end", r, wall, trainable(module))
                self.stopped_by, trainer.should_stop = "max_rollouts", True
                self._prev = None
            elif wall >= self.next_snap:
                self._snap("periodic", r, wall, trainable(module))
                self.next_snap = (math.floor(wall / every_s) + 1) * every_s
                self._prev = None
            else:
                self._prev = {"rollouts": r, "wall": wall, "params": trainable(module)}
            self.excluded += clock() - enter

        def on_train_end(self, trainer: Any, module: Any) -> None:
            if self._prev is not None:  # the data ran out between snapshots
                self._snap("end", **self._prev)
                self._prev = None

    return BudgetRecorder()


def evaluate_heldout(backend: Any, samples: int, seed: int, n_prompts: int | None) -> dict[str, float]:
    """``evaluate_shapes`` on the held-out prompts (the first ``n_prompts`` only, for quick runs)."""
    from pro_grpo_lightning.tasks.shapes_eval import evaluate_shapes

    return evaluate_shapes(backend, "heldout", samples_per_prompt=samples, seed=seed, max_prompts=n_prompts)


def cli_args(task: dict[str, Any]) -> list[str]:
    """The LightningCLI arguments of one run."""
    from pro_grpo_lightning.data import PromptDataModule

    s = task["settings"]
    seed = int(s["seed"])
    sched = C.parse_schedule(s["spec"]).schedule
    args = ["--config", task["config_path"],
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.max_steps=-1", "--trainer.max_epochs=1000000", "--trainer.num_sanity_val_steps=0",
            "--trainer.limit_val_batches=0",  # no held-out loop inside the timed fit
            f"--seed_everything={seed}", f"--model.seed={seed}", "--model.sample_every_n_rollouts=0",
            "--model.schedule=" + json.dumps(schedule_init(sched))]
    if "seed" in inspect.signature(PromptDataModule.__init__).parameters:
        args.append(f"--data.seed={seed}")
    args += [f"--{k}={v}" for k, v in s["set"]]
    return args


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) for the budget, evaluate its snapshots, write its run file."""
    import torch

    torch.set_num_threads(1)
    from pro_grpo_lightning.cli import main as cli_main

    s = task["settings"]
    t_build = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    cli = cli_main(cli_args(task), run=False, save_config=False)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    want = C.parse_schedule(s["spec"]).schedule
    got = module.schedule
    if (type(got), got.sizes(), got.checkpoints, got.rule) != (type(want), want.sizes(), want.checkpoints, want.rule):
        raise RuntimeError(f"the CLI built {got!r}, not the arm's {want!r}")
    recorder = make_recorder(float(s["budget_s"]), float(s["snapshot_every_s"]), s["max_rollouts"])
    trainer.callbacks.append(recorder)
    build_s = time.perf_counter() - t_build
    t_fit = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - t_fit

    t_eval = time.perf_counter()
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    final = {n: p.detach().clone() for n, p in params.items()}
    module.eval()
    curve = []
    with torch.no_grad():
        for snap in recorder.snapshots:
            for n, v in snap["params"].items():
                params[n].copy_(v.to(params[n].device))
            res = evaluate_heldout(module.backend, int(s["eval_samples"]), EVAL_SEED, s["eval_prompts"])
            curve.append({k: snap[k] for k in ("kind", "rollouts", "wall_s", "within_budget")}
                         | {k: res[k] for k in ("reward", "exact", "colour", "count", "shape", "position", "n")})
        for n, v in final.items():
            params[n].copy_(v)
    eval_s = time.perf_counter() - t_eval
    run = {"arm": task["arm"], "spec": s["spec"], "seed": s["seed"], "settings": s,
           "schedule": repr(module.schedule), "stopped_by": recorder.stopped_by,
           "rollouts_total": recorder.rows[-1]["rollouts"] if recorder.rows else 0,
           "wall_total_s": recorder.rows[-1]["wall_s"] if recorder.rows else 0.0,
           "callback_s": recorder.excluded, "build_s": build_s, "fit_s": fit_s, "eval_s": eval_s,
           "load_average": {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
           "train_log": recorder.rows, "curve": curve}
    path = Path(task["run_file"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(C._clean(run), indent=1) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted run leaves no file, so it reruns
    return run


# ---- orchestration ---------------------------------------------------------------------------------------
def run_settings(args: argparse.Namespace, arm: C.NamedSchedule, seed: int, config_sha: str) -> dict[str, Any]:
    """What a run file must match to be reused."""
    return {"config": args.config, "config_sha256": config_sha, "arm": arm.name, "spec": arm.spec, "seed": seed,
            "budget_s": args.budget_s, "snapshot_every_s": args.snapshot_every_s, "eval_samples": args.eval_samples,
            "eval_prompts": args.eval_prompts, "eval_seed": EVAL_SEED, "max_rollouts": args.max_rollouts,
            "set": [list(kv) for kv in args.sets], "jobs": args.jobs}


def existing_run(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return run if run.get("settings") == json.loads(json.dumps(settings)) else None


def run_queue(tasks: list[dict[str, Any]], jobs: int, log: Callable[[str], None]) -> list[str]:
    """Run the tasks (in order) as worker subprocesses, ``jobs`` at a time. Returns failures."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pending, running, failures = list(tasks), [], []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                logf = open(task["log_file"], "w")
                proc = subprocess.Popen([sys.executable, "-m", "benchmarks.learning_efficiency", "--worker",
                                         json.dumps(task)], cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
                running.append((proc, task, logf, time.perf_counter()))
                log(f"start {task['arm']} seed {task['settings']['seed']} (pid {proc.pid})")
            time.sleep(0.2)
            for item in list(running):
                proc, task, logf, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                logf.close()
                name = f"{task['arm']} seed {task['settings']['seed']}"
                if proc.returncode == 0 and Path(task["run_file"]).exists():
                    log(f"done  {name} in {time.perf_counter() - t0:.0f} s")
                else:
                    tail = Path(task["log_file"]).read_text(errors="replace")[-2000:]
                    failures.append(f"{name}: exit {proc.returncode}, log {task['log_file']}:\n{tail}")
                    log(f"FAILED {name} (exit {proc.returncode}); log {task['log_file']}")
    finally:
        for proc, _, logf, _ in running:  # interrupted: end only the workers this process started
            proc.terminate()
            proc.wait()
            logf.close()
    return failures


# ---- aggregation -----------------------------------------------------------------------------------------
def wall_curve(run: dict[str, Any], key: str = "reward") -> list[tuple[float, float]]:
    """(wall_s, value) of the snapshots within the budget."""
    return [(p["wall_s"], p[key]) for p in run["curve"] if p["within_budget"]]


def rollout_curve(run: dict[str, Any], key: str = "reward") -> list[tuple[float, float]]:
    return sorted(((p["rollouts"], p[key]) for p in run["curve"]), key=lambda x: x[0])


def final_value(run: dict[str, Any], budget: float, key: str = "reward") -> float:
    return step_value(wall_curve(run, key), budget)


def rollouts_in_budget(run: dict[str, Any]) -> int:
    return max(p["rollouts"] for p in run["curve"] if p["within_budget"])


def aggregate(runs_by_arm: dict[str, list[dict[str, Any]]], arms: Sequence[C.NamedSchedule], budget: float,
              T: int) -> dict[str, Any]:
    """Per-arm curves and summaries, the target and every arm's time to it (see the module docstring)."""
    ref = C.reference(arms).name
    ref_finals = [final_value(r, budget) for r in runs_by_arm[ref]]
    target = sum(ref_finals) / len(ref_finals)
    wall_grid = [budget * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    max_r = max(p["rollouts"] for runs in runs_by_arm.values() for r in runs for p in r["curve"])
    step = max(1, math.ceil(max_r / (GRID_POINTS - 1)))
    roll_grid = list(range(0, max_r + 1, step)) + ([max_r] if max_r % step else [])
    out: dict[str, Any] = {}
    for arm in arms:
        runs = sorted(runs_by_arm[arm.name], key=lambda r: r["seed"])
        curves = [wall_curve(r) for r in runs]
        finals = [final_value(r, budget) for r in runs]
        exact = [final_value(r, budget, "exact") for r in runs]
        t = time_to_target(curves, target, budget)
        logs = [row for r in runs for row in r["train_log"]]
        compute = {}
        for key in ("compute/nfe", "compute/previews", "compute/nfe_saved_frac", "time/rollout_denoise_s",
                    "time/rollout_preview_s", "time/rollout_final_s", "time/update_s"):
            vals = [row[key] for row in logs if row.get(key) is not None]
            if vals:
                compute[key + " (mean per rollout)"] = sum(vals) / len(vals)
        walls = [r["wall_total_s"] / r["rollouts_total"] for r in runs if r["rollouts_total"]]
        s = arm.schedule
        out[arm.name] = {
            "spec": arm.spec, "kind": arm.kind, "describe": arm.describe(T), "final_size": s.final_size,
            "nfe_per_prompt": s.nfe_per_prompt(T), "seeds": [r["seed"] for r in runs],
            "curve_wall": mean_curve(curves, wall_grid),
            "curve_rollouts": mean_curve([rollout_curve(r) for r in runs], roll_grid,
                                         [max(p["rollouts"] for p in r["curve"]) for r in runs]),
            "final_reward": dict(mean_ci(finals), values=finals),
            "final_exact": dict(mean_ci(exact), values=exact),
            "rollouts_in_budget": dict(mean_ci([rollouts_in_budget(r) for r in runs]),
                                       values=[rollouts_in_budget(r) for r in runs]),
            "wall_s_per_rollout": mean_ci(walls)["mean"] if walls else None,
            "stopped_by": [r["stopped_by"] for r in runs],
            "delta_vs_reference": welch_interval(finals, ref_finals),
            "time_to_target": {"time_s": t, "reached": t is not None, "reached_at_start": t == 0,
                               "speedup": speedup(budget, t),  # inf (reached at t = 0) is written as null
                               "bootstrap": bootstrap_speedup(ref_finals, curves, budget)},
            "compute": compute,
            "start_reward": [r["curve"][0]["reward"] for r in runs],
        }
    starts = {round(v, 9) for a in out.values() for v in a["start_reward"]}
    return {"reference": ref, "target": target, "target_definition":
            f"mean over seeds of {ref!r}'s held-out reward at the budget", "arms": out,
            "start_reward_identical": len(starts) == 1}


# ---- output ----------------------------------------------------------------------------------------------
def _pm(s: dict[str, Any], digits: int = 3) -> str:
    if s.get("mean", s.get("diff")) is None:
        return "n/a"
    m = s.get("mean", s.get("diff"))
    if s.get("lo") is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def _speed(x: float | None) -> str:
    if x is None:
        return "not reached"
    return "inf (at start)" if math.isinf(x) else f"{x:.2f}x"


def table(result: dict[str, Any], budget: float) -> str:
    ref = result["reference"]
    rows = []
    for name, a in result["arms"].items():
        tt = a["time_to_target"]
        if name == ref:
            own = "n/a" if tt["time_s"] is None else f"{tt['time_s']:.0f} s"
            delta, when, spd = "reference", f"{own} (its own final)", "reference"
        else:
            delta = _pm({"diff": a["delta_vs_reference"]["diff"], "lo": a["delta_vs_reference"]["lo"],
                         "hi": a["delta_vs_reference"]["hi"]})
            delta = ("+" if (a["delta_vs_reference"]["diff"] or 0) >= 0 else "") + delta
            when = "not reached within budget" if tt["time_s"] is None else f"{tt['time_s']:.0f} s"
            b, spd = tt["bootstrap"], _speed(tt["speedup"])
            if b["samples"] and len(a["seeds"]) > 1 and len(result["arms"][ref]["seeds"]) > 1:
                spd += f" [{_speed(b['lo'])}, {_speed(b['hi'])}]"
                if b["never_frac"]:
                    spd += f"; not reached in {100 * b['never_frac']:.0f} % of resamples"
        rows.append([name, f"`{a['spec']}`", len(a["seeds"]), f"{a['rollouts_in_budget']['mean']:.1f}",
                     _pm(a["final_reward"]), _pm(a["final_exact"]), delta, when, spd])
    head = ["arm", "spec", "seeds", "rollouts in budget (mean)", "final held-out reward [95% CI]",
            "exact-rate [95% CI]", f"Δ vs {ref} [95% CI]", f"time to {ref}'s final ({result['target']:.3f})",
            f"speed-up = {budget:.0f} s / time [bootstrap 95%]"]
    return C.markdown_table(head, rows)


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    plt, fig, axes = C.new_figure(2)
    nan = float("nan")
    for i, (name, a) in enumerate(result["arms"].items()):
        color = f"C{i}"
        for ax, key in ((axes[0], "curve_wall"), (axes[1], "curve_rollouts")):
            c = a[key]
            f = lambda vals: [nan if v is None else v for v in vals]  # noqa: E731
            ax.plot(c["x"], f(c["mean"]), color=color, label=f"{name} ({a['spec']}, n={len(a['seeds'])})",
                    drawstyle="steps-post")
            if len(a["seeds"]) > 1:
                ax.fill_between(c["x"], f(c["lo"]), f(c["hi"]), color=color, alpha=0.18, step="post", linewidth=0)
    for ax in axes:
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, -0.02), min(hi, 1.02))  # rewards lie in [0, 1]; t-bands of few seeds may not
        ax.axhline(result["target"], color="0.4", linestyle="--", linewidth=0.8,
                   label=f"target: {result['reference']}'s final")
        ax.set_ylabel("held-out reward (mean over seeds, 95% band)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training wall time (s)")
    axes[1].set_xlabel("rollouts")
    axes[0].legend(fontsize=7, loc="lower right")
    C.save_figure(plt, fig, path, title)


def meta() -> dict[str, Any]:
    import lightning
    import torch

    return {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": C._git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "device": "cpu",
            "device_name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads_per_run": 1, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


# ---- entry point -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"the shapes-task training config (default: {DEFAULT_CONFIG} in the repository)")
    p.add_argument("--preset", choices=PRESETS, default="main",
                   help="main: grpo / static OVF / pro at the config's sizes; paper: main plus plain GRPO at "
                        "2K (the paper's comparison); gmax: Pro-GRPO G_max ablation; "
                        "checkpoints: early / middle / late checkpoints (each with grpo as the reference)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="'[name=]plain:G' | 'static:G>K' | 'pro:G>k1@c1>k2@c2[/rule]'; replaces the preset")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per arm")
    p.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock budget per run (s)")
    p.add_argument("--snapshot-every-s", type=float, default=60.0, help="weight snapshot interval (training s)")
    p.add_argument("--eval-samples", type=int, default=2, help="held-out samples per prompt and snapshot")
    p.add_argument("--eval-prompts", type=int, default=None, help="only the first N held-out prompts (quick runs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--max-rollouts", type=int, default=None, help="also stop a run after N rollouts")
    p.add_argument("--set", dest="set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra CLI override for every run, e.g. data.prompts_per_step=4")
    p.add_argument("--allow-unequal-k", action="store_true", help="allow arms with different final group sizes")
    p.add_argument("--list-arms", action="store_true", help="print the arms and exit")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--out", default=None, help=f"output folder (default benchmarks/results/{NAME})")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.seeds < 1 or args.jobs < 1 or args.eval_samples < 1:
        raise ValueError("--seeds, --jobs and --eval-samples must be >= 1")
    if args.budget_s <= 0 or args.snapshot_every_s <= 0:
        raise ValueError("--budget-s and --snapshot-every-s must be > 0")
    if args.max_rollouts is not None and args.max_rollouts < 1:
        raise ValueError("--max-rollouts must be >= 1")
    if args.eval_prompts is not None and not 1 <= args.eval_prompts <= 36:
        raise ValueError("--eval-prompts must be in 1..36 (the held-out prompts)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.worker is not None:
        sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from ``args=`` only
        return run_one(json.loads(args.worker))
    args.sets = parse_sets([s for group in args.set for s in group])
    check_args(args)
    args.config, config_path = resolve_config(args.config or DEFAULT_CONFIG)
    T, base, _ = read_config(str(config_path), args.sets)
    specs = args.arms if args.arms else preset_arms(args.preset, T, base)
    arms = resolve_arms(specs, T, args.allow_unequal_k or (not args.arms and args.preset == "paper"))
    log = C.logger()
    print(f"arms ({'--arms' if args.arms else 'preset ' + args.preset}, T = {T}, reference = {C.reference(arms).name}):")
    for a in arms:
        print(f"  {a.name:12s} {a.spec:24s} {a.describe(T)}; NFE/prompt {a.schedule.nfe_per_prompt(T)}")
    if args.list_arms:
        return {"arms": [{"name": a.name, "spec": a.spec} for a in arms]}
    notes = []
    if args.seeds < 5:
        notes.append(f"only {args.seeds} seed(s): intervals are wide or absent (use >= 5)")
    out = C.out_dir(args, NAME)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    config_sha = hashlib.sha256(config_path.read_bytes()).hexdigest()
    tasks, skipped = [], 0
    for seed in range(args.seeds):  # seed-major: machine load spreads evenly over the arms
        for arm in arms:
            path = runs_dir / f"{arm.name}_seed{seed}.json"
            settings = run_settings(args, arm, seed, config_sha)
            if existing_run(path, settings) is not None:
                skipped += 1
                continue
            tasks.append({"arm": arm.name, "settings": settings, "config_path": str(config_path), "run_file": str(path),
                          "log_file": str(runs_dir / f"{arm.name}_seed{seed}.log")})
    log(f"{len(tasks)} run(s) to do, {skipped} reused from {runs_dir}; budget {args.budget_s:.0f} s each, "
        f"{args.jobs} at a time")
    failures = run_queue(tasks, args.jobs, log)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed:\n" + "\n\n".join(failures))
    runs_by_arm = {a.name: [json.loads((runs_dir / f"{a.name}_seed{s}.json").read_text())
                            for s in range(args.seeds)] for a in arms}
    result = aggregate(runs_by_arm, arms, args.budget_s, T)
    capped = sorted({a for a, runs in runs_by_arm.items() for r in runs if r["stopped_by"] != "budget"})
    if capped:
        notes.append(f"runs of {capped} stopped before the budget (--max-rollouts or the data ran out): their "
                     f"last weights count until the budget, so the comparison is not at equal training time")
    if not result["start_reward_identical"]:
        notes.append("the t = 0 held-out rewards differ between runs: the runs did not start from the same "
                     "weights or the evaluation noise is not fixed")
    tab = table(result, args.budget_s)
    print(tab)
    for n in notes:
        print("note:", n)
    payload = {"benchmark": NAME, "schema_version": C.SCHEMA_VERSION, "meta": meta(),
               "settings": {"config": args.config, "config_sha256": config_sha, "num_steps": T,
                            "preset": None if args.arms else args.preset, "budget_s": args.budget_s,
                            "snapshot_every_s": args.snapshot_every_s, "eval_samples": args.eval_samples,
                            "eval_prompts": args.eval_prompts, "eval_seed": EVAL_SEED, "seeds": args.seeds,
                            "jobs": args.jobs, "max_rollouts": args.max_rollouts,
                            "set": [list(kv) for kv in args.sets], "bootstrap_samples": BOOTSTRAP_SAMPLES,
                            "bootstrap_seed": BOOTSTRAP_SEED,
                            "arms": [{"name": a.name, "spec": a.spec, "kind": a.kind, "sizes": a.schedule.sizes(),
                                      "checkpoints": a.schedule.checkpoints, "rule": a.schedule.rule,
                                      "final_size": a.schedule.final_size,
                                      "nfe_per_prompt": a.schedule.nfe_per_prompt(T)} for a in arms]},
               "notes": notes, **result,
               "runs": {a.name: [f"runs/{a.name}_seed{s}.json" for s in range(args.seeds)] for a in arms}}
    title = (f"Held-out reward at equal training wall time: {Path(args.config).name}, T={T}, "
             f"{args.seeds} seed(s), budget {args.budget_s:.0f} s, 1 thread/run, {args.jobs} run(s) at a time")
    paths = C.write_outputs(out, NAME, payload, tab, None if args.no_plot else lambda p: plot(result, title, p))
    log(f"wrote {paths}")
    return payload


if __name__ == "__main__":
    main()
