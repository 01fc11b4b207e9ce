"""The numbers the docs quote, regenerated from the stored results under docs/results/.

    python -m benchmarks.docs_numbers            # rewrite every marked number in the docs
    python -m benchmarks.docs_numbers --check    # exit 1 and list each marked number that differs

A quoted number is marked in the Markdown source as ``<!--#KEY-->text<!--/-->`` (the comments do not
render); KEY says where the text comes from, and this module recomputes it. Keys:

    gq:FAMILY/MEASURE:COMPARISON:FIELD   the mechanism benchmark (docs/results/gradient_quality/GQ:
                                         the summary recomputed from grams.npz, at its looks' level);
                                         FIELD one of ci, est, p, p_holm, power, mde80, family_ci,
                                         resolved, or nominal_ci|family_ci|power|mde80|resolved (at 0.05)
    gq1:...                              the same keys for the first look (gradient_quality/main)
    gqarm:ARM:FIELD                      per arm: per_rollout, per_flop (estimate ± SE), spread, cost, n
    gq:rollouts | gq:effect | gq:needed  rollouts joined; the positive control's effect; the rollouts
                                         80 % power at that effect would take (SE ~ 1 / sqrt(R), to 10)
    cov:FAMILY/MEASURE:coverage|fwe      the zero-signal simulation (COV), at its looks' level; with
    cov:all                              _nominal (coverage_nominal, ...) at 0.05; cov:all: every interval
    le:FOLDER:BUDGET:MEASURE:WHAT@D      benchmarks.evidence_stats of learning_efficiency/FOLDER at
                                         BUDGET s; WHAT: pooled, gain.ARM, final.ARM or pair.A - B; D decimals
    le:FOLDER:rollouts.ARM | le:FOLDER:wall.ARM | le:FOLDER:rollout_ratio.A/B
                                         mean rollouts in the budget / wall s per rollout / their ratio
    json:PATH|KEY|KEY...@FMT             any value of a JSON file under docs/results (format spec FMT)
    txt:PATH|PREFIX|I[@D]                the I-th number after PREFIX on the line of a stored text output
                                         that starts with PREFIX (as written, or to D decimals); PREFIX#N: its N-th such line
    summary:PATH|NAME@D                  a "NAME: mean [lo, hi]" line of a summary.txt, as mean [lo, hi]
    table:sd35m_configs | table:gq | table:gq:FAMILY   a generated table (the SD3.5-M config FLOPs; the
                                         mechanism's arms and families, or one part: "arms" or a family)
    gpumem:VARIANT:planned|measured|gap_pct  gpu_memory: the plan's and the measured allocator peak
                                         (GiB), and |measured - planned| / planned in %
    previewcorr:ARM:CKPT                 preview_decoders: ARM's whole-group proxy correlation at
                                         checkpoint CKPT minus the VAE preview's, paired by rollout
    flopunit:FAMILY:FIELD@D              flops/flops.json unit FLOPs: F, row (TFLOP per CFG row), c, vae,
                                         reward (TFLOP) and preview_over_F
    flops:CONFIG:FIELD@FMT               the shipped SD3.5-M configs' FLOP table (flops/flops.json)

``tests/test_docs_numbers.py`` runs the check, so a number edited by hand, or a result changed under
it, fails the suite.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOCS = ("README.md", "docs/evidence.md", "docs/benchmarks.md", "docs/STATUS.md")
MARK = re.compile(r"<!--#(.+?)-->(.*?)<!--/-->", re.S)


def ci(c: dict[str, Any], d: int = 3, keys: tuple[str, str, str] = ("mean", "lo", "hi")) -> str:
    m, lo, hi = (c[k] for k in keys)
    return f"{m:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"


GQ = "extension"  #: the mechanism benchmark's latest look
COV = "gradient_quality/extension/coverage/coverage.json"  #: its intervals' coverage at zero signal, at that look's size


@functools.lru_cache(maxsize=None)
def _gq(folder: str = GQ) -> dict[str, Any]:
    from benchmarks.gradient_quality import load, summarize

    res = load(RESULTS / "gradient_quality" / folder)
    return summarize(res)


@functools.lru_cache(maxsize=None)
def _json(rel: str) -> Any:
    return json.loads((RESULTS / rel).read_text())


@functools.lru_cache(maxsize=None)
def _le(folder: str, budget: float) -> dict[str, Any]:
    from benchmarks.evidence_stats import compute

    return compute(str(RESULTS / "learning_efficiency" / folder), budget)


def _digits(key: str, default: int = 3) -> tuple[str, int]:
    if "@" in key:
        key, d = key.rsplit("@", 1)
        return key, int(d)
    return key, default


def _gq_value(parts: list[str], folder: str = GQ) -> str:
    s = _gq(folder)
    if parts == ["rollouts"]:
        return str(s["rollouts"])
    if parts == ["effect"]:
        return f"{s['positive_control_effect']:+.3f}"
    if parts == ["needed"]:  # rollouts for 80 % power at the observed control effect (SE ~ 1 / sqrt(R))
        c = s["families"]["positive_control/per_rollout"]["plain-2K - plain-K"]
        return str(int(round(s["rollouts"] * (c["mde80"] / abs(c["est"])) ** 2, -1)))
    fam, comp, field = parts
    c = s["families"][fam][comp]
    if field.startswith("nominal_"):  # the 0.05 figures of a later look (the first look's own)
        c, field = c.get("nominal", c) | {"est": c["est"], "p_holm": c["p_holm"]}, field[len("nominal_"):]
    return {"ci": lambda: ci(c, 3, ("est", "lo", "hi")), "est": lambda: f"{c['est']:+.3f}",
            "p": lambda: f"{c['p']:.2g}",
            "family_ci": lambda: ci(c, 3, ("est", "lo_family", "hi_family")),
            "p_holm": lambda: f"{c['p_holm']:.2g}", "power": lambda: f"{c['power']:.2f}",
            "mde80": lambda: f"{c['mde80']:.3f}", "resolved": lambda: "resolved" if c["resolved"] else "not resolved",
            }[field]()


def _gqarm_value(arm: str, field: str) -> str:
    a = _gq()["arms"][arm]
    if field in ("per_rollout", "per_flop"):
        return f"{a[field]['est']:+.3f} ± {a[field]['se']:.3f}"
    return {"spread": f"{a['spread']:.4f}", "cost": f"{a['cost']:.0f}", "n": f"{a['n_at_equal_flops']:.2f}"}[field]


def _le_value(folder: str, rest: list[str]) -> str:
    what, d = _digits(rest[-1], 3)
    if len(rest) == 1:  # rollouts / wall / ratio from the benchmark's JSON
        data = _json(f"learning_efficiency/{folder}/learning_efficiency.json")
        kind, arm = what.split(".", 1)
        if kind == "wall":
            return f"{data['arms'][arm]['wall_s_per_rollout']:.{d}f}"

        def mean_rollouts(a: str) -> float:
            return data["arms"][a]["rollouts_in_budget"]["mean"]
        if kind == "rollouts":
            return f"{mean_rollouts(arm):.{d}f}"
        a, b = arm.split("/")
        return f"{mean_rollouts(a) / mean_rollouts(b):.{d}f}"
    budget, measure = float(rest[0]), rest[1]
    m = _le(folder, budget)[measure]
    if what == "pooled":
        return ci(m["pooled_gain"], d)
    kind, arm = what.split(".", 1)
    if kind == "pair":
        return ci(m["pairs"][arm], d, ("diff", "lo", "hi"))
    c = m["arms"][arm][kind]
    if kind == "final":  # a level, not a change: no sign
        return f"{c['mean']:.{d}f} [{c['lo']:.{d}f}, {c['hi']:.{d}f}]"
    return ci(c, d)


def value(key: str) -> str:
    """The text ``key`` stands for (module docstring)."""
    kind, _, rest = key.partition(":")
    if kind in ("gq", "gq1"):
        return _gq_value(rest.split(":"), GQ if kind == "gq" else "main")
    if kind == "gqarm":
        return _gqarm_value(*rest.split(":"))
    if kind == "cov":
        cov = _json(COV)
        if rest in ("all", "all_nominal"):
            return f"{cov['coverage_' + rest]:.3f}"
        fam, field = rest.rsplit(":", 1)
        field = field.replace("fwe", "familywise_error")
        return f"{cov['families'][fam][field]:.3f}"
    if kind == "le":
        folder, *more = rest.split(":")
        return _le_value(folder, more)
    if kind == "json":
        body, fmt = rest.rsplit("@", 1) if "@" in rest else (rest, "")
        path, *keys = body.split("|")
        v: Any = _json(path)
        for k in keys:
            v = v[int(k)] if isinstance(v, list) else v[k]
        return format(v, fmt)
    if kind == "txt":  # the I-th number of the line of a stored text output that starts with PREFIX
        body, fmt = rest.rsplit("@", 1) if "@" in rest else (rest, "")
        path, prefix, i = body.split("|")
        prefix, _, nth = prefix.partition("#")  # "PREFIX#2": the second line that starts with PREFIX
        lines = [ln for ln in (RESULTS / path).read_text().splitlines() if ln.startswith(prefix)]
        for line in lines[int(nth or 1) - 1:int(nth or 1)]:
            if line.startswith(prefix):
                tok = re.findall(r"[-+]?\d+(?:\.\d+)?", line[len(prefix):])[int(i)]
                if not fmt:
                    return tok
                return format(float(tok), ("+" if tok[0] in "+-" else "") + f".{int(fmt)}f")
        raise KeyError(f"{path}: no line starting {prefix!r}")
    if kind == "summary":
        body, d = _digits(rest)
        path, name = body.split("|")
        for line in (RESULTS / path).read_text().splitlines():
            if line.startswith(name + ":"):
                m, lo, hi = (float(x) for x in re.findall(r"[-+]?\d+\.\d+", line.split(":", 1)[1])[:3])
                return f"{m:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"
        raise KeyError(f"{path}: no line {name!r}")
    if kind == "table":  # a whole generated Markdown table
        if rest == "sd35m_configs":
            from benchmarks.flops import shipped_config_markdown

            return "\n" + shipped_config_markdown(_json("flops/flops.json")["sd35m_configs"]) + "\n\n"
        from benchmarks.gradient_quality import table

        return "\n" + table(_gq(), only=None if rest == "gq" else rest.split(":", 1)[1]) + "\n\n"
    if kind == "gpumem":  # a GPU memory variant: planned / measured allocator peak (GiB), their gap in %
        variant, field = rest.split(":")
        planned = _json(f"gpu_memory/{variant}.plan.json")["peak"] / 2 ** 30
        measured = _json(f"gpu_memory/{variant}.json")["peak_allocated"] / 2 ** 30
        return {"planned": f"{planned:.2f}", "measured": f"{measured:.2f}",
                "gap_pct": f"{100 * abs(measured - planned) / planned:.1f}"}[field]
    if kind == "previewcorr":  # paired whole-group proxy correlation, a preview decoder minus the VAE
        from benchmarks.stats import mean_ci

        arm, ck = rest.split(":")
        arms = _json("preview_decoders/results.json")["arms"]
        a, v = arms[arm]["per_rollout"]["corr"], arms["vae"]["per_rollout"]["corr"]
        return ci(mean_ci([x[int(ck)] - y[int(ck)] for x, y in zip(a, v)]), 3)
    if kind == "flopunit":  # benchmarks.flops' unit FLOPs of a family (TFLOP, or in F)
        body, d = _digits(rest, 2)
        family, field = body.split(":")
        u = _json("flops/flops.json")["backends"][family]["unit_flops"]
        F = u["denoiser_call"]
        v = {"F": F / 1e12, "row": F / u["rows_per_call"] / 1e12, "c": u["train_pair"] / F,
             "vae": u["vae_decode"] / 1e12, "reward": u["reward"] / 1e12,
             "preview_over_F": (u["vae_decode"] + u["reward"]) / F}[field]
        return f"{v:.{d}f}"
    if kind == "flops":
        body, fmt = rest.rsplit("@", 1) if "@" in rest else (rest, ".3f")
        cfg, field = body.split(":")
        t = _json("flops/flops.json")["sd35m_configs"]
        return format(t["lora_train"][field] if cfg == "lora" else t["rows"][cfg][field], fmt)
    raise KeyError(f"unknown number key {key!r}")


def render(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(text with every marked number regenerated, [(key, found, expected)] for those that differed)."""
    diffs: list[tuple[str, str, str]] = []

    def sub(m: re.Match) -> str:
        key, found = m.group(1), m.group(2)
        want = value(key)
        if found != want:
            diffs.append((key, found, want))
        return f"<!--#{key}-->{want}<!--/-->"
    return MARK.sub(sub, text), diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.docs_numbers", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a marked number differs")
    p.add_argument("files", nargs="*", default=list(DOCS), help="Markdown files (default: the docs that quote numbers)")
    args = p.parse_args(argv)
    bad = 0
    for name in args.files:
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        text = path.read_text()
        new, diffs = render(text)
        for key, found, want in diffs:
            print(f"{name}: {key}: the doc says {found!r}, the stored results give {want!r}")
        bad += len(diffs)
        if not args.check and new != text:
            path.write_text(new)
    n = sum(len(MARK.findall((Path(f) if Path(f).is_absolute() else ROOT / f).read_text())) for f in args.files)
    print(f"{n} marked numbers, {bad} {'differ' if args.check else 'rewritten'}")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
