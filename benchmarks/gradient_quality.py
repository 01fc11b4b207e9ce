"""Gradient quality per FLOP of each selection arm, on shared trajectories (common random numbers).

    python -m benchmarks.gradient_quality [--config configs/quickstart.yaml] [--rollouts 8] [--prompts 8] [--reward brightness]
                                          [--schedule NAME=pro:16>10@4>6@6 ...] [--out DIR]

Each rollout samples G_sample trajectories for each of the same P training prompts to the end
(the config's policy, its SDE and guidance), with the x0 preview of every trajectory decoded and
scored after every checkpoint step any schedule uses. Every arm is then a *selection* of K
trajectories per prompt from these same trajectories, so arms differ only by which trajectories
they train on (and what that costs):

    plain-K, plain-2K     the first K / 2K of each group (plain GRPO; trajectories are iid)
    static-ovf            OVF on the true final rewards of the first G_static (no early stop)
    static-extremes       ceil(K/2) best + floor(K/2) worst true rewards of G_static (DanceGRPO)
    pro-<s>               schedule s, OVF on the previews at its checkpoints (Pro-GRPO)
    topk-<s>, random-<s>  schedule s with the top-k / a random k-subset at each checkpoint

For every arm and rollout: its exact policy gradient on-policy (the GRPO loss's gradient before any
optimizer step, ratio 1, with the config's advantages on the arm's rewards and one random subset
of ``timestep_fraction`` of the trainable steps per trajectory, the same subset in every arm); the
trained group's true-reward spread; the cost in units of F = one denoiser call on one trajectory
(denoiser calls + previews and final images x (decode + reward) / F + c x training pairs, c =
(forward + backward) / F; each counted with ``torch.utils.flop_counter`` on this model, as
``benchmarks.measure`` does). The random arms draw their subsets from a stream of their own.

Because the GRPO gradient is linear in the advantages, each arm's gradient is a weighted sum of
per-trajectory gradients h_i = d/dtheta sum_{t in S_i} log p(x_{t+1} | x_t): one backward per
trajectory serves every arm. Scoring (``benchmarks.crossfit``): each arm's gradients in one half of
the rollouts against the other half's whole-group reference (cross-fitting), per rollout and at
equal FLOPs (every arm given the FLOPs of one plain-2K rollout), with delete-one-rollout jackknife
intervals, Holm across each family of comparisons, and power against the positive control's effect
(plain-2K - plain-K); ``--looks L`` when these comparisons have been looked at L times (a run
continued after a first analysis): every interval and decision at family-wise alpha 0.05 / L, the
nominal 95 % figures beside them. The inner products this needs are saved as ``grams.npz`` (float32,
the blocks the cross-fitting reads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .schedules import NamedSchedule, parse_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCHEDULES = ["quickstart=pro:16>10@4>6@6",  # configs/quickstart.yaml
                     "paper=pro:24>12@5>6@7",  # the paper's 48 -> 24 @5 -> 12 @7 (T = 10), sizes x 0.5
                     "early=pro:16>6@2"]  # one prune at round(0.2 T) (benchmarks.schedules' pro-early)


def arm_schedules(K: int, G_static: int, schedules: list[NamedSchedule]) -> list[NamedSchedule]:
    """The arms as schedules (every one trains K per prompt, plain-2K trains 2K)."""
    arms = [f"plain-K=plain:{K}", f"plain-2K=plain:{2 * K}", f"static-ovf=static:{G_static}>{K}",
            f"static-extremes=static:{G_static}>{K}/extremes"]
    for s in schedules:
        body = s.spec.split(":", 1)[1].split("/")[0]
        arms += [f"pro-{s.name}=pro:{body}", f"topk-{s.name}=pro:{body}/topk", f"random-{s.name}=pro:{body}/random"]
    return [parse_schedule(a) for a in arms]


def select_arm(sched: Any, previews: dict[int, Tensor], final: Tensor, generator: torch.Generator) -> Tensor:
    """The rows of the sampled group an arm trains on: [P, K] indices into the G_sample columns.

    previews: {step: [P, G_sample]} preview rewards; final: [P, G_sample] true rewards. The arm's
    expanded group is the first ``group_size`` columns; its selections run in order, as the rollout's.
    """
    from pro_grpo_lightning.selection import select_indices

    P = final.shape[0]
    idx = torch.arange(sched.group_size).expand(P, -1)  # [P, G] columns still live
    scored = sched.rule not in ("none", "random")
    for c, k in zip(sched.checkpoints, sched.keep):
        scores = previews[c].gather(1, idx) if scored else None  # [P, G_live]
        kept = select_indices(scores, k, sched.rule, group_size=idx.shape[1], num_groups=P, generator=generator)
        idx = idx.gather(1, kept)  # [P, k]
    if sched.final_keep is not None:
        kept = select_indices(final.gather(1, idx), sched.final_keep, sched.rule)  # [P, K]
        idx = idx.gather(1, kept)
    return idx


def arm_gradient(H: Tensor, idx: Tensor, final: Tensor, m: int, adv_kw: dict[str, Any]) -> Tensor:
    """The GRPO loss gradient of an arm: -(1 / pairs) sum_i A_i h_i over its trajectories.

    H: [P, G_sample, D] per-trajectory log-prob gradients; idx: [P, K]; final: [P, G_sample].
    """
    from pro_grpo_lightning.objectives import group_advantages

    P, K = idx.shape
    adv = group_advantages(final.gather(1, idx), **adv_kw)  # [P, K]
    h = H[torch.arange(P)[:, None], idx]  # [P, K, D]
    return -(adv.to(H.dtype)[..., None] * h).sum((0, 1)) / (P * K * m)  # [D]


def unit_costs(module: Any, prompt: str) -> dict[str, float]:
    """FLOPs of one denoiser call, one training pair, one decode and one reward call, batch 1."""
    from benchmarks.measure import count_flops

    b = module.backend
    cond = b.encode_prompts([prompt])
    x = b.initial_latents(1, torch.Generator().manual_seed(0))
    x1 = b.initial_latents(1, torch.Generator().manual_seed(1))
    step = b.trainable_steps().nonzero().flatten()[:1]  # [1]
    with torch.no_grad():
        fwd = count_flops(lambda: b.step(x, step, cond, noise=x1))

    def train() -> None:
        b.step(x, step, cond, next_latents=x1).log_prob.sum().backward()
    pair = count_flops(train)
    b.denoiser().zero_grad(set_to_none=True)
    img = b.decode(x)
    return {"denoiser_call": fwd, "train_pair": pair, "decode": count_flops(lambda: b.decode(x)),
            "reward": count_flops(lambda: module.rollout.rewards(img, [prompt]))}


def arm_cost(sched: Any, T: int, m: int, units: dict[str, float]) -> dict[str, float]:
    """Cost per prompt in units of F (one denoiser call on one trajectory)."""
    from benchmarks.measure import decoded_images

    F = units["denoiser_call"]
    previews, finals = decoded_images(sched, 1, T)
    image = (units["decode"] + units["reward"]) / F
    parts = {"denoise": sched.nfe_per_prompt(T), "previews": previews * image, "finals": finals * image,
             "update": units["train_pair"] / F * sched.final_size * m}
    parts["total"] = sum(parts.values())
    return parts


def sample(module: Any, prompts: list[str], G: int, preview_steps: list[int], gen: torch.Generator):
    """All P x G trajectories to the end: latents [P*G, T+1, ...], previews {step: [P, G]}, final [P, G]."""
    from pro_grpo_lightning.backends.base import select_rows
    from pro_grpo_lightning.steps import draw_noise

    b, ro = module.backend, module.rollout
    P, T = len(prompts), b.num_steps
    cond = b.encode_prompts(prompts)
    prompt_of = torch.arange(P).repeat_interleave(G)  # [P*G]
    row_cond = select_rows(cond, prompt_of)
    texts = [prompts[i] for i in prompt_of.tolist()]
    x = b.initial_latents(P * G, gen)  # [P*G, *latent]
    hist, previews = [x], {}
    with torch.no_grad():
        for t in range(T):
            out = b.step(x, torch.full((P * G,), t, dtype=torch.long), row_cond,
                         noise=draw_noise(tuple(x.shape), x.device, gen))
            x = out.next_latents  # [P*G, *latent]
            hist.append(x)
            if t in preview_steps:
                previews[t] = ro.rewards(ro.preview_images(out.x0), texts)[0].view(P, G)  # [P, G]
        final = ro.rewards(b.decode(x), texts)[0].view(P, G)  # [P, G]
    return cond, torch.stack(hist, 1), previews, final


def trajectory_gradients(module: Any, cond: Any, latents: Tensor, P: int, G: int, fraction: float,
                         gen: torch.Generator) -> tuple[Tensor, int]:
    """H [P, G, D]: per trajectory, the gradient of the sum of its log-probs over a random subset
    of ``ceil(fraction * n)`` trainable steps (``update.training_pairs``' rule); and m."""
    from pro_grpo_lightning.backends.base import select_rows
    from pro_grpo_lightning.update import training_pairs

    b = module.backend
    params = b.trainable_parameters()
    traj, step = training_pairs(P * G, b.trainable_steps(), fraction, gen)  # [N*m], [N*m]
    m = traj.numel() // (P * G)
    order = traj.argsort(stable=True)  # group each trajectory's pairs together
    traj, step = traj[order], step[order]
    rows = []
    for i in range(P * G):  # one backward per trajectory: per-sample gradients (benchmark only)
        tr, st = traj[i * m:(i + 1) * m], step[i * m:(i + 1) * m]  # [m]
        c = select_rows(cond, torch.full((m,), i // G, dtype=torch.long))
        out = b.step(latents[tr, st], st, c, next_latents=latents[tr, st + 1])
        grads = torch.autograd.grad(out.log_prob.sum(), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows).view(P, G, -1), m  # [P, G, D]


def arm_generator(seed: int, r: int) -> torch.Generator:
    """The random arms' own stream for rollout ``r``: independent of the sampling stream (seed, r)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, r, 1]).generate_state(1)[0]))


def pack_grams(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Gram matrices as stored: float32, only the blocks ``benchmarks.crossfit`` reads (GF between
    rollouts of different halves, GG and FF within a half, these two symmetric: upper triangles).
    Keys GF_01 / GF_10 [A, |half 0|, |half 1|] / [A, |half 1|, |half 0|], GG_0 / GG_1 [A, n(n+1)/2],
    FF_0 / FF_1 [n(n+1)/2]."""
    from benchmarks.crossfit import half_index

    half = half_index(g["FF"].shape[0])
    H = [np.flatnonzero(half == h) for h in (0, 1)]
    out = {}
    for h in (0, 1):
        S, O = H[h], H[1 - h]
        iu = np.triu_indices(len(S))
        out[f"GF_{h}{1 - h}"] = g["GF"][:, S][:, :, O]
        out[f"GG_{h}"] = g["GG"][:, S][:, :, S][:, iu[0], iu[1]]
        out[f"FF_{h}"] = g["FF"][np.ix_(S, S)][iu]
    return {k: v.astype(np.float32) for k, v in out.items()}


def unpack_grams(z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``pack_grams``' inverse: GF, GG [A, R, R] and FF [R, R] (float64), NaN in the blocks not stored
    (which the cross-fitted scoring never reads: a NaN there would show in every result)."""
    from benchmarks.crossfit import half_index

    A, n0, n1 = z["GF_01"].shape
    R = n0 + n1
    half = half_index(R)
    H = [np.flatnonzero(half == h) for h in (0, 1)]
    if [len(H[0]), len(H[1])] != [n0, n1]:
        raise ValueError(f"grams.npz: halves of {n0} and {n1} rollouts do not split {R} rollouts as the scoring does")
    GF, GG, FF = np.full((A, R, R), np.nan), np.full((A, R, R), np.nan), np.full((R, R), np.nan)
    for h in (0, 1):
        S, O = H[h], H[1 - h]
        iu = np.triu_indices(len(S))
        GF[np.ix_(np.arange(A), S, O)] = z[f"GF_{h}{1 - h}"]
        for M, packed in ((GG, z[f"GG_{h}"]), (FF, z[f"FF_{h}"])):
            block = np.zeros(packed.shape[:-1] + (len(S), len(S)))
            block[..., iu[0], iu[1]] = packed
            block[..., iu[1], iu[0]] = packed
            M[..., S[:, None], S[None, :]] = block
    return {"GF": GF, "GG": GG, "FF": FF}


def grams(grads: dict[str, list[Tensor]], full: list[Tensor]) -> dict[str, np.ndarray]:
    """The inner products ``benchmarks.crossfit`` needs: GF [A, R, R], GG [A, R, R], FF [R, R] (float64)."""
    F = torch.stack(full).double()  # [R, D]
    GF, GG = [], []
    for g in grads.values():
        G = torch.stack(g).double()  # [R, D]
        GF.append((G @ F.T).numpy())
        GG.append((G @ G.T).numpy())
    return {"GF": np.stack(GF), "GG": np.stack(GG), "FF": (F @ F.T).numpy()}


def measure(module: Any, prompts: list[str], rollouts: int, schedules: list[NamedSchedule], K: int,
            G_static: int, seed: int = 0, log=print, state: Path | None = None,
            shard: tuple[int, int] = (0, 1), shards: Sequence[Path] = ()) -> dict[str, Any]:
    """Sample ``rollouts`` rollouts and score every arm. With ``state``, the gradients and per-rollout
    values are saved there every 8 rollouts and at the end, and a saved state is continued (same
    settings), so an interrupted run keeps its saved rollouts (``--rollouts`` at or below the saved count samples
    nothing new and summarises the saved ones).

    Rollout ``r`` depends only on (seed, r), so the work splits exactly: ``shard=(i, n)`` samples the
    rollouts ``r`` with ``r % n == i`` into its own ``state`` (and scores nothing); ``shards`` (their
    state files) are joined in rollout order and scored as one run of their rollouts."""
    arms = arm_schedules(K, G_static, schedules)
    T = module.backend.num_steps
    for a in arms:
        a.schedule.validate_steps(T)
    G = max(a.schedule.group_size for a in arms)
    preview_steps = sorted({c for a in arms for c in a.schedule.checkpoints})
    adv_kw = dict(std_mode=module.advantages.std, eps=module.advantages.eps, clip=module.advantages.clip)
    frac = module.settings.timestep_fraction
    P = len(prompts)
    per_rollout: list[dict[str, Any]] = []
    grads: dict[str, list[Tensor]] = {a.name: [] for a in arms}
    full: list[Tensor] = []
    key = {"prompts": prompts, "arms": [a.spec for a in arms], "seed": seed,
           "rewards": module.rollout.rewards.names}
    if shards:
        per_rollout, grads, full = join_shards(shards, key)
        rollouts = len(full)
        log(f"joined {rollouts} rollouts from {len(shards)} shards")
    elif state is not None and state.exists():
        saved = torch.load(state, weights_only=True)
        if saved["key"] != key:
            raise ValueError(f"{state} holds another setting: {saved['key']} != {key}")
        per_rollout, grads, full = saved["per_rollout"], saved["grads"], saved["full"]
        log(f"continuing from {len(full)} saved rollouts in {state}")
    i_shard, n_shard = shard
    todo = [r for r in range(rollouts) if r % n_shard == i_shard][len(full):]
    t0 = time.perf_counter()
    for r in todo:
        gen = torch.Generator().manual_seed(seed * 100_003 + r)
        cond, latents, previews, final = sample(module, prompts, G, preview_steps, gen)
        H, m = trajectory_gradients(module, cond, latents, P, G, frac, gen)
        full.append(arm_gradient(H, torch.arange(G).expand(P, -1), final, m, adv_kw))
        row: dict[str, Any] = {"rollout": r, "final_mean": float(final.mean()),
                               "final_std": float(final.std(1, unbiased=False).mean()), "arms": {}}
        arm_gen = arm_generator(seed, r)  # the random arms' subsets: not the sampling stream
        for a in arms:
            idx = select_arm(a.schedule, previews, final, arm_gen)
            grads[a.name].append(arm_gradient(H, idx, final, m, adv_kw))
            row["arms"][a.name] = {"spread": float(final.gather(1, idx).std(1, unbiased=False).mean()),
                                   "reward": float(final.gather(1, idx).mean())}
        per_rollout.append(row)
        if state is not None and (n_shard > 1 or r == todo[-1] or len(full) % 8 == 0):  # the file grows: every 8
            torch.save({"key": key, "per_rollout": per_rollout, "grads": grads, "full": full}, state)
        log(f"rollout {r + 1}/{rollouts}: {time.perf_counter() - t0:.0f} s")
    if n_shard > 1:
        return {"shard": list(shard), "rollouts": [row["rollout"] for row in per_rollout]}
    rollouts = len(full)
    units = unit_costs(module, prompts[0])
    m_steps = math.ceil(frac * int(module.backend.trainable_steps().sum()))
    return {"config_prompts": prompts, "rollouts": rollouts, "K": K, "G_sample": G, "G_static": G_static,
            "T": T, "pairs_per_trajectory": m_steps, "preview_steps": preview_steps, "units_flops": units,
            "rewards": key["rewards"],
            "arms": {a.name: {"spec": a.spec, "cost_F_per_prompt": arm_cost(a.schedule, T, m_steps, units)}
                     for a in arms},
            "per_rollout": per_rollout, "grams": grams(grads, full), "seconds": time.perf_counter() - t0}


def join_shards(paths: Sequence[Path], key: dict[str, Any]) -> tuple[list, dict[str, list[Tensor]], list[Tensor]]:
    """The saved states of ``paths`` (shards of one run) as one run's, in rollout order; every
    rollout index from 0 to the largest present exactly once."""
    rows: list[tuple[dict[str, Any], dict[str, Tensor], Tensor]] = []
    for path in paths:
        saved = torch.load(path, weights_only=True)
        if saved["key"] != key:
            raise ValueError(f"{path} holds another setting: {saved['key']} != {key}")
        for i, row in enumerate(saved["per_rollout"]):
            rows.append((row, {a: g[i] for a, g in saved["grads"].items()}, saved["full"][i]))
    rows.sort(key=lambda x: x[0]["rollout"])
    got = [row["rollout"] for row, _, _ in rows]
    if len(set(got)) != len(got) or not got or got[0] != 0:
        missing = sorted(set(range(max(got, default=0) + 1)) - set(got))
        raise ValueError(f"shards do not start at rollout 0 or repeat one: missing {missing[:10]}, duplicates "
                         f"{len(got) - len(set(got))}")
    prefix = next((i for i, r in enumerate(got) if r != i), len(got))
    rows = rows[:prefix]  # rollouts 0..prefix-1: what one process would have sampled (an interrupted shard leaves a gap)
    arms = rows[0][1].keys()
    return [r for r, _, _ in rows], {a: [g[a] for _, g, _ in rows] for a in arms}, [f for _, _, f in rows]


#: The comparisons each sentence of the evidence claims together: one Holm family each.
def families(arms: Sequence[str], schedules: Sequence[str]) -> dict[str, list[tuple[str, str, str]]]:
    """{family: [(name, arm, baseline)]}: the positive control alone, Pro-GRPO against both plain
    baselines, Pro-GRPO against its own top-k / random ablations, and the remaining arms."""
    pro = [f"pro-{s}" for s in schedules]
    others = [a for a in arms if a not in pro and not a.startswith("plain")]
    vs = lambda names: [(f"{a} - {b}", a, b) for a in names for b in ("plain-K", "plain-2K")]  # noqa: E731
    return {"positive_control": [("plain-2K - plain-K", "plain-2K", "plain-K")],
            "pro_vs_plain": vs(pro),
            "pro_vs_ablations": [(f"pro-{s} - {k}-{s}", f"pro-{s}", f"{k}-{s}") for s in schedules
                                 for k in ("topk", "random")],
            "other_arms_vs_plain": vs(others)}


def summarize(res: dict[str, Any], budget_arm: str = "plain-2K", looks: int | None = None) -> dict[str, Any]:
    """Per arm its quality per rollout and at equal compute (``benchmarks.crossfit``: cross-fitted,
    delete-one-rollout jackknife); per comparison family the differences with intervals, Holm
    correction, and power against the positive control's effect, at family-wise alpha 0.05 /
    ``looks`` (default: the result's ``looks``, 1 if absent) with the nominal figures beside them.
    Equal compute: every arm's gradients aggregated over the FLOPs of one ``budget_arm`` rollout
    (n = cost(budget_arm) / cost)."""
    from benchmarks.crossfit import LEVEL, compare_family, jack_se, quality_jackknife

    g = res["grams"]
    GF, GG, FF = (np.asarray(g[k], dtype=np.float64) for k in ("GF", "GG", "FF"))
    names = list(res["arms"])
    R = FF.shape[0]
    cost = np.array([res["arms"][a]["cost_F_per_prompt"]["total"] for a in names])
    n_flop = cost[names.index(budget_arm)] / cost  # [A] rollouts' worth at equal FLOPs
    full, reps = quality_jackknife(GF, GG, FF, [1.0, n_flop])  # [2A], [R, 2A]
    A = len(names)
    se = jack_se(reps)
    rows = res["per_rollout"]
    arms = {a: {"spec": res["arms"][a]["spec"], "cost": float(cost[i]), "n_at_equal_flops": float(n_flop[i]),
                "per_rollout": {"est": float(full[i]), "se": float(se[i])},
                "per_flop": {"est": float(full[A + i]), "se": float(se[A + i])},
                "spread": float(np.mean([r["arms"][a]["spread"] for r in rows]))}
            for i, a in enumerate(names)}
    schedules = [a[4:] for a in names if a.startswith("pro-")]
    effect = float(full[names.index("plain-2K")] - full[names.index("plain-K")])
    looks = int(res.get("looks", 1) if looks is None else looks)
    out: dict[str, Any] = {"arms": arms, "budget_arm": budget_arm, "positive_control_effect": effect,
                           "rollouts": R, "families": {}}
    if looks > 1:
        out |= {"looks": looks, "alpha": (1 - LEVEL) / looks}
    for measure_name, off in (("per_rollout", 0), ("per_flop", A)):
        for fam, comps in families(names, schedules).items():
            i = [off + names.index(a) for _, a, _ in comps]
            j = [off + names.index(b) for _, _, b in comps]
            out["families"][f"{fam}/{measure_name}"] = compare_family(
                [c[0] for c in comps], full[i] - full[j], reps[:, i] - reps[:, j], effect, looks)
    return out


def table(summary: dict[str, Any], only: str | None = None) -> str:
    """Markdown: the arms, then each family's comparisons (``only``: "arms" or one family's name)."""
    from benchmarks.report import markdown_table

    arms = markdown_table(["arm", "schedule", "cost (F/prompt)", "trained spread", "cos per rollout (± jackknife SE)",
                           f"rollouts at the FLOPs of one {summary['budget_arm']}", "cos at equal FLOPs"],
                          [[a, s["spec"], f"{s['cost']:.0f}", f"{s['spread']:.3f}",
                            f"{s['per_rollout']['est']:+.4f} ± {s['per_rollout']['se']:.4f}",
                            f"{s['n_at_equal_flops']:.2f}", f"{s['per_flop']['est']:+.4f} ± {s['per_flop']['se']:.4f}"]
                           for a, s in summary["arms"].items()])
    if only == "arms":
        return arms
    parts = [arms] if only is None else []
    looks = summary.get("looks", 1)
    ci = lambda c, lo="lo", hi="hi": f"[{c[lo]:+.4f}, {c[hi]:+.4f}]"  # noqa: E731
    yes = lambda r: "yes" if r else "no"  # noqa: E731
    for fam, comps in summary["families"].items():
        if only is not None and fam != only:
            continue
        head = f"**{fam}** (Holm over {len(comps)}; power against the positive control's effect " \
               f"{summary['positive_control_effect']:+.4f}"
        if looks == 1:
            parts.append(head + ")\n\n" + markdown_table(
                ["difference", "estimate", "95 % interval", "Holm-level interval", "p", "p (Holm)", "resolved",
                 "power", "80 %-power difference"],
                [[nm, f"{c['est']:+.4f}", ci(c), ci(c, "lo_family", "hi_family"), f"{c['p']:.3g}",
                  f"{c['p_holm']:.3g}", yes(c["resolved"]), f"{c.get('power', float('nan')):.2f}", f"{c['mde80']:.4f}"]
                 for nm, c in comps.items()]))
            continue
        a = summary["alpha"]
        parts.append(head + f"; look {looks}: family-wise alpha 0.05 / {looks} = {a:g}, the nominal 0.05 beside it)\n\n"
                     + markdown_table(
            ["difference", "estimate", "95 % interval", f"{100 * (1 - a):g} % interval",
             f"Holm-level interval ({a:g})", "p", "p (Holm)", "resolved at 0.05", f"resolved at {a:g}",
             f"power at {a:g} (0.05)", f"80 %-power difference at {a:g} (0.05)"],
            [[nm, f"{c['est']:+.4f}", ci(c["nominal"]), ci(c), ci(c, "lo_family", "hi_family"), f"{c['p']:.3g}",
              f"{c['p_holm']:.3g}", yes(c["nominal"]["resolved"]), yes(c["resolved"]),
              f"{c.get('power', float('nan')):.2f} ({c['nominal'].get('power', float('nan')):.2f})",
              f"{c['mde80']:.4f} ({c['nominal']['mde80']:.4f})"]
             for nm, c in comps.items()]))
    return "\n\n".join(parts)


def save(res: dict[str, Any], out: Path) -> None:
    """gradient_quality.json (everything but the Gram matrices), grams.npz (them: ``pack_grams``),
    gradient_quality.md."""
    g = res.pop("grams")
    np.savez_compressed(out / "grams.npz", **pack_grams(g))
    (out / "gradient_quality.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "gradient_quality.md").write_text(table(res["summary"]) + "\n")
    res["grams"] = g


def load(out: Path) -> dict[str, Any]:
    """A saved result with its Gram matrices (``np.load`` without pickles): packed (``pack_grams``),
    or full float64 GF, GG, FF (the first look's ``main/grams.npz``)."""
    res = json.loads((out / "gradient_quality.json").read_text())
    with np.load(out / "grams.npz", allow_pickle=False) as z:
        g = {k: z[k] for k in z.files}
    res["grams"] = unpack_grams(g) if "GF_01" in g else g
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.gradient_snr import build_module

    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="training prompts per rollout (the same every rollout)")
    p.add_argument("--schedule", nargs="+", default=DEFAULT_SCHEDULES, help="NAME=pro:G>k1@c1>... (K = the last k)")
    p.add_argument("--static-group", type=int, default=16, help="G of the static and extremes arms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", choices=["config", "brightness"], default="config",
                   help="the config's reward, or mean image brightness (a reward whose gradient resolves)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gradient_quality"))
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="sample only the rollouts r with r %% N == I into OUT/state.shardI.pt (parallel processes)")
    p.add_argument("--join", action="store_true", help="score the shards' states in OUT as one run")
    p.add_argument("--looks", type=int, default=1, help="which look at these comparisons this is: "
                   "intervals and Holm at family-wise alpha 0.05 / LOOKS (Bonferroni over looks)")
    args = p.parse_args(argv)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        p.error(f"--shard: expected I/N with 0 <= I < N, got {args.shard!r}")
    if args.looks < 1:
        p.error(f"--looks must be >= 1, got {args.looks}")
    if args.rollouts < 6:
        p.error(f"--rollouts must be >= 6 (two halves of at least 3), got {args.rollouts}")
    schedules = [parse_schedule(s) for s in args.schedule]
    Ks = {s.schedule.final_size for s in schedules}
    if len(Ks) != 1 or any(s.kind != "pro" for s in schedules):
        p.error(f"--schedule: give pro schedules with one final K, got {args.schedule}")
    torch.set_num_threads(args.threads)
    module, data = build_module(args.config, args.prompts, args.reward, args.set)
    data.setup("fit")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sharded = shard[1] > 1
    shards = sorted(out.glob("state.shard*.pt")) if args.join else []
    if args.join and not shards:
        p.error(f"--join: no state.shard*.pt in {out}")
    res = measure(module, list(data.prompts[:args.prompts]), args.rollouts, schedules, Ks.pop(),
                  args.static_group, args.seed, state=out / (f"state.shard{shard[0]}.pt" if sharded else "state.pt"),
                  shard=shard, shards=shards)
    if sharded:
        print(f"shard {args.shard}: rollouts {res['rollouts']} saved; score them with --join")
        return res
    res.update(command=["python", "-m", "benchmarks.gradient_quality", *(argv if argv is not None else sys.argv[1:])],
               config=args.config, sets=args.set, seed=args.seed, looks=args.looks)
    res["grams"] = unpack_grams(pack_grams(res["grams"]))  # scored as stored: load + summarize gives the same
    res["summary"] = summarize(res)
    save(res, out)
    print(table(res["summary"]))
    return res


if __name__ == "__main__":
    main()
