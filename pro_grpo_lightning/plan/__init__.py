"""A memory plan: will this config fit on this GPU, and if not, what to change first.

``pro-grpo plan --config configs/X.yaml [--gpu_memory 48GB] [--json]`` (or ``python -m
pro_grpo_lightning plan ...``): the fit on 24 / 40 / 80 GiB cards (and ``--gpu_memory``), in GiB.

The package: ``tracking.py`` (counting bytes, building a run without weights, the denoiser's block
stacks), ``calls.py`` (the library's calls traced: ``TracedCalls``), ``planner.py`` (the phases and
levers: ``Planner``), ``report.py`` (the command, its text, JSON and the README's fit table).

No GPU and no weights are needed. The run is built from its YAML as ``fit`` builds it, with
``NetworkSource("empty")`` (``networks.py``): every network (denoiser, VAE, text encoders, reward
models) is built by the library on the ``meta`` device, from the code that builds it (tiny
models), from a local folder's ``config.json`` files, or from the architecture numbers of
``architectures.py`` (hub ids), then turned into fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): shapes, dtypes and devices without storage.
The library's own functions then run on them (``backend.step``, the rollout's
``decode_and_score``, the reward set, the update's ``minibatch_loss`` with its backward), and ``LiveBytes``, a ``TorchDispatchMode``, adds up the bytes
of every storage an op creates and subtracts them when Python frees the storage: the peak of that
sum is the extra memory the call needs on top of what existed before (weights, stored rollout).

Checked against measurement (``tests/test_plan.py``): on the CPU the same calls on real weights,
measured by the allocator's own events (``torch.profiler`` memory events), peak within 2% of the
plan (+ 16 KiB) for the tiny models and the ``mini`` architectures, and equal to it for one
denoiser call and one update minibatch of the real SD1.5 and SD3.5-M (docs/results/real_architectures).
The CPU target (``target="cpu"``) adds what convolutions and 16-bit matrix products allocate
inside themselves (oneDNN's weight copies: not ops, so no trace sees them), measured once per op
signature on real zeros (``CpuWorkspace``). On a GPU the plan is an
estimate of
``torch.cuda.max_memory_allocated``: allocations are rounded to the CUDA caching allocator's 512 B
blocks, and ``RUNTIME_OVERHEAD`` (CUDA context, cuBLAS workspace, allocator fragmentation) is
added before comparing with a card's memory. What is not modelled: Lightning's ``bf16-mixed``
autocast copies (the frozen weights are already bf16; only the small LoRA weights are cast), the
workspaces of cuDNN's convolutions and of the attention kernel on GPU (the plan traces PyTorch's
CPU flash-attention path, which like the GPU flash / memory-efficient kernels never materialises
the attention matrix).

Phases (each: resident weights + what lives through the phase + the call's transient peak):
    encode prompts         text encoders on the device (offloaded ones too, while they encode)
    rollout denoiser call  the stored trajectory so far + one denoiser call on ``sample_batch_size``
                           rows (CFG doubles the network batch inside the call)
    rollout previews       x0 previews decoded and scored (``sample_batch_size`` rows per decode and
                           per reward call, ``decode_chunk`` per VAE call inside a decode)
    rollout final          final images decoded and scored (the same), survivors' trajectories gathered
    audit rollout          the same with the whole group alive (``audit_every_n_rollouts``)
    update minibatch       the stored rollout + LoRA gradients + forward and backward of
                           ``train_batch_size`` (trajectory, step) pairs (+ the reference forward
                           when ``kl_beta > 0``), with and without gradient checkpointing

The plan's cost is its traces (``Planner.traces`` counts them; each runs one library call op by op,
~0.1 ms per op), so every figure is made of a few small ones:

- rows: denoiser calls, update minibatches, decodes in one VAE call and reward calls are traced at
  1 and 2 rows and extrapolated linearly (``Planner._linear``: every activation is [batch, ...]),
  so every row count of the schedule and every chunk size a lever tries is free; a decode in
  ``decode_chunk`` chunks is extrapolated in the number of chunks (``Planner.decode``), and a
  decode + reward split by ``sample_batch_size`` is assembled from those (``Planner.score``);
- depth: the denoiser's calls are traced on shallow copies of it, one block of every run of
  identical blocks (``block_stacks``: SD3.5-M's 13 + 10 + 1, FLUX's 19 double and 38 single
  blocks), then one more block of each run in turn, and extended to full depth
  (``Depth.deep``); a UNet has no such run and is traced whole;
- prompt encoding is traced once when the planner is built, and a reward's traceability is
  checked only when a trace fails.

Rows per denoiser, decode and reward call come from ``--sample_batch_size``, else the run's
``model.rollout.sample_batch_size`` (None: all live rows). A reward whose scoring branches on pixel values
cannot run on fake tensors: its activations are left out, with a note in the output.
Levers (``Planner.levers`` / ``advice``): each lever alone, then the ones to pull in order until
the peak fits, those that leave the results unchanged first.
"""

from .calls import TRAINED, TRAINED_FULL, Settings, TracedCalls
from .planner import Lever, Phase, Planner
from . import report as report_module
from .report import CARDS, RUNTIME_OVERHEAD, allocator_note, fit_table, format_report, main, parse_memory, report
from .tracking import (CUDA_BLOCK, CpuWorkspace, GiB, LiveBytes, MiB, block_stacks, build_run, fake_backend, fake_reward,
                       measured_peak_bytes)

__all__ = ["CARDS", "CUDA_BLOCK", "CpuWorkspace", "allocator_note", "GiB", "Lever", "LiveBytes", "MiB", "Phase", "Planner", "RUNTIME_OVERHEAD", "Settings",
           "TRAINED", "TRAINED_FULL", "TracedCalls", "block_stacks", "build_run", "fake_backend", "fake_reward",
           "fit_table", "format_report", "main", "measured_peak_bytes", "parse_memory", "report"]
