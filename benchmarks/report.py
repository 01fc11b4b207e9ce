"""What every benchmark writes: ``<name>.json`` (settings, meta, results), ``<name>.md`` (the table
printed to the terminal) and ``<name>.png``, into ``--out`` (default ``benchmarks/results/<name>``).
No torch here: the learning-efficiency aggregation and ``evidence_stats`` use it without a model.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parent


def out_dir(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.out) if args.out else ROOT / "results" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine: fine
        return None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN and inf become null, tuples lists, tensors and arrays nested lists."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # a tensor or an array, without importing torch
        return json_safe(obj.tolist())
    return obj


def write_outputs(out: Path, name: str, payload: dict[str, Any], table: str,
                  plot: Callable[[Path], None] | None) -> dict[str, str]:
    """``<name>.json``, ``<name>.md`` (the table) and ``<name>.png``; returns their paths."""
    paths = {"json": str(out / f"{name}.json"), "table": str(out / f"{name}.md")}
    Path(paths["table"]).write_text(table + "\n")
    if plot is not None:
        png = out / f"{name}.png"
        plot(png)
        paths["png"] = str(png)
    payload = dict(payload, files=paths)
    Path(paths["json"]).write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    return paths


def new_figure(ncols: int = 2, width: float = 11.0, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height))
    return plt, fig, axes


def save_figure(plt: Any, fig: Any, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def logger(quiet: bool = False) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    return log
