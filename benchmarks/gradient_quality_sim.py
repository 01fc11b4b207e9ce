"""Do the mechanism benchmark's intervals cover? A simulation with its structure and zero signal.

    python -m benchmarks.gradient_quality_sim [--reps 200] [--rollouts 128] [--prompts 4] [--dim 400] [--out DIR]

Each simulated run has the benchmark's structure: ``rollouts`` rollouts of ``prompts`` prompts with
G_sample trajectories each, the same arms (``gradient_quality.arm_schedules``, selected by
``gradient_quality.select_arm`` from previews that predict the final reward with correlation about
0.7), the same arm gradients (``gradient_quality.arm_gradient``, the config's advantages) and the same
scoring (``gradient_quality.grams`` + ``gradient_quality.summarize``: cross-fitted halves, delete-one-
rollout jackknife). The per-trajectory log-prob gradients h are drawn independently of the rewards
(zero mean, a decaying spectrum over ``dim`` coordinates, a log-normal scale per trajectory), so every
arm's expected gradient is 0 and every true difference is 0. Reported per comparison family: how
often the 95 % interval covers 0 (target 0.95) and how often Holm resolves any comparison (the
family-wise error, target at most 0.05); with ``--looks L`` the same at level 1 - 0.05 / L.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .gradient_quality import DEFAULT_SCHEDULES, arm_gradient, arm_schedules, grams, select_arm, summarize
from .schedules import parse_schedule

ROOT = Path(__file__).resolve().parent.parent
ADV = dict(std_mode="global", eps=1e-4, clip=5.0)  # configs/quickstart.yaml's advantages


def simulate_run(rollouts: int, prompts: int, dim: int, K: int, G_static: int, schedules: list[str],
                 seed: int, signal: float = 0.0) -> dict[str, Any]:
    """One simulated run in the benchmark's result format. ``signal`` > 0 adds signal x (reward - 0.5)
    along the first coordinate to every h (a policy gradient that exists: tests use it). Costs: each
    arm's denoiser calls + 5 per trained trajectory, so the equal-FLOP n differ as in the benchmark."""
    arms = arm_schedules(K, G_static, [parse_schedule(s) for s in schedules])
    G = max(a.schedule.group_size for a in arms)
    steps = sorted({c for a in arms for c in a.schedule.checkpoints})
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.25  # [D] decaying spectrum (sd)
    grads: dict[str, list[torch.Tensor]] = {a.name: [] for a in arms}
    full, rows = [], []
    for r in range(rollouts):
        final = torch.rand(prompts, G, generator=gen)  # [P, G]
        previews = {c: 0.7 * final + 0.3 * torch.rand(prompts, G, generator=gen) for c in steps}  # [P, G]
        size = torch.exp(0.5 * torch.randn(prompts, G, 1, generator=gen, dtype=torch.float64))  # [P, G, 1]
        H = torch.randn(prompts, G, dim, generator=gen, dtype=torch.float64) * scale * size  # [P, G, D]
        H[..., 0] += signal * (final.double() - 0.5)
        full.append(arm_gradient(H, torch.arange(G).expand(prompts, -1), final, 1, ADV))
        arm_gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        for a in arms:
            grads[a.name].append(arm_gradient(H, select_arm(a.schedule, previews, final, arm_gen), final, 1, ADV))
        rows.append({"rollout": r, "arms": {a.name: {"spread": 0.0} for a in arms}})
    cost = {a.name: a.schedule.nfe_per_prompt(10) + a.schedule.final_size * 5 for a in arms}
    return {"arms": {a.name: {"spec": a.spec, "cost_F_per_prompt": {"total": float(cost[a.name])}} for a in arms},
            "per_rollout": rows, "grams": grams(grads, full)}


def coverage(reps: int, rollouts: int, prompts: int, dim: int, K: int = 6, G_static: int = 16,
             schedules: list[str] | None = None, seed: int = 0, log=print, looks: int = 1) -> dict[str, Any]:
    """Per family (and per measure): interval coverage of 0 and the Holm family-wise error over ``reps``
    runs, scored as the benchmark's ``--looks`` scores (level 1 - 0.05 / looks; with looks > 1 the
    nominal 95 % figures too, as ``coverage_nominal`` / ``familywise_error_nominal``)."""
    schedules = schedules or DEFAULT_SCHEDULES
    hits: dict[str, list[float]] = {}
    fwe: dict[str, list[bool]] = {}
    for i in range(reps):
        s = summarize(simulate_run(rollouts, prompts, dim, K, G_static, schedules, seed * 100_003 + i), looks=looks)
        for fam, comps in s["families"].items():
            hits.setdefault(fam, []).extend(float(c["lo"] <= 0 <= c["hi"]) for c in comps.values())
            fwe.setdefault(fam, []).append(any(c["resolved"] for c in comps.values()))
            if looks > 1:
                nominal = [c["nominal"] for c in comps.values()]
                hits.setdefault(fam + "#nominal", []).extend(float(c["lo"] <= 0 <= c["hi"]) for c in nominal)
                fwe.setdefault(fam + "#nominal", []).append(any(c["resolved"] for c in nominal))
        if (i + 1) % 20 == 0:
            log(f"{i + 1}/{reps} runs")
    fams = [f for f in hits if not f.endswith("#nominal")]
    all_hits = [h for f in fams for h in hits[f]]
    out = {"reps": reps, "rollouts": rollouts, "prompts": prompts, "dim": dim, "K": K, "schedules": schedules,
           "seed": seed, "coverage_all": float(np.mean(all_hits)), "intervals": len(all_hits),
           "families": {f: {"coverage": float(np.mean(hits[f])), "intervals": len(hits[f]),
                            "familywise_error": float(np.mean(fwe[f]))} for f in fams}}
    if looks > 1:
        out |= {"looks": looks, "level": 1 - 0.05 / looks,
                "coverage_all_nominal": float(np.mean([h for f in fams for h in hits[f + "#nominal"]]))}
        for f in fams:
            out["families"][f] |= {"coverage_nominal": float(np.mean(hits[f + "#nominal"])),
                                   "familywise_error_nominal": float(np.mean(fwe[f + "#nominal"]))}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_quality_sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--rollouts", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--dim", type=int, default=400)
    p.add_argument("--schedule", nargs="+", default=DEFAULT_SCHEDULES, help="as gradient_quality's --schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--looks", type=int, default=1, help="score as gradient_quality --looks does (alpha 0.05 / LOOKS)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gradient_quality_sim"))
    args = p.parse_args(argv)
    if args.rollouts < 6 or args.reps < 1 or args.dim < 1 or args.looks < 1:
        p.error(f"--rollouts must be >= 6, --reps, --dim and --looks >= 1; got {args.rollouts}, {args.reps}, "
                f"{args.dim}, {args.looks}")
    torch.set_num_threads(args.threads)
    res = coverage(args.reps, args.rollouts, args.prompts, args.dim, schedules=args.schedule, seed=args.seed,
                   looks=args.looks)
    res["command"] = ["python", "-m", "benchmarks.gradient_quality_sim", *(argv if argv is not None else sys.argv[1:])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "command"}, indent=1))
    return res


if __name__ == "__main__":
    main()
