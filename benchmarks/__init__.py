"""Benchmarks: what a rollout and a training iteration cost, Pro-GRPO vs plain GRPO vs static OVF.

One entry point per question (each prints a table and writes JSON + Markdown + PNG to ``--out``,
default ``benchmarks/results/<name>``):

    python -m benchmarks.rollout_cost     # one rollout: calls, wall time, floor, previews, memory
    python -m benchmarks.iteration_cost   # rollout + rewards + update: wall-time vs FLOP ratios
    python -m benchmarks.floor            # the denoiser alone across batch sizes; schedule floors
    python -m benchmarks.flops            # full-size FLOPs per call, counted on the meta device

CPU: the library's tiny models (default). GPU: ``benchmarks/gpu/run_all.sh OUT`` runs all of it on
the real-size SD1.5 / SD3.5-M / FLUX.1-dev architectures with random weights. See docs/benchmarks.md.
"""
