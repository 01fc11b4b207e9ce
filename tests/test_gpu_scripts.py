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
    assert rows[2] == "| a | x.yaml  | 4.00 | 3.00 | 0.75 | 5.00 | 2.0, 1.5 |"
    assert rows[3].startswith("| b | y.yaml --z | 2.00 | RuntimeError: boom |")


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        memory_check.main(["--only", "nope", "--out", "x"])
