"""Assembling the traced calls into the run's phases (``Planner.plan``) and the levers that lower its
peak (``Planner.levers``, ``Planner.advice``). See the package docstring."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .calls import TRAINED, TRAINED_FULL, Settings, TracedCalls


@dataclasses.dataclass
class Phase:
    name: str
    resident: int
    persistent: int
    transient: int

    @property
    def peak(self) -> int:
        return self.resident + self.persistent + self.transient


@dataclasses.dataclass
class Lever:
    name: str
    change: str
    peak: int
    saving: int
    changes_results: bool




class Planner(TracedCalls):
    """Measures the phases of one run on fake tensors; ``plan(settings)`` assembles them (the
    arguments are ``TracedCalls``')."""

    # ---- decodes and rewards, from their traces -------------------------------------------------
    def _previews_differ(self, preview: bool) -> bool:
        """Whether ``preview`` decodes differ from ``decode``'s: only with a preview decoder (else the
        preview and final decodes are one cached trace)."""
        return preview and self.backend.preview_decoder is not None

    def decoded_side(self, preview_scale: float = 1.0, preview: bool = False) -> int:
        """Side of a decoded image (previews at ``preview_scale`` are smaller), from a decode of 1 row."""
        preview = self._previews_differ(preview)
        if (preview_scale, preview) not in self.image_row_bytes:
            self.decode(1, None, preview_scale, preview)
        return int(round((self.image_row_bytes[preview_scale, preview] / 12) ** 0.5))  # 3 float32 channels

    def decode(self, rows: int, chunk: int | None, preview_scale: float = 1.0, preview: bool = False) -> int:
        """Transient of one ``backend.decode`` of ``rows`` latents, ``chunk`` per VAE call, its
        images included. In one VAE call every activation is [rows, ...]: linear in rows
        (``_linear``). In ``q`` chunks and a last one of ``r`` rows (1 <= r <= chunk), each chunk
        adds the same (its images, kept for the final ``torch.cat``): linear in ``q`` from the
        traces at ``chunk + r`` and ``2 * chunk + r`` rows, so the levers' chunked decodes of many
        rows cost two traces of two and three VAE calls."""
        preview = self._previews_differ(preview)
        return self._split(lambda: self._decode(rows, chunk, preview_scale, preview))

    def _decode(self, rows: int, chunk: int | None, preview_scale: float, preview: bool) -> int:
        if chunk is None or chunk >= rows:
            return self._linear(lambda n: self._trace(("decode", n, None, preview_scale, preview),
                                                      lambda: self.decode_call(n, None, preview_scale, preview)),
                                rows)
        q, r = divmod(rows - 1, chunk)  # rows = q * chunk + (r + 1)
        r += 1

        def traced(k: int) -> int:
            n = k * chunk + r
            return self._trace(("decode", n, chunk, preview_scale, preview),
                               lambda: self.decode_call(n, chunk, preview_scale, preview))

        return traced(1) + (q - 1) * (traced(2) - traced(1)) if q > 1 else traced(q)

    def reward(self, rows: int, preview_scale: float = 1.0, preview: bool = False) -> int:
        """Transient of every reward on ``rows`` images (linear in rows: ``_linear``)."""
        preview = self._previews_differ(preview)
        side = self.decoded_side(preview_scale, preview)

        def traced(n: int) -> int:
            key = ("reward", n, preview_scale, preview)
            try:
                return self._trace(key, lambda: self.reward_call(n, side))
            except Exception:  # a reward that cannot score fake images: find it, leave it out, trace again
                kept = [rw for rw in self.rewards if self._traceable(rw)]
                if len(kept) == len(self.rewards):
                    raise
                self.rewards = kept
                return self._trace(key, lambda: self.reward_call(n, side))
        return self._split(lambda: self._linear(traced, rows))

    def score(self, rows: int, chunk: int | None, preview_scale: float = 1.0,
              sample_batch_size: int | None = None, preview: bool = False) -> int:
        """Transient of decoding ``rows`` latents and scoring the images as the rollout does
        (``score_call``): ``sample_batch_size`` rows per ``decode`` and per reward call. The decodes'
        images accumulate for the final ``torch.cat`` (2 x the images at its end); the rewards then
        run on slices of the images, one slice at a time. Previews (``preview_scale`` < 1) are
        decoded from resized latents, alive through the decodes."""
        m = rows if sample_batch_size is None else min(sample_batch_size, rows)
        preview = self._previews_differ(preview)
        self.decoded_side(preview_scale, preview)
        img = self.image_row_bytes[preview_scale, preview]  # one decoded image, float32
        if m == rows:
            dec = self.decode(rows, chunk, preview_scale, preview)
        else:
            q, r = divmod(rows, m)  # q calls of m rows, a last one of r
            dec = max((q - 1) * m * img + self.decode(m, chunk, preview_scale, preview), 2 * rows * img)
            if r:
                dec = max(dec, q * m * img + self.decode(r, chunk, preview_scale, preview))
        if preview_scale < 1.0:
            dec += rows * self.latent_row_bytes[preview_scale]
        return max(dec, rows * img + self.reward(m, preview_scale, preview))

    # ---- assembling ----------------------------------------------------------------------------
    def resident(self, st: Settings, offloaded: bool = True) -> int:
        """Bytes on the device for the whole run: frozen weights, LoRA, its AdamW state, rewards."""
        total = 0
        for name, n in self.weights.items():
            if name.startswith("text_encoder"):
                if name == "text_encoder_3" and st.drop_t5:
                    continue
                if st.offload_text_encoders and offloaded:
                    continue
            if name.startswith(("LoRA", "AdamW")):
                total += n
            else:
                total += int(n * st.weight_bytes_scale)
        return total + sum(int(n * st.weight_bytes_scale) for n in self.reward_bytes.values())

    def live_rows(self, P: int, audit: bool) -> list[int]:
        """Live rows at each of the T denoiser calls."""
        if audit:
            return [P * self.G] * self.T
        return [P * g for g in self.schedule.group_sizes_per_step(self.T)]

    def mean_bytes(self) -> int:
        """Bytes per row and step of the recorded step means (GRPO-Guard's ``update.ratio_norm``
        makes the rollout keep them, ``RolloutResult.means``): one latent, else nothing."""
        return self.latent_bytes if self.module.rollout.record_means else 0

    def rollout_phases(self, st: Settings, audit: bool) -> list[Phase]:
        P, T, L, M = st.prompts_per_step, self.T, self.latent_bytes, self.mean_bytes()
        rows = self.live_rows(P, audit)
        res = self.resident(st)
        tag = "audit rollout" if audit else "rollout"
        phases: list[Phase] = []
        history = rows[0] * L  # x_T of every row
        keep_at = dict(zip(self.schedule.checkpoints, self.schedule.keep))
        best: Phase | None = None
        for t in range(T):
            chunk = rows[t] if st.sample_batch_size is None else min(st.sample_batch_size, rows[t])
            persistent = history + rows[t] * self.cond_row_bytes
            ph = Phase(f"{tag}: denoiser call, {chunk} of {rows[t]} rows", res, persistent, self.denoise(chunk))
            if best is None or ph.peak > best.peak:
                best = ph
            history += rows[t] * (L + 4 + M)  # x_{t+1} [B, *latent] float32, log-prob [B] (, mean)
            if t in keep_at and self.schedule.rule not in ("none", "random"):
                scale = self.module.rollout_settings.preview_scale
                phases.append(Phase(f"{tag}: previews after step {t}, {rows[t]} rows", res,
                                    history + rows[t] * (self.cond_row_bytes + L),  # + the step's x0
                                    self.score(rows[t], st.decode_chunk, scale, st.sample_batch_size,
                                               preview=True)))
        phases.insert(0, best)
        final = rows[-1]
        survivors = P * self.K
        result = survivors * ((T + 1) * L + T * M + 4 * T + self.image_bytes)
        phases.append(Phase(f"{tag}: final decode + reward, {final} rows", res,
                            history + final * self.cond_row_bytes,
                            self.score(final, st.decode_chunk, 1.0, st.sample_batch_size)))
        phases.append(Phase(f"{tag}: gather survivors ({survivors} trajectories)", res,
                            history + final * self.image_bytes, result))
        return phases

    def update_phase(self, st: Settings) -> Phase:
        P, T, L = st.prompts_per_step, self.T, self.latent_bytes
        N = P * self.K
        result = N * ((T + 1) * L + T * self.mean_bytes() + 4 * T + self.image_bytes) + P * self.cond_row_bytes
        lora = self.weights.get(TRAINED, self.weights.get(TRAINED_FULL, 0))  # its gradients
        b = st.train_batch_size
        ckpt = "with" if st.gradient_checkpointing else "without"
        return Phase(f"update: minibatch of {b}, {ckpt} gradient checkpointing", self.resident(st),
                     result + lora, self.update(b, st.gradient_checkpointing))

    def plan(self, st: Settings | None = None) -> list[Phase]:
        st = st or self.settings
        res_no_offload = self.resident(st, offloaded=False)
        phases = [Phase(f"encode {st.prompts_per_step} prompts", res_no_offload, 0,
                        self.encode(st.prompts_per_step))]
        phases += self.rollout_phases(st, audit=False)
        if self.module.rollout_settings.audit_every_n_rollouts > 0 and self.G != self.K:
            phases += self.rollout_phases(st, audit=True)
        phases.append(self.update_phase(st))
        return phases

    def peak(self, st: Settings | None = None) -> int:
        return max(p.peak for p in self.plan(st))

    # ---- levers --------------------------------------------------------------------------------
    def levers(self, st: Settings | None = None) -> list[Lever]:
        """Each lever alone, from ``st``: the new peak and the saving, largest saving first."""
        st = st or self.settings
        base = self.peak(st)
        rows0 = st.prompts_per_step * self.G
        current = rows0 if st.sample_batch_size is None else min(st.sample_batch_size, rows0)
        options: list[tuple[str, str, dict[str, Any], bool]] = []
        if st.train_batch_size > 1:
            tb = max(1, st.train_batch_size // 4)
            options.append(("train_batch_size", f"model.update.train_batch_size: {tb}", {"train_batch_size": tb}, False))
        if not st.gradient_checkpointing:
            options.append(("gradient_checkpointing", "model.backend.init_args.gradient_checkpointing: true",
                            {"gradient_checkpointing": True}, False))
        offloadable = "offload_text_encoders" in self.backend.memory_settings() and self.text_encoder_names()
        if offloadable and not st.offload_text_encoders:
            options.append(("offload_text_encoders", "model.backend.init_args.offload_text_encoders: true",
                            {"offload_text_encoders": True}, False))
        if st.decode_chunk is None or st.decode_chunk > 4:
            options.append(("decode_chunk", "model.backend.init_args.decode_chunk: 4",
                            {"decode_chunk": 4}, False))
        # after decode_chunk: on a tie (both split the decodes) the one that leaves the denoiser
        # and reward calls whole, which costs less time, comes first
        smaller = self.G if current > self.G else max(1, current // 2)
        if smaller < current:
            options.append(("sample_batch_size", f"model.rollout.sample_batch_size: {smaller} (rows per denoiser, "
                            "decode and reward call)", {"sample_batch_size": smaller}, False))
        if "text_encoder_3" in self.weights and not st.drop_t5:
            options.append(("drop_t5", "model.backend.init_args.drop_t5: true (T5 tokens become zeros: "
                            "changes the model's conditioning)", {"drop_t5": True}, True))
        if st.prompts_per_step > 1:
            options.append(("prompts_per_step", "data.prompts_per_step: 1 (fewer groups per rollout)",
                            {"prompts_per_step": 1}, True))
        if self.backend.weight_dtype == torch.float32 and st.weight_bytes_scale == 1.0:
            options.append(("dtype", "model.backend.init_args.dtype: bfloat16 (weights only; activations not "
                            "re-measured)", {"weight_bytes_scale": 0.5}, True))
        out = []
        for name, change, kw, changes in options:
            peak = self.peak(dataclasses.replace(st, **kw))
            out.append(Lever(name, change, peak, base - peak, changes))
        return sorted(out, key=lambda lv: -lv.saving)

    def advice(self, budget: int) -> list[Lever]:
        """Levers to pull in order until the peak fits ``budget`` (bytes, overhead excluded):
        result-neutral levers first, each time the one saving most; [] when it already fits."""
        st = self.settings
        chosen: list[Lever] = []
        while self.peak(st) > budget:
            used = {lv.name for lv in chosen}  # each lever once
            levers = [lv for lv in self.levers(st) if lv.saving > 0 and lv.name not in used]
            if not levers:
                break
            neutral = [lv for lv in levers if not lv.changes_results]
            pick = (neutral or levers)[0]
            chosen.append(pick)
            st = dataclasses.replace(st, **_lever_kwargs(pick, st, self))
        return chosen



def _lever_kwargs(lever: Lever, st: Settings, planner: Planner) -> dict[str, Any]:
    rows0 = st.prompts_per_step * planner.G
    current = rows0 if st.sample_batch_size is None else min(st.sample_batch_size, rows0)
    return {"sample_batch_size": {"sample_batch_size": planner.G if current > planner.G else max(1, current // 2)},
            "train_batch_size": {"train_batch_size": max(1, st.train_batch_size // 4)},
            "gradient_checkpointing": {"gradient_checkpointing": True},
            "offload_text_encoders": {"offload_text_encoders": True},
            "decode_chunk": {"decode_chunk": 4},
            "drop_t5": {"drop_t5": True},
            "prompts_per_step": {"prompts_per_step": 1},
            "dtype": {"weight_bytes_scale": 0.5}}[lever.name]


