"""The floor: what the denoiser alone costs per sample, across batch sizes, and what each schedule's
denoiser calls alone would take at the batch sizes it actually runs.

    python -m benchmarks.floor [--backend sd3] [--size tiny|full] [--out DIR]

Forward: the denoiser call the rollout makes for B trajectories at one step (CFG doubles the
physical rows), no step arithmetic, no grad. Train: what the update does per minibatch of B
(trajectory, step) pairs: the policy step with grad plus the backward pass.

Schedule floors:  rollout floor = sum over the T steps of forward(rows at that step);
                  update floor  = sum over the update's minibatches of train(minibatch size).
``rollout_cost`` and ``iteration_cost`` measure their own floors in the same process, interleaved with
the runs they compare them to; this entry point shows the latency curve behind them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .harness import Bench, add_update_args, base_parser, rollout_rows, run_entry_point, update_chunks
from .measure import FlopModel, denoiser_forward, denoiser_train_step, interleaved, median, timed, trainable_step_indices
from .report import markdown_table, new_figure, save_figure

NAME = "floor"
DEFAULT_GRID = "1,2,4,8,16,24,32,48"
DEFAULT_TRAIN_GRID = "1,2,4,8"


def parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default=DEFAULT_GRID,
                   help="trajectory rows to time the forward at (the schedules' own sizes are added)")
    p.add_argument("--train-batch-sizes", default=DEFAULT_TRAIN_GRID,
                   help="pairs per minibatch to time forward+backward at (the update's sizes are added)")
    add_update_args(p)
    p.set_defaults(repeats=5)
    return p


def schedule_floors(bench: Bench, fwd: dict[int, float], train: dict[int, float], model: FlopModel,
                    train_batch: int) -> list[dict[str, Any]]:
    out = []
    for s in bench.schedules:
        rows = rollout_rows(bench, s)
        pairs = model.pairs(s.schedule, len(bench.prompts))
        chunks = update_chunks(pairs, train_batch)
        out.append({"name": s.name, "rows_per_step": rows, "nfe": sum(rows),
                    "rollout_floor_s": sum(fwd[r] for r in rows),
                    "update_pairs": pairs, "update_chunks": chunks,
                    "update_floor_s": sum(train[c] for c in chunks) if all(c in train for c in chunks) else None})
    return out


def run(bench: Bench, args, log=print) -> dict[str, Any]:
    sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x}
                   | {r for s in bench.schedules for r in rollout_rows(bench, s)})
    model = FlopModel(train_cost=0.0, trainable_steps=len(trainable_step_indices(bench)),
                        timestep_fraction=args.timestep_fraction, inner_epochs=args.inner_epochs)
    update_sizes = {c for s in bench.schedules
                    for c in update_chunks(model.pairs(s.schedule, len(bench.prompts)), args.train_batch_size)}
    train_sizes = sorted({int(x) for x in args.train_batch_sizes.split(",") if x} | update_sizes)

    tasks: dict[str, Any] = {}
    for B in sizes:
        fn = denoiser_forward(bench, B)
        tasks[f"fwd@{B}"] = (lambda fn=fn: {"s": timed(fn, bench.device)[0]})
    for B in train_sizes:
        fn = denoiser_train_step(bench, B)
        tasks[f"train@{B}"] = (lambda fn=fn: {"s": timed(fn, bench.device)[0]})
    log(f"floor: timing forward at {sizes} rows and forward+backward at {train_sizes} pairs")
    recs = interleaved(tasks, args.repeats, args.warmup, log)
    fwd = {B: median([r["s"] for r in recs[f"fwd@{B}"]]) for B in sizes}
    train = {B: median([r["s"] for r in recs[f"train@{B}"]]) for B in train_sizes}
    cfg = bench.cfg_factor
    result = {
        "forward": [{"rows": B, "physical_rows": B * cfg, "median_s": fwd[B], "per_sample_ms": 1e3 * fwd[B] / B,
                     "samples_s": [r["s"] for r in recs[f"fwd@{B}"]]} for B in sizes],
        "train": [{"rows": B, "physical_rows": B * cfg, "median_s": train[B], "per_sample_ms": 1e3 * train[B] / B,
                   "samples_s": [r["s"] for r in recs[f"train@{B}"]]} for B in train_sizes],
        "schedules": schedule_floors(bench, fwd, train, model, args.train_batch_size),
        "update": {"train_batch_size": args.train_batch_size, "timestep_fraction": args.timestep_fraction,
                   "inner_epochs": args.inner_epochs, "trainable_steps": model.trainable_steps,
                   "steps_per_trajectory": model.steps_per_trajectory},
    }
    return result


def table(result: dict[str, Any]) -> str:
    fwd = {r["rows"]: r for r in result["forward"]}
    train = {r["rows"]: r for r in result["train"]}
    rows = sorted(set(fwd) | set(train))
    t1 = markdown_table(
        ["rows (trajectories)", "forward ms/sample", "forward+backward ms/sample", "fwd+bwd / fwd"],
        [[B, fwd[B]["per_sample_ms"] if B in fwd else "", train[B]["per_sample_ms"] if B in train else "",
          train[B]["per_sample_ms"] / fwd[B]["per_sample_ms"] if B in fwd and B in train else ""] for B in rows])
    t2 = markdown_table(
        ["schedule", "rows per step", "denoiser calls", "rollout floor s", "update pairs", "update floor s"],
        [[s["name"], _compress(s["rows_per_step"]), s["nfe"], s["rollout_floor_s"], s["update_pairs"],
          s["update_floor_s"] if s["update_floor_s"] is not None else "n/a"] for s in result["schedules"]])
    return t1 + "\n\n" + t2


def _compress(rows: list[int]) -> str:
    """[48, 48, 48, 24, 12] -> '48x3 24 12'."""
    out, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[i]:
            j += 1
        out.append(f"{rows[i]}x{j - i + 1}" if j > i else str(rows[i]))
        i = j + 1
    return " ".join(out)


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    plt, fig, (a1, a2) = new_figure(2)
    for key, label, marker in (("forward", "forward (no grad)", "o"), ("train", "forward + backward", "s")):
        xs = [r["rows"] for r in result[key]]
        a1.plot(xs, [r["per_sample_ms"] for r in result[key]], marker=marker, label=label)
    a1.set_xscale("log", base=2)
    a1.set_xlabel("trajectories per denoiser call (CFG rows x2 inside)")
    a1.set_ylabel("ms per trajectory sample")
    a1.set_title("latency curve", fontsize=9)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    names = [s["name"] for s in result["schedules"]]
    roll = [s["rollout_floor_s"] for s in result["schedules"]]
    upd = [s["update_floor_s"] or 0.0 for s in result["schedules"]]
    a2.bar(names, roll, label="rollout floor")
    a2.bar(names, upd, bottom=roll, label="update floor")
    a2.set_ylabel("seconds (denoiser alone)")
    a2.set_title("each schedule's floor at its own batch sizes", fontsize=9)
    a2.tick_params(axis="x", labelrotation=20, labelsize=8)
    a2.legend(fontsize=8)
    save_figure(plt, fig, path, title)


def main(argv: list[str] | None = None, bench: Bench | None = None) -> dict[str, Any]:
    return run_entry_point(NAME, "denoiser floor", parser(), run, table, plot, argv, bench)


if __name__ == "__main__":
    main(sys.argv[1:])
