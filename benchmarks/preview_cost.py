"""What one pruning preview costs per preview option at real size, on this machine's CPU: time
ratios measured side by side, next to the FLOP ratios.

    python -m benchmarks.preview_cost [--families sd15 sd3 flux] [--repeats 2] [--warmup 1] [--out DIR]
    python -m benchmarks.preview_cost --device cuda --batch 16 --repeats 10 --warmup 3   # on a GPU
    python -m benchmarks.preview_cost --summarize DIR/preview_cost.json                  # tables again

Per family, with random weights (the architecture decides the cost), float32, ``--threads`` torch
threads: one denoiser call for one trajectory (CFG: two rows; FLUX.1-dev: one) and, for one preview
image, each option's decode (``flops.PREVIEW_OPTIONS``: the VAE at 512 px, the VAE on the latent
resized by 0.5, the family's public tiny decoder ``AutoencoderTiny``) and one PickScore call (the
same for every option: PickScore resizes every image to 224 px). Every measured thing runs
``--warmup`` times unrecorded, then ``--repeats`` rounds in which each runs once, order rotated per
round; ratios are taken within a round (median, min, max over rounds).

FLUX.1-dev's transformer (11.9 B parameters, 48 GB in float32) does not fit this machine's memory,
so its call is timed at reduced depth and extrapolated: FLUX.1-dev has 19 double-stream and 38
single-stream blocks, i.e. 19 units of (1 double + 2 single); the same architecture with 1 and with
2 units (real width, real sequence lengths, real input/output layers) is timed in the same rounds and
t(19 units) = t(1) + 18 (t(2) - t(1)). The same extrapolation of the counted FLOPs is checked against
the full model's count (``flop_extrapolation_check`` in the JSON). SD1.5 and SD3.5-M are timed whole.
The VAEs of SD3 and FLUX have the same architecture (only their latent scale and shift differ), as
do TAESD3 and TAEF1, so their decodes cost the same; each family still times its own, in its rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pro_grpo_lightning.networks import NetworkSource  # noqa: E402

from .flops import PREVIEW_OPTIONS, denoiser_call, pickscore_clip, preview_decoders, reward_calls  # noqa: E402
from .measure import count_flops, interleaved, median, timed  # noqa: E402
from .models import arch  # noqa: E402
from .report import ROOT, SCHEMA_VERSION, git_commit, json_safe, markdown_table, new_figure, save_figure  # noqa: E402
from .schedules import paper_schedules  # noqa: E402

NAME = "preview_cost"


def depth_units(family: str, a: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """(units, arch of one unit) for FLUX: the transformer's blocks as ``units`` repeats of one unit
    (FLUX.1-dev: 19 x (1 double + 2 single)); (1, None) for the others (timed whole)."""
    if family != "flux":
        return 1, None
    t = a["transformer"]
    units = math.gcd(t["num_layers"], t["num_single_layers"])
    unit = dict(t, num_layers=t["num_layers"] // units, num_single_layers=t["num_single_layers"] // units)
    return units, unit


def with_units(a: dict[str, Any], unit: dict[str, Any], n: int) -> dict[str, Any]:
    """``a`` with its transformer at ``n`` units of depth."""
    return dict(a, transformer=dict(unit, num_layers=n * unit["num_layers"],
                                    num_single_layers=n * unit["num_single_layers"]))


def extrapolate(units: int, one: float, two: float) -> float:
    """Cost of ``units`` units from the costs of 1 and 2 (the per-unit part linear in depth)."""
    return one + (units - 1) * (two - one)


def denoiser_flops(family: str, a: dict[str, Any], resolution: int) -> int:
    with torch.device("meta"):
        _, call, x = denoiser_call(family, a, resolution)
    return count_flops(lambda: call(x))


def flop_extrapolation_check(family: str, a: dict[str, Any], resolution: int) -> dict[str, float] | None:
    """The depth extrapolation applied to counted FLOPs, against the full model's count (meta device)."""
    units, unit = depth_units(family, a)
    if unit is None:
        return None
    one = denoiser_flops(family, with_units(a, unit, 1), resolution)
    two = denoiser_flops(family, with_units(a, unit, 2), resolution)
    full = denoiser_flops(family, a, resolution)
    return {"units": units, "one_unit": one, "two_units": two, "extrapolated": extrapolate(units, one, two),
            "counted": full}


def measure_family(family: str, size: str, resolution: int, clip: Any, repeats: int, warmup: int,
                   seed: int, log, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   whole: bool = False, batch: int = 1) -> dict[str, Any]:
    """Time one denoiser call, each preview option's decode and one PickScore call, side by side.
    ``whole``: also time FLUX's whole transformer (it fits a GPU); its time is then the denoiser's and
    the depth extrapolation is reported against it."""
    a = arch(family, size)
    units, unit = depth_units(family, a)
    variants = {"denoiser": a} if unit is None else {"denoiser@1": with_units(a, unit, 1),
                                                     "denoiser@2": with_units(a, unit, 2)}
    if unit is not None and whole:
        variants["denoiser"] = a
    dev = torch.device(device)
    tasks, flops = {}, {}
    keep = []  # the modules, alive until the rounds are done
    with NetworkSource("random", device, seed).building(dtype):
        for name, arch_v in variants.items():
            net, call, x = denoiser_call(family, arch_v, resolution, batch)
            keep.append(net)
            tasks[name] = (lambda call=call, x=x: call(x))
            flops[name] = denoiser_flops(family, arch_v, resolution)
        decoders = preview_decoders(family, a, resolution, batch)
    with torch.device("meta"):
        meta_decoders = preview_decoders(family, a, resolution)
        meta_reward = reward_calls(pickscore_clip(size))
    for k, fn in decoders.items():
        tasks[k] = fn
        flops[k] = count_flops(meta_decoders[k])
    with NetworkSource("random", device, seed).building(dtype):  # the reward's inputs on the device, in its dtype
        reward = reward_calls(clip, batch)
    tasks["reward"] = lambda: (reward["image"](), reward["text"]())
    flops["reward"] = sum(count_flops(fn) for fn in meta_reward.values())

    def timer(fn):
        def run() -> dict[str, float]:
            with torch.no_grad():
                return {"s": timed(fn, dev)[0]}
        return run

    log(f"preview_cost {family}: {list(tasks)}, {warmup} warm-up + {repeats} rounds")
    recs = interleaved({k: timer(fn) for k, fn in tasks.items()}, repeats, warmup, log)
    del keep, decoders, tasks
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    rounds = []
    for r in range(repeats):
        t = {k: v[r]["s"] for k, v in recs.items()}
        rec: dict[str, Any] = {"times_s": t}
        if unit is not None:
            rec["extrapolated_s"] = extrapolate(units, t["denoiser@1"], t["denoiser@2"])
        rec["denoiser_s"] = t["denoiser"] if "denoiser" in t else rec["extrapolated_s"]
        rounds.append(rec)
    f_den = flops["denoiser"] if "denoiser" in flops else extrapolate(units, flops["denoiser@1"],
                                                                       flops["denoiser@2"])

    def stat(values: list[float]) -> dict[str, float]:
        return {"median": median(values), "min": min(values), "max": max(values)}

    options = {}
    for k in PREVIEW_OPTIONS:
        options[k] = {
            "decode_s": stat([x["times_s"][k] for x in rounds]),
            "decode_over_denoiser": stat([x["times_s"][k] / x["denoiser_s"] for x in rounds]),
            "preview_over_denoiser": stat([(x["times_s"][k] + x["times_s"]["reward"]) / x["denoiser_s"]
                                           for x in rounds]),
            "decode_over_vae": stat([x["times_s"][k] / x["times_s"]["vae"] for x in rounds]),
            "flops": {"decode": flops[k], "decode_over_denoiser": flops[k] / f_den,
                      "preview_over_denoiser": (flops[k] + flops["reward"]) / f_den,
                      "decode_over_vae": flops[k] / flops["vae"]},
            "gflop_per_s": batch * flops[k] / 1e9 / median([x["times_s"][k] for x in rounds]),
        }
    den_s = median([x["denoiser_s"] for x in rounds])
    den: dict[str, Any] = {"s": stat([x["denoiser_s"] for x in rounds]), "flops": f_den,
                           "gflop_per_s": batch * f_den / 1e9 / den_s,
                           "measured_as": "whole model" if "denoiser" in flops else
                           f"extrapolated from 1 and 2 of {units} depth units, timed in the same rounds"}
    if unit is not None and "denoiser" in flops:  # both: how good the CPU's extrapolation is
        den["extrapolated_over_whole"] = stat([x["extrapolated_s"] / x["denoiser_s"] for x in rounds])
    return {"family": family, "depth_units": units if unit is not None else None, "device": str(dev),
            "denoiser": den,
            "reward": {"s": stat([x["times_s"]["reward"] for x in rounds]), "flops": flops["reward"],
                       "over_denoiser": stat([x["times_s"]["reward"] / x["denoiser_s"] for x in rounds])},
            "options": options, "task_flops": flops, "rounds": rounds}


def schedule_shares(result: dict[str, Any]) -> dict[str, Any]:
    """What the previews add to a Pro-GRPO rollout, weighted by the measured times instead of FLOPs:
    previews x t(preview) / (calls x t(denoiser call) + finals x t(final: VAE + PickScore)), per
    round (median, min, max), for the paper's Pro-GRPO schedules (SD1.5 at T = 50 and 20, the flow
    models at T = 10). An estimate from unit times: the rollout runs its calls at other batch sizes."""
    out: dict[str, Any] = {}
    for fam, r in result["families"].items():
        for T in ((50, 20) if fam == "sd15" else (10,)):
            for s in paper_schedules(fam, T):
                if s.kind != "pro" or s.name == "pro-early":
                    continue
                sizes = s.schedule.group_sizes_per_step(T)
                previews, finals, calls = sum(sizes[c] for c in s.schedule.checkpoints), sizes[-1], sum(sizes)
                row: dict[str, Any] = {"spec": s.spec, "previews": previews, "calls": calls, "finals": finals}
                for k in PREVIEW_OPTIONS:
                    vals = []
                    for x in r["rounds"]:
                        t = x["times_s"]
                        rest = calls * x["denoiser_s"] + finals * (t["vae"] + t["reward"])
                        vals.append(previews * (t[k] + t["reward"]) / rest)
                    row[k] = {"median": median(vals), "min": min(vals), "max": max(vals)}
                out.setdefault(fam, {})[f"T={T} {s.name}"] = row
    return out


def shares_table(result: dict[str, Any]) -> str:
    rows = [[fam, key, *[f"{100 * row[k]['median']:.1f}%" for k in PREVIEW_OPTIONS]]
            for fam, per in result["schedule_shares"].items() for key, row in per.items()]
    return markdown_table(["model", "schedule", *[f"previews add, by time ({k})" for k in PREVIEW_OPTIONS]], rows)


def table(result: dict[str, Any]) -> str:
    rows = []
    for fam, r in result["families"].items():
        for k, o in r["options"].items():
            rows.append([fam, k, f"{o['decode_s']['median']:.3g}", f"{r['denoiser']['s']['median']:.3g}",
                         f"{o['decode_over_denoiser']['median']:.3f} ({o['decode_over_denoiser']['min']:.3f}-"
                         f"{o['decode_over_denoiser']['max']:.3f})", f"{o['flops']['decode_over_denoiser']:.3f}",
                         f"{o['preview_over_denoiser']['median']:.3f}", f"{o['flops']['preview_over_denoiser']:.3f}",
                         f"{o['decode_over_vae']['median']:.3f}", f"{o['flops']['decode_over_vae']:.3f}",
                         f"{o['gflop_per_s']:.0f}", f"{r['denoiser']['gflop_per_s']:.0f}"])
    return markdown_table(["model", "preview option", "decode s", "denoiser call s", "decode / call: time (min-max)",
                           "decode / call: FLOPs", "preview (decode + PickScore) / call: time", "same: FLOPs",
                           "decode / VAE decode: time", "same: FLOPs", "decode GFLOP/s", "denoiser GFLOP/s"], rows)


def plot(result: dict[str, Any], path: Path) -> None:
    fams = list(result["families"])
    plt, fig, axes = new_figure(len(fams), width=4.2 * len(fams), height=3.8)
    axes = axes if len(fams) > 1 else [axes]
    for ax, fam in zip(axes, fams):
        r = result["families"][fam]
        xs = list(range(len(PREVIEW_OPTIONS)))
        ax.bar([i - 0.2 for i in xs], [r["options"][k]["preview_over_denoiser"]["median"] for k in PREVIEW_OPTIONS],
               width=0.4, label="time")
        ax.bar([i + 0.2 for i in xs], [r["options"][k]["flops"]["preview_over_denoiser"] for k in PREVIEW_OPTIONS],
               width=0.4, label="FLOPs")
        ax.set_xticks(xs, list(PREVIEW_OPTIONS), fontsize=8)
        ax.set_title(fam, fontsize=9)
        ax.set_ylabel("one preview (decode + PickScore) / one denoiser call", fontsize=7)
    axes[0].legend(fontsize=7)
    st = result["settings"]
    where = st["device"] if st["device"] != "cpu" else f"CPU x{st['threads']}"
    save_figure(plt, fig, path, f"preview cost per option ({st['size']} size, {st['resolution']} px, "
                                f"{st['dtype']}, {where})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--families", nargs="+", choices=("sd15", "sd3", "flux"), default=["sd15", "sd3", "flux"])
    p.add_argument("--size", choices=("full", "mini"), default="full",
                   help="full: the real architectures; mini: the same builders at toy numbers (tests)")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default 512 (full), 64 (mini)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's setting)")
    p.add_argument("--batch", type=int, default=1,
                   help="trajectories per denoiser call and images per decode / reward call (ratios are per item)")
    p.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16; FLUX also timed whole)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"output folder (default benchmarks/results/{NAME})")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="measure nothing: recompute the tables and shares of a stored result into --out")
    args = p.parse_args(argv)
    if args.summarize:
        out = Path(args.out) if args.out else Path(args.summarize).parent
        out.mkdir(parents=True, exist_ok=True)
        return write(json.loads(Path(args.summarize).read_text()), out, args.no_plot)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        raise ValueError(f"--repeats >= 1, --warmup >= 0 and --batch >= 1 please, got {args.repeats}, "
                         f"{args.warmup}, {args.batch}")
    resolution = args.resolution or (512 if args.size == "full" else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else ROOT / "results" / NAME
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    with NetworkSource("random", args.device, args.seed).building(dtype):
        clip = pickscore_clip(args.size).eval()  # one reward model for every family
    result: dict[str, Any] = {
        "benchmark": NAME, "schema_version": SCHEMA_VERSION,
        "meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
                 "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                 "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"size": args.size, "resolution": resolution, "batch": args.batch, "repeats": args.repeats,
                     "warmup": args.warmup,
                     "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
                     "device": torch.cuda.get_device_name(0) if cuda else "cpu", "families": args.families,
                     "command": "python -m benchmarks.preview_cost " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])},
        "families": {}, "flop_extrapolation_check": {}}
    for fam in args.families:
        result["families"][fam] = measure_family(fam, args.size, resolution, clip, args.repeats, args.warmup,
                                                 args.seed, log, device=args.device, dtype=dtype, whole=cuda,
                                                 batch=args.batch)
        result["flop_extrapolation_check"][fam] = flop_extrapolation_check(fam, arch(fam, args.size), resolution)
    result["meta"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return write(result, out, args.no_plot)


def write(result: dict[str, Any], out: Path, no_plot: bool = False) -> dict[str, Any]:
    """Add the schedule shares, print and write the table, the PNG and the JSON into ``out``."""
    result["schedule_shares"] = schedule_shares(result)
    tab = table(result) + "\n\n" + shares_table(result)
    print(tab)
    (out / f"{NAME}.md").write_text(tab + "\n")
    files = {"json": str(out / f"{NAME}.json"), "table": str(out / f"{NAME}.md")}
    if not no_plot:
        plot(result, out / f"{NAME}.png")
        files["png"] = str(out / f"{NAME}.png")
    result["files"] = files
    (out / f"{NAME}.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
