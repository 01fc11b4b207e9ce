"""The library's own calls on fake tensors (``TracedCalls``): each traced once or twice, cached, and
extended to any row count (``_linear``) and to full depth (``Depth``). See the package docstring."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..networks import UnknownArchitecture
from ..rewards.base import Reward
from .tracking import CUDA_BLOCK, CpuWorkspace, Depth, LiveBytes, fake_backend, fake_reward, module_bytes, tensor_bytes

#: The weights-table row of what the optimizer trains: the LoRA adapter, or the whole denoiser
#: with ``finetune: full`` (then its frozen copy, the KL reference, is the ``reference_denoiser`` row).
TRAINED = "LoRA adapter (fp32)"
TRAINED_FULL = "denoiser, fully fine-tuned"


class UntracedRewards(Reward):
    """Stands in for a run's rewards when none of them scores fake images (e.g. the shapes reward,
    whose scoring reads pixel values): the rollout's decodes are still traced, the rewards' own
    activations are left out (the plan notes each), their weights counted."""

    default_name = "untraced"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.new_zeros(images.shape[0])  # [B]


@dataclasses.dataclass
class Settings:
    """The levers: what the plan is computed for."""

    prompts_per_step: int
    sample_batch_size: int | None  # rows per denoiser, decode and reward call (None: all live rows at once)
    train_batch_size: int
    gradient_checkpointing: bool
    offload_text_encoders: bool
    decode_chunk: int | None
    drop_t5: bool
    weight_bytes_scale: float = 1.0  # 0.5: frozen weights fp32 -> bf16 (the "dtype" lever)


class TracedCalls:
    """The library's own calls of one run, traced on fake tensors: bytes each one needs on top of
    what exists before it (``Planner`` assembles them into phases).

    Args:
        module: a ``ProGRPOModule`` built from a config (nothing loaded yet; it is configured here
            on fake tensors and is of no further use for training).
        prompts_per_step: P, prompts per rollout on one device.
        sample_batch_size: rows per denoiser, decode and reward call in the rollout (None: all live rows).
        prompt: a prompt of the run's task (task rewards may parse it).
        target: "cuda" (round allocations to CUDA blocks) or "cpu" (exact bytes, and what each
            convolution allocates inside itself: ``CpuWorkspace``).
    """

    def __init__(self, module: Any, prompts_per_step: int, target: str = "cuda",
                 sample_batch_size: int | None = None, prompt: str = "a photo of a cat") -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.module = module
        self.prompt = prompt  # every row's prompt (text is padded to fixed lengths: any prompt of the task)
        self.backend = module.backend
        self.block = CUDA_BLOCK if target == "cuda" else 1
        #: on the CPU, what convolutions allocate inside themselves (measured once per signature)
        self.workspace = CpuWorkspace() if target == "cpu" else None
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.notes: list[str] = []
        fake_backend(self.backend, self.fake_mode)
        self.rewards: list[Any] = []
        self.reward_bytes: dict[str, int] = {}
        for r in [*module.rewards.rewards, *module.eval_rewards]:
            try:
                fake_reward(r, self.fake_mode)
            except UnknownArchitecture as err:
                self.notes.append(str(err))
                continue
            self.reward_bytes[f"reward {r.name}"] = module_bytes(r)
            if r in list(module.rewards.rewards):
                self.rewards.append(r)  # until a trace finds that it cannot score fake images
        b = self.backend
        self.schedule = module.schedule
        self.T = b.num_steps
        self.G = self.schedule.group_size
        self.K = self.schedule.final_size
        memory = b.memory_settings()  # the levers' current values, by their config names
        self.settings = Settings(
            prompts_per_step=prompts_per_step, sample_batch_size=sample_batch_size,
            train_batch_size=module.settings.train_batch_size,
            gradient_checkpointing=bool(memory["gradient_checkpointing"]),
            offload_text_encoders=bool(memory.get("offload_text_encoders", False)),
            decode_chunk=memory["decode_chunk"], drop_t5=bool(memory.get("drop_t5", False)))
        if self.settings.offload_text_encoders:  # the plan counts offloading itself: nothing moves
            b.set_offload_text_encoders(False)
        self.weights = self._weights()
        self._depth_setup()
        self._cache: dict[tuple, dict[str, int]] = {}  # key -> {"all", "tensors", "inside"}: peaks
        self._part = "all"  # which peak ``_trace`` answers (``_split``)
        self.image_row_bytes: dict[tuple[float, bool], int] = {}  # (preview_scale, preview) -> one image's bytes
        self.latent_row_bytes: dict[float, int] = {}  # preview_scale -> bytes of one latent decoded
        #: Fake-tensor traces run so far (each runs one library call op by op; the plan's cost).
        self.traces = 0
        self.cond1 = self._encode_one()  # {k: [1, ...]}
        self._cond: dict[int, dict[str, Tensor]] = {id(b): self.cond1}
        with self.fake_mode, torch.no_grad():
            self.latent_bytes = b.initial_latents(1).numel() * 4  # float32 latents
        side = b.resolution
        self.cond_row_bytes = sum(v[0].numel() * v.element_size() for v in self.cond1.values())
        self.image_bytes = 3 * side * side * 4  # float32 images in [0, 1]

    def _encode_one(self) -> dict[str, Tensor]:
        """The conditioning of one prompt, traced: it is also the plan's ``encode(1)``."""
        out: dict[str, Any] = {}

        def make() -> Callable[[], Any]:
            call = self.encode_call(1)
            return lambda: out.update(call())

        self._trace(("encode", 1), make)
        return out

    def _traceable(self, reward: Any) -> bool:
        """Whether ``reward`` scores fake images (a reward whose control flow reads pixel values,
        e.g. a loop until convergence, cannot): otherwise its activations are left out, with a note."""
        side = self.backend.resolution
        try:
            with self.fake_mode, torch.no_grad():
                reward(torch.zeros(1, 3, side, side), [self.prompt])
        except Exception as err:  # noqa: BLE001 - fake tensors refuse data-dependent ops in many ways
            self.notes.append(f"reward {reward.name}: activations not estimated (its scoring reads pixel "
                              f"values: {type(err).__name__}); its weights are counted")
            return False
        return True

    # ---- weights -------------------------------------------------------------------------------
    def _weights(self) -> dict[str, int]:
        """Bytes by component: frozen networks in their dtype, the LoRA adapter (fp32)."""
        out: dict[str, int] = {}
        lora = 0
        for name, child in self.backend.named_children():
            frozen = sum(tensor_bytes(p) for p in child.parameters() if not p.requires_grad)
            frozen += sum(tensor_bytes(t) for t in child.buffers())
            lora += sum(tensor_bytes(p) for p in child.parameters() if p.requires_grad)
            if frozen:
                out[name] = frozen
        if self.backend.finetune == "full":  # the denoiser itself trains, in its dtype
            out[TRAINED_FULL] = lora
            out["AdamW state (2 per trained weight, its dtype)"] = 2 * lora
            return out
        out[TRAINED] = lora
        out["AdamW state (2 x fp32 per LoRA weight)"] = 2 * lora
        return out

    def text_encoder_names(self) -> list[str]:
        return [n for n in self.weights if n.startswith("text_encoder")]

    # ---- depth ---------------------------------------------------------------------------------
    def _depth_setup(self) -> None:
        """The denoiser (and a fully fine-tuned run's reference copy) cut to shallow copies (``Depth``)."""
        nets = [self.backend.denoiser()]
        ref = self.backend.reference_denoiser
        if ref is not None:  # fully fine-tuned: the KL reference is a frozen copy of the same stack
            nets.append(ref)
        self.depth = Depth(nets)
        self.stacks, self.depth_base, self.depth_steps = self.depth.stacks, self.depth.base, self.depth.steps

    def deep(self, measure: Callable[[tuple | None], int]) -> int:
        """``measure`` of the full-depth denoiser from its shallow copies (``Depth.deep``)."""
        return self.depth.deep(measure)

    # ---- measured calls (cached) -------------------------------------------------------------
    def _trace(self, key: tuple, make: Callable[[], Callable[[], Any]], grad: bool = False,
               depth: tuple | None = None) -> int:
        key = (*key, depth)
        if key not in self._cache:
            self.traces += 1
            with self.fake_mode, self.depth.at(depth):
                fn = make()  # inputs: created before tracking (counted as persistent, not transient)
                tracker = LiveBytes(self.block, self.workspace)
                with torch.set_grad_enabled(grad), tracker:
                    fn()
                tracker.settle()
            self._cache[key] = {"all": tracker.peak, "tensors": tracker.tensor_peak, "inside": tracker.inside_peak}
        return self._cache[key][self._part]

    def _split(self, figure: Callable[[], int]) -> int:
        """``figure`` (extrapolated from traces) as it is, or, where ops hold a workspace (the CPU
        target), made twice, from the traces' peaks of what ops return and from their peaks inside
        the ops that hold one, each extrapolated on its own, and the larger taken. The two sit at
        different ops and grow differently with rows (a convolution's copy of its weight is the same
        at every row count): a line through the maximum's values at 1 and 2 rows would fall below
        it further out (tiny SD1.5's decode of 6 rows: 6 % low)."""
        if self.workspace is None:
            return figure()
        out = 0
        for part in ("tensors", "inside"):
            self._part = part
            try:
                out = max(out, figure())
            finally:
                self._part = "all"
        return out

    def _rows(self, n: int, backend: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if id(backend) not in self._cond:
            with torch.no_grad():
                self._cond[id(backend)] = backend.encode_prompts([self.prompt])  # {k: [1, ...]}
        cond1 = self._cond[id(backend)]
        x = backend.initial_latents(n)  # [n, *latent]
        cond = {k: v.expand(n, *v.shape[1:]).clone() for k, v in cond1.items()}  # [n, ...]
        return x, cond

    def denoise_call(self, rows: int, backend: Any = None) -> Callable[[], Any]:
        """One sampling call ``backend.step`` on ``rows`` samples (run it without grad)."""
        backend = backend or self.backend
        x, cond = self._rows(rows, backend)
        idx = torch.zeros(rows, dtype=torch.long, device=x.device)
        return lambda: backend.step(x, idx, cond)

    def encode_call(self, prompts: int, backend: Any = None) -> Callable[[], Any]:
        backend = backend or self.backend
        texts = [self.prompt] * prompts
        return lambda: backend.encode_prompts(texts)

    def _reward_set(self, rewards: Sequence[Any]) -> Any:
        """A reward set over ``rewards`` (those that score fake images) with the run's weights. Its
        normalisation is left out: it branches on the scores' values (which fake tensors do not
        have) and holds a few [B, n] statistics, nothing next to a reward model's activations."""
        from ..rewards.combine import RewardSet

        return RewardSet(list(rewards) or [UntracedRewards()], normalize="none")

    def score_call(self, rows: int, chunk: int | None, preview_scale: float = 1.0, backend: Any = None,
                   rewards: Sequence[Any] | None = None, sample_batch_size: int | None = None,
                   preview: bool = False) -> Callable[[], Any]:
        """The rollout's own decode-and-score step (``ExpandPruneRollout.decode_and_score``) on ``rows``
        latents: ``sample_batch_size`` rows per decode and per reward call, ``chunk``
        (``decode_chunk``) latents per decoder call; ``preview``: the x0 previews at
        ``preview_scale`` (the backend's preview decoder), else the final images."""
        from ..rollout import ExpandPruneRollout

        backend = backend or self.backend
        settings = dataclasses.replace(self.module.rollout_settings, preview_scale=preview_scale,
                                       sample_batch_size=sample_batch_size)
        rollout = ExpandPruneRollout(backend, self._reward_set(self.rewards if rewards is None else rewards),
                                     self.schedule, settings)
        x = backend.initial_latents(rows)  # [rows, *latent]
        texts = [self.prompt] * rows

        def run() -> None:
            backend.set_decode_chunk(chunk)
            rollout.decode_and_score(x, texts, preview=preview)
        return run

    def decode_call(self, rows: int, chunk: int | None, preview_scale: float = 1.0,
                    preview: bool = False) -> Callable[[], Any]:
        """One ``backend.decode`` (``preview``: ``decode_preview``) of ``rows`` latents, ``chunk`` per
        VAE call (its output is counted)."""
        backend = self.backend
        x = backend.initial_latents(rows)
        if preview_scale < 1.0 and x.ndim == 4:
            x = torch.nn.functional.interpolate(x, scale_factor=preview_scale, mode="bilinear", antialias=True)
        self.latent_row_bytes[preview_scale] = x[0].numel() * x.element_size()
        decode = backend.decode_preview if preview else backend.decode

        def run():
            backend.set_decode_chunk(chunk)
            images = decode(x)  # [rows, 3, H, W]
            self.image_row_bytes[preview_scale, preview] = images[0].numel() * images.element_size()
        return run

    def reward_call(self, rows: int, side: int) -> Callable[[], Any]:
        """The reward set's call on ``rows`` decoded images of ``side`` pixels (created before the
        call: not counted)."""
        images = torch.zeros(rows, 3, side, side)  # [rows, 3, H, W]
        texts = [self.prompt] * rows
        rewards = self._reward_set(self.rewards)
        return lambda: rewards(images, texts)

    def update_call(self, batch: int, checkpointing: bool, backend: Any = None) -> Callable[[], Any]:
        """One update minibatch as ``update.grpo_update`` runs it: ``update.minibatch_loss`` (the
        policy forward with grad, the reference forward when ``kl_beta > 0``, the loss), its
        backward, the gradients dropped after (they are counted with the resident part)."""
        from ..update import minibatch_loss

        backend = backend or self.backend
        settings = self.module.settings
        net = backend.denoiser()
        x, cond = self._rows(batch, backend)
        x_next = backend.initial_latents(batch)  # [b, *latent]
        st = torch.full((batch,), min(1, self.T - 1), dtype=torch.long, device=x.device)
        old, adv = torch.zeros(batch, device=x.device), torch.ones(batch, device=x.device)
        # GRPO-Guard reads the rollout's recorded step means: a latent per pair, stored like x_next
        old_mean = backend.initial_latents(batch) if settings.ratio_norm == "grpo_guard" else None

        def run() -> None:
            if checkpointing:  # set here, not when the call is built: builders may run ahead
                net.enable_gradient_checkpointing()
            else:
                net.disable_gradient_checkpointing()
            net.train()
            loss = minibatch_loss(backend, x, st, cond, x_next, old, adv, settings, old_mean=old_mean)[0]
            loss.backward()
            net.zero_grad(set_to_none=True)
        return run

    def _linear(self, measure: Callable[[int], int], rows: int) -> int:
        """``measure`` at ``rows`` from its values at 1 and 2 rows: every activation of a denoiser
        call is [batch, ...] (CFG concatenates along the batch), so its peak is a + b * rows
        (checked against direct traces and measurements in tests/test_plan.py). Two traces then
        serve every chunk size the levers try."""
        one, two = measure(1), measure(2)
        if two < one and rows > 2:  # what ops hold inside (``CpuWorkspace``) follows the kernel library's
            # choice of algorithm by batch size: oneDNN's convolutions hold more at 1 row than at 2 (a
            # tiny TAESD decoder: 395 KB vs 332 KB, then 166 KB per row), so a line through them falls;
            # beyond 2 rows the 2-row figure per row is taken instead
            return two * rows // 2
        return one + (two - one) * (rows - 1)

    def denoise(self, rows: int) -> int:
        """Transient of one sampling call ``backend.step`` on ``rows`` samples (no grad)."""
        return self._split(lambda: self._linear(lambda n: self.deep(lambda d: self.denoise_traced(n, d)), rows))

    def update(self, batch: int, checkpointing: bool) -> int:
        """Transient of one update minibatch of ``batch`` pairs (see ``update_call``)."""
        return self._split(lambda: self._linear(lambda n: self.deep(lambda d: self.update_traced(n, checkpointing, d)),
                                                batch))

    def denoise_traced(self, rows: int, depth: tuple | None = None) -> int:
        """One sampling call traced as it runs (``depth`` None: the whole denoiser)."""
        return self._trace(("denoise", rows), lambda: self.denoise_call(rows), depth=depth)

    def encode(self, prompts: int) -> int:
        return self._trace(("encode", prompts), lambda: self.encode_call(prompts))

    def score_traced(self, rows: int, chunk: int | None, preview_scale: float = 1.0,
                     sample_batch_size: int | None = None, preview: bool = False) -> int:
        """``score_call`` traced as it runs (a check of ``score``)."""
        key = ("score", rows, chunk, preview_scale, sample_batch_size, preview)
        return self._trace(key, lambda: self.score_call(rows, chunk, preview_scale,
                                                        sample_batch_size=sample_batch_size, preview=preview))

    def update_traced(self, batch: int, checkpointing: bool, depth: tuple | None = None) -> int:
        """One update minibatch traced as it runs (``depth`` None: the whole denoiser)."""
        return self._trace(("update", batch, checkpointing), lambda: self.update_call(batch, checkpointing),
                           grad=True, depth=depth)

