"""Every matmul and attention call of one update minibatch, against the kernels' 32-bit limits (issue 29).

FLUX.1-dev failed in its first update's backward on an H200 with ``CUBLAS_STATUS_EXECUTION_FAILED``
in a bf16 GEMM (``docs/results/gpu_memory/``). Three tools, one per question:

``trace`` (CPU, no weights): the shipped config's update minibatch as ``update.minibatch_loss`` runs
it (policy forward with grad, the no-grad reference forward when ``kl_beta > 0``, the PPO loss, the
backward), on fake tensors of the real architecture (``plan.fake_backend``), under the config's
autocast (``bf16-mixed``: CPU autocast, which casts matmuls to bf16 as CUDA autocast does), with
the denoiser cut to the first block of every run of identical blocks (each block of a run issues
the same calls). ``KernelCalls``, a ``TorchDispatchMode``, records every mm / addmm / bmm / baddbmm
and scaled-dot-product-attention call (forward, or backward including the recompute of gradient
checkpointing): shapes, strides, storage offsets, dtypes, the module that issued it (forward), and
the largest activation (not a weight) any op touched. ``limit_violations`` checks each call
against the limits where kernels are known to fail (int32 element counts and spans, cuBLAS's int
m/n/k/ld, 65535 grid dimensions for batched GEMMs and attention). The rollout's denoiser call (no grad, all live rows)
is traced too: it ran on the GPU, so it shows which sizes the same kernels handled.

``replay`` (CUDA): every distinct GEMM call of a trace on random tensors of exactly those shapes,
strides, offsets and dtypes, and every attention call through ``F.scaled_dot_product_attention``
(forward and backward, the kernel the GPU's torch picks), one at a time; run it with
``CUDA_LAUNCH_BLOCKING=1`` so the first failing call is the one named.

``update`` (CUDA, or CPU for the smoke test): one real update minibatch at full size, random
weights of the real architecture (``NetworkSource("random")``, as memory_check builds them),
forward and backward under the config's autocast, nothing else of the run (no rollout): whether
the failure needs the rollout before it. ``--sdpa`` forces one attention backend. One variant per process.

    python -m benchmarks.gpu.kernel_calls trace --config configs/flux_dev_pickscore_pro_grpo.yaml \
        --out docs/results/flux_backward
    CUDA_LAUNCH_BLOCKING=1 python -m benchmarks.gpu.kernel_calls replay \
        --calls docs/results/flux_backward/calls.json --out OUT/replay.json
    CUDA_LAUNCH_BLOCKING=1 python -m benchmarks.gpu.kernel_calls update \
        --config configs/flux_dev_pickscore_pro_grpo.yaml --out OUT/update.json [--sdpa math] [overrides]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
INT32_MAX = 2**31 - 1
#: CUDA's limit on gridDim.y and gridDim.z: kernels that put a batch or head count there fail beyond it.
GRID_YZ_MAX = 65535
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation")


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or name.startswith(("_efficient_attention", "_flash_attention",
                                                            "_cudnn_attention"))


def tensor_spec(t: Tensor) -> dict[str, Any]:
    """What a kernel sees of a tensor: shape, strides, storage offset (elements), dtype, and the span
    of elements it addresses from its data pointer (1 + sum of (size - 1) * stride)."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) if t.numel() else 0
    return {"shape": list(t.shape), "stride": list(t.stride()), "offset": int(t.storage_offset()),
            "dtype": str(t.dtype).replace("torch.", ""), "numel": int(t.numel()), "span": int(span),
            "bytes": int(t.numel() * t.element_size())}


def _leading_dim(spec: dict[str, Any]) -> int:
    """cuBLAS's leading dimension of a matrix operand (its last two dims): the stride of the non-unit
    dim; torch copies an operand with neither stride 1, so then the row length."""
    (r, c), (sr, sc) = spec["shape"][-2:], spec["stride"][-2:]
    if sc == 1 and sr >= max(1, c):
        return sr
    if sr == 1 and sc >= max(1, r):
        return sc
    return c


def gemm_dims(op: str, specs: list[dict[str, Any]]) -> dict[str, int]:
    """m, n, k (row-major C[m, n] = A[m, k] B[k, n]), the batch count, and the leading dimensions."""
    a, b = (specs[1], specs[2]) if op in ("addmm", "baddbmm", "addbmm", "_addmm_activation") else specs[:2]
    m, k = a["shape"][-2:]
    n = b["shape"][-1]
    batch = a["shape"][0] if len(a["shape"]) == 3 and op in ("bmm", "baddbmm", "addbmm") else 1
    return {"m": m, "n": n, "k": k, "batch": batch, "lda": _leading_dim(a), "ldb": _leading_dim(b)}


def limit_violations(call: dict[str, Any]) -> list[str]:
    """The limits ``call`` (a ``KernelCalls`` record) exceeds; [] when none.

    Per tensor: more than 2^31 - 1 elements, or a span of addressed elements beyond it (int32 index
    arithmetic; cuBLASLt has failed at exactly 2^31 elements of input span). GEMMs: m, n, k or a
    leading dimension beyond cuBLAS's int, a batch count beyond 65535 (batched kernels put it on a
    grid dimension). Attention: batch or heads beyond 65535, or their product (kernels that put
    batch x heads on one grid dimension)."""
    out = []
    for where, specs in (("in", call["inputs"]), ("out", call["outputs"])):
        for i, s in enumerate(specs):
            if s["numel"] > INT32_MAX:
                out.append(f"{where}[{i}] numel {s['numel']} > 2^31-1")
            elif s["span"] > INT32_MAX:
                out.append(f"{where}[{i}] span {s['span']} > 2^31-1")
    g = call.get("gemm")
    if g:
        for key in ("m", "n", "k", "lda", "ldb"):
            if g[key] > INT32_MAX:
                out.append(f"gemm {key} {g[key]} > 2^31-1")
        if g["batch"] > GRID_YZ_MAX:
            out.append(f"gemm batch {g['batch']} > {GRID_YZ_MAX}")
    a = call.get("attention")
    if a:
        for key in ("batch", "heads"):
            if a[key] > GRID_YZ_MAX:
                out.append(f"attention {key} {a[key]} > {GRID_YZ_MAX}")
        if a["batch"] * a["heads"] > GRID_YZ_MAX:
            out.append(f"attention batch x heads {a['batch'] * a['heads']} > {GRID_YZ_MAX}")
    return out


class KernelCalls(TorchDispatchMode):
    """Records every GEMM and attention op dispatched inside it, and the largest activation of any op.

    ``phase`` is set by the caller ("rollout", "forward", "backward"); ``module`` (a stack kept by
    global module hooks, ``watch``) names the module of a forward call; a backward op has none (the
    recompute of a checkpointed block shows as forward ops, addmm and attention, in the backward).
    """

    def __init__(self, weights: Sequence[Tensor] = ()) -> None:
        super().__init__()
        #: storages of the network's weights: the largest *activation* is what ``largest`` tracks
        self._weights = [t.untyped_storage() for t in weights]  # kept alive: their ids stay theirs
        self._weight_ids = {id(st) for st in self._weights}
        self.phase = "forward"
        self.calls: list[dict[str, Any]] = []
        self.largest: dict[str, dict[str, Any]] = {}  # phase -> the largest activation seen
        self.modules: list[str] = []
        #: (phase, top-level module of the denoiser) -> [forward calls, calls whose output requires grad]
        self.module_grad: dict[tuple[str, str], list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        tensors_in = [a for a in args if isinstance(a, Tensor)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors_out = [o for o in outs if isinstance(o, Tensor)]
        acts = [t for t in tensors_in + tensors_out if id(t.untyped_storage()) not in self._weight_ids]
        biggest = max(acts, key=lambda t: t.numel(), default=None)
        if biggest is not None and func.namespace != "prim":  # prim ops (``device``) compute nothing
            best = self.largest.get(self.phase)
            if best is None or biggest.numel() > best["numel"]:
                self.largest[self.phase] = {**tensor_spec(biggest), "op": str(func)}
        gemm, attention = name in GEMM_OPS, _is_attention(name)
        if not (gemm or attention):
            return out
        call: dict[str, Any] = {
            "phase": self.phase, "op": str(func),
            "module": self.modules[-1] if self.modules and self.phase != "backward" else None,
            "inputs": [tensor_spec(t) for t in tensors_in], "outputs": [tensor_spec(t) for t in tensors_out],
            "values": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, type(None)))},
        }
        if gemm:
            call["gemm"] = gemm_dims(name, call["inputs"])
        elif "backward" not in name:  # q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev]
            q, k, v = (call["inputs"][i]["shape"] for i in range(3))
            call["attention"] = {"batch": q[0], "heads": q[1], "q_len": q[2], "kv_len": k[2], "head_dim": q[3],
                                 "v_dim": v[3]}
            call["values"].update({f"arg{i}": a for i, a in enumerate(args)
                                   if isinstance(a, (bool, int, float)) and i >= 3})
        else:
            q = call["inputs"][1]["shape"]  # backward ops: (grad_out, q, k, v, ...)
            call["attention"] = {"batch": q[0], "heads": q[1], "q_len": q[2], "kv_len": call["inputs"][2]["shape"][2],
                                 "head_dim": q[3], "v_dim": call["inputs"][3]["shape"][3]}
        call["violations"] = limit_violations(call)
        self.calls.append(call)
        return out

    @contextlib.contextmanager
    def watch(self, net: nn.Module, prefix: str = "") -> Iterator[None]:
        """Name the module of each forward call of ``net``'s submodules (global forward hooks)."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        names = {id(m): prefix + n for n, m in net.named_modules()}

        # Not in the backward: gradient checkpointing's recompute stops a block's forward as soon as
        # it has what the backward needs, so its modules' post-hooks may never run.
        def pre(mod: nn.Module, args: Any) -> None:
            if id(mod) in names and self.phase != "backward":
                self.modules.append(names[id(mod)])

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            if id(mod) in names and self.modules and self.phase != "backward":
                self.modules.pop()
                outs = out if isinstance(out, (tuple, list)) else (out,)
                row = self.module_grad.setdefault((self.phase, names[id(mod)].split(".")[0]), [0, 0])
                row[0] += 1  # autograd's view (a dispatch mode runs below autograd: it cannot see it)
                row[1] += int(any(isinstance(o, Tensor) and o.requires_grad for o in outs))

        handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


# ---- trace (CPU, fake tensors) ------------------------------------------------------------------
@contextlib.contextmanager
def shallow(net: nn.Module, blocks: int = 1) -> Iterator[list[str]]:
    """``net`` with only the first ``blocks`` blocks of every run of identical blocks of each stack
    (``plan.block_stacks``); yields what was kept, e.g. ``["transformer_blocks: 1 of 19"]``."""
    from pro_grpo_lightning.plan import block_stacks

    saved, kept = [], []
    for owner, attr, runs in block_stacks(net):
        full = getattr(owner, attr)
        idx = [i for start, n in runs for i in range(start, start + min(blocks, n))]
        saved.append((owner, attr, full))
        kept.append(f"{attr}: {len(idx)} of {len(full)}")
        owner.register_module(attr, nn.ModuleList([full[i] for i in idx]))  # nn.Module's public API
    try:
        yield kept
    finally:
        for owner, attr, full in saved:
            owner.register_module(attr, full)


def autocast_for(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast Lightning's ``precision`` runs the training step under (nothing for full precision)."""
    if precision.startswith("bf16-mixed"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision.startswith("16-mixed"):
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def _rows(backend: Any, cond1: dict[str, Tensor], n: int) -> tuple[Tensor, dict[str, Tensor]]:
    x = backend.initial_latents(n)  # [n, *latent]
    return x, {k: v.expand(n, *v.shape[1:]).clone() for k, v in cond1.items()}  # [n, ...] each


def trace(configs: Sequence[str], overrides: Sequence[str] = (), blocks: int = 1,
          checkpointing: bool | None = None, rollout_rows: int | None = None,
          prompt: str = "a photo of a cat") -> dict[str, Any]:
    """The GEMM and attention calls of one update minibatch (and of one rollout denoiser call) of a
    config at real size on fake tensors; see the module docstring. ``checkpointing``: None as
    configured. ``rollout_rows``: rows of the rollout call (None: the run's sample_batch_size, else
    prompts_per_step x G_max)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.gpu.memory_check import config_precision
    from pro_grpo_lightning.plan import build_run, fake_backend
    from pro_grpo_lightning.update import minibatch_loss

    module, datamodule = build_run([str(ROOT / c) for c in configs], overrides)
    backend, settings = module.backend, module.settings
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_backend(backend, mode)
    if getattr(backend, "offload_text_encoders", False):  # fake tensors never move (as the plan does)
        backend.set_offload_text_encoders(False)
    net = backend.denoiser()
    trainable = backend.trainable_steps().nonzero().flatten()
    step = int(trainable[min(1, trainable.numel() - 1)])  # a trained step (sigma, not the shapes, varies)
    precision = config_precision(configs)
    b = settings.train_batch_size
    rows = rollout_rows or module.rollout_settings.sample_batch_size or \
        datamodule.prompts_per_step * module.schedule.group_size
    ckpt = bool(getattr(backend, "gradient_checkpointing", False)) if checkpointing is None else checkpointing
    with mode, shallow(net, blocks) as kept:
        rec = KernelCalls([*net.parameters(), *net.buffers()])
        with torch.no_grad():
            cond1 = backend.encode_prompts([prompt])  # {k: [1, ...]}
        x, cond = _rows(backend, cond1, rows)
        st = torch.full((rows,), step, dtype=torch.long)
        net.eval()
        with rec, rec.watch(net), torch.no_grad(), autocast_for(precision, "cpu"):
            rec.phase = "rollout"
            backend.step(x, st, cond)
        x, cond = _rows(backend, cond1, b)
        x_next = backend.initial_latents(b)
        st = torch.full((b,), step, dtype=torch.long)
        old, adv = torch.zeros(b), torch.ones(b)
        (net.enable_gradient_checkpointing if ckpt else net.disable_gradient_checkpointing)()
        net.train()
        with rec, rec.watch(net):
            rec.phase = "forward"
            with autocast_for(precision, "cpu"):  # Lightning's precision plugin wraps the training step
                loss = minibatch_loss(backend, x, st, cond, x_next, old, adv, settings)[0]
                rec.phase = "backward"
                loss.backward()  # manual_backward runs inside the training step, under its autocast
    lora = [p for p in backend.trainable_parameters()]
    return {
        "configs": list(configs), "overrides": list(overrides), "precision": precision,
        "denoiser": type(net).__name__, "blocks_kept": kept, "train_batch_size": b, "rollout_rows": rows,
        "gradient_checkpointing": ckpt, "kl_beta": settings.kl_beta, "step": step,
        "lora_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in lora}),
        "largest_tensor": rec.largest, "calls": rec.calls,
        "module_grad": [{"phase": ph, "module": m, "calls": n, "requires_grad": g}
                        for (ph, m), (n, g) in rec.module_grad.items()],
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per phase: call counts, operand-dtype combinations, the largest value of each size and its
    call, every limit exceeded, and the headroom (limit / largest value) of each limit."""
    out: dict[str, Any] = {}
    for phase in ("rollout", "forward", "backward"):
        calls = [c for c in result["calls"] if c["phase"] == phase]
        kinds = collections.Counter(c["op"] for c in calls)
        dtypes = collections.Counter(
            f"{c['op'].split('.')[1]}({', '.join(s['dtype'] for s in c['inputs'])}) -> "
            f"{', '.join(s['dtype'] for s in c['outputs'][:1])}" for c in calls)
        largest: dict[str, Any] = {}

        def keep(key: str, value: int, call: dict[str, Any]) -> None:
            if value > largest.get(key, {"value": -1})["value"]:
                largest[key] = {"value": value, "op": call["op"], "module": call["module"],
                                "shapes": [s["shape"] for s in call["inputs"]]}

        for c in calls:
            for s in c["inputs"] + c["outputs"]:
                keep("tensor numel", s["numel"], c)
                keep("tensor span", s["span"], c)
            if "gemm" in c:
                for key in ("m", "n", "k", "batch", "lda", "ldb"):
                    keep(f"gemm {key}", c["gemm"][key], c)
            if "attention" in c:
                a = c["attention"]
                keep("attention batch x heads", a["batch"] * a["heads"], c)
                keep("attention q_len", a["q_len"], c)
        limits = {"tensor numel": INT32_MAX, "tensor span": INT32_MAX, "gemm m": INT32_MAX, "gemm n": INT32_MAX,
                  "gemm k": INT32_MAX, "gemm lda": INT32_MAX, "gemm ldb": INT32_MAX, "gemm batch": GRID_YZ_MAX,
                  "attention batch x heads": GRID_YZ_MAX}
        out[phase] = {
            "calls": len(calls), "ops": dict(kinds), "dtypes": dict(dtypes), "largest": largest,
            "headroom": {k: limits[k] / v["value"] for k, v in largest.items() if k in limits and v["value"] > 0},
            "violations": [{"op": c["op"], "module": c["module"], "violations": c["violations"]}
                           for c in calls if c["violations"]],
            "grad_by_module": {r["module"]: {"calls": r["calls"], "requires_grad": r["requires_grad"]}
                               for r in result["module_grad"] if r["phase"] == phase},
            "misaligned_16B": sum(1 for c in calls for s in c["inputs"]
                                  if s["offset"] * _itemsize(s["dtype"]) % 16),
            "largest_tensor_any_op": result["largest_tensor"].get(phase),
        }
    return out


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def table(result: dict[str, Any], summary: dict[str, Any]) -> str:
    """Markdown: per phase the largest value of each size against its limit, then the dtype mix."""
    lines = [f"Update minibatch of {result['train_batch_size']} and rollout call of {result['rollout_rows']} rows, "
             f"{result['denoiser']} ({', '.join(result['blocks_kept'])}), precision {result['precision']}, "
             f"gradient checkpointing {result['gradient_checkpointing']}, kl_beta {result['kl_beta']}, "
             f"LoRA weights {', '.join(result['lora_dtypes'])}", "",
             "| phase | quantity | largest | limit | limit / largest | op | module | operand shapes |",
             "|---|---|---|---|---|---|---|---|"]
    for phase, s in summary.items():
        for key, v in s["largest"].items():
            head = s["headroom"].get(key)
            limit = GRID_YZ_MAX if key in ("gemm batch", "attention batch x heads") else (
                INT32_MAX if head is not None else "")
            lines.append(f"| {phase} | {key} | {v['value']:,} | {limit if limit == '' else f'{limit:,}'} | "
                         f"{'' if head is None else f'{head:,.0f}'} | `{v['op']}` | {v['module'] or '-'} | "
                         f"{' '.join(str(x) for x in v['shapes'])} |")
    lines += ["", "| phase | calls | limits exceeded | operands not 16-byte aligned | largest activation of any op |",
              "|---|---|---|---|---|"]
    for phase, s in summary.items():
        big = s["largest_tensor_any_op"] or {}
        lines.append(f"| {phase} | {s['calls']} | {len(s['violations'])} | {s['misaligned_16B']} | "
                     f"{big.get('numel', 0):,} elements {big.get('shape')} {big.get('dtype')} (`{big.get('op')}`) |")
    lines += ["", "| phase | top-level module of the denoiser | module calls (every submodule) | "
              "of them with an output that requires grad |", "|---|---|---|---|"]
    for phase, s in summary.items():
        for mod, row in s["grad_by_module"].items():
            lines.append(f"| {phase} | {mod} | {row['calls']} | {row['requires_grad']} |")
    lines += ["", "| phase | op (operand dtypes) -> output dtype | calls |", "|---|---|---|"]
    for phase, s in summary.items():
        for k, n in sorted(s["dtypes"].items()):
            lines.append(f"| {phase} | `{k}` | {n} |")
    return "\n".join(lines) + "\n"


# ---- replay (CUDA) ------------------------------------------------------------------------------------
def _materialize(spec: dict[str, Any], device: str, gen: torch.Generator) -> Tensor:
    """A random tensor with exactly ``spec``'s shape, strides, storage offset and dtype."""
    dtype = getattr(torch, spec["dtype"])
    base = torch.empty(spec["offset"] + max(spec["span"], 1), dtype=dtype, device=device)
    if dtype.is_floating_point:
        base.normal_(0, 0.1, generator=gen)
    else:
        base.zero_()
    return base.as_strided(spec["shape"], spec["stride"], spec["offset"])


def distinct_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One call per distinct (op, operand layout); attention once per (q, k, v) layout, as a forward."""
    seen, out = set(), []
    for c in calls:
        if "attention" in c:
            if "backward" in c["op"]:
                continue  # replayed through the forward's autograd (the kernel the GPU picks)
            key = ("attention", json.dumps(c["inputs"][:3], sort_keys=True))
        else:
            key = (c["op"], json.dumps(c["inputs"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def replay(calls: list[dict[str, Any]], device: str = "cuda", sdpa: str | None = None) -> list[dict[str, Any]]:
    """Run each distinct call on random tensors; stop at the first that raises (its context is gone).
    GEMMs: the recorded aten op itself. Attention: ``F.scaled_dot_product_attention`` on q, k, v of the
    recorded layouts with grad, then its backward with a random gradient."""
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for i, c in enumerate(distinct_calls(calls)):
        t0 = time.perf_counter()
        entry = {"index": i, "op": c["op"], "phase": c["phase"], "module": c["module"],
                 "inputs": [(s["shape"], s["stride"], s["offset"], s["dtype"]) for s in c["inputs"]]}
        try:
            if "attention" in c:
                q, k, v = (_materialize(s, device, gen).requires_grad_() for s in c["inputs"][:3])
                with _sdpa_backend(sdpa):
                    out = F.scaled_dot_product_attention(q, k, v)
                    out.backward(torch.randn_like(out))
            else:
                ns, name, overload = c["op"].split(".")
                op = getattr(getattr(getattr(torch.ops, ns), name), overload)
                op(*(_materialize(s, device, gen) for s in c["inputs"]))
            if device == "cuda":
                torch.cuda.synchronize()
            entry.update(ok=True, seconds=time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - the point is to name the failing call
            entry.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            results.append(entry)
            break
        results.append(entry)
    return results


@contextlib.contextmanager
def _sdpa_backend(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    with sdpa_kernel(backend):
        yield


# ---- one real update minibatch (CUDA) ---------------------------------------------------------------
def update_check(configs: Sequence[str], overrides: Sequence[str], device: str, sdpa: str | None = None,
                 repeats: int = 2, prompt: str = "a photo of a cat") -> dict[str, Any]:
    """``repeats`` update minibatches (forward + backward, gradients kept as the update keeps them)
    of a config at full size with random weights on ``device``; see the module docstring."""
    from benchmarks.gpu.memory_check import config_precision
    from pro_grpo_lightning.networks import NetworkSource
    from pro_grpo_lightning.plan import build_run
    from pro_grpo_lightning.update import minibatch_loss

    t0 = time.perf_counter()
    module, _ = build_run([str(ROOT / c) for c in configs], overrides)
    module.use_networks(NetworkSource("random", device, seed=0))  # as memory_check builds them
    backend, settings = module.backend, module.settings
    backend.configure_model()
    backend.to(device)
    precision = config_precision(configs)
    out: dict[str, Any] = {"configs": list(configs), "overrides": list(overrides), "sdpa": sdpa,
                           "precision": precision, "device": device, "minibatches": 0}
    if device == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    trainable = backend.trainable_steps().nonzero().flatten()
    b = settings.train_batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        cond1 = backend.encode_prompts([prompt])  # {k: [1, ...]}
    backend.denoiser().train()
    out["build_s"] = time.perf_counter() - t0
    seconds = []
    for r in range(repeats):
        x, cond = _rows(backend, cond1, b)
        x_next = backend.initial_latents(b, generator=gen)
        st = trainable[torch.arange(b) % trainable.numel()].to(device)  # [b] different trained steps
        old = torch.zeros(b, device=device)
        adv = torch.randn(b, generator=gen, device=device)
        t1 = time.perf_counter()
        with _sdpa_backend(sdpa), autocast_for(precision, device):
            loss = minibatch_loss(backend, x, st, cond, x_next, old, adv, settings)[0]
            loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t1)
        out["minibatches"] = r + 1
    out["seconds"] = seconds
    grads = [p.grad for p in backend.trainable_parameters() if p.grad is not None]
    out["finite_grad_norm"] = bool(torch.isfinite(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))
    out["grad_tensors"] = len(grads)
    if device == "cuda":
        out.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved())
    return out


# ---- the command ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.kernel_calls", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="CPU: the calls of one update minibatch on fake tensors")
    t.add_argument("--config", action="append", required=True)
    t.add_argument("--out", type=Path, required=True, help="folder: calls.json, summary.json, table.md")
    t.add_argument("--blocks", type=int, default=1, help="blocks kept of each run of identical blocks")
    t.add_argument("--checkpointing", choices=("config", "on", "off"), default="config")
    r = sub.add_parser("replay", help="CUDA: each distinct call of a trace on random tensors")
    r.add_argument("--calls", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--sdpa", choices=("math", "flash", "efficient", "cudnn"))
    r.add_argument("--device", default="cuda")
    u = sub.add_parser("update", help="CUDA: one real update minibatch at full size, random weights")
    u.add_argument("--config", action="append", required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--sdpa", choices=("math", "flash", "efficient", "cudnn"))
    u.add_argument("--device", default="cuda")
    u.add_argument("--repeats", type=int, default=2)
    args, overrides = p.parse_known_args(argv)
    if args.cmd != "trace" and args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --device cpu for the smoke check)")
    if args.cmd == "trace":
        if overrides and not all(o.startswith("--") for o in overrides):
            p.error(f"unknown arguments {overrides}")
        ckpt = {"config": None, "on": True, "off": False}[args.checkpointing]
        result = trace(args.config, overrides, blocks=args.blocks, checkpointing=ckpt)
        summary = summarize(result)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "calls.json").write_text(json.dumps(result, indent=1))
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        text = table(result, summary)
        (args.out / "table.md").write_text(text)
        print(text)
        return 0
    if args.cmd == "replay":
        if overrides:
            p.error(f"unknown arguments {overrides}")
        calls = json.loads(args.calls.read_text())["calls"]
        results = replay(calls, args.device, args.sdpa)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"calls": str(args.calls), "sdpa": args.sdpa, "results": results}, indent=1))
        bad = [e for e in results if not e["ok"]]
        verdict = f"FAILED at {bad[0]['op']} {bad[0]['inputs']}: {bad[0]['error']}" if bad else "all ran"
        print(f"[replay] {len(results)} calls, {verdict}")
        return 1 if bad else 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = update_check(args.config, overrides, args.device, args.sdpa, args.repeats)
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - the record of the failure is the result
        traceback.print_exc()
        result = {"configs": args.config, "overrides": overrides, "sdpa": args.sdpa, "ok": False,
                  "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"[update] {' '.join(args.config + overrides)} sdpa={args.sdpa}: "
          f"{'ok' if result['ok'] else result['error'].splitlines()[0]}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
