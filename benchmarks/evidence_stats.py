"""Statistics behind docs/evidence.md, from a learning-efficiency output folder's run files.

    python -m benchmarks.evidence_stats DIR BUDGET_S

Per arm and measure (reward, exact, shape, count): the final held-out value and its gain over the
run's own start (t intervals over seeds); Welch intervals of every arm against grpo, and of the
paper-style pair pro - grpo12 and pro - static when both exist; and the gain pooled over all arms
(does RL move the model at all?). Uses the benchmark's own ``final_value``
(``benchmarks.learning_report``) and ``mean_ci`` / ``welch_interval`` (``benchmarks.stats``).
Reads ``DIR/runs/*.json`` (a benchmark's output) or ``DIR/run_files/*.json`` (the copies under
``docs/results``).
"""

from __future__ import annotations

import glob
import json
import sys
from typing import Any

from .learning_report import final_value, rollouts_in_budget
from .report import markdown_table
from .stats import mean_ci, welch_interval

PAIRS = (("pro", "grpo12"), ("pro", "static"))  # besides every arm against grpo


def compute(folder: str, budget: float) -> dict[str, Any]:
    """{measure: {"arms": {arm: {"start", "final", "gain"}}, "pairs": {"a - b": welch}, "pooled_gain": mean_ci}}."""
    runs = _runs(folder)
    out: dict[str, Any] = {}
    for key in ("reward", "exact", "shape", "count"):
        final = {a: [final_value(r, budget, key) for r in rs] for a, rs in runs.items()}
        start = {a: [r["curve"][0][key] for r in rs] for a, rs in runs.items()}
        arms = {a: {"start": start[a][0], "final": mean_ci(final[a]),
                    "gain": mean_ci([f - s for f, s in zip(final[a], start[a])])} for a in final}
        pairs = [(a, "grpo") for a in final if a != "grpo"] + list(PAIRS)
        out[key] = {"arms": arms,
                    "pairs": {f"{a} - {b}": welch_interval(final[a], final[b]) for a, b in pairs
                              if a in final and b in final},
                    "pooled_gain": mean_ci([f - s for a in final for f, s in zip(final[a], start[a])])}
    return out


def _runs(folder: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for f in sorted(glob.glob(f"{folder}/runs/*.json") or glob.glob(f"{folder}/run_files/*.json")):
        with open(f) as fh:
            r = json.load(fh)
        runs.setdefault(r["settings"]["arm"], []).append(r)
    if not runs:
        raise ValueError(f"{folder}: no runs/*.json or run_files/*.json")
    return runs


def markdown(folder: str, budget: float, order: list[str] | None = None, d: int = 3) -> str:
    """The arms' table docs/evidence.md shows for a run folder: rollouts in the budget, the final held-out
    reward and its gain over the start, the exact rate, the count part and the Welch difference to grpo
    (95 % t intervals over seeds; a start row first: every run starts from the same weights and noise).
    ``order``: the arms to show, in that order (default: every arm, grpo first)."""
    runs, m = _runs(folder), compute(folder, budget)
    order = order or sorted(runs, key=lambda a: a != "grpo")

    def iv(c: dict[str, float], sign: str = "", keys: tuple[str, str, str] = ("mean", "lo", "hi")) -> str:
        a, lo, hi = (c[k] for k in keys)
        return f"{a:{sign}.{d}f} [{lo:{sign}.{d}f}, {hi:{sign}.{d}f}]"
    start = {k: f"{next(iter(m[k]['arms'].values()))['start']:.{d}f}" for k in ("reward", "exact", "count")}
    rows = [["(start, every run)", "", "", start["reward"], "", start["exact"], start["count"], ""]]
    for arm in order:
        rs = runs[arm]
        n = [rollouts_in_budget(r) for r in rs]
        pair = m["reward"]["pairs"].get(f"{arm} - grpo")
        rows.append([arm, f"`{rs[0]['spec']}`", f"{sum(n) / len(n):.1f}", iv(m["reward"]["arms"][arm]["final"]),
                     iv(m["reward"]["arms"][arm]["gain"], "+"), iv(m["exact"]["arms"][arm]["final"]),
                     f"{m['count']['arms'][arm]['final']['mean']:.{d}f}",
                     "reference" if arm == "grpo" else iv(pair, "+", ("diff", "lo", "hi"))])
    head = ["arm", "schedule", f"rollouts in {budget:.0f} s (mean of {len(next(iter(runs.values())))})",
            "final held-out reward [95 % CI]", "gain over the start [95 % CI]", "exact rate [95 % CI]",
            "count part", "Δ vs grpo [95 % Welch CI]"]
    return markdown_table(head, rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__)
    for key, m in compute(argv[0], float(argv[1])).items():
        print(f"--- {key}")
        for a, v in m["arms"].items():
            print(a, "start", round(v["start"], 4), "final", v["final"], "gain", v["gain"])
        for name, w in m["pairs"].items():
            print(f"{name}:", w)
        print("all arms gain", m["pooled_gain"])


if __name__ == "__main__":
    main()
