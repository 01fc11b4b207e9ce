"""Read a device session's archive (``benchmarks/gpu/session.sh`` -> OUT/results.tgz) into docs/results/.

    python -m benchmarks.gpu.session_results OUT/results.tgz --into docs/results/gpu_session_<date>

Unpacks the archive into the folder (refusing to overwrite one that holds files already) and
writes ``README.md`` there: the device and commit, each stage's exit and seconds (``stages.tsv``),
then every result the stages stored, as tables generated from the files themselves: the FLUX check
(the replay's first failing call or its count of calls run, each update variant's outcome), the
cost tables (``run_all/summary.md``, written by ``run_all --summarize``), the FSDP smoke's verdict,
and the memory variants against their plans (``memory_check --compare``, with the plans copied
from ``docs/results/gpu_memory`` where the variant's table name has one). Nothing is quoted that no
file holds; a stage that did not run says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "docs/results/gpu_memory"


def unpack(archive: Path, into: Path) -> None:
    """Extract ``archive`` into ``into`` (new or empty); members may not leave it."""
    if into.exists() and any(into.iterdir()):
        raise FileExistsError(f"--into {into}: the folder holds files already; choose a new one")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(into, filter="data")  # "data": no absolute paths, links or files outside ``into``
            return
        root = into.resolve()  # older 3.11: the same refusals by hand
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not (member.isfile() or member.isdir()) or root not in (target, *target.parents):
                raise ValueError(f"{archive}: refusing archive member {member.name!r} (a link, device or path outside {into})")
        tar.extractall(into)


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def flux_check_section(root: Path) -> list[str]:
    fc = root / "flux_check"
    if not fc.exists():
        return ["Not run in this session."]
    lines = []
    replay = _json(fc / "replay.json")
    if replay is None:
        lines.append("- replay: no result (stopped before it wrote one)")
    else:
        res = replay["results"]
        bad = [r for r in res if not r["ok"]]
        lines.append(f"- replay of the trace's distinct GEMM / attention calls (`{replay['calls']}`): "
                     + (f"**failed at call {bad[0]['index']}**, `{bad[0]['op']}` ({bad[0]['phase']}, "
                        f"{bad[0]['module'] or 'backward'}), operands {bad[0]['inputs']}: `{bad[0]['error']}`"
                        if bad else f"all {len(res)} ran"))
    lines += ["", "| update check (one minibatch, full size, CUDA_LAUNCH_BLOCKING=1) | overrides | attention | "
              "result | peak allocated (GiB) | s per minibatch |", "|---|---|---|---|---|---|"]
    for path in sorted(fc.glob("update*.json")):
        r = json.loads(path.read_text())
        result = "ok" if r["ok"] else f"**{r['error'].splitlines()[0]}**"
        peak = f"{r['peak_allocated'] / 2**30:.2f}" if r.get("peak_allocated") else ""
        secs = ", ".join(f"{s:.2f}" for s in r.get("seconds", []))
        lines.append(f"| {path.stem} | {' '.join(r['overrides']) or '(as shipped)'} | {r.get('sdpa') or 'default'} | "
                     f"{result} | {peak} | {secs} |")
    mem = sorted((fc / "memory").glob("*.json")) + sorted((fc / "memory").glob("*.error.txt"))
    for path in mem:
        if path.name == "versions.json":
            continue
        if path.name.endswith(".error.txt"):
            lines.append(f"- the whole fit loop ({path.name[:-len('.error.txt')]}): "
                         f"**{path.read_text().splitlines()[0]}**")
        else:
            r = json.loads(path.read_text())
            lines.append(f"- the whole fit loop ({r['name']}): ran, peak allocated "
                         f"{r.get('peak_allocated', 0) / 2**30:.2f} GiB")
    return lines


def fsdp_section(root: Path) -> list[str]:
    r = _json(root / "fsdp" / "fsdp_smoke.json")
    if r is None:
        return ["Not run in this session (or stopped before its verdict)."]
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_relative_difference"].items())
    return [f"`{r['tested_strategy']}` vs the plain strategy, same seed, steps {r['steps_compared']}: "
            f"**{'agree' if r['ok'] else 'differ or failed'}** (largest relative differences: {diffs or 'none compared'}; "
            f"exported adapters: largest absolute difference {r['adapter_max_abs_difference']}; "
            f"exit codes {[run['returncode'] for run in r['runs']]})"]


def memory_section(root: Path, sub: str) -> list[str]:
    """``memory_check --compare`` of the variants in ``root/sub`` (plans copied from docs/results/gpu_memory)."""
    from benchmarks.gpu import memory_check

    d = root / sub
    if not d.exists():
        return ["Not run in this session."]
    names = sorted({p.name[:-len(".error.txt")] if p.name.endswith(".error.txt") else p.stem
                    for p in list(d.glob("*.json")) + list(d.glob("*.error.txt"))
                    if p.name != "versions.json" and not p.name.endswith(".plan.json")})
    base = {**memory_check.SMOKE, **memory_check.VARIANTS}  # a CPU smoke run's variants too
    table = memory_check.with_derived(base, [n for n in names if "+" in n and n.split("+")[0] in base])
    known = {n: table[n] for n in names if n in table}
    for n in known:
        plan = PLANS / f"{n.split('+')[0]}.plan.json"
        if plan.exists() and not (d / plan.name).exists():
            shutil.copy(plan, d / plan.name)
    text = memory_check.compare(d, known).strip().splitlines() if known else []
    unknown = sorted(set(names) - set(known))
    return text + ([f"", f"Results of variants this version's table does not know: {unknown}"] if unknown else [])


def readme(root: Path) -> str:
    gpu = (root / "gpu.txt").read_text().strip().splitlines()[1:] if (root / "gpu.txt").exists() else []
    commit = (root / "git_commit.txt").read_text().strip() if (root / "git_commit.txt").exists() else "unknown"
    lines = [f"# Device session results", "",
             f"Device: {gpu[0] if gpu else 'no GPU (nvidia-smi gave nothing: a CPU smoke run)'}; commit {commit}. "
             "Produced by `benchmarks/gpu/session.sh`, read by `python -m benchmarks.gpu.session_results`; the raw "
             "files are beside this README (`session.log` is the whole run's output).", "",
             "| stage | exit | seconds | seconds left |", "|---|---|---|---|"]
    if (root / "stages.tsv").exists():
        with open(root / "stages.tsv") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                lines.append(f"| {row['stage']} | {row['exit']} | {row['seconds']} | {row['left']} |")
    lines += ["", "## FLUX.1-dev update backward (issue 29)", ""] + flux_check_section(root)
    lines += ["", "## Cost tables", ""]
    summary = root / "run_all" / "summary.md"
    lines += [summary.read_text().strip().replace("\n# ", "\n### ").replace("\n## ", "\n### ")
              if summary.exists() else "Not run in this session."]
    lines += ["", "## FSDP smoke", ""] + fsdp_section(root)
    lines += ["", "## Real-size memory", ""] + memory_section(root, "memory")
    lines += ["", "## Compiled vs eager (same session)", ""] + memory_section(root, "compile")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.session_results", description=__doc__.split("\n\n")[0])
    p.add_argument("archive", type=Path, help="OUT/results.tgz of benchmarks/gpu/session.sh")
    p.add_argument("--into", type=Path, required=True, help="a new folder, e.g. docs/results/gpu_session_<date>")
    args = p.parse_args(argv)
    if not args.archive.is_file():
        print(f"session_results: archive {args.archive} does not exist", file=sys.stderr)
        return 2
    try:
        unpack(args.archive, args.into)
    except (FileExistsError, tarfile.TarError) as err:
        print(f"session_results: {err}", file=sys.stderr)
        return 2
    text = readme(args.into)
    (args.into / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
