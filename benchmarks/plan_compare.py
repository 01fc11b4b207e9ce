"""Every stored plan (``docs/results/plan/*.json``) made again by the current code, and compared.

    python -m benchmarks.plan_compare --out docs/results/plan/compared.json
    python -m benchmarks.plan_compare --summary A.json B.json   # two such outputs: the same differences?
    python -m benchmarks.plan_compare --write --out OUT.json     # and store the new plans in their place

Each stored file is the ``pro-grpo plan --json`` of the configs its ``config`` field names (with
the ``--gpu_memory`` it was made with, and the overrides ``OVERRIDES`` lists for the file that had
some); the new plan is compared with it key by key over the keys the stored file has (older files
lack ``cards``), ``traces`` (the plan's cost, not a figure) left out. Prints one line per file and
writes the differences, if any, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pro_grpo_lightning.plan import report  # noqa: E402

from .report import git_commit  # noqa: E402

#: Stored plans made with overrides that their ``config`` field does not record (docs/results/plan/README.md).
OVERRIDES = {"sdxl_hps_pro_grpo_without_levers": ["--model.backend.init_args.gradient_checkpointing", "false",
                                                  "--model.backend.init_args.decode_chunk", "null"]}  # vae_decode_chunk then


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Where ``new`` differs from ``old``, over ``old``'s keys (``traces`` left out)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old if k != "traces"
                for d in (differences(old[k], new[k], f"{path}.{k}") if k in new else [f"{path}.{k}: missing"])]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", type=Path, default=Path("docs/results/plan"))
    p.add_argument("--out", type=Path, default=None, help="write the differences here (JSON)")
    p.add_argument("--only", nargs="*", default=None, help="these plans' names only")
    p.add_argument("--write", action="store_true",
                   help="also replace each stored plan with the new one (what `pro-grpo plan --json` prints)")
    p.add_argument("--summary", nargs=2, type=Path, default=None, metavar=("A", "B"),
                   help="instead: whether two outputs of this script found the same differences, plan by plan")
    args = p.parse_args(argv)
    if args.summary:
        a, b = (json.loads(f.read_text())["plans"] for f in args.summary)
        for name in sorted(set(a) | set(b)):
            same = name in a and name in b and a[name]["differences"] == b[name]["differences"]
            print(f"{name}: {'the same' if same else 'NOT the same'} "
                  f"({len(a.get(name, {}).get('differences', []))} / {len(b.get(name, {}).get('differences', []))} differences)")
        return 0
    result: dict[str, Any] = {"command": "python -m benchmarks.plan_compare " + " ".join(argv or sys.argv[1:]),
                              "git_commit": git_commit(), "plans": {}}
    for path in sorted(args.plans.glob("*.json")):
        old = json.loads(path.read_text())
        if "phases" not in old or (args.only is not None and path.stem not in args.only):
            continue  # not a plan (this script's own output), or not asked for
        configs = old["config"].split()
        t0 = time.perf_counter()
        new = report(configs[0] if len(configs) == 1 else configs, old.get("gpu_memory"),
                     OVERRIDES.get(path.stem, []))
        diff = differences(old, new)
        result["plans"][path.stem] = {"identical": not diff, "differences": diff,
                                      "traces": [old.get("traces"), new["traces"]],
                                      "seconds": time.perf_counter() - t0}
        print(f"{path.stem}: {'identical' if not diff else f'{len(diff)} differences'} "
              f"({time.perf_counter() - t0:.0f} s)", *diff[:8], sep="\n  ", flush=True)
        if args.write:
            path.write_text(json.dumps(new, indent=1) + "\n")
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))  # after each plan: a stopped run keeps what it made
    return 0 if all(r["identical"] for r in result["plans"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
