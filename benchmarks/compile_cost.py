"""Eager vs compiled denoiser (``compile: true``): rollout and update wall time as ratios, and agreement.

    python -m benchmarks.compile_cost --model tiny --model block --compile-backend inductor \\
        --repeats 3 --out docs/results/compile_cost

Per model, two backends with the same seed (same weights): one eager, one compiled. The warm-up
(one rollout and one update on each; the compiled one compiles every shape there, timed as the
compile cost) is followed by ``--repeats`` rounds; in each, both run the same rollout (same prompts,
same noise: the same trajectories up to float rounding) and the same update on it (SGD at lr 0, so
the weights, and hence every round, stay the same), eager first in even rounds and compiled first
in odd ones. Ratios are compiled / eager within a round; medians over rounds (min-max in the JSON).

Agreement, in every round: whether the two rollouts kept the same survivors; max |log-ratio| of the
compiled rollout's recorded log-probs against an *eager* re-scoring of its own transitions (the
trainable steps); and max |log-ratio| on-policy, i.e. the compiled denoiser with grad (the update's
graph) re-scoring the compiled rollout's transitions before any optimizer step. The PPO clip ranges
are 1e-4 (the paper's configs) to 1e-2 (the quickstart): a log-ratio of that size would be clipped.
Graphs compiled after the warm-up are counted (``DenoiserCompiler``): the claim is zero.

Models: ``tiny`` (the library's ``TinySD3Backend``, 64 px, CFG 4.5: the denoiser sees 2x the rows)
and ``block`` (SD3.5-Medium's first and last MMDiT-X blocks at their real width, 1536, 24 heads:
random weights, 128 px, 154 text tokens, no CFG; ``benchmarks/models.py``), brightness reward, LoRA
rank 8. ``full`` (the whole SD3.5-M, 512 px) is for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings, grpo_update

from .models import build_backend, build_rewards

#: model -> (backend size, resolution, T, prompts, schedule, guidance scale, train batch)
MODELS = {
    "tiny": ("tiny", 64, 6, 2, ProGRPOSchedule(8, [1, 3], [4, 2]), 4.5, 8),
    "block": ("block", 128, 3, 1, ProGRPOSchedule(4, [0], [2]), 1.0, 4),
    # the whole SD3.5-Medium at 512 px (GPU: benchmarks/gpu/session.sh's compile stage)
    "full": ("full", 512, 10, 1, ProGRPOSchedule(16, [4, 6], [8, 4]), 4.5, 8),
}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow stars"]


def build(model: str, compile_backend: str | None, device: str, dtype: str) -> tuple[Any, ExpandPruneRollout, int]:
    size, res, T, P, sched, guidance, batch = MODELS[model]
    options: dict[str, Any] = {"guidance_scale": guidance}
    if compile_backend is not None:
        options.update(compile=True, compile_backend=compile_backend)
    backend = build_backend("sd3", size, num_steps=T, resolution=res, device=device, dtype=dtype, **options)
    backend.eval()
    rollout = ExpandPruneRollout(backend, build_rewards("brightness", "tiny", device), sched)
    return backend, rollout, batch


def log_ratios(backend: Any, result: Any, grad: bool, chunk: int) -> float:
    """max |log p(stored transition) under ``backend`` - recorded log-prob| over trainable steps."""
    N, T = result.log_probs.shape
    trainable = backend.trainable_steps()  # [T] bool
    traj = torch.arange(N).repeat_interleave(T)  # [N*T]
    step = torch.arange(T).repeat(N)  # [N*T]
    keep = trainable[step]  # [N*T]
    traj, step = traj[keep].to(result.log_probs.device), step[keep].to(result.log_probs.device)
    worst = 0.0
    for tr, st in zip(traj.split(chunk), step.split(chunk)):  # the update's minibatch shape: its graph
        if tr.numel() < chunk:  # a shorter last chunk would compile one more shape: pad it with row 0
            pad = chunk - tr.numel()
            tr, st = torch.cat([tr, tr[:1].repeat(pad)]), torch.cat([st, st[:1].repeat(pad)])
        cond = {k: v.index_select(0, result.prompt_index[tr]) for k, v in result.cond.items()}
        with torch.set_grad_enabled(grad):
            out = backend.step(result.latents[tr, st], st, cond, next_latents=result.latents[tr, st + 1])
        worst = max(worst, float((out.log_prob.detach() - result.log_probs[tr, st]).abs().max()))
    return worst


def one(backend: Any, rollout: ExpandPruneRollout, batch: int, P: int, seed: int) -> dict[str, Any]:
    """One rollout and one update (lr 0), timed."""
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.0)
    t0 = time.perf_counter()
    res = rollout.run(PROMPTS[:P], torch.Generator().manual_seed(seed))
    t1 = time.perf_counter()
    adv = torch.linspace(-1, 1, res.log_probs.shape[0])  # [N]
    grpo_update(backend, res, adv.to(res.log_probs.device), UpdateSettings(train_batch_size=batch), opt,
                generator=torch.Generator().manual_seed(seed))
    if res.log_probs.is_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"rollout_s": t1 - t0, "update_s": t2 - t1, "result": res}


def bench_model(model: str, compile_backend: str, repeats: int, device: str = "cpu",
                dtype: str = "float32") -> dict[str, Any]:
    P = MODELS[model][3]
    eager, eager_ro, batch = build(model, None, device, dtype)
    comp, comp_ro, _ = build(model, compile_backend, device, dtype)
    t0 = time.perf_counter()
    warm_c = one(comp, comp_ro, batch, P, seed=0)
    compile_s = time.perf_counter() - t0
    log_ratios(comp, warm_c["result"], grad=True, chunk=batch)  # the re-scoring chunks' graphs are warm-up too
    log_ratios(comp, warm_c["result"], grad=False, chunk=batch)
    warm_e = one(eager, eager_ro, batch, P, seed=0)
    graphs_warm = comp.compiler.graphs
    rounds = []
    for r in range(repeats):
        order = [("eager", eager, eager_ro), ("compiled", comp, comp_ro)]
        got = {name: one(b, ro, batch, P, seed=r + 1) for name, b, ro in (order if r % 2 == 0 else order[::-1])}
        e, c = got["eager"]["result"], got["compiled"]["result"]
        same = all(torch.equal(a.kept, b.kept) for a, b in zip(e.checkpoints, c.checkpoints))
        rounds.append({
            "eager_rollout_s": got["eager"]["rollout_s"], "compiled_rollout_s": got["compiled"]["rollout_s"],
            "eager_update_s": got["eager"]["update_s"], "compiled_update_s": got["compiled"]["update_s"],
            "rollout_ratio": got["compiled"]["rollout_s"] / got["eager"]["rollout_s"],
            "update_ratio": got["compiled"]["update_s"] / got["eager"]["update_s"],
            "same_survivors": same,
            "max_abs_log_ratio_vs_eager_rescoring": log_ratios(eager, c, grad=False, chunk=batch),
            "max_abs_log_ratio_on_policy": log_ratios(comp, c, grad=True, chunk=batch),
            "max_abs_log_prob_diff_eager_vs_compiled_rollout": float((e.log_probs - c.log_probs).abs().max())
            if same else None,
        })
        print(f"{model} round {r}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items()
                                               if isinstance(v, float)), flush=True)

    def med(key: str) -> dict[str, float]:
        vals = [x[key] for x in rounds]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    return {
        "model": model, "settings": dict(zip(("size", "resolution", "T", "prompts", "schedule", "guidance",
                                               "train_batch_size"), map(str, MODELS[model]))),
        "denoiser_params": sum(p.numel() for p in comp.denoiser().parameters()),
        "warmup_compiled_s": compile_s, "warmup_eager_s": warm_e["rollout_s"] + warm_e["update_s"],
        "graphs_after_warmup": graphs_warm, "graphs_after_rounds": comp.compiler.graphs,
        "graph_shapes": [list(s) for s in comp.compiler.shapes],
        "rollout_ratio": med("rollout_ratio"), "update_ratio": med("update_ratio"),
        "eager_rollout_s": med("eager_rollout_s"), "eager_update_s": med("eager_update_s"),
        "same_survivors": all(x["same_survivors"] for x in rounds),
        "max_abs_log_ratio_vs_eager_rescoring": max(x["max_abs_log_ratio_vs_eager_rescoring"] for x in rounds),
        "max_abs_log_ratio_on_policy": max(x["max_abs_log_ratio_on_policy"] for x in rounds),
        "rounds": rounds,
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| model | denoiser params | rollout: compiled / eager | update: compiled / eager | eager rollout s | "
            "eager update s | warm-up (compile) s, compiled vs eager | graphs: after warm-up / after rounds | "
            "same survivors | max abs log-ratio vs eager re-scoring | on-policy |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r['model']} | {r['denoiser_params'] / 1e6:.2f} M | {r['rollout_ratio']['median']:.2f} "
            f"({r['rollout_ratio']['min']:.2f}-{r['rollout_ratio']['max']:.2f}) | {r['update_ratio']['median']:.2f} "
            f"({r['update_ratio']['min']:.2f}-{r['update_ratio']['max']:.2f}) | {r['eager_rollout_s']['median']:.2f} | "
            f"{r['eager_update_s']['median']:.2f} | {r['warmup_compiled_s']:.0f} vs {r['warmup_eager_s']:.1f} | "
            f"{r['graphs_after_warmup']} / {r['graphs_after_rounds']} | {r['same_survivors']} | "
            f"{r['max_abs_log_ratio_vs_eager_rescoring']:.1e} | {r['max_abs_log_ratio_on_policy']:.1e} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable (default: tiny and block)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="denoiser weights (bfloat16 on a GPU)")
    p.add_argument("--out", default="benchmarks/results/compile_cost")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    out: dict[str, Any] = {"command": "python -m benchmarks.compile_cost " + " ".join(sys.argv[1:] if argv is None else argv),
                           "torch": torch.__version__, "threads": args.threads, "device": args.device,
                           "dtype": args.dtype,
                           "load_average_start": os.getloadavg(), "results": []}
    for model in args.model or ["tiny", "block"]:
        out["results"].append(bench_model(model, args.compile_backend, args.repeats, args.device, args.dtype))
        out["load_average_end"] = os.getloadavg()
        with open(os.path.join(args.out, "compile_cost.json"), "w") as fh:  # after each model: partial runs keep
            json.dump(out, fh, indent=1)
    md = table(out["results"])
    with open(os.path.join(args.out, "compile_cost.md"), "w") as fh:
        fh.write(f"`{out['command']}`\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
