"""The compiled denoiser (``compile: true``): same survivors and log-probs as eager, no recompiles after warm-up.

Compiled with ``aot_eager`` (dynamo's tracing and AOT autograd, no code generation): the same graph
capture, guards and recompilation behaviour as inductor at a fraction of the compile time on a
2-core CPU. Inductor's own numerics (fused kernels, so float rounding differs from eager) are
measured by ``benchmarks/compile_cost.py`` (max |log-ratio| in ``docs/benchmarks.md``).
"""

import pytest
import torch

from pro_grpo_lightning.backends.flux import TinyFluxBackend
from pro_grpo_lightning.backends.sd3 import TinySD3Backend
from pro_grpo_lightning.backends.sd15 import TinySD15Backend
from pro_grpo_lightning.compiling import DenoiserCompiler
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout, RolloutSettings
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings, grpo_update
from tests.fakes import MeanPixel

PROMPTS = ["a cat", "two dogs"]
BACKENDS = {"sd15": TinySD15Backend, "sd3": TinySD3Backend, "flux": TinyFluxBackend}
#: compiled vs eager log-probs (aot_eager runs the same kernels as eager: only summation order may differ)
ATOL = 1e-5


def build(name, **kwargs):
    backend = BACKENDS[name](num_steps=3, resolution=32, **kwargs)
    backend.configure_model()
    return backend


def rollout_of(backend, schedule=None, **settings):
    schedule = schedule or ProGRPOSchedule(4, [0], [2])
    return ExpandPruneRollout(backend, RewardSet([MeanPixel()]), schedule, RolloutSettings(**settings))


def rescored_log_probs(backend, result):
    """Every stored transition of ``result`` re-scored by ``backend`` in one batch: [N, T]."""
    N, T = result.log_probs.shape
    traj = torch.arange(N).repeat_interleave(T)  # [N*T]
    step = torch.arange(T).repeat(N)  # [N*T]
    cond = {k: v.index_select(0, result.prompt_index[traj]) for k, v in result.cond.items()}
    with torch.no_grad():
        out = backend.step(result.latents[traj, step], step, cond, next_latents=result.latents[traj, step + 1])
    return out.log_prob.view(N, T)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_compiled_rollout_matches_eager_and_rescoring(name):
    eager, compiled = build(name), build(name, compile=True, compile_backend="aot_eager")
    assert compiled.compiler is not None and eager.compiler is None
    runs = [rollout_of(b).run(PROMPTS, torch.Generator().manual_seed(0)) for b in (eager, compiled)]
    assert compiled.compiler.graphs >= 2  # the expanded and the pruned batch, each its own graph
    for a, b in zip(runs[0].checkpoints, runs[1].checkpoints):
        assert torch.equal(a.kept, b.kept)  # the same survivors
    torch.testing.assert_close(runs[1].log_probs, runs[0].log_probs, rtol=0, atol=ATOL)
    torch.testing.assert_close(runs[1].latents, runs[0].latents, rtol=0, atol=ATOL)
    # the compiled rollout's recorded log-probs against an eager re-scoring of its own transitions
    trainable = eager.trainable_steps()  # [T] bool: a flow model's last step has no log-prob
    ratio = (rescored_log_probs(eager, runs[1]) - runs[1].log_probs)[:, trainable]
    assert ratio.abs().max() < ATOL
    assert compiled.compile_metrics()["compile/graphs"] == compiled.compiler.graphs
    assert eager.compile_metrics() == {}


def test_no_recompilation_after_warmup_across_pruning_chunks_update_and_checkpointing():
    """Warm-up: one pruned rollout (5 -> 3 -> 2 rows in chunks of 2, so remainder chunks too), one
    audit rollout and one update with a KL reference (adapter off) under gradient checkpointing.
    Then every later rollout and update only looks graphs up: with the public ``fail_on_recompile``
    stance a new compilation would raise, and our own count stays where it was."""
    backend = build("sd3", compile=True, compile_backend="aot_eager", gradient_checkpointing=True)
    rollout = rollout_of(backend, ProGRPOSchedule(5, [0, 1], [3, 2]), sample_batch_size=2)
    settings = UpdateSettings(train_batch_size=2, kl_beta=0.1)
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.1)

    def iteration(seed, audit=False):
        res = rollout.run(PROMPTS[:1], torch.Generator().manual_seed(seed), audit=audit)
        adv = torch.linspace(-1, 1, res.log_probs.shape[0])  # [N]
        return grpo_update(backend, res, adv, settings, opt, generator=torch.Generator().manual_seed(seed))

    iteration(0)
    iteration(0, audit=True)
    warm = backend.compiler.graphs
    # rollout chunks of 2 and 1 trajectories (x2 rows: CFG); update minibatches of 2 with grad and
    # for the reference without: one graph each, no graph breaks
    assert sorted(shape[0] for shape in backend.compiler.shapes) == [2, 4, 4, 4]
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for seed in (1, 2):
            stats = iteration(seed, audit=seed == 2)
            assert stats["steps"] == 1 and stats["grad_norm"] > 0
    finally:
        torch.compiler.set_stance("default")
    assert backend.compiler.graphs == warm


def test_compile_backend_is_checked_before_any_model_loads():
    with pytest.raises(ValueError, match="compile_backend='no_such'"):
        TinySD3Backend(compile=True, compile_backend="no_such")
    assert DenoiserCompiler("aot_eager").metrics() == {"compile/graphs": 0.0}


@pytest.mark.heavy
def test_compiled_ddp_run_matches_the_eager_single_process_run(tmp_path):
    """Two gloo ranks with the compiled denoiser (aot_eager) train the same LoRA as one eager process
    with the same global batch (as ``test_ddp.py`` checks for eager ranks), and compile nothing after
    the first rollout. Outside the default suite (4 compiling processes' worth of CPU): ``-m heavy``."""
    import os
    import subprocess
    import sys

    from pro_grpo_lightning.cli import main
    from tests.cli_runs import ROOT, run_metrics
    from tests.test_ddp import run_args

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    compiled = ["--model.backend.init_args.compile=true", "--model.backend.init_args.compile_backend=aot_eager"]
    with open(tmp_path / "ddp.log", "w") as log:
        ddp = subprocess.Popen(
            [sys.executable, "-m", "pro_grpo_lightning", "fit", *run_args(tmp_path, "ddp"), *compiled,
             "--data.prompts_per_step", "1", "--trainer.strategy", "ddp", "--trainer.devices", "2",
             "--trainer.accelerator", "cpu"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            main(["fit", *run_args(tmp_path, "single"), "--data.prompts_per_step", "2"])
            ddp.wait(timeout=900)
        finally:
            ddp.kill()
    assert ddp.returncode == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    single = torch.load(tmp_path / "single/ckpt/last.ckpt", weights_only=False)["state_dict"]
    two = torch.load(tmp_path / "ddp/ckpt/last.ckpt", weights_only=False)["state_dict"]
    assert set(single) == set(two)
    for k, v in single.items():
        torch.testing.assert_close(two[k], v, rtol=0, atol=2e-6)
    graphs = [float(r["compile/graphs"]) for r in run_metrics(tmp_path / "ddp", "compile/graphs")]
    assert len(graphs) == 2 and graphs[0] > 0 and graphs[1] == graphs[0]  # nothing compiled after rollout 1
