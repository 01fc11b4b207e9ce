"""Adaptive pruning points (``python -m pro_grpo_lightning adapt``) against fixed ones, on shared trajectories.

    python -m benchmarks.adaptive_schedule --config configs/quickstart.yaml --select-rollouts 8 \\
        --eval-rollouts 16 --bound 0.05 --out docs/results/adaptive_schedule

1. Selection: the ``adapt`` rule on ``--select-rollouts`` audit rollouts (rollout indices 0..), every
   step previewed (``pro_grpo_lightning/adaptive.py``).
2. Evaluation on ``--eval-rollouts`` *other* audit rollouts (the next prompt batches and noise
   indices, so the choice is not scored on the data that made it): every arm's selections are
   replayed on the same recorded previews and final rewards (common trajectories), so the overlap
   difference between arms is paired per rollout. Arms: the adaptive choice, the config's
   checkpoints, the paper's positions for T (SD3.5-M's 5 and 7 of 10, SD-v1.4's 30 and 40 of 50,
   scaled as ``round(c * T / T_paper)``) and, for reference, the latest points.
   Compute per rollout: the FLOP model of ``adaptive.rollout_flops`` x prompts (denoiser calls on
   one trajectory, previews at their counted cost); deterministic for a schedule.

Writes ``adaptive_schedule.json`` (both measurements, per-rollout overlaps, the command) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from pro_grpo_lightning.adaptive import (analyse, build_cli, measure, overlap_with_final, preview_cost_in_calls,
                                         prompt_batches, rollout_flops, sequential_choice)
from pro_grpo_lightning.schedules import ProGRPOSchedule

from .stats import mean_ci


def paper_points(num_steps: int, count: int) -> list[int] | None:
    """The paper's checkpoints scaled to T (0-based, as ``benchmarks/schedules.py`` scales them)."""
    paper = {2: [(10, [5, 7]), (50, [30, 40])]}.get(count)
    if paper is None:
        return None
    t_paper, pts = min(paper, key=lambda p: abs(p[0] - num_steps))
    return [round(c * num_steps / t_paper) for c in pts]


def replay(probes: torch.Tensor, final: torch.Tensor, steps: list[int], cks: list[int], keep: list[int],
           rule: str) -> torch.Tensor:
    """Per-rollout overlap [R] of the schedule with checkpoints ``cks`` replayed on recorded scores."""
    R, S, P, G = probes.shape
    index = {s: j for j, s in enumerate(steps)}
    chosen = sequential_choice([probes[:, index[c]].reshape(R * P, G) for c in cks], keep, rule)  # [R*P, K]
    return overlap_with_final(chosen, final.reshape(R * P, G), rule).view(R, P).mean(1)  # [R]


def bound_sweep(out: dict[str, Any], bounds: list[float]) -> list[dict[str, Any]]:
    """What the rule picks at each bound, from the stored measurements alone: the choice on the
    selection rollouts (``--bound`` only moves the threshold), scored on the evaluation rollouts,
    paired with the config's and the paper's points per rollout."""
    sel, ev = out["selection"], out["evaluation"]
    by_ck = {tuple(t["checkpoints"]): t for t in ev["tuples"]}
    ref = sel["reference_overlap"]
    rows = []
    for bound in bounds:
        feasible = [t for t in sel["tuples"] if t["overlap"] >= ref - bound]
        pick = min(feasible, key=lambda t: (t["flops_per_prompt"], t["checkpoints"]))
        got = by_ck[tuple(pick["checkpoints"])]
        row = {"bound": bound, "checkpoints": pick["checkpoints"], "selection_overlap": pick["overlap"],
               "overlap": mean_ci(got["overlap_per_rollout"]),
               "flops_per_rollout": out["prompts_per_rollout"] * got["flops_per_prompt"]}
        for name in ("config", "paper"):
            if name in out["arms"]:
                arm = out["arms"][name]
                base = by_ck[tuple(arm["checkpoints"])]["overlap_per_rollout"]
                row[f"overlap_minus_{name}"] = mean_ci([a - b for a, b in zip(got["overlap_per_rollout"], base)])
                row[f"flops_ratio_to_{name}"] = row["flops_per_rollout"] / arm["flops_per_rollout"]
        rows.append(row)
    return rows


def sweep_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| bound | chosen checkpoints | overlap (selection) | overlap (evaluation) | minus config | minus paper "
             "| FLOPs / config | FLOPs / paper |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bound']} | {r['checkpoints']} | {r['selection_overlap']:.3f} | {ci(r['overlap'], sign='')} | "
                     f"{ci(r['overlap_minus_config']) if 'overlap_minus_config' in r else '-'} | "
                     f"{ci(r['overlap_minus_paper']) if 'overlap_minus_paper' in r else '-'} | "
                     f"{r.get('flops_ratio_to_config', float('nan')):.3f} | {r.get('flops_ratio_to_paper', float('nan')):.3f} |")
    return "\n".join(lines)


def report(folder: str, bounds: list[float]) -> int:
    """``--report DIR``: the bound sweep of a stored run, written beside it (``bound_sweep.json``/``.md``)."""
    with open(os.path.join(folder, "adaptive_schedule.json")) as fh:
        out = json.load(fh)
    rows = bound_sweep(out, bounds)
    with open(os.path.join(folder, "bound_sweep.json"), "w") as fh:
        json.dump({"command": "python -m benchmarks.adaptive_schedule " + " ".join(sys.argv[1:]), "rows": rows}, fh,
                  indent=1)
    md = sweep_table(rows)
    with open(os.path.join(folder, "bound_sweep.md"), "w") as fh:
        fh.write(f"`python -m benchmarks.adaptive_schedule {' '.join(sys.argv[1:])}`\n\n{md}\n")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--report"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_schedule --report")
        p.add_argument("--report", required=True, help="a folder this benchmark wrote")
        p.add_argument("--bounds", default="0,0.05,0.1,0.15,0.2,0.3")
        a = p.parse_args()
        return report(a.report, [float(b) for b in a.bounds.split(",")])
    p = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_schedule", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--select-rollouts", type=int, default=8)
    p.add_argument("--eval-rollouts", type=int, default=16)
    p.add_argument("--bound", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/adaptive_schedule")
    args, overrides = p.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cli = build_cli([a for c in args.config for a in ("--config", c)] + overrides)
    module, sched = cli.model, cli.model.schedule
    module.configure_model()
    module.backend.eval()
    T, keep, rule, G = module.backend.num_steps, list(sched.keep), sched.rule, sched.group_size
    steps = list(range(T))
    with torch.no_grad():
        sel = measure(module, cli.datamodule, args.select_rollouts, steps, log=print)
        prompts, _ = prompt_batches(cli.datamodule, 1)[0]
        cost = preview_cost_in_calls(module, prompts[0])
        chosen = analyse(*sel, steps, G, keep, rule, T, cost, args.bound)
        print(f"chosen {chosen['chosen']} (reference {chosen['reference']}, config {sched.checkpoints})", flush=True)
        ev = measure(module, cli.datamodule, args.eval_rollouts, steps, first_rollout=args.select_rollouts, log=print)
    evaluation = analyse(*ev, steps, G, keep, rule, T, cost, args.bound)  # every tuple, on fresh rollouts
    P = ev[0].shape[2]
    arms = {"adaptive": chosen["chosen"], "config": list(sched.checkpoints)}
    paper = paper_points(T, len(keep))
    if paper is not None and len(set(paper)) == len(paper) and all(0 <= c < T for c in paper):
        arms["paper"] = paper
    arms["latest"] = chosen["reference"]
    per = {name: replay(*ev, steps, cks, keep, rule) for name, cks in arms.items()}  # [R] each
    flops = {name: P * rollout_flops(ProGRPOSchedule(G, cks, keep, rule), T, cost) for name, cks in arms.items()}
    summary = {}
    for name, cks in arms.items():
        row = {"checkpoints": cks, "overlap": mean_ci(per[name].tolist()), "flops_per_rollout": flops[name],
               "nfe_per_rollout": P * ProGRPOSchedule(G, cks, keep, rule).nfe_per_prompt(T),
               "overlap_per_rollout": per[name].tolist()}
        for ref in ("config", "paper"):
            if ref in arms and ref != name:
                row[f"overlap_minus_{ref}"] = mean_ci((per[name] - per[ref]).tolist())
                row[f"flops_ratio_to_{ref}"] = flops[name] / flops[ref]
        summary[name] = row
    out = {"command": "python -m benchmarks.adaptive_schedule " + " ".join(sys.argv[1:] if argv is None else argv),
           "threads": args.threads, "load_average_end": os.getloadavg(), "preview_cost_in_calls": cost,
           "prompts_per_rollout": P, "plain_gmax_flops_per_rollout": P * G * T,
           "selection": chosen, "evaluation": evaluation, "arms": summary}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adaptive_schedule.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    md = table(out)
    with open(os.path.join(args.out, "adaptive_schedule.md"), "w") as fh:
        fh.write(f"`{out['command']}`\n\n{md}\n")
    print(md)
    return 0


def ci(d: dict[str, Any], sign: str = "+") -> str:
    """``mean [lo, hi]`` (signed by default: a difference)."""
    f = f"{{:{sign}.3f}}"
    if d.get("lo") is None:
        return f.format(d["mean"])
    return f"{f.format(d['mean'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def table(out: dict[str, Any]) -> str:
    rows = ["| arm | checkpoints | rollout FLOPs (denoiser calls) | / config | / paper | overlap | "
            "minus config | minus paper |", "|---|---|---|---|---|---|---|---|"]
    for name, r in out["arms"].items():
        rows.append(f"| {name} | {r['checkpoints']} | {r['flops_per_rollout']:.0f} | "
                    f"{r.get('flops_ratio_to_config', 1.0):.3f} | {r.get('flops_ratio_to_paper', 1.0):.3f} | "
                    f"{ci(r['overlap'], sign='')} | "
                    f"{ci(r['overlap_minus_config']) if 'overlap_minus_config' in r else '-'} | "
                    f"{ci(r['overlap_minus_paper']) if 'overlap_minus_paper' in r else '-'} |")
    ev = out["evaluation"]
    rows += ["", "| step | preview-final corr (selection) | (evaluation) | one-stage overlap (selection) | (evaluation) |",
             "|---|---|---|---|---|"]
    for a, b in zip(out["selection"]["per_step"], ev["per_step"]):
        rows.append(f"| {a['step']} | {a['corr']:.3f} | {b['corr']:.3f} | {a['overlap_one_stage']:.3f} | "
                    f"{b['overlap_one_stage']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
