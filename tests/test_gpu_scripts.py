"""benchmarks/gpu/memory_check.py: the same code path as the GPU run, on a tiny config on CPU, and the
comparison table from stored results."""

import json

import pytest

from benchmarks.gpu import memory_check


def test_smoke_variant_runs_through_a_trainer(tmp_path):
    memory_check.main(["--smoke", "--in-process", "--only", "tiny_flux", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "tiny_flux.json").read_text())
    assert r["iterations"] == 1 and r["global_step"] == 1 and len(r["seconds_per_iteration"]) == 1
    assert r["precision"] == "32-true" and r["overrides"] == memory_check.LEVERS_ON
    assert r["logged"]["compute/nfe"] > 0  # a real rollout ran
    assert not (tmp_path / "tiny_flux.error.txt").exists()


def test_compare_divides_measured_by_planned(tmp_path):
    variants = {"a": (["configs/x.yaml"], [], 1), "b": (["configs/y.yaml"], ["--z"], 1)}
    g = 2**30
    (tmp_path / "a.plan.json").write_text(json.dumps({"peak": 4 * g}))
    (tmp_path / "a.json").write_text(json.dumps({"peak_allocated": 3 * g, "peak_reserved": 5 * g,
                                                 "seconds_per_iteration": [2.0, 1.5]}))
    (tmp_path / "b.plan.json").write_text(json.dumps({"peak": 2 * g}))
    (tmp_path / "b.error.txt").write_text("RuntimeError: boom\n\ntraceback")
    rows = memory_check.compare(tmp_path, variants).splitlines()
    assert rows[2] == "| a | x.yaml  | 4.00 | 3.00 | 0.75 | 5.00 | 2.0, 1.5 |  |  |"
    assert rows[3].startswith("| b | y.yaml --z | 2.00 | RuntimeError: boom |")


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        memory_check.main(["--only", "nope", "--out", "x"])


# ---- benchmarks/gpu/kernel_calls.py: the GEMM / attention calls of an update, against kernel limits ----
from benchmarks.gpu import kernel_calls  # noqa: E402


def _record(fn):
    rec = kernel_calls.KernelCalls()
    with rec:
        fn()
    return rec.calls


def test_limit_violations_flag_each_limit_and_pass_small_calls():
    import torch

    big = torch.empty(2**16, 2**15 + 1, device="meta", dtype=torch.bfloat16)  # 2^31 + 2^16 elements
    (call,) = _record(lambda: torch.mm(big, torch.empty(2**15 + 1, 8, device="meta", dtype=torch.bfloat16)))
    assert call["gemm"] == {"m": 2**16, "n": 8, "k": 2**15 + 1, "batch": 1, "lda": 2**15 + 1, "ldb": 8}
    assert call["violations"] == [f"in[0] numel {2**31 + 2**16} > 2^31-1"]
    (call,) = _record(lambda: torch.bmm(torch.empty(70000, 2, 3, device="meta"), torch.empty(70000, 3, 4, device="meta")))
    assert call["violations"] == ["gemm batch 70000 > 65535"]
    wide = torch.empty(4, 2**31, device="meta", dtype=torch.bfloat16)[:, :8]  # 32 elements, a span past 2^31
    (call,) = _record(lambda: torch.mm(wide.t(), torch.empty(4, 4, device="meta", dtype=torch.bfloat16)))
    assert call["violations"] == [f"in[0] span {3 * 2**31 + 8} > 2^31-1", f"gemm lda {2**31} > 2^31-1"]
    (call,) = _record(lambda: torch.mm(torch.empty(8, 4, device="meta"), torch.empty(4, 2, device="meta")))
    assert call["violations"] == [] and call["phase"] == "forward"
    attention = {"inputs": [], "outputs": [], "attention": {"batch": 3000, "heads": 24}}
    assert kernel_calls.limit_violations(attention) == ["attention batch x heads 72000 > 65535"]


def test_shipped_flux_update_issues_no_call_beyond_a_kernel_limit():
    """The FLUX.1-dev config's update minibatch (one block of each stack, real widths) on fake tensors:
    every GEMM and attention call of its forward and backward (gradient checkpointing's recompute
    included) within every limit, all in bf16 under bf16-mixed, and nothing of the timestep / guidance
    embedding in the backward; the rollout call (which ran on the GPU) is the larger one."""
    result = kernel_calls.trace(["configs/flux_dev_pickscore_pro_grpo.yaml"])
    summary = kernel_calls.summarize(result)
    assert result["gradient_checkpointing"] and result["train_batch_size"] == 2 and result["precision"] == "bf16-mixed"
    back = [c for c in result["calls"] if c["phase"] == "backward"]
    assert sum("gemm" in c for c in back) > 50 and any("attention" in c and "backward" in c["op"] for c in back)
    recomputed = [c for c in back if c["op"] == "aten.addmm.default" or ("attention" in c and "backward" not in c["op"])]
    assert recomputed  # the checkpointed blocks' forward ops, recomputed in the backward
    for phase in ("rollout", "forward", "backward"):
        assert summary[phase]["violations"] == []
    assert {s["dtype"] for c in result["calls"] if "gemm" in c for s in c["inputs"]} == {"bfloat16"}
    modules = summary["forward"]["grad_by_module"]
    assert modules["time_text_embed"]["calls"] > 0 and modules["time_text_embed"]["requires_grad"] == 0
    assert modules["single_transformer_blocks"]["requires_grad"] > 0  # the LoRA path: the backward flows there
    assert summary["rollout"]["largest"]["tensor numel"]["value"] > 4 * summary["backward"]["largest"]["tensor numel"]["value"]


def test_update_check_and_replay_run_on_cpu(tmp_path):
    """The GPU checks' code paths at toy size on CPU: one real update minibatch, and the replay of
    every distinct call of a trace."""
    r = kernel_calls.update_check(["configs/tiny_flux.yaml"], [], "cpu", repeats=1)
    assert r["minibatches"] == 1 and r["grad_tensors"] > 0 and r["finite_grad_norm"]
    result = kernel_calls.trace(["configs/tiny_flux.yaml"])
    distinct = kernel_calls.distinct_calls(result["calls"])
    assert 0 < len(distinct) < len(result["calls"])
    replayed = kernel_calls.replay(result["calls"], device="cpu")
    assert len(replayed) == len(distinct) and all(e["ok"] for e in replayed)


def test_allocator_variants_derive_from_the_table(tmp_path, capsys):
    """``NAME+expandable+capNN`` runs the table's NAME with the allocator settings; ``--unmeasured``
    leaves out what has a result; a derived variant compares against its table variant's plan."""
    assert memory_check.allocator_settings("sd35m_pro+expandable+cap80") == (
        {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, 80.0)
    assert memory_check.allocator_settings("flux_pro") == ({}, None)
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        memory_check.allocator_settings("flux_pro+nope")
    table = memory_check.with_derived(memory_check.VARIANTS, memory_check.DERIVED)
    assert all(table[n] == memory_check.VARIANTS[n.split("+")[0]] for n in memory_check.DERIVED)
    (tmp_path / "flux_pro.json").write_text("{}")
    memory_check.main(["--unmeasured", str(tmp_path), "--list"])
    listed = capsys.readouterr().out.split()
    assert "flux_pro" not in listed and "sd15_hps_pro" in listed and "sd35m_pro+cap80" in listed
    memory_check.main(["--only", "flux_pro+expandable", "--list"])
    assert capsys.readouterr().out.split() == ["flux_pro+expandable"]
    g = 2**30
    (tmp_path / "a.plan.json").write_text(json.dumps({"peak": 4 * g}))
    (tmp_path / "a+cap80.json").write_text(json.dumps({
        "peak_allocated": 3 * g, "peak_reserved": 3.5 * g, "seconds_per_iteration": [2.0],
        "device_used_after_each_iteration": [4 * g], "alloc_retries": 2}))
    rows = memory_check.compare(tmp_path, {"a+cap80": (["configs/x.yaml"], [], 1)}).splitlines()
    assert rows[2] == "| a+cap80 | x.yaml  | 4.00 | 3.00 | 0.75 | 3.50 | 2.0 | 4.0 | 2 |"


# ---- benchmarks/gpu/session_results.py and session.sh: the archive back into docs/results ----------------
import subprocess  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.gpu import session_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _archive(tmp_path, files):
    res = tmp_path / "res"
    for name, text in files.items():
        (res / name).parent.mkdir(parents=True, exist_ok=True)
        (res / name).write_text(text if isinstance(text, str) else json.dumps(text))
    path = tmp_path / "results.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(res, arcname=".")
    return path


def test_session_results_writes_tables_from_the_archive(tmp_path):
    g = 2**30
    archive = _archive(tmp_path, {
        "gpu.txt": "name, memory.total [MiB], driver_version\nNVIDIA H100 80GB HBM3, 81559 MiB, 580\n",
        "git_commit.txt": "abc123\n",
        "stages.tsv": "stage\texit\tseconds\tleft\nflux_check\t1\t150\t330\nrun_all\tskipped\t0\t40\n",
        "flux_check/replay.json": {"calls": "c.json", "sdpa": None, "results": [
            {"index": 0, "op": "aten.mm.default", "phase": "forward", "module": "m", "inputs": [], "ok": True},
            {"index": 1, "op": "aten.addmm.default", "phase": "backward", "module": None,
             "inputs": [[[2, 3], [3, 1], 0, "bfloat16"]], "ok": False, "error": "RuntimeError: CUBLAS boom"}]},
        "flux_check/update.json": {"overrides": [], "sdpa": None, "ok": False, "error": "RuntimeError: CUBLAS x\ntb"},
        "flux_check/update_no_kl.json": {"overrides": ["--model.update.kl_beta=0"], "sdpa": None, "ok": True,
                                         "peak_allocated": 30 * g, "seconds": [1.5, 1.25]},
        "fsdp/fsdp_smoke.json": {"tested_strategy": "fsdp", "ok": True, "steps_compared": [0, 1],
                                 "max_relative_difference": {"train/loss": 1e-6}, "adapter_max_abs_difference": 0.0,
                                 "runs": [{"returncode": 0}, {"returncode": 0}]},
        "memory/sd15_hps_pro.json": {"peak_allocated": 20 * g, "peak_reserved": 24 * g,
                                     "seconds_per_iteration": [9.0], "device_used_after_each_iteration": [25 * g],
                                     "alloc_retries": 0},
        "memory/flux_pro+cap80.error.txt": "OutOfMemoryError: CUDA out of memory\n\ntraceback",
    })
    into = tmp_path / "docs" / "gpu_session"
    assert session_results.main([str(archive), "--into", str(into)]) == 0
    text = (into / "README.md").read_text()
    assert "Device: NVIDIA H100 80GB HBM3, 81559 MiB, 580; commit abc123" in text
    assert "| flux_check | 1 | 150 | 330 |" in text and "| run_all | skipped | 0 | 40 |" in text
    assert "**failed at call 1**, `aten.addmm.default` (backward, backward)" in text and "CUBLAS boom" in text
    assert "| update | (as shipped) | default | **RuntimeError: CUBLAS x** |  |  |" in text
    assert "| update_no_kl | --model.update.kl_beta=0 | default | ok | 30.00 | 1.50, 1.25 |" in text
    assert "**agree**" in text and "## Cost tables\n\nNot run in this session." in text
    plan = json.loads((ROOT / "docs/results/gpu_memory/sd15_hps_pro.plan.json").read_text())["peak"] / g
    assert f"| sd15_hps_pro | sd15_hps_pro_grpo.yaml  | {plan:.2f} | 20.00 |" in text
    assert "| flux_pro+cap80 | flux_dev_pickscore_pro_grpo.yaml  |" in text and "OutOfMemoryError" in text
    assert (into / "flux_check" / "update.json").exists()  # the raw files stay beside the README
    assert session_results.main([str(archive), "--into", str(into)]) == 2  # never over a filled folder
    assert session_results.main([str(tmp_path / "nope.tgz"), "--into", str(tmp_path / "x")]) == 2


@pytest.mark.session
def test_session_script_smoke_end_to_end(tmp_path):
    """``SMOKE=1 benchmarks/gpu/session.sh``: every stage on CPU at toy size, then its archive read back.
    Minutes on a busy 2-core machine: outside the default suite (``pytest -m session``)."""
    out = tmp_path / "out"
    env = {**__import__("os").environ, "SMOKE": "1", "PYTHON": __import__("sys").executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/session.sh"), str(out), "2400"], env=env,
                          capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    into = tmp_path / "read"
    assert session_results.main([str(out / "results.tgz"), "--into", str(into)]) == 0
    text = (into / "README.md").read_text()
    for stage in ("flux_check", "run_all", "fsdp", "memory", "compile"):
        assert f"| {stage} |" in text
    assert "all " in text and "| update | (as shipped) | default | ok |" in text  # the tiny FLUX check ran
    assert "**agree**" in text  # ddp vs the plain strategy on CPU
    assert "| tiny_sd3 |" in text and "| tiny_sd3+expandable+cap80 |" in text
    assert "| compile | 0 |" in text and "| tiny_sd3+compiled |" in text  # the backends' compile option


def test_plan_output_says_what_the_caching_allocator_adds(capsys):
    from pro_grpo_lightning import plan

    assert plan.main(["--config", "configs/tiny_sd3.yaml", "--gpu_memory", "2GB"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"note: {plan.allocator_note()}" and "expandable_segments:True" in last


def test_fsdp_smoke_verdict_needs_equal_logs_and_adapters(tmp_path):
    """The FSDP smoke's comparison (the runs themselves need CUDA; ``pytest -m session`` runs the
    script's CPU path): every key within tolerance at the common steps, both exits clean, and the
    exported adapters equal."""
    import torch
    from safetensors.torch import save_file

    from benchmarks.gpu import fsdp_smoke

    steps = {0: {"train/policy_loss": -0.5, "train/grad_norm": 0.2, "reward/mean": 0.5},
             1: {"train/policy_loss": -0.4, "train/grad_norm": 0.3, "reward/mean": 0.6}}
    plain = {"returncode": 0, "steps": steps}
    same = fsdp_smoke.compare(plain, {"returncode": 0, "steps": {k: dict(v) for k, v in steps.items()}}, 1e-3)
    assert same["ok"] and same["steps_compared"] == [0, 1]
    moved = {k: dict(v) for k, v in steps.items()}
    moved[1]["train/grad_norm"] = 0.31
    assert not fsdp_smoke.compare(plain, {"returncode": 0, "steps": moved}, 1e-3)["ok"]
    assert not fsdp_smoke.compare(plain, {"returncode": -1, "steps": steps}, 1e-3)["ok"]
    for name, value in (("a", 1.0), ("b", 1.0), ("c", 1.5)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((2, 2), value)}, str(tmp_path / name / "adapter.safetensors"))
    assert fsdp_smoke.adapter_difference(tmp_path / "a", tmp_path / "b") == 0.0
    assert fsdp_smoke.adapter_difference(tmp_path / "a", tmp_path / "c") == 0.5
    assert fsdp_smoke.adapter_difference(tmp_path / "a", tmp_path / "missing") is None
