"""What one rollout costs under each schedule: plain GRPO, static OVF, Pro-GRPO (paper, custom).

    python -m benchmarks.rollout_cost [--backend sd3] [--size tiny|full] [--steps 10] [--out DIR]

Per schedule (medians over interleaved rounds, after warm-up):
    denoiser calls (``RolloutResult.nfe``: trajectory rows summed over steps, CFG counted once),
    wall time of ``ExpandPruneRollout.run`` split into its own ``timings`` (denoise loop, previews =
    decode + reward at the checkpoints, final = decode + reward of the survivors) and the rest
    (prompt encoding, lineage gather), the floor (the same process's timing of the bare denoiser
    call at each step's batch size, summed over the steps; see ``benchmarks.floor``), the preview
    share of the wall time, the wall-time and call ratios to plain GRPO, and peak memory (CUDA:
    ``max_memory_allocated``; CPU: sampled RSS increase, approximate; else n/a).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pro_grpo_lightning.rollout import ExpandPruneRollout

from .harness import Bench, base_parser, rollout_rows, run_entry_point
from .measure import (PeakMemory, decoded_images, denoiser_forward, interleaved, median, mem_str, paired_ratios,
                      timed, unit_flops)
from .report import markdown_table, new_figure, save_figure
from .schedules import NamedSchedule, reference

NAME = "rollout_cost"


def parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--no-memory-pass", action="store_true",
                   help="CPU: skip the extra untimed run per schedule that samples RSS")
    return p


def rollout_task(bench: Bench, s: NamedSchedule, seed: int, track_cuda_memory: bool):
    roll = ExpandPruneRollout(bench.backend, bench.rewards, s.schedule)

    def run() -> dict[str, Any]:
        mem = PeakMemory(bench.device, cpu_sampling=False) if track_cuda_memory else None
        with mem if mem is not None else _null():
            wall, res = timed(lambda: roll.run(bench.prompts, bench.generator(seed)), bench.device)
        t = res.timings
        rec = {"wall": wall, "denoise": t["denoise"], "preview": t["preview"], "final": t["final"],
               "other": wall - t["denoise"] - t["preview"] - t["final"], "nfe": res.nfe,
               "nfe_full": res.nfe_full, "num_previews": res.num_previews, "survivors": int(res.latents.shape[0])}
        if mem is not None:
            rec["memory"] = mem.result
        return rec
    return run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run(bench: Bench, args, log=print) -> dict[str, Any]:
    ref = reference(bench.schedules)
    cuda = bench.device.type == "cuda"
    tasks: dict[str, Any] = {s.name: rollout_task(bench, s, args.seed, cuda) for s in bench.schedules}
    rows_needed = sorted({r for s in bench.schedules for r in rollout_rows(bench, s)})
    for B in rows_needed:
        fn = denoiser_forward(bench, B)
        tasks[f"fwd@{B}"] = (lambda fn=fn: {"s": timed(fn, bench.device)[0]})
    log(f"rollout_cost: {len(bench.schedules)} schedules + denoiser floor at {rows_needed} rows, "
        f"{args.warmup} warm-up + {args.repeats} rounds")
    recs = interleaved(tasks, args.repeats, args.warmup, log)

    # per round: each schedule's floor from that round's forward timings
    for s in bench.schedules:
        rows = rollout_rows(bench, s)
        for r, rec in enumerate(recs[s.name]):
            rec["floor"] = sum(recs[f"fwd@{B}"][r]["s"] for B in rows)
            rec["denoise_over_floor"] = rec["denoise"] / rec["floor"]
            rec["wall_over_floor"] = rec["wall"] / rec["floor"]
            rec["preview_frac"] = rec["preview"] / rec["wall"]
    wall_ratio = paired_ratios({s.name: recs[s.name] for s in bench.schedules}, "wall", ref.name)
    floor_ratio = paired_ratios({s.name: recs[s.name] for s in bench.schedules}, "floor", ref.name)

    memory: dict[str, Any] = {}
    if cuda:
        for s in bench.schedules:
            peaks = [r["memory"] for r in recs[s.name] if "memory" in r]
            memory[s.name] = max(peaks, key=lambda m: m["peak_bytes"]) if peaks else {"method": "n/a"}
    elif not args.no_memory_pass:
        log("memory pass (CPU, sampled RSS, untimed)")
        for s in bench.schedules:
            roll = ExpandPruneRollout(bench.backend, bench.rewards, s.schedule)
            with PeakMemory(bench.device) as mem:
                roll.run(bench.prompts, bench.generator(args.seed))
            memory[s.name] = mem.result
    else:
        memory = {s.name: {"method": "n/a", "peak_bytes": None, "delta_bytes": None} for s in bench.schedules}

    P, T = len(bench.prompts), bench.num_steps
    units = unit_flops(bench)
    image_units = (units["vae_decode"] + units["reward"]) / units["denoiser_forward"]
    results = []
    for s in bench.schedules:
        rr = recs[s.name]
        m = lambda k: median([x[k] for x in rr])  # noqa: E731
        results.append({
            "name": s.name, "spec": s.spec, "kind": s.kind, "describe": s.describe(T),
            "nfe": rr[0]["nfe"], "nfe_expected": P * s.schedule.nfe_per_prompt(T),
            "nfe_ratio": s.schedule.nfe_per_prompt(T) / ref.schedule.nfe_per_prompt(T),
            "num_previews": rr[0]["num_previews"], "survivors": rr[0]["survivors"],
            "wall_s": m("wall"), "denoise_s": m("denoise"), "preview_s": m("preview"), "final_s": m("final"),
            "other_s": m("other"), "floor_s": m("floor"),
            "denoise_over_floor": m("denoise_over_floor"), "wall_over_floor": m("wall_over_floor"),
            "preview_frac": m("preview_frac"),
            "preview_add": m("preview") / max(m("wall") - m("preview"), 1e-12),
            "preview_flop_add": _preview_flop_add(s, P, T, image_units),
            "wall_ratio": wall_ratio[s.name], "floor_ratio": floor_ratio[s.name],
            "memory": memory.get(s.name),
            "rounds": [{k: v for k, v in x.items() if k != "memory"} for x in rr],
        })
    fwd = {B: median([x["s"] for x in recs[f"fwd@{B}"]]) for B in rows_needed}
    targets = evaluate(results)
    return {"reference": ref.name, "results": results, "unit_flops": units, "image_units": image_units,
            "forward_s": [{"rows": B, "median_s": fwd[B], "per_sample_ms": 1e3 * fwd[B] / B} for B in rows_needed],
            "targets": targets}


def _preview_flop_add(s: NamedSchedule, P: int, T: int, image_units: float) -> float:
    """Counted FLOPs of the previews over the rest of the rollout (denoiser calls + final images)."""
    previews, finals = decoded_images(s.schedule, P, T)
    return previews * image_units / (P * s.schedule.nfe_per_prompt(T) + finals * image_units)


def evaluate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets for a rollout: denoise loop within 10 % of its floor (every schedule);
    previews add < 10 % to a Pro-GRPO rollout (schedules that score previews)."""
    floor = {r["name"]: r["denoise_over_floor"] - 1 for r in results}
    wall_floor = {r["name"]: r["wall_over_floor"] - 1 for r in results}
    prev = {r["name"]: r["preview_add"] for r in results if r["num_previews"] > 0}
    return {
        "denoise_within_10pct_of_floor": {"value": floor, "met": all(v <= 0.10 for v in floor.values())},
        "rollout_wall_over_floor": {"value": wall_floor, "met": all(v <= 0.10 for v in wall_floor.values())},
        "previews_add_under_10pct": {"value": prev, "met": all(v < 0.10 for v in prev.values())},
    }


def table(result: dict[str, Any]) -> str:
    return markdown_table(
        ["schedule", "sizes", "denoiser calls", "calls / plain", "wall s", "wall / plain", "denoise s",
         "floor s", "denoise / floor", "previews s (n)", "previews add", "previews add (FLOPs)", "final s",
         "other s", "peak memory"],
        [[r["name"], r["describe"], r["nfe"], r["nfe_ratio"], r["wall_s"], r["wall_ratio"]["median"],
          r["denoise_s"], r["floor_s"], r["denoise_over_floor"],
          f"{r['preview_s']:.3g} ({r['num_previews']})",
          f"{100 * r['preview_add']:.1f}%" if r["num_previews"] else "-",
          f"{100 * r['preview_flop_add']:.1f}%" if r["num_previews"] else "-", r["final_s"], r["other_s"], mem_str(r["memory"] or {})] for r in result["results"]])


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    plt, fig, (a1, a2) = new_figure(2)
    res = result["results"]
    names = [r["name"] for r in res]
    bottom = [0.0] * len(res)
    for key, label in (("denoise_s", "denoise loop"), ("preview_s", "previews (decode+reward)"),
                       ("final_s", "final decode+reward"), ("other_s", "other")):
        vals = [max(r[key], 0.0) for r in res]
        a1.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a1.scatter(names, [r["floor_s"] for r in res], color="black", marker="_", s=400, zorder=3,
               label="floor (denoiser alone)")
    a1.set_ylabel("seconds per rollout (median)")
    a1.set_title("where a rollout's time goes", fontsize=9)
    a1.tick_params(axis="x", labelrotation=20, labelsize=8)
    a1.legend(fontsize=7)
    x = range(len(res))
    w = 0.27
    a2.bar([i - w for i in x], [r["nfe_ratio"] for r in res], width=w, label="denoiser calls")
    a2.bar(list(x), [r["floor_ratio"]["median"] for r in res], width=w, label="floor time")
    a2.bar([i + w for i in x], [r["wall_ratio"]["median"] for r in res], width=w, label="wall time")
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xticks(list(x), names, rotation=20, fontsize=8)
    a2.set_ylabel(f"relative to {result['reference']}")
    a2.set_title("rollout cost relative to plain GRPO", fontsize=9)
    a2.legend(fontsize=7)
    save_figure(plt, fig, path, title)


def main(argv: list[str] | None = None, bench: Bench | None = None) -> dict[str, Any]:
    return run_entry_point(NAME, "rollout cost", parser(), run, table, plot, argv, bench)


if __name__ == "__main__":
    main(sys.argv[1:])
