"""Pruning points chosen from measured proxy quality: ``python -m pro_grpo_lightning adapt``.

The paper's pruning points are fixed numbers from its ablations (steps 30, 40 of 50; 5, 7 of 10).
Where to prune trades compute (an earlier prune runs fewer trajectories through the later steps)
against how well the preview ranks trajectories at that step, and the latter depends on the model,
the reward and T. This measures it and picks:

1. ``--rollouts`` audit rollouts of the config's model (the whole expanded group kept to the end)
   score every trajectory's x0 preview after every candidate step (``probe_steps``) and its final
   image with the true reward.
2. Per candidate step: the preview's group-centred correlation with the final reward over the
   whole expanded group, and the overlap of a one-stage choice (``G_max -> K`` by the schedule's
   rule on the previews) with the choice the same rule makes on the final rewards.
3. Per candidate tuple of checkpoints (one per ``keep`` size, the sizes stay the config's): the
   overlap of the schedule's whole sequence of selections with the final-reward choice, replayed
   exactly on the recorded scores (what audit mode's ``pruning/audit_overlap`` would log), and its
   rollout FLOPs per prompt from the FLOP model (denoiser calls + previews, in units of one
   denoiser call on one trajectory; a preview's cost counted with ``torch.utils.flop_counter``).
4. The rule: the *reference* is the latest tuple (the last candidate steps, whose previews are
   closest to the final images); among the tuples whose mean overlap is at least the reference's
   minus ``--bound``, the one with the fewest FLOPs wins (ties: the earliest). The choice is
   written as a config overlay (``schedule.yaml``: a ``ProGRPOSchedule`` with the chosen
   checkpoints) next to the measurement (``adaptive.json``). The run then trains on fixed points:
   its checkpoints store the config, so resume is exact; measuring again is a new ``adapt`` run.

The overlap of a proxy choice with the final-reward choice is in [0, 1]; a uniform random choice of
K of G_max scores K / G_max on average, the final-reward choice itself 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .rollout import group_centred_corr
from .schedules import GroupSchedule, ProGRPOSchedule
from .selection import select_indices

#: rules that rank by scores (the others ignore previews: nothing to measure)
SCORED_RULES = ("ovf", "topk", "extremes")


def sequential_choice(scores: Sequence[Tensor], keep: Sequence[int], rule: str) -> Tensor:
    """Replay a schedule's selections on recorded scores: the survivors' original indices.

    scores: one [B, G] tensor per checkpoint, every trajectory's score there (B groups, any mix of
    rollouts and prompts); keep: the group size after each checkpoint. Each selection sees only
    the trajectories the previous ones kept, as the rollout does. Returns [B, keep[-1]] long.
    """
    B, G = scores[0].shape
    live = torch.arange(G, device=scores[0].device).expand(B, G)  # [B, g] original index of each live row
    for s, k in zip(scores, keep):
        kept = select_indices(s.gather(1, live), k, rule)  # [B, k] positions among the live rows
        live = live.gather(1, kept)  # [B, k]
    return live


def overlap_with_final(chosen: Tensor, final: Tensor, rule: str) -> Tensor:
    """Share of each group's chosen trajectories the same rule would keep on the final rewards.

    chosen: [B, K] original indices; final: [B, G] true rewards. Returns [B] in [0, 1]."""
    true = select_indices(final, chosen.shape[1], rule)  # [B, K]
    hit = torch.zeros_like(final, dtype=torch.bool).scatter_(1, true, True)  # [B, G]
    return hit.gather(1, chosen).float().mean(1)  # [B]


def candidate_tuples(steps: Sequence[int], count: int) -> list[tuple[int, ...]]:
    """Every strictly increasing choice of ``count`` checkpoints among ``steps``."""
    return list(itertools.combinations(sorted(set(steps)), count))


def rollout_flops(schedule: GroupSchedule, num_steps: int, preview_cost: float) -> float:
    """FLOP model of one prompt's rollout, in denoiser calls on one trajectory (CFG included):
    denoiser calls + ``preview_cost`` x previews (every live trajectory at each checkpoint). The
    final decode and reward and the update are the same for every checkpoint choice (K fixed)."""
    previews = sum(schedule.sizes()[:len(schedule.checkpoints)])  # live trajectories at each checkpoint
    return schedule.nfe_per_prompt(num_steps) + preview_cost * previews


def _mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error over rollouts ([R]); se 0 for one rollout."""
    n = values.numel()
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return float(values.mean()), se


def analyse(probes: Tensor, final: Tensor, steps: Sequence[int], group_size: int, keep: Sequence[int],
            rule: str, num_steps: int, preview_cost: float, bound: float) -> dict[str, Any]:
    """The measurement and the choice from recorded scores.

    probes: [R, S, P, G] preview scores of R audit rollouts after each of the S candidate ``steps``;
    final: [R, P, G] true rewards. Returns per-step figures, every candidate tuple's overlap (mean,
    standard error over rollouts) and FLOPs, the reference tuple and the choice (JSON-ready).
    """
    if rule not in SCORED_RULES:
        raise ValueError(f"schedule rule {rule!r} ignores previews: adaptive points need one of {SCORED_RULES}")
    R, S, P, G = probes.shape
    if G != group_size or final.shape != (R, P, G) or S != len(steps):
        raise ValueError(f"probes {tuple(probes.shape)} / final {tuple(final.shape)} do not match "
                         f"{len(steps)} steps and G_max={group_size}")
    K = keep[-1]
    flat_final = final.reshape(R * P, G)  # [R*P, G]
    per_step = []
    for j, step in enumerate(steps):
        corr = torch.stack([group_centred_corr(probes[r, j], final[r]) for r in range(R)])  # [R]
        one_stage = overlap_with_final(select_indices(probes[:, j].reshape(R * P, G), K, rule), flat_final, rule)
        corr_m, corr_se = _mean_se(corr)
        ov_m, ov_se = _mean_se(one_stage.view(R, P).mean(1))
        per_step.append({"step": step, "corr": corr_m, "corr_se": corr_se, "overlap_one_stage": ov_m,
                         "overlap_one_stage_se": ov_se})
    index = {s: j for j, s in enumerate(steps)}
    tuples = []
    for cks in candidate_tuples(steps, len(keep)):
        chosen = sequential_choice([probes[:, index[c]].reshape(R * P, G) for c in cks], keep, rule)  # [R*P, K]
        per_rollout = overlap_with_final(chosen, flat_final, rule).view(R, P).mean(1)  # [R]
        m, se = _mean_se(per_rollout)
        sched = ProGRPOSchedule(group_size, list(cks), list(keep), rule)
        tuples.append({"checkpoints": list(cks), "overlap": m, "overlap_se": se,
                       "overlap_per_rollout": per_rollout.tolist(),
                       "flops_per_prompt": rollout_flops(sched, num_steps, preview_cost)})
    reference = tuples[-1]  # combinations() is lexicographic: the last is the latest tuple
    threshold = reference["overlap"] - bound
    feasible = [t for t in tuples if t["overlap"] >= threshold]  # never empty: the reference is in it
    chosen = min(feasible, key=lambda t: (t["flops_per_prompt"], t["checkpoints"]))
    return {"steps": list(steps), "per_step": per_step, "tuples": tuples, "reference": reference["checkpoints"],
            "reference_overlap": reference["overlap"], "bound": bound, "threshold": threshold,
            "chosen": chosen["checkpoints"], "chosen_overlap": chosen["overlap"],
            "chosen_flops_per_prompt": chosen["flops_per_prompt"], "group_size": group_size, "keep": list(keep),
            "rule": rule, "num_steps": num_steps, "preview_cost": preview_cost, "rollouts": R, "prompts": P,
            "chance_overlap": K / group_size}


# ---- measuring on a config's model ---------------------------------------------------------------------
def preview_cost_in_calls(module: Any, prompt: str) -> float:
    """FLOPs of one preview (decode + reward of one image) / FLOPs of one denoiser step on one
    trajectory (CFG rows included), both counted with ``torch.utils.flop_counter`` at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    backend, rollout = module.backend, module.rollout
    cond = backend.encode_prompts([prompt])  # {k: [1, ...]}
    x = backend.initial_latents(1, torch.Generator(device=backend.device).manual_seed(0))  # [1, *latent]
    with torch.no_grad():
        with FlopCounterMode(display=False) as step_count:
            out = backend.step(x, torch.zeros(1, dtype=torch.long), cond,
                               generator=torch.Generator(device=backend.device).manual_seed(0))
        with FlopCounterMode(display=False) as preview_count:
            rollout.rewards(rollout.preview_images(out.x0), [prompt], None)
    return preview_count.get_total_flops() / max(step_count.get_total_flops(), 1)


def prompt_batches(datamodule: Any, n: int, skip: int = 0) -> list[tuple[list[str], Any]]:
    """Prompt batches ``skip .. skip + n - 1`` of the data module's train loader, epoch after epoch
    (its own shuffle and seed, as training draws them)."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    out: list[tuple[list[str], Any]] = []
    seen = 0
    for epoch in range(skip + n):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            seen += 1
            if seen > skip:
                out.append((list(batch.prompts), batch.metadata) if hasattr(batch, "prompts") else (list(batch), None))
            if len(out) == n:
                return out
    raise ValueError(f"the data module gave fewer than {skip + n} prompt batches")


def measure(module: Any, datamodule: Any, rollouts: int, steps: Sequence[int], first_rollout: int = 0,
            log: Any = None) -> tuple[Tensor, Tensor]:
    """Audit rollouts ``first_rollout ..`` of the module (its noise of those rollout indices, the data
    module's prompt batches) with every trajectory previewed after each of ``steps``.
    Returns probes [R, S, P, G] and final rewards [R, P, G]."""
    probes, finals = [], []
    for i, (prompts, meta) in enumerate(prompt_batches(datamodule, rollouts, skip=first_rollout)):
        noise, local = module.rollout_generators(first_rollout + i)
        res = module.rollout.run(prompts, local, audit=True, metadata=meta, noise_generator=noise,
                                 probe_steps=steps)
        probes.append(torch.stack([res.probe_scores[s] for s in steps]).cpu())  # [S, P, G]
        finals.append(res.expanded_rewards.cpu())  # [P, G]
        if log is not None:
            log(f"audit rollout {first_rollout + i}: overlap at the config's points {float(res.audit['overlap']):.3f}")
    return torch.stack(probes).float(), torch.stack(finals).float()


def schedule_overlay(result: dict[str, Any]) -> str:
    """The chosen schedule as a config overlay (``fit --config base.yaml --config schedule.yaml``)."""
    lines = [
        "# Written by `python -m pro_grpo_lightning adapt` (pro_grpo_lightning/adaptive.py): pruning points",
        f"# chosen from {result['rollouts']} audit rollouts x {result['prompts']} prompts. Overlap of the proxy's",
        f"# choice with the final-reward choice: {result['chosen_overlap']:.3f} here, {result['reference_overlap']:.3f} at the",
        f"# latest points {result['reference']} (bound {result['bound']}); rollout FLOPs per prompt",
        f"# {result['chosen_flops_per_prompt']:.1f} denoiser calls. Measurement: adaptive.json beside this file.",
        "model:",
        "  schedule:",
        "    class_path: pro_grpo_lightning.schedules.ProGRPOSchedule",
        "    init_args:",
        f"      group_size: {result['group_size']}",
        f"      checkpoints: {result['chosen']}",
        f"      keep: {result['keep']}",
        f"      rule: {result['rule']}",
    ]
    return "\n".join(lines) + "\n"


def format_table(result: dict[str, Any]) -> str:
    rows = ["step | preview-final corr | one-stage overlap", "---|---|---"]
    for s in result["per_step"]:
        rows.append(f"{s['step']} | {s['corr']:.3f} +- {s['corr_se']:.3f} | "
                    f"{s['overlap_one_stage']:.3f} +- {s['overlap_one_stage_se']:.3f}")
    best = sorted(result["tuples"], key=lambda t: t["flops_per_prompt"])
    rows += ["", "checkpoints | overlap | rollout FLOPs / prompt (denoiser calls)", "---|---|---"]
    rows += [f"{t['checkpoints']} | {t['overlap']:.3f} +- {t['overlap_se']:.3f} | {t['flops_per_prompt']:.1f}"
             + (" <- chosen" if t["checkpoints"] == result["chosen"] else "")
             + (" <- reference" if t["checkpoints"] == result["reference"] else "") for t in best]
    return "\n".join(rows)


@dataclasses.dataclass
class AdaptOptions:
    """The adapt command's own settings, beside the run's (``fit``'s: ``--config`` and any override).

    Args:
        out: folder for schedule.yaml (the config overlay) and adaptive.json (the measurement); a
            folder that already holds either is refused (nothing is replaced).
        rollouts: audit rollouts to measure on.
        bound: largest loss of overlap with the final-reward choice accepted, against the latest
            pruning points.
        candidates: 0-based steps to consider, e.g. [3, 5, 7] (default: every step).
    """

    out: str
    rollouts: int = 8
    bound: float = 0.05
    candidates: list[int] | None = None


DESCRIPTION = ("Choose a Pro-GRPO schedule's pruning points from a few audit rollouts of the config's model "
               "(pro_grpo_lightning/adaptive.py). The run's settings are fit's (--config files, overrides such as "
               "--data.prompts_per_step 2).")


def build_cli(argv: Sequence[str], options: Any = None) -> Any:
    """``fit``'s CLI on ``argv`` (``--config`` files, overlays in order, overrides), not run: the
    module and data module. ``options``: the command's own settings beside the run's (``AdaptOptions``)."""
    from .cli import main as cli_main

    with warnings.catch_warnings():  # LightningCLI reads only ``args``, and warns when argv has more
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_main(list(argv), run=False, save_config=False, exit_on_error=False, options=options,
                        description=DESCRIPTION if options else None, prog="pro-grpo adapt" if options else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``pro-grpo adapt`` / ``python -m pro_grpo_lightning adapt``: fit's parser plus ``AdaptOptions``
    (one ``--config``, ``--print_config``, one-line errors); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(argv, AdaptOptions)
    args = cli.config
    if args.rollouts < 1:
        raise ValueError(f"--rollouts must be >= 1, got {args.rollouts}")
    if not 0 <= args.bound <= 1:
        raise ValueError(f"--bound must be in [0, 1], got {args.bound}")
    written = [p for p in (os.path.join(args.out, n) for n in ("schedule.yaml", "adaptive.json")) if os.path.exists(p)]
    if written:
        raise ValueError(f"--out {args.out!r} already holds {written[0]!r}: choose a new folder (nothing is replaced)")
    module, sched = cli.model, cli.model.schedule
    T = module.backend.num_steps
    steps = list(range(T)) if args.candidates is None else list(args.candidates)
    if any(not 0 <= s < T for s in steps):
        raise ValueError(f"--candidates {steps}: steps must be in [0, {T}) for num_steps={T}")
    if not sched.keep or sched.final_keep is not None:
        raise ValueError(f"model.schedule {sched!r}: adapt moves a Pro-GRPO schedule's checkpoints; "
                         f"give a ProGRPOSchedule (its sizes are kept)")
    if sched.rule not in SCORED_RULES:
        raise ValueError(f"model.schedule rule {sched.rule!r} ignores previews; use one of {SCORED_RULES}")
    if len(steps) < len(sched.keep):
        raise ValueError(f"--candidates: {len(steps)} steps for {len(sched.keep)} checkpoints")
    module.configure_model()
    module.backend.eval()
    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        probes, final = measure(module, cli.datamodule, args.rollouts, steps, log=print)
        prompts, _ = prompt_batches(cli.datamodule, 1)[0]
        cost = preview_cost_in_calls(module, prompts[0])
    result = analyse(probes, final, steps, sched.group_size, sched.keep, sched.rule, T, cost, args.bound)
    result["config_checkpoints"] = list(sched.checkpoints)
    result["command"] = "python -m pro_grpo_lightning adapt " + " ".join(argv)
    with open(os.path.join(args.out, "adaptive.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, "schedule.yaml"), "w") as fh:
        fh.write(schedule_overlay(result))
    print(format_table(result))
    print(f"chosen checkpoints {result['chosen']} (config: {sched.checkpoints}); "
          f"overlay written to {os.path.join(args.out, 'schedule.yaml')}")
    return 0
