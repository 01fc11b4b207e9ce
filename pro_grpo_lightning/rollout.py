"""Expand and prune: one rollout of P prompts x G_max trajectories as one batch.

The rollout is a plain object (no Trainer needed). All groups of a batch live in one tensor,
group-major: rows ``p * G_live .. (p + 1) * G_live - 1`` are prompt p's live trajectories. At a
checkpoint every live trajectory's x0 preview (free: the step just computed it) is decoded and
scored; the selection rule keeps ``K_next`` per group, and *every* tensor of the live batch is
index-selected together, so the following denoiser calls run on the smaller batch. Pruned
trajectories cost nothing afterwards.

History is stored per step at the batch size of that step; the survivors' full trajectories
(latents of all T + 1 noise levels, log-probs of all T steps) are gathered once at the end
through the composed keep-indices (the lineage), which copies nothing while sampling.

Audit mode (``audit=True``) runs the same selections but keeps the whole expanded group alive to
the end, so the proxy choice can be compared with the choice the true reward would have made,
and previews every trajectory at each checkpoint, so the preview-to-final correlation is measured
over the whole expanded group. It costs a plain G_max rollout plus those previews; the module
runs it every N rollouts to log proxy quality.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .backends.base import Conditioning, DiffusionBackend, select_rows
from .rewards.combine import RewardSet
from .schedules import GroupSchedule
from .selection import flat_indices, select_indices
from .steps import draw_noise


@dataclass
class RolloutSettings:
    """How a rollout samples; YAML ``model.rollout``.

    Args:
        preview_scale: resize factor of the x0 latents before the pruning previews' decode (1 = full
            size). It resizes whatever decodes the previews: the VAE, or the backend's
            ``preview_decoder`` (an ``AutoencoderTiny``) when one is set. Both decoders are
            convolutional, so 0.5 decodes a half-resolution preview at about a quarter of the
            decoder's cost; reward models resize to 224 px anyway. It trades proxy quality for speed:
            watch ``pruning/proxy_true_corr_*`` when lowering it (``docs/benchmarks.md``, "Preview
            decoders", measures both knobs on the quickstart's model).
        shared_initial_noise: every trajectory of a prompt's group starts from the *same* initial
            latent, so the group differs only by the SDE step noise, which is what the policy gradient
            credits (DanceGRPO, Xue et al. 2025, arXiv:2505.07818, shares the initialisation noise
            within a group). With independent starts (Flow-GRPO's default) part of the within-group
            reward spread comes from x_T, which no action caused, and that part is noise in the gradient.
        audit_every_n_rollouts: every N rollouts keep the whole expanded group alive to measure how
            often the proxy picks what the true reward would (0: never; costs a full G_max rollout).
        sample_batch_size: rows per denoiser, VAE-decode and reward call (None: all live rows at once).
            Counted *before* classifier-free guidance: a CFG backend runs 2 x sample_batch_size rows
            through the network in one call. The whole batch's noise is drawn first and the chunks are
            concatenated, so noise, selections, rewards and log-probs do not depend on it (to float
            tolerance). A denoiser is latency-bound below some batch size, so smaller chunks cost time
            without saving any below that size: lower it only when the rollout does not fit in memory.
    """

    preview_scale: float = 1.0
    shared_initial_noise: bool = False
    audit_every_n_rollouts: int = 0
    sample_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.preview_scale <= 1.0:
            raise ValueError(f"rollout.preview_scale must be in (0, 1], got {self.preview_scale}")
        if self.audit_every_n_rollouts < 0:
            raise ValueError(f"rollout.audit_every_n_rollouts must be >= 0, got {self.audit_every_n_rollouts}")
        if self.sample_batch_size is not None and self.sample_batch_size < 1:
            raise ValueError(f"rollout.sample_batch_size must be >= 1 or None, got {self.sample_batch_size}")


def chunked(fn, n: int, size: int | None, *args):  # noqa: ANN001, ANN202
    """``fn`` over rows ``[i, i + size)`` of every tensor / dict-of-tensors / list argument, outputs
    concatenated along dim 0 (tensors, dicts of tensors, tuples of those, or objects whose tensor
    fields are). ``size`` None or >= n: one call on everything."""
    if size is None or size >= n:
        return fn(*args)

    def rows(a, i: int):  # noqa: ANN001, ANN202
        if isinstance(a, Tensor):
            return a[i:i + size]
        if isinstance(a, dict):
            return {k: rows(v, i) for k, v in a.items()}
        if isinstance(a, list):
            return a[i:i + size]
        return a

    outs = [fn(*(rows(a, i) for a in args)) for i in range(0, n, size)]
    return _cat(outs)


def _cat(outs: list):  # noqa: ANN202
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(outs)
    if isinstance(first, dict):
        return {k: _cat([o[k] for o in outs]) for k in first}
    if isinstance(first, tuple):
        return tuple(_cat([o[i] for o in outs]) for i in range(len(first)))
    if first is None:
        return None
    if hasattr(first, "__dataclass_fields__"):  # e.g. StepOutput
        return type(first)(**{k: _cat([getattr(o, k) for o in outs]) for k in first.__dataclass_fields__})
    raise TypeError(f"chunked: cannot concatenate {type(first).__name__}")


@dataclass
class PruningPoint:
    """What happened at one pruning point (a step the schedule's ``checkpoints`` names, or the final
    static selection); not a training checkpoint (``checkpointing.py``).

    step:   the 0-based step whose x0 preview was scored (T for the final selection on true rewards)
    scores: [P, G_before] the (proxy) scores of every trajectory live there (None for rule "none")
    kept:   [P, G_after] local indices (into the live group) that survived
    survivors: [N] for each final survivor, its local index in the group at this checkpoint
    """

    step: int
    scores: Tensor | None
    kept: Tensor
    survivors: Tensor


@dataclass
class RolloutResult:
    """The K survivors of each of P prompts (N = P * K trajectories, group-major), ready to train on.

    prompts:       P prompt strings
    cond:          the prompts' conditioning, one row per prompt (reused by every inner epoch)
    prompt_index:  [N] long, the prompt of each trajectory
    step_index:    [T] long, 0..T-1
    latents:       [N, T + 1, *latent_shape]  x at every noise level, the noisiest first
    log_probs:     [N, T]                     log-prob of each sampled step (sampling policy)
    means:         [N, T, *latent_shape]      each sampled step's Gaussian mean mu_old, recorded
                                              only when the update needs it (GRPO-Guard's
                                              RatioNorm, ``ExpandPruneRollout(record_means=True)``);
                                              else None
    rewards:       [P, K]                     true total reward of the final images
    components:    {name: [P, K]}             each reward's raw score
    images:        [N, 3, H, W]               final images in [0, 1]
    checkpoints:   the selections made, in order
    nfe:           denoiser calls spent (per sample; CFG's doubled batch counts once)
    nfe_full:      what the expanded group would cost unpruned, P * G_max * T
    num_previews:  x0 previews decoded and scored
    timings:       seconds spent in "denoise", "preview" (decode + reward) and "final"
    audit:         {"overlap": fraction of survivors the true reward would also have kept,
                    "proxy_corr_full_<i>": checkpoint i's preview-to-final correlation over the
                    whole expanded group, ...}
    metadata:      P metadata dicts, one per prompt (None when the prompt set has none); a
                   trajectory's is ``metadata[prompt_index[n]]``
    probe_scores:  audit with ``probe_steps`` only: {step: [P, G_max]} every trajectory's preview
                   score after that step (``adaptive.py`` measures candidate pruning points with it)
    expanded_rewards: audit only: [P, G_max] the true reward of every trajectory of the expanded group
    """

    prompts: list[str]
    cond: Conditioning
    prompt_index: Tensor
    latents: Tensor
    log_probs: Tensor
    rewards: Tensor
    components: dict[str, Tensor]
    images: Tensor
    checkpoints: list[PruningPoint]
    nfe: int
    nfe_full: int
    num_previews: int
    timings: dict[str, float] = field(default_factory=dict)
    audit: dict[str, Tensor] = field(default_factory=dict)
    metadata: list[dict] | None = None
    means: Tensor | None = None
    probe_scores: dict[int, Tensor] = field(default_factory=dict)
    expanded_rewards: Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExpandPruneRollout:
    """Samples one rollout batch under a group schedule.

    Args:
        backend: the model family (policy sampling, previews, decoding).
        rewards: scores previews (proxy) and final images (true reward).
        schedule: G_max, checkpoints, sizes and selection rule; checked against T here.
        settings: preview scale, shared starts, rows per call (``RolloutSettings``). The audit
            period is the caller's: ``run(audit=True)``.
        record_means: also keep every step's Gaussian mean (``RolloutResult.means``, as large as
            the latents), gathered through the prunes like the log-probs: what GRPO-Guard's
            RatioNorm compares the re-scored mean against (``update.UpdateSettings.ratio_norm``).
    """

    def __init__(self, backend: DiffusionBackend, rewards: RewardSet, schedule: GroupSchedule,
                 settings: RolloutSettings | None = None, *, record_means: bool = False) -> None:
        schedule.validate_steps(backend.num_steps)  # settings only: no weights needed
        self.backend = backend
        self.rewards = rewards
        self.schedule = schedule
        self.settings = settings or RolloutSettings()
        self.record_means = record_means

    @property
    def preview_scale(self) -> float:
        return self.settings.preview_scale

    @property
    def shared_initial_noise(self) -> bool:
        return self.settings.shared_initial_noise

    @property
    def sample_batch_size(self) -> int | None:
        return self.settings.sample_batch_size

    def preview_images(self, x0: Tensor) -> Tensor:
        """Decode x0 previews [B, *latent] -> images [B, 3, H', W'] (smaller when preview_scale < 1),
        ``sample_batch_size`` rows per decode, with the backend's preview decoder
        (``decode_preview``: the VAE unless a cheaper ``preview_decoder`` is configured)."""
        if self.preview_scale < 1.0 and x0.ndim == 4:
            x0 = torch.nn.functional.interpolate(x0, scale_factor=self.preview_scale, mode="bilinear",
                                                 antialias=True)  # [B, C, h', w']
        return chunked(self.backend.decode_preview, x0.shape[0], self.sample_batch_size, x0)

    def decode_and_score(self, latents: Tensor, texts: Sequence[str], metadata: Sequence[dict] | None = None, *,
                         preview: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Images of ``latents`` [R, *latent] and their rewards, as a rollout scores them:
        ``preview``: x0 previews (``preview_images``; the reward statistics are not updated), else the
        final images (``backend.decode``, statistics updated); ``sample_batch_size`` rows per decode
        and per reward call. Returns images [R, 3, H, W], total [R], {name: raw score [R]}."""
        if preview:
            images = self.preview_images(latents)  # [R, 3, H', W']
        else:
            images = chunked(self.backend.decode, latents.shape[0], self.sample_batch_size, latents)  # [R, 3, H, W]
        total, comps = self.rewards(images, texts, metadata, update_stats=not preview, chunk=self.sample_batch_size)
        return images, total, comps

    @torch.no_grad()
    def run(self, prompts: Sequence[str], generator: torch.Generator | None = None, *,
            audit: bool = False, metadata: Sequence[dict] | None = None,
            noise_generator: torch.Generator | None = None, rank: int = 0,
            world_size: int = 1,
            progress: Callable[[int, int, int, int], None] | None = None,
            probe_steps: Sequence[int] = ()) -> RolloutResult:
        """Roll out ``prompts`` (this rank's P prompts of a global batch of ``world_size`` x P).

        Args:
            generator: the "random" selection rule's draws; also the noise's when
                ``noise_generator`` is None.
            audit: keep the whole expanded group alive (see the module docstring).
            metadata: None or one dict per prompt; every reward call gets each row's prompt's dict.
            noise_generator: draws the sampling noise (initial latents and every step's noise).
                Under DDP it is seeded alike on every rank: each draw covers the global batch,
                [world_size * rows, *latent], and this rank keeps rows ``rank * rows ..
                (rank + 1) * rows - 1``, so W ranks sample exactly what one process with all
                W x P prompts samples (``noise.py``).
            rank, world_size: this process's place in the global batch.
            progress: called after every step (and its pruning) with (steps done, T, live
                trajectories, previews scored so far): a progress display (``logs.py``).
            probe_steps: audit only: also preview and score every trajectory after these steps,
                whether or not the schedule prunes there (``RolloutResult.probe_scores``; counted in
                ``num_previews`` and the preview time). The selections are the schedule's.
        """
        if probe_steps and not audit:
            raise ValueError("probe_steps needs audit=True: only an audit rollout keeps every trajectory alive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        backend, sched = self.backend, self.schedule
        device = backend.device
        prompts = list(prompts)
        P, G, T = len(prompts), sched.group_size, backend.num_steps
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != P:
                raise ValueError(f"{P} prompts but {len(metadata)} metadata entries")

        def rows_of(rows: Tensor) -> tuple[list[str], list[dict] | None]:
            """Each row's prompt and metadata, by its prompt index (one host copy per reward call)."""
            idx = rows.tolist()
            return [prompts[i] for i in idx], None if metadata is None else [metadata[i] for i in idx]

        timings = {"denoise": 0.0, "preview": 0.0, "final": 0.0}
        noise_gen = generator if noise_generator is None else noise_generator

        def mine(full: Tensor, rows: int) -> Tensor:  # this rank's rows of a global draw
            return full[rank * rows:(rank + 1) * rows]  # [rows, ...]

        cond = backend.encode_prompts(prompts)  # {k: [P, ...]}
        # Rows of the physical batch, group-major. ``live`` indexes the physical rows that are still
        # selected; without audit the physical batch is pruned so ``live`` is always arange.
        prompt_of = torch.arange(P, device=device).repeat_interleave(G)  # [P*G]
        row_cond = select_rows(cond, prompt_of)  # {k: [P*G, ...]}
        starts = P if self.shared_initial_noise else P * G  # shared: one start per prompt
        x = mine(backend.initial_latents(starts * world_size, noise_gen), starts)  # [starts, *latent]
        if self.shared_initial_noise:
            x = x.repeat_interleave(G, dim=0)  # [P*G, *latent]
        live = torch.arange(P * G, device=device)  # [P*G_live]
        group_live = G

        lat_hist: list[Tensor] = [x]  # T + 1 entries, each at its step's physical batch size
        lp_hist: list[Tensor] = []  # T entries
        mean_hist: list[Tensor] = []  # T entries when record_means, each [B, *latent]
        stage_of_step: list[int] = []  # physical-batch stage of each step's output
        remaps: list[Tensor] = []  # per physical prune: [rows after] -> rows before
        checkpoints: list[PruningPoint] = []
        keep_at = dict(zip(sched.checkpoints, sched.keep))
        audit_previews: list[Tensor] = []  # audit: each checkpoint's preview scores of all rows [P, G]
        probe_at, probe_scores = set(int(s) for s in probe_steps), {}
        nfe = previews = 0

        def score_previews(x0: Tensor, rows: Tensor) -> Tensor:
            """Preview rewards of physical ``rows`` [R] of the step's x0 [B, *latent] -> [R]."""
            nonlocal previews
            texts, meta = rows_of(prompt_of.index_select(0, rows))
            images, total, _ = self.decode_and_score(x0.index_select(0, rows), texts, meta, preview=True)
            previews += images.shape[0]
            return total  # [R]

        for t in range(T):
            t0 = time.perf_counter()
            B = x.shape[0]
            step_index = torch.full((B,), t, device=device, dtype=torch.long)  # [B]
            noise = mine(draw_noise((B * world_size, *x.shape[1:]), x.device, noise_gen), B)  # [B, *latent]
            # chunks of the live rows; the noise was drawn for the whole batch above
            out = chunked(lambda *a: backend.step(*a[:3], noise=a[3]), B, self.sample_batch_size,
                          x, step_index, row_cond, noise)  # StepOutput of [B, ...]
            nfe += x.shape[0]
            x = out.next_latents  # [B, *latent]
            lat_hist.append(x)
            lp_hist.append(out.log_prob)  # [B]
            if self.record_means:
                mean_hist.append(out.mean)  # [B, *latent]
            stage_of_step.append(len(remaps))
            _sync(device)
            timings["denoise"] += time.perf_counter() - t0

            probed = None  # audit: every row's preview score after a probed step, [P*G]
            if t in probe_at:
                t0 = time.perf_counter()
                probed = score_previews(out.x0, torch.arange(P * G, device=device))  # [P*G]
                probe_scores[t] = probed.view(P, G)
                timings["preview"] += time.perf_counter() - t0
            if t not in keep_at:
                if progress is not None:
                    progress(t + 1, T, P * group_live, previews)
                continue
            t0 = time.perf_counter()
            k_next = keep_at[t]
            scores = None
            if sched.rule not in ("none", "random"):  # these rules ignore scores: skip the preview
                # audit: preview every row of the expanded group, to correlate over all of it
                rows = torch.arange(P * G, device=device) if audit else live  # [R]
                total = probed if probed is not None else score_previews(out.x0, rows)  # [R]
                if audit:
                    audit_previews.append(total.view(P, G))  # [P, G]
                    total = total.index_select(0, live)  # [P*G_live]
                scores = total.view(P, group_live)  # [P, G_live]
            kept = select_indices(scores, k_next, sched.rule, group_size=group_live, num_groups=P,
                                  generator=generator, device=device)  # [P, k_next]
            checkpoints.append(PruningPoint(t, scores, kept, kept))  # survivors filled in at the end
            keep_rows = flat_indices(kept, group_live)  # [P*k_next], positions within ``live``
            group_live = k_next
            if audit:
                live = live.index_select(0, keep_rows)
            else:  # prune the physical batch: later steps run on P * k_next rows
                x = x.index_select(0, keep_rows)
                prompt_of = prompt_of.index_select(0, keep_rows)
                row_cond = select_rows(row_cond, keep_rows)
                remaps.append(keep_rows)
                live = torch.arange(x.shape[0], device=device)
            _sync(device)
            timings["preview"] += time.perf_counter() - t0
            if progress is not None:
                progress(t + 1, T, P * group_live, previews)

        # True rewards of the final images (of every physical row in audit mode).
        t0 = time.perf_counter()
        scored_rows = torch.arange(x.shape[0], device=device) if audit else live
        texts, meta = rows_of(prompt_of.index_select(0, scored_rows))
        images, total, comps = self.decode_and_score(x.index_select(0, scored_rows), texts, meta,
                                                     preview=False)  # [R, 3, H, W], [R]
        audit_stats: dict[str, Tensor] = {}
        expanded = total.view(P, G) if audit else None  # [P, G] every trajectory's true reward
        if audit:
            # rows are all P*G trajectories; ``live`` the proxy-selected survivors
            # what the same rule would keep knowing the true rewards (random/none have no preference: OVF)
            true_rule = sched.rule if sched.rule in ("ovf", "topk", "extremes") else "ovf"
            true_kept = select_indices(total.view(P, G), group_live, true_rule,
                                       group_size=G, num_groups=P, generator=generator, device=device)
            chosen = torch.zeros(P * G, dtype=torch.bool, device=device)
            chosen[flat_indices(true_kept, G)] = True
            audit_stats["overlap"] = chosen.index_select(0, live).float().mean()
            audit_stats["expanded_reward_std"] = total.view(P, G).std(1, unbiased=False).mean()
            audit_stats["expanded_reward_mean"] = total.mean()
            for i, proxy in enumerate(audit_previews):  # over the whole expanded group, not the survivors
                audit_stats[f"proxy_corr_full_{i}"] = group_centred_corr(proxy, total.view(P, G))
            total = total.index_select(0, live)
            comps = {k: v.index_select(0, live) for k, v in comps.items()}
            images = images.index_select(0, live)
        rewards = total.view(P, group_live)  # [P, K]

        if sched.final_keep is not None:  # static selection on the true reward (no early stop)
            kept = select_indices(rewards, sched.final_keep, sched.rule, group_size=group_live,
                                  num_groups=P, generator=generator, device=device)  # [P, K]
            checkpoints.append(PruningPoint(T, rewards, kept, kept))
            keep_rows = flat_indices(kept, group_live)  # [P*K]
            live = live.index_select(0, keep_rows)
            rewards = rewards.flatten().index_select(0, keep_rows).view(P, -1)
            comps = {k: v.index_select(0, keep_rows) for k, v in comps.items()}
            images = images.index_select(0, keep_rows)
            group_live = sched.final_keep
        _sync(device)
        timings["final"] += time.perf_counter() - t0

        # Lineage: each survivor's physical row at every stage, walking the prunes backwards.
        rows_at_stage = [live]
        for remap in reversed(remaps):
            rows_at_stage.insert(0, remap.index_select(0, rows_at_stage[0]))
        stage_of_latent = [0] + stage_of_step  # x_0 (noise) is at stage 0; x_{t+1} at step t's stage
        latents = torch.stack([h.index_select(0, rows_at_stage[s]) for h, s in zip(lat_hist, stage_of_latent)], 1)
        log_probs = torch.stack([h.index_select(0, rows_at_stage[s]) for h, s in zip(lp_hist, stage_of_step)], 1)
        means = torch.stack([h.index_select(0, rows_at_stage[s]) for h, s in zip(mean_hist, stage_of_step)], 1) \
            if self.record_means else None  # [N, T, *latent]
        checkpoints = [replace(ck, survivors=pos)
                       for ck, pos in zip(checkpoints, self._survivor_positions(checkpoints, P, group_live))]

        return RolloutResult(
            prompts=prompts, cond=cond,
            prompt_index=torch.arange(P, device=device).repeat_interleave(group_live),
            latents=latents,  # [N, T+1, *latent]
            log_probs=log_probs,  # [N, T]
            rewards=rewards,  # [P, K]
            components={k: v.view(P, group_live) for k, v in comps.items()},
            images=images, checkpoints=checkpoints, nfe=nfe, nfe_full=P * G * T,
            num_previews=previews, timings=timings, audit=audit_stats, metadata=metadata, means=means,
            probe_scores=probe_scores, expanded_rewards=expanded)

    @staticmethod
    def _survivor_positions(checkpoints: list[PruningPoint], P: int, K: int) -> list[Tensor]:
        """For each checkpoint, the final survivors' local index in the group live there ([P*K]).

        Walk backwards: a survivor's position after checkpoint i indexes checkpoint i's ``kept``.
        """
        pos = torch.arange(K).repeat(P)  # [P*K] position in the final group
        out = []
        for ck in reversed(checkpoints):
            kept = ck.kept  # [P, k_i]
            pos = pos.to(kept.device)
            prompt = torch.arange(P, device=kept.device).repeat_interleave(K)  # [P*K]
            pos = kept[prompt, pos]  # [P*K] local index before this selection
            out.append(pos)
        return out[::-1]


def group_centred_corr(proxy: Tensor, true: Tensor) -> Tensor:
    """Pearson correlation of proxy [P, n] and true [P, n] scores after centring each group.

    Selection only compares within a group, so this says how well the proxy ranks the trajectories
    of one prompt (0 when either is constant within every group). Scalar.
    """
    proxy = proxy - proxy.mean(1, keepdim=True)  # [P, n]
    true = true - true.mean(1, keepdim=True)  # [P, n]
    denom = (proxy.pow(2).sum() * true.pow(2).sum()).sqrt()
    return (proxy * true).sum() / denom if denom > 0 else torch.zeros((), device=true.device)


def proxy_reward_correlation(result: RolloutResult) -> list[Tensor]:
    """Per checkpoint, the group-centred correlation between the *final survivors'* proxy scores
    and their true rewards (``group_centred_corr``). Scalar per checkpoint.

    Survivors are selected for their spread in the proxy, so this figure runs above the
    correlation over the whole expanded group (logged in audit mode as ``proxy_corr_full_<i>``).
    """
    P, K = result.rewards.shape
    out = []
    for ck in result.checkpoints:
        if ck.scores is None or ck.step >= result.num_steps:
            continue
        prompt = torch.arange(P, device=ck.scores.device).repeat_interleave(K)  # [P*K]
        proxy = ck.scores[prompt, ck.survivors].view(P, K)  # [P, K]
        out.append(group_centred_corr(proxy, result.rewards))
    return out
