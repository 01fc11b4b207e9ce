"""The real SD1.5 and SD3.5-M architectures through one Pro-GRPO rollout and update on the CPU.

    python -m benchmarks.real_architectures --out docs/results/real_architectures

Nothing at real size had run end to end except in one GPU memory check. Here each family's backend
is the paper config's hub id built by the library with ``NetworkSource("random", "cpu", seed)``
(the architecture from ``architectures.py``, seeded random weights; no hub, no files), at 128 px:
SD1.5 in float32, SD3.5-M in bfloat16 without T5 (``drop_t5``: the 4.8 B-parameter encoder would
not fit this machine's shared memory next to the 2.2 B MMDiT) and 16 T5 tokens (zeros) instead of
256, which keeps the sequence short enough for a CPU. One prompt, G = 4 trajectories pruned to 2
by OVF on the x0 previews (SD1.5: after step 1 of T = 4, with CFG 4.5; SD3.5-M: after step 0 of
T = 2, without CFG, so that a 2.2 B bf16 MMDiT runs in minutes on a shared CPU), rewarded by
``Brightness`` (no network), then one ``grpo_update`` with AdamW. Checked and stored per family
(``<family>.json``):

- shapes of the rollout (latents [K, T + 1, C, h, w], log-probs [K, T], images [K, 3, 128, 128]);
- the LoRA adapter: which modules carry it (the family's default targets) and its size;
- recorded vs re-scored log-probs: the survivors' transitions re-scored by ``backend.step`` with
  the stored next latents (what the update's first minibatch sees: the ratio is exactly 1);
- the update ran and changed the adapter;
- the plan (``Planner`` on an empty build, target "cpu") of one denoiser call on 2 rows and one
  update minibatch of 2 against the CPU allocator's peak (``measured_peak_bytes``) on the real weights.

FLUX.1-dev (11.9 B parameters) does not fit this machine's memory: it is built on the meta device
(``NetworkSource("empty")``), its parameters counted by component, and planned.
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

import torch  # noqa: E402

from pro_grpo_lightning.backends import FluxBackend, LoraSettings, SD3Backend, SD15Backend  # noqa: E402
from pro_grpo_lightning.loading import source_checks_skipped  # noqa: E402
from pro_grpo_lightning.module import ProGRPOModule  # noqa: E402
from pro_grpo_lightning.networks import EMPTY, NetworkSource  # noqa: E402
from pro_grpo_lightning.objectives import group_advantages  # noqa: E402
from pro_grpo_lightning.plan import LiveBytes, Planner  # noqa: E402
from pro_grpo_lightning.plan.tracking import allocator_levels  # noqa: E402
from pro_grpo_lightning.rewards import Brightness, RewardSet  # noqa: E402
from pro_grpo_lightning.rollout import ExpandPruneRollout  # noqa: E402
from pro_grpo_lightning.schedules import ProGRPOSchedule  # noqa: E402
from pro_grpo_lightning.update import UpdateSettings, grpo_update  # noqa: E402

from .report import git_commit  # noqa: E402

#: family -> (backend class, hub id, backend settings, (T, G, K, pruning step)).
FAMILIES = {
    "sd15": (SD15Backend, "runwayml/stable-diffusion-v1-5", dict(dtype="float32", guidance_scale=4.5), (4, 4, 2, 1)),
    "sd35m": (SD3Backend, "stabilityai/stable-diffusion-3.5-medium",
              dict(dtype="bfloat16", guidance_scale=1.0, drop_t5=True, max_sequence_length=16), (2, 4, 2, 0)),
}


def _backend(family: str) -> Any:
    cls, hub_id, kwargs, (T, _, _, _) = FAMILIES[family]
    with source_checks_skipped():  # a hub id that is not downloaded: only its architecture is read
        return cls(hub_id, num_steps=T, resolution=128, lora=LoraSettings(rank=8, alpha=8), **kwargs)


def _schedule(family: str) -> ProGRPOSchedule:
    _, G, K, prune_at = FAMILIES[family][3]
    return ProGRPOSchedule(group_size=G, checkpoints=[prune_at], keep=[K], rule="ovf")


def _module(backend: Any, family: str) -> ProGRPOModule:
    return ProGRPOModule(backend=backend, rewards=[Brightness()], schedule=_schedule(family),
                         update=UpdateSettings(train_batch_size=2, clip_range=1e-4))


def _no_grad(fn: Any) -> Any:
    def run() -> None:
        with torch.no_grad():
            fn()
    return run


def run_family(family: str, seed: int, log: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    backend = _backend(family)
    backend.use_networks(NetworkSource("random", "cpu", seed))
    backend.configure_model()
    built_s = time.perf_counter() - t0
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in backend.denoiser().named_parameters() if ".lora_A" in n})
    leaves = sorted({n.rsplit(".", 1)[-1] if not n.endswith("out.0") else "to_out.0" for n in adapted})
    lora_params = sum(p.numel() for p in backend.trainable_parameters())
    log(f"{family}: built in {built_s:.0f}s, LoRA on {len(adapted)} modules ({lora_params / 1e6:.2f} M parameters)")

    rewards = RewardSet([Brightness()])
    rollout = ExpandPruneRollout(backend, rewards, _schedule(family))
    T = backend.num_steps
    t0 = time.perf_counter()
    res = rollout.run(["a photo of a red apple on a wooden table"], torch.Generator().manual_seed(seed))
    rollout_s = time.perf_counter() - t0
    N = res.latents.shape[0]
    steps = torch.arange(T).repeat(N)  # [N*T]
    traj = torch.arange(N).repeat_interleave(T)  # [N*T]
    from pro_grpo_lightning.backends.base import select_rows

    with torch.no_grad():
        out = backend.step(res.latents[traj, steps], steps, select_rows(res.cond, res.prompt_index[traj]),
                           next_latents=res.latents[traj, steps + 1])
    rescored = out.log_prob.view(N, T)  # [N, T]
    trainable = backend.trainable_steps()  # [T]
    diff = (rescored - res.log_probs)[:, trainable].abs()
    log(f"{family}: rollout {rollout_s:.0f}s; recorded vs re-scored log-probs: max |diff| {float(diff.max()):.2e}")

    before = {n: p.detach().clone() for n, p in backend.denoiser().named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(backend.trainable_parameters(), lr=1e-4)
    adv = group_advantages(res.rewards).flatten()  # [N]
    t0 = time.perf_counter()
    stats = grpo_update(backend, res, adv, UpdateSettings(train_batch_size=2, clip_range=1e-4), opt,
                        generator=torch.Generator().manual_seed(seed))
    update_s = time.perf_counter() - t0
    changed = sum(not torch.equal(p.detach(), before[n]) for n, p in backend.denoiser().named_parameters()
                  if p.requires_grad)
    log(f"{family}: update {update_s:.0f}s, {stats['steps']:.0f} optimizer step(s), {changed} adapter tensors changed")

    # the plan at real size vs the CPU allocator on these real-size weights
    planner = Planner(_module(_backend(family), family), prompts_per_step=1, target="cpu")
    pairs = {"denoiser call, 2 rows": (planner.denoise(2), _no_grad(planner.denoise_call(2, backend=backend))),
             "update minibatch of 2": (planner.update(2, False), planner.update_call(2, False, backend=backend))}
    plan_vs = {}
    for what, (planned, fn) in pairs.items():
        measured, inside = allocator_peak(fn)
        plan_vs[what] = {"planned_bytes": planned, "measured_bytes": measured, "ratio": planned / measured,
                         "allocator_peak_inside": inside,
                         "largest_op_workspace_planned_bytes": max(planner.workspace.bytes.values(), default=0)}
        log(f"{family}: {what}: plan {planned / 2**20:.1f} MiB vs CPU allocator {measured / 2**20:.1f} MiB "
            f"(peak inside {' > '.join(inside['ops'])})")
    # the tracker on the real call: what the ops return, without the workspace (the plan's old figure)
    tracker = LiveBytes()
    with tracker:
        pairs["denoiser call, 2 rows"][1]()
    plan_vs["denoiser call, 2 rows"]["tensors_returned_on_real_weights"] = tracker.peak
    return {
        "hub_id": FAMILIES[family][1], "settings": {k: str(v) for k, v in FAMILIES[family][2].items()},
        "schedule": dict(zip(("T", "G", "K", "pruned_after_step"), FAMILIES[family][3])), "resolution": 128,
        "seconds": {"build": built_s, "rollout": rollout_s, "update": update_s},
        "shapes": {"latents": list(res.latents.shape), "log_probs": list(res.log_probs.shape),
                   "images": list(res.images.shape), "rewards": list(res.rewards.shape)},
        "lora": {"modules": len(adapted), "leaf_names": leaves, "parameters": lora_params,
                 "default_targets": list(backend.default_lora_targets)},
        "log_prob_recorded_vs_rescored": {"max_abs_diff": float(diff.max()), "pairs": int(diff.numel())},
        "update": {k: float(v) for k, v in stats.items()}, "adapter_tensors_changed": changed,
        "plan_vs_cpu_allocator": plan_vs,
        "peak_rss_gib_so_far": _peak_rss_gib(),
    }


def allocator_peak(fn: Any) -> tuple[int, dict[str, Any]]:
    """The CPU allocator's peak during ``fn()`` (as ``measured_peak_bytes`` reads it) and where it
    is: the ops running at that moment (outermost first), the bytes alive when the innermost began,
    and per op name the most it held inside itself beyond what it returned (its peak minus the
    larger of the bytes alive at its start and at its end)."""
    import bisect

    events, times, levels = allocator_levels(fn)
    peak = max(levels, default=0)
    at = times[levels.index(peak)] if levels else 0

    def before(t: int) -> int:
        i = bisect.bisect_left(times, t)
        return levels[i - 1] if i else 0

    ops = [e for e in events if e.name().startswith("aten::")]
    running = sorted((e for e in ops if e.start_ns() <= at <= e.start_ns() + e.duration_ns()),
                     key=lambda e: -e.duration_ns())
    inside: dict[str, int] = {}
    for e in ops:
        i, j = bisect.bisect_left(times, e.start_ns()), bisect.bisect_right(times, e.start_ns() + e.duration_ns())
        if i < j:
            held = max(levels[i:j]) - max(before(e.start_ns()), levels[j - 1])
            inside[e.name()] = max(inside.get(e.name(), 0), held)
    top = dict(sorted(inside.items(), key=lambda kv: -kv[1])[:8])
    return peak, {"ops": [e.name() for e in running],
                  "alive_at_innermost_start": before(running[-1].start_ns()) if running else 0,
                  "most_held_inside_by_op": top}


def flux_on_meta() -> dict[str, Any]:
    module = _flux_module()
    module.use_networks(EMPTY)
    backend = module.backend
    backend.configure_model()
    counts = {name: sum(p.numel() for p in child.parameters() if not p.requires_grad)
              for name, child in backend.named_children()}
    planner = Planner(_flux_module(), prompts_per_step=1)  # a second empty build, faked by the planner
    return {"parameters_by_component": counts, "lora_parameters": sum(p.numel() for p in backend.trainable_parameters()),
            "all_on_meta": all(p.is_meta for p in backend.parameters()),
            "plan_peak_gib_cuda": max(p.peak for p in planner.plan()) / 2**30}


def _flux_module() -> ProGRPOModule:
    with source_checks_skipped():
        backend = FluxBackend("black-forest-labs/FLUX.1-dev", num_steps=4, resolution=128, dtype="bfloat16",
                              max_sequence_length=512)
    return ProGRPOModule(backend=backend, rewards=[Brightness()],
                         schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2], rule="ovf"))


def replan(path: Path, log: Any) -> None:
    """The plan figures of a stored ``<family>.json`` made again by the current code (no real
    weights: the plan's fake build), stored beside the old ones as ``replanned``."""
    stored = json.loads(path.read_text())
    family = stored["family"]
    planner = Planner(_module(_backend(family), family), prompts_per_step=1, target="cpu")
    figures = {"denoiser call, 2 rows": planner.denoise(2), "update minibatch of 2": planner.update(2, False)}
    for what, planned in figures.items():
        log(f"{family}: {what}: plan {planned} (stored {stored['result']['plan_vs_cpu_allocator'][what]['planned_bytes']})")
    stored["replanned"] = {"git_commit": git_commit(), "planned_bytes": figures}
    path.write_text(json.dumps(stored, indent=1))


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_architectures", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--families", nargs="+", default=[*FAMILIES, "flux"], choices=[*FAMILIES, "flux"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replan", action="store_true",
                   help="only make the plan figures of the stored <family>.json files in --out again")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.replan:
        for family in args.families:
            if family != "flux":
                replan(args.out / f"{family}.json", log)
        return 0

    result: dict[str, Any] = {"command": "python -m benchmarks.real_architectures " + " ".join(argv or sys.argv[1:]),
                              "git_commit": git_commit(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                              "load_average_start": os.getloadavg()}
    for family in args.families:  # one file per family, written as soon as it is done
        t0 = time.perf_counter()
        out = flux_on_meta() if family == "flux" else run_family(family, args.seed, log)
        path = args.out / f"{family}.json"
        path.write_text(json.dumps({**result, "family": family, "result": out, "wall_s": time.perf_counter() - t0,
                                    "load_average_end": os.getloadavg()}, indent=1))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
