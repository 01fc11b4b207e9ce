"""The README's fit-table rows from stored ``plan --json`` reports (docs/results/plan/).

    python -m benchmarks.plan_table docs/results/plan/sdxl_hps_pro_grpo.json [...]

Each report was made with ``--gpu-memory 24GB``, so its ``advice`` is the levers to pull, in the
plan's order, to fit 24 GiB; the 40 GB and 80 GB verdicts compare the same peak plus the plan's
runtime overhead with those sizes, as ``plan --gpu-memory 40GB`` / ``80GB`` would.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GiB = 2 ** 30


def row(path: Path) -> str:
    """One table row: config, resident weights, peak + overhead at its phase, fits 24 / 40 / 80, advice."""
    r = json.loads(path.read_text())
    top = max(r["phases"], key=lambda p: p["peak"])
    need = r["peak"] + r["overhead"]
    fits = ["yes" if need <= m * GiB else "no" for m in (24, 40, 80)]
    if r["fits"]:
        advice = "fits as is"
    elif r["advice"] and r["advice"][-1]["peak"] + r["overhead"] <= r["gpu_memory"]:
        steps = "; ".join(a["change"].split(".")[-1].split(" (")[0] for a in r["advice"])
        advice = f"{steps} -> {(r['advice'][-1]['peak'] + r['overhead']) / GiB:.1f} GiB"
    else:
        advice = "nothing fits it"
    return (f"| `{path.stem}` | {r['resident'] / GiB:.1f} | {r['peak'] / GiB:.1f} + {r['overhead'] / GiB:.1f} "
            f"({top['name']}) | {' | '.join(fits)} | {advice} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="plan --json outputs made with --gpu-memory 24GB")
    for path in p.parse_args(argv).reports:
        print(row(path))


if __name__ == "__main__":
    main()
