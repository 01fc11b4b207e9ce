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

from .learning_report import final_value
from .stats import mean_ci, welch_interval

PAIRS = (("pro", "grpo12"), ("pro", "static"))  # besides every arm against grpo


def compute(folder: str, budget: float) -> dict[str, Any]:
    """{measure: {"arms": {arm: {"start", "final", "gain"}}, "pairs": {"a - b": welch}, "pooled_gain": mean_ci}}."""
    runs: dict[str, list[dict]] = {}
    for f in sorted(glob.glob(f"{folder}/runs/*.json") or glob.glob(f"{folder}/run_files/*.json")):
        with open(f) as fh:
            r = json.load(fh)
        runs.setdefault(r["settings"]["arm"], []).append(r)
    if not runs:
        raise ValueError(f"{folder}: no runs/*.json or run_files/*.json")
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
