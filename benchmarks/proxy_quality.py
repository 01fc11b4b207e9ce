"""Proxy quality: from an audit run's CSV log, or measured per preview decoder on a config's model.

1. Summarise a training run's log (mean and 95 % t-interval over rollouts of each metric):

    python -m pro_grpo_lightning fit --config configs/quickstart.yaml --model.rollout.audit_every_n_rollouts=1 \\
        --optimizer.init_args.lr=0 --trainer.max_steps=12 ... \\
        --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=DIR
    python -m benchmarks.proxy_quality DIR/.../metrics.csv

   With lr 0 every rollout samples the base policy, so rollouts are independent draws and a
   t-interval over them is the honest spread. Reported: ``pruning/audit_proxy_corr_full_<i>``
   (checkpoint i's preview-to-final correlation over the whole expanded group),
   ``pruning/proxy_true_corr_survivors_<i>`` (the same over the final survivors only, selected for
   their preview spread), ``pruning/audit_overlap`` (share of the survivors the true reward's
   choice would also keep), the expanded group's and the survivors' true-reward spread.

2. Compare preview decoders on a config's model (no training: the base policy, as lr 0):

    python -m benchmarks.proxy_quality --config configs/quickstart.yaml --rollouts 16 \\
        --preview-decoder vae --preview-decoder vae@0.5 \\
        --preview-decoder pkg://pro_grpo_lightning/assets/tiny_shapes_sd3_preview_decoder --out DIR

   Each ``--preview-decoder`` is an arm: ``vae`` (the backend's VAE) or an ``AutoencoderTiny`` source
   (set as ``model.backend.init_args.preview_decoder``), optionally ``@<preview_scale>``. Every arm
   is built from the config through the CLI (the user's path) and runs the same rollouts: rollout i
   takes the data module's i-th prompt batch and the module's noise of rollout i, so the
   trajectories, final images and true rewards are identical across arms and only the previews
   differ (paired differences are exact per rollout). Per arm:

   - audit rollouts (the whole group kept): ``overlap`` with the true-reward choice and each
     checkpoint's whole-group preview-to-final correlation, as the module logs them;
   - Pro-GRPO rollouts (pruned, as training runs them), interleaved across arms: the preview share
     of the rollout's wall time (decode + reward + selection at the checkpoints, over
     denoise + preview + final) and seconds per preview (decode + reward);
   - FLOPs of one preview decode (``torch.utils.flop_counter``, batch 1) and its decode time alone
     (median of ``--repeats`` decodes of one Pro-GRPO checkpoint's rows).

   Writes ``results.json`` (per-rollout values, summaries, the command) and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from .stats import mean_ci

PREFIXES = ("pruning/audit_", "pruning/proxy_true_corr", "reward/group_std", "reward/mean")


def summarize(path: str) -> dict[str, dict[str, Any]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    keys = sorted({k for r in rows for k in r if k.startswith(PREFIXES)})
    return {k: mean_ci([float(r[k]) for r in rows if r.get(k) not in (None, "")]) for k in keys}


# ---- preview decoders compared on one model -------------------------------------------------------------
def parse_arm(text: str) -> tuple[str, float]:
    """``vae`` / ``<source>``, optionally ``@<scale>`` -> (source or "vae", preview_scale)."""
    source, sep, scale = text.rpartition("@")
    if not sep or "/" in scale:
        return text, 1.0
    return source, float(scale)


def build_arm(config: list[str], source: str, scale: float, overrides: list[str]) -> Any:
    """The config's module with this arm's preview settings, built by the CLI, backend configured."""
    from pro_grpo_lightning.cli import main

    args = [a for c in config for a in ("--config", c)] + list(overrides)
    args.append(f"--model.rollout.preview_scale={scale}")
    if source != "vae":
        args.append(f"--model.backend.init_args.preview_decoder={source}")
    cli = main(args, run=False, save_config=False)
    cli.model.configure_model()
    cli.model.backend.eval()
    return cli


def prompt_batches(datamodule: Any, n: int) -> list[tuple[list[str], Any]]:
    """The first ``n`` prompt batches of the data module's train loader, epoch after epoch (its own
    shuffle and seed, as training draws them)."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    out: list[tuple[list[str], Any]] = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            out.append((list(batch.prompts), batch.metadata) if hasattr(batch, "prompts") else (list(batch), None))
            if len(out) == n:
                return out
    raise ValueError(f"the data module gave fewer than {n} prompt batches")


def run_rollout(module: Any, index: int, prompts: list[str], metadata: Any, audit: bool) -> Any:
    noise, local = module.rollout_generators(index)
    return module.rollout.run(prompts, local, audit=audit, metadata=metadata, noise_generator=noise)


def decode_cost(module: Any, rows: int, repeats: int) -> dict[str, float]:
    """FLOPs of one preview decode at batch 1, and the median seconds of decoding ``rows`` previews
    (one Pro-GRPO checkpoint's live rows) divided by ``rows``."""
    from .measure import count_flops

    rollout, backend = module.rollout, module.backend
    x0 = backend.initial_latents(rows, torch.Generator().manual_seed(0))  # [rows, *latent]
    flops = count_flops(lambda: rollout.preview_images(x0[:1]))
    rollout.preview_images(x0)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rollout.preview_images(x0)
        times.append(time.perf_counter() - t0)
    return {"flops": flops, "decode_s_per_preview": statistics.median(times) / rows}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    arms = [parse_arm(a) for a in args.preview_decoder]
    names = list(args.preview_decoder)
    clis = [build_arm(args.config, src, scale, args.override) for src, scale in arms]
    batches = prompt_batches(clis[0].datamodule, max(args.rollouts, args.timed_rollouts))
    out: dict[str, Any] = {"command": "python -m benchmarks.proxy_quality " + " ".join(args.argv),
                           "threads": args.threads, "arms": {}}
    per = {n: {"overlap": [], "corr": [], "share": [], "preview_s": [], "previews": [], "rollout_s": [],
               "final_reward": []} for n in names}
    for i in range(args.rollouts):  # audit: proxy quality (arms interleaved per rollout)
        prompts, meta = batches[i]
        for n, cli in zip(names, clis):
            res = run_rollout(cli.model, i, prompts, meta, audit=True)
            per[n]["overlap"].append(float(res.audit["overlap"]))
            per[n]["corr"].append([float(v) for k, v in sorted(res.audit.items()) if k.startswith("proxy_corr_full_")])
            per[n]["final_reward"].append(float(res.audit["expanded_reward_mean"]))
        print(f"audit rollout {i}: " + ", ".join(f"{n} overlap {per[n]['overlap'][-1]:.3f}" for n in names), flush=True)
    for i in range(args.timed_rollouts):  # Pro-GRPO rollouts as training runs them: the time share
        prompts, meta = batches[i]
        for n, cli in (zip(names, clis) if i % 2 == 0 else reversed(list(zip(names, clis)))):
            res = run_rollout(cli.model, i, prompts, meta, audit=False)
            tm = res.timings
            total = tm["denoise"] + tm["preview"] + tm["final"]
            per[n]["share"].append(tm["preview"] / total)
            per[n]["preview_s"].append(tm["preview"])
            per[n]["previews"].append(res.num_previews)
            per[n]["rollout_s"].append(total)
        print(f"timed rollout {i}: " + ", ".join(f"{n} share {per[n]['share'][-1]:.3f}" for n in names), flush=True)
    ref = names[0]
    for n, cli in zip(names, clis):
        p = per[n]
        ck = len(p["corr"][0]) if p["corr"] else 0
        rows = cli.model.schedule.group_size * len(batches[0][0])
        arm = {
            "preview_decoder": arms[names.index(n)][0], "preview_scale": arms[names.index(n)][1],
            "overlap": mean_ci(p["overlap"]),
            "overlap_minus_" + ref: mean_ci([a - b for a, b in zip(p["overlap"], per[ref]["overlap"])]),
            "proxy_corr_full": [mean_ci([c[k] for c in p["corr"]]) for k in range(ck)],
            "preview_share": mean_ci(p["share"]),
            "preview_share_of_sums": sum(p["preview_s"]) / sum(p["rollout_s"]) if p["rollout_s"] else None,
            "preview_s_per_preview": sum(p["preview_s"]) / max(1, sum(p["previews"])),
            **decode_cost(cli.model, rows, args.repeats),
            "per_rollout": p,
        }
        out["arms"][n] = arm
    return out


def format_table(out: dict[str, Any]) -> str:
    arms = out["arms"]
    ref = next(iter(arms))
    ncorr = len(next(iter(arms.values()))["proxy_corr_full"])
    head = ["preview decoder", "MFLOPs / preview", "decode ms / preview", "preview s / preview (decode + reward)",
            "preview share of rollout time", f"overlap (paired diff vs {ref})",
            *[f"whole-group corr ckpt {k}" for k in range(ncorr)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ci(d: dict[str, Any], fmt: str = ".3f") -> str:
        if d["lo"] is None:
            return f"{d['mean']:{fmt}}"
        return f"{d['mean']:{fmt}} [{d['lo']:{fmt}}, {d['hi']:{fmt}}]"

    for name, a in arms.items():
        diff = a["overlap_minus_" + ref]
        cells = [f"`{name}`", f"{a['flops'] / 1e6:.1f}", f"{a['decode_s_per_preview'] * 1e3:.3f}",
                 f"{a['preview_s_per_preview'] * 1e3:.2f} ms", ci(a["preview_share"]),
                 f"{ci(a['overlap'])} ({diff['mean']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}])"
                 if diff["lo"] is not None else ci(a["overlap"]),
                 *[ci(c) for c in a["proxy_corr_full"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare preview decoders on a config's model (see the module docstring).")
    p.add_argument("--config", action="append", required=True, help="config file(s), as for fit")
    p.add_argument("--preview-decoder", action="append", required=True,
                   help="an arm: 'vae' or an AutoencoderTiny source, optionally '@<preview_scale>' (repeat)")
    p.add_argument("--override", action="append", default=[], help="extra CLI arguments (repeat)")
    p.add_argument("--rollouts", type=int, default=16, help="audit rollouts per arm (proxy quality)")
    p.add_argument("--timed-rollouts", type=int, default=8, help="Pro-GRPO rollouts per arm (time share)")
    p.add_argument("--repeats", type=int, default=5, help="decode-only timings per arm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for results.json and summary.md")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and not argv[0].startswith("-"):
        out = summarize(argv[0])
        for k, v in out.items():
            print(f"{k}: {v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}] (n = {v['n']} rollouts)")
        return out
    if not argv:
        raise SystemExit(__doc__)
    args = parse_args(argv)
    out = compare(args)
    table = format_table(out)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        with open(os.path.join(args.out, "summary.md"), "w") as fh:
            fh.write(f"`{out['command']}` (torch threads: {out['threads']})\n\n{table}\n")
    return out


if __name__ == "__main__":
    main()
