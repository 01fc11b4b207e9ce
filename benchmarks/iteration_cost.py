"""What one training iteration costs under each schedule: rollout + rewards + the GRPO update.

    python -m benchmarks.iteration_cost [--backend sd3] [--size tiny|full] [--out DIR]

One iteration = ``ExpandPruneRollout.run`` (sampling, previews, final rewards), group advantages over
the survivors, and ``grpo_update`` (one optimizer; the adapter weights are restored after every
timed iteration so all rounds do the same work). Per schedule (medians over interleaved rounds):
wall time of the rollout, of the update and in total; the wall-time ratio to plain GRPO (paired
per round) next to the FLOP ratio, and the time floor (the bare denoiser forward at each rollout
step's batch size plus forward+backward at each update minibatch's size, timed in the same rounds).

FLOP model (``common.FlopModel``), in units of F = one denoiser call on one trajectory, CFG included:
    FLOPs = nfe + c * pairs,   nfe = P * sum_t live_t,   pairs = P * K * ceil(fraction * n) * epochs
with K the trained group size, n the backend's trainable steps and c the FLOPs of one training pair
(forward with grad + backward) over F, counted with ``torch.utils.flop_counter`` (``--train-cost``
overrides it). Previews, decodes and rewards are outside the FLOP model; their time is in the wall time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from pro_grpo_lightning.objectives import group_advantages
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.update import UpdateSettings, grpo_update

from .harness import (Bench, add_update_args, base_parser, restored_lora, rollout_rows, run_entry_point,
                      update_chunks)
from .measure import (FlopModel, PeakMemory, decoded_images, denoiser_forward, denoiser_train_step, interleaved,
                      median, mem_str, paired_ratios, sde_window, timed, trainable_step_indices, unit_flops)
from .report import markdown_table, new_figure, save_figure
from .schedules import NamedSchedule, reference

NAME = "iteration_cost"


def parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    add_update_args(p)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--windows", action="store_true",
                   help="presets: SDE windows alone and with Pro-GRPO (benchmarks.schedules.window_schedules) "
                        "instead of the paper's schedules")
    return p


def iteration_task(bench: Bench, s: NamedSchedule, upd: UpdateSettings, opt: torch.optim.Optimizer,
                   seed: int, track_cuda_memory: bool):
    roll = ExpandPruneRollout(bench.backend, bench.rewards, s.schedule)

    def one() -> tuple[float, float, Any, dict[str, float]]:
        t_roll, res = timed(lambda: roll.run(bench.prompts, bench.generator(seed)), bench.device)
        adv = group_advantages(res.rewards).flatten()  # [N]
        t_upd, stats = timed(lambda: grpo_update(bench.backend, res, adv, upd, opt,
                                                   generator=bench.generator(seed + 1)), bench.device)
        return t_roll, t_upd, res, stats

    def run() -> dict[str, Any]:
        mem = PeakMemory(bench.device, cpu_sampling=False) if track_cuda_memory else None
        with restored_lora(bench.backend), sde_window(bench.backend, s.window):
            if mem is not None:
                with mem:
                    wall, (t_roll, t_upd, res, _) = timed(one, bench.device)
            else:
                wall, (t_roll, t_upd, res, _) = timed(one, bench.device)
        rec = {"wall": wall, "rollout": t_roll, "update": t_upd, "preview": res.timings["preview"],
               "nfe": res.nfe, "num_previews": res.num_previews, "trained": int(res.latents.shape[0]),
               # steps that sampled stochastically (a non-zero log-prob in some trajectory): the window's
               "stochastic_steps": int((res.log_probs != 0).any(0).sum())}
        if mem is not None:
            rec["memory"] = mem.result
        return rec
    return run


def run(bench: Bench, args, log=print) -> dict[str, Any]:
    ref = reference(bench.schedules)
    P, T = len(bench.prompts), bench.num_steps
    n_trainable = len(trainable_step_indices(bench))
    units = unit_flops(bench)
    counted_c = units["train_pair"] / units["denoiser_forward"]
    c = counted_c if args.train_cost == "counted" else float(args.train_cost)
    model = FlopModel(train_cost=c, trainable_steps=n_trainable, timestep_fraction=args.timestep_fraction,
                        inner_epochs=args.inner_epochs)
    models = {}  # per schedule: an SDE window trains only its steps (fewer pairs)
    for s in bench.schedules:
        with sde_window(bench.backend, s.window):
            n = int(bench.backend.trainable_steps().sum())
        models[s.name] = FlopModel(train_cost=c, trainable_steps=n, timestep_fraction=args.timestep_fraction,
                                   inner_epochs=args.inner_epochs)
    upd = UpdateSettings(inner_epochs=args.inner_epochs, timestep_fraction=args.timestep_fraction,
                         train_batch_size=args.train_batch_size)
    opt = torch.optim.AdamW(bench.backend.trainable_parameters(), lr=args.lr)
    cuda = bench.device.type == "cuda"

    tasks: dict[str, Any] = {s.name: iteration_task(bench, s, upd, opt, args.seed, cuda) for s in bench.schedules}
    rows_needed = sorted({r for s in bench.schedules for r in rollout_rows(bench, s)})
    chunks = {s.name: [ch for _ in range(args.inner_epochs)
                       for ch in update_chunks(models[s.name].pairs(s.schedule, P) // args.inner_epochs,
                                               args.train_batch_size)]
              for s in bench.schedules}
    train_needed = sorted({ch for v in chunks.values() for ch in v})
    for B in rows_needed:
        fn = denoiser_forward(bench, B)
        tasks[f"fwd@{B}"] = (lambda fn=fn: {"s": timed(fn, bench.device)[0]})
    for B in train_needed:
        fn = denoiser_train_step(bench, B)
        tasks[f"train@{B}"] = (lambda fn=fn: {"s": timed(fn, bench.device)[0]})
    log(f"iteration_cost: {len(bench.schedules)} schedules, floors at {rows_needed} rows / {train_needed} pairs, "
        f"c = {c:.3f} (counted {counted_c:.3f}), {args.warmup} warm-up + {args.repeats} rounds")
    recs = interleaved(tasks, args.repeats, args.warmup, log)

    for s in bench.schedules:
        rows = rollout_rows(bench, s)
        for r, rec in enumerate(recs[s.name]):
            rec["rollout_floor"] = sum(recs[f"fwd@{B}"][r]["s"] for B in rows)
            rec["update_floor"] = sum(recs[f"train@{B}"][r]["s"] for B in chunks[s.name])
            rec["floor"] = rec["rollout_floor"] + rec["update_floor"]
    sched_recs = {s.name: recs[s.name] for s in bench.schedules}
    wall_ratio = paired_ratios(sched_recs, "wall", ref.name)
    floor_ratio = paired_ratios(sched_recs, "floor", ref.name)
    flops_ref = models[ref.name].total(ref.schedule, P, T)
    image_units = (units["vae_decode"] + units["reward"]) / units["denoiser_forward"]  # one decoded+scored image
    flops_ref_all = flops_ref + image_units * sum(decoded_images(ref.schedule, P, T))

    results = []
    for s in bench.schedules:
        rr = recs[s.name]
        m = lambda k: median([x[k] for x in rr])  # noqa: E731
        model = models[s.name]
        flops = model.total(s.schedule, P, T)
        flop_ratio = flops / flops_ref
        flops_all = flops + image_units * sum(decoded_images(s.schedule, P, T))
        flop_ratio_all = flops_all / flops_ref_all
        wr = wall_ratio[s.name]["median"]
        peaks = [x["memory"] for x in rr if "memory" in x]
        results.append({
            "name": s.name, "spec": s.spec, "kind": s.kind, "describe": s.describe(T),
            "window": list(s.window) if s.window else None, "trainable_steps": model.trainable_steps,
            "nfe": rr[0]["nfe"], "nfe_expected": P * s.schedule.nfe_per_prompt(T),
            "trained_trajectories": rr[0]["trained"], "update_pairs": model.pairs(s.schedule, P),
            "stochastic_steps": rr[0]["stochastic_steps"],
            "flops_units": {"rollout": model.rollout(s.schedule, P, T), "update": c * model.pairs(s.schedule, P),
                            "total": flops},
            "flops": flops * units["denoiser_forward"],
            "flop_ratio": flop_ratio, "wall_ratio": wall_ratio[s.name], "floor_ratio": floor_ratio[s.name],
            "flop_saving": 1 - flop_ratio, "wall_saving": 1 - wr, "saving_gap_points": 100 * ((1 - wr) - (1 - flop_ratio)),
            "flops_units_all": flops_all, "flop_ratio_all": flop_ratio_all,
            "saving_gap_points_all": 100 * (flop_ratio_all - wr),
            "wall_s": m("wall"), "rollout_s": m("rollout"), "update_s": m("update"), "preview_s": m("preview"),
            "floor_s": m("floor"), "rollout_floor_s": m("rollout_floor"), "update_floor_s": m("update_floor"),
            "wall_over_floor": median([x["wall"] / x["floor"] for x in rr]),
            "memory": max(peaks, key=lambda q: q["peak_bytes"]) if peaks else {"method": "n/a", "peak_bytes": None,
                                                                              "delta_bytes": None},
            "rounds": [{k: v for k, v in x.items() if k != "memory"} for x in rr],
        })
    return {"reference": ref.name, "results": results,
            "flop_model": {"unit": "one denoiser call on one trajectory sample (CFG included)",
                           "train_cost": c, "train_cost_counted": counted_c, "train_cost_source": args.train_cost,
                           "trainable_steps": n_trainable, "steps_per_trajectory": model.steps_per_trajectory,
                           "per_schedule_trainable_steps": {k: v.trainable_steps for k, v in models.items()},
                           "timestep_fraction": args.timestep_fraction, "inner_epochs": args.inner_epochs,
                           "train_batch_size": args.train_batch_size,
                           "formula": "nfe + train_cost * P * K * ceil(timestep_fraction * trainable_steps) * inner_epochs",
                           "image_units": image_units,
                           "formula_all": "formula + image_units * (previews + final decodes)"},
            "unit_flops": units, "targets": evaluate(results)}


def evaluate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pro-GRPO's wall-time saving >= its FLOP saving - 5 points (each Pro-GRPO schedule)."""
    gaps = {r["name"]: r["saving_gap_points"] for r in results if r["kind"] == "pro"}
    gaps_all = {r["name"]: r["saving_gap_points_all"] for r in results if r["kind"] == "pro"}
    return {"wall_saving_at_least_flop_saving_minus_5pts": {"value": gaps, "met": all(g >= -5 for g in gaps.values())},
            "same_against_flops_incl_decodes_and_rewards": {"value": gaps_all,
                                                            "met": all(g >= -5 for g in gaps_all.values())}}


def table(result: dict[str, Any]) -> str:
    return markdown_table(
        ["schedule", "sizes", "trained", "calls", "FLOPs / plain", "wall / plain", "floor / plain",
         "saving: FLOPs", "saving: wall", "gap (pts)", "FLOPs incl. decodes / plain", "gap to that (pts)",
         "rollout s", "update s", "iteration s", "floor s", "peak memory"],
        [[r["name"], r["describe"], r["trained_trajectories"], r["nfe"], r["flop_ratio"], r["wall_ratio"]["median"],
          r["floor_ratio"]["median"], f"{100 * r['flop_saving']:.1f}%", f"{100 * r['wall_saving']:.1f}%",
          f"{r['saving_gap_points']:+.1f}", r["flop_ratio_all"], f"{r['saving_gap_points_all']:+.1f}",
          r["rollout_s"], r["update_s"], r["wall_s"], r["floor_s"],
          mem_str(r["memory"])] for r in result["results"]])


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    plt, fig, (a1, a2) = new_figure(2)
    res = result["results"]
    names = [r["name"] for r in res]
    a1.bar(names, [r["rollout_s"] for r in res], label="rollout (incl. previews, rewards)")
    a1.bar(names, [r["update_s"] for r in res], bottom=[r["rollout_s"] for r in res], label="update")
    a1.scatter(names, [r["floor_s"] for r in res], color="black", marker="_", s=400, zorder=3,
               label="floor (denoiser alone)")
    a1.set_ylabel("seconds per iteration (median)")
    a1.set_title("one iteration", fontsize=9)
    a1.tick_params(axis="x", labelrotation=20, labelsize=8)
    a1.legend(fontsize=7)
    x = list(range(len(res)))
    w = 0.2
    a2.bar([i - 1.5 * w for i in x], [r["flop_ratio"] for r in res], width=w, label="FLOPs (model)")
    a2.bar([i - 0.5 * w for i in x], [r["flop_ratio_all"] for r in res], width=w, label="FLOPs incl. decodes+rewards")
    a2.bar([i + 0.5 * w for i in x], [r["floor_ratio"]["median"] for r in res], width=w, label="floor time")
    a2.bar([i + 1.5 * w for i in x], [r["wall_ratio"]["median"] for r in res], width=w, label="wall time")
    lo = [r["wall_ratio"]["median"] - r["wall_ratio"]["min"] for r in res]
    hi = [r["wall_ratio"]["max"] - r["wall_ratio"]["median"] for r in res]
    a2.errorbar([i + 1.5 * w for i in x], [r["wall_ratio"]["median"] for r in res], yerr=[lo, hi], fmt="none",
                ecolor="black", capsize=2, lw=0.8)
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xticks(x, names, rotation=20, fontsize=8)
    a2.set_ylabel(f"relative to {result['reference']}")
    a2.set_title("iteration cost relative to plain GRPO", fontsize=9)
    a2.legend(fontsize=7)
    save_figure(plt, fig, path, title)


def main(argv: list[str] | None = None, bench: Bench | None = None) -> dict[str, Any]:
    return run_entry_point(NAME, "iteration cost", parser(), run, table, plot, argv, bench)


if __name__ == "__main__":
    main(sys.argv[1:])
