"""The ``plan`` command: the plan of a config as a dict (``report``, what ``--json`` prints) and as text."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ConfigError
from .planner import Planner
from .tracking import GiB, MiB, build_cli, build_run

#: Added to the allocator peak before comparing with the GPU's memory: CUDA context (~0.3-0.6 GiB),
#: cuBLAS / attention workspaces, caching-allocator fragmentation. An assumption, not a measurement.
RUNTIME_OVERHEAD = int(1.5 * GiB)


# ---- the command -----------------------------------------------------------------------------------
def parse_memory(text: str) -> int:
    """"24GB", "24 GiB", "40g", "81559MiB" -> bytes. GB and GiB both mean 2**30 (GPU cards are sold
    in GiB-sized memories: a "24 GB" card has 24 GiB)."""
    s = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", GiB), ("gb", GiB), ("g", GiB), ("mib", MiB), ("mb", MiB), ("m", MiB)):
        if s.endswith(suffix):
            try:
                return int(float(s[: -len(suffix)]) * mult)
            except ValueError:
                break
    raise ConfigError(f"plan: --gpu_memory {text!r}: cannot read it; write e.g. 24GB, 40GiB or 81559MiB")


#: The cards every plan is checked against (GiB), besides ``--gpu_memory``.
CARDS = (24, 40, 80)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The libraries' info lines and warnings off while the run is built and traced (the plan prints
    only its own output); errors still show. diffusers and transformers through their own verbosity
    switches (their loggers reset their level when first configured)."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [diffusers_logging, transformers_logging]
    verbosity = [lib.get_verbosity() for lib in libraries]
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lib in libraries:
        lib.set_verbosity_error()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, v in zip(libraries, verbosity):
            lib.set_verbosity(v)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def report(config: str | Sequence[str], gpu_memory: int | None = None, overrides: Sequence[str] = (),
           sample_batch_size: int | None = None, target: str = "cuda", built: tuple[Any, Any] | None = None
           ) -> dict[str, Any]:
    """The plan of ``config`` as a dict (what ``--json`` prints). ``cards``: for each of ``CARDS``
    (and ``gpu_memory``), whether the peak + overhead fits and the levers that make it fit.
    ``built``: the run's (module, datamodule) when the caller built them (the command)."""
    with quiet():
        module, datamodule = built if built is not None else build_run(config, overrides)
        sbs = sample_batch_size if sample_batch_size is not None else module.rollout_settings.sample_batch_size
        first = datamodule.prompts[0]
        prompt = first if isinstance(first, str) else str(getattr(first, "prompt", first))
        planner = Planner(module, datamodule.prompts_per_step, target=target, sample_batch_size=sbs, prompt=prompt)
        st = planner.settings
        phases = planner.plan(st)
        other = dataclasses.replace(st, gradient_checkpointing=not st.gradient_checkpointing)
        peak = max(p.peak for p in phases)
        overhead = RUNTIME_OVERHEAD if target == "cuda" else 0
        out: dict[str, Any] = {
            "config": config if isinstance(config, str) else " ".join(config), "target": target,
            "settings": dataclasses.asdict(st),
            "weights": {**planner.weights, **planner.reward_bytes},
            "resident": planner.resident(st),
            "phases": [dict(dataclasses.asdict(p), peak=p.peak) for p in phases],
            "update_other_checkpointing": dict(dataclasses.asdict(planner.update_phase(other)),
                                               peak=planner.update_phase(other).peak),
            "peak": peak, "overhead": overhead,
            "levers": [dataclasses.asdict(lv) for lv in planner.levers(st)],
            "notes": planner.notes,
        }
        sizes = sorted({*(c * GiB for c in CARDS), *([gpu_memory] if gpu_memory is not None else [])})
        out["cards"] = [{"gpu_memory": size, "fits": peak + overhead <= size,
                         "advice": [dataclasses.asdict(lv) for lv in planner.advice(size - overhead)]}
                        for size in sizes]
        if gpu_memory is not None:
            card = next(c for c in out["cards"] if c["gpu_memory"] == gpu_memory)
            out.update(gpu_memory=gpu_memory, fits=card["fits"], advice=card["advice"])
        out["traces"] = planner.traces  # fake-tensor traces the plan ran (its cost)
    return out


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"


def fit_line(card: dict[str, Any], overhead: int, short: bool = False) -> str:
    """``fits as is`` / the levers to pull in order and the peak + overhead they reach / that no
    lever fits it. ``short``: settings without their ``model.backend.init_args.`` / ``model.`` prefix."""
    if card["fits"]:
        return "fits as is"
    if card["advice"] and card["advice"][-1]["peak"] + overhead <= card["gpu_memory"]:
        changes = [lv["change"].split(" (")[0] for lv in card["advice"]]
        if short:
            changes = [c.removeprefix("model.backend.init_args.").removeprefix("model.") for c in changes]
        return f"{'; '.join(changes)} -> {_g(card['advice'][-1]['peak'])} + {overhead / GiB:.1f} GiB"
    return "no lever fits it: a larger card or sharding (FSDP)"


def format_report(r: dict[str, Any]) -> str:
    """The plan as text, in GiB: weights, phases, peak, the fit on each card, the levers that save."""
    st = r["settings"]
    rows = "all live rows" if st["sample_batch_size"] is None else str(st["sample_batch_size"])
    lines = [f"Memory plan of {r['config']} (estimates, GiB; {r['target']} allocator peak; no weights loaded)",
             f"settings: prompts_per_step {st['prompts_per_step']}, rows per denoiser / decode / reward call "
             f"{rows}, train_batch_size {st['train_batch_size']}, gradient_checkpointing "
             f"{st['gradient_checkpointing']}, offload_text_encoders {st['offload_text_encoders']}, "
             f"decode_chunk {st['decode_chunk']}", "", f"{'weights by component':<50}{'GiB':>8}"]
    offloaded = st["offload_text_encoders"]
    for name, n in r["weights"].items():
        where = " (offloaded to CPU)" if offloaded and name.startswith("text_encoder") else ""
        lines.append(f"  {name + where:<48}{_g(n):>8}")
    lines.append(f"  {'resident on the device':<48}{_g(r['resident']):>8}")
    lines += ["", f"{'phase':<64}{'resident':>9}{'stored':>9}{'call':>9}{'peak':>9}"]
    for p in r["phases"]:
        lines.append(f"  {p['name']:<62}" + "".join(f"{_g(p[k]):>9}" for k in ("resident", "persistent",
                                                                                "transient", "peak")))
    o = r["update_other_checkpointing"]
    lines.append(f"  ({o['name']}: peak {_g(o['peak'])})")
    over = f" + {r['overhead'] / GiB:.1f} GiB runtime overhead (CUDA context, workspaces, fragmentation)" \
        if r["overhead"] else ""
    lines += ["", f"peak: {_g(r['peak'])} GiB{over}", "", f"{'card':>10}  fit"]
    for card in r["cards"]:
        lines.append(f"{card['gpu_memory'] / GiB:>6.0f} GiB  {fit_line(card, r['overhead'])}")
    saving = [lv for lv in r["levers"] if lv["saving"] >= GiB / 200]  # what shows as 0.01 GiB or more
    lines += ["", "each lever alone (GiB saved on the peak):" if saving else "no lever saves 0.01 GiB or more"]
    if saving:
        for lv in saving:
            flag = "  [changes results]" if lv["changes_results"] else ""
            lines.append(f"  {lv['change']:<78}{_g(lv['saving']):>7}{flag}")
    lines += [f"note: {note}" for note in r["notes"]]
    if r["target"] == "cuda":
        lines.append(f"note: {allocator_note()}")
    return "\n".join(lines)


def allocator_note() -> str:
    """What "fits" means against a card: the plan estimates the allocator's *allocated* peak; what the
    card must hold is what PyTorch's caching allocator *reserves* (cached free blocks, fragmentation)
    plus the runtime overhead. Measured reserved / allocated peaks: docs/results/gpu_memory."""
    return ("the peak is what PyTorch allocates; its caching allocator reserves more (cached blocks, "
            "fragmentation: SD3.5-M's reserved peak was well above its allocated one on a GPU, "
            "docs/results/gpu_memory). On a card with little headroom set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which PyTorch provides to reduce fragmentation")


def cards_of(r: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """{card bytes: its verdict} of a report; a report stored before ``cards`` existed (made with
    ``--gpu_memory``: ``fits`` and ``advice`` for that card) gives the other ``CARDS`` the verdict of
    the same peak + overhead, without advice."""
    if "cards" in r:
        return {c["gpu_memory"]: c for c in r["cards"]}
    need = r["peak"] + r["overhead"]
    cards = {c * GiB: {"gpu_memory": c * GiB, "fits": need <= c * GiB, "advice": []} for c in CARDS}
    if "gpu_memory" in r:
        cards[r["gpu_memory"]] = {"gpu_memory": r["gpu_memory"], "fits": r["fits"], "advice": r["advice"]}
    return cards


def fit_table(reports: Sequence[dict[str, Any]]) -> str:
    """The README's "what fits" table (markdown) from ``report`` outputs, one row per config: the
    weights on the GPU, the peak + overhead and its phase, the fit on each of ``CARDS``, and on the
    smallest card the levers in order with the peak they reach."""
    head = " | ".join(f"{c} GiB" for c in CARDS)
    lines = [f"| config | weights on the GPU (GiB) | peak + overhead (GiB), at | {head} | "
             f"on {CARDS[0]} GiB: levers in order -> peak |", "|---" * (4 + len(CARDS)) + "|"]
    for r in reports:
        name = os.path.splitext(os.path.basename(str(r["config"]).split()[-1]))[0]
        at = max(r["phases"], key=lambda p: p["peak"])["name"]
        cards = cards_of(r)
        fits = " | ".join("yes" if cards[c * GiB]["fits"] else "no" for c in CARDS)
        lines.append(f"| `{name}` | {r['resident'] / GiB:.1f} | {r['peak'] / GiB:.1f} + "
                     f"{r['overhead'] / GiB:.1f} ({at}) | {fits} | {fit_line(cards[CARDS[0] * GiB], r['overhead'], short=True)} |")
    return "\n".join(lines)


@dataclasses.dataclass
class PlanOptions:
    """The plan's own settings, beside the run's (``fit``'s: ``--config`` and any override).

    Args:
        gpu_memory: another card's memory to plan for (besides 24 / 40 / 80 GiB), e.g. 48GB or 81559MiB.
        sample_batch_size: rows per denoiser, decode and reward call in the rollout (default: the
            run's model.rollout.sample_batch_size, else all rows).
        json: print the plan as JSON.
    """

    gpu_memory: str | None = None
    sample_batch_size: int | None = None
    json: bool = False


DESCRIPTION = ("Expected peak GPU memory of a training config, per phase, without a GPU or weights: whether it "
               "fits 24 / 40 / 80 GiB cards (and --gpu_memory) and which settings to change. The run's settings "
               "are fit's (--config files, overrides such as --model.update.train_batch_size 2).")


def run(argv: Sequence[str] | None = None) -> None:
    """Parse (``fit``'s parser plus ``PlanOptions``), plan, print; errors raise (``main`` turns
    them into one line and exit 2)."""
    with quiet():
        cli = build_cli(sys.argv[1:] if argv is None else argv, PlanOptions, DESCRIPTION, "pro-grpo plan")
    options = cli.config
    gpu = parse_memory(options.gpu_memory) if options.gpu_memory else None
    configs = [str(c) for c in options.get("config") or []]
    r = report(configs[0] if len(configs) == 1 else configs, gpu, sample_batch_size=options.sample_batch_size,
               built=(cli.model, cli.datamodule))
    print(json.dumps(r, indent=1) if options.json else format_report(r))


def main(argv: Sequence[str] | None = None) -> int:
    """``pro-grpo plan`` / ``python -m pro_grpo_lightning plan``: exit 0, or 2 with one ``error:``
    line for bad input (``PRO_GRPO_DEBUG=1``: the trace)."""
    from ..cli import run_main

    return run_main(run, list(argv) if argv is not None else None)
