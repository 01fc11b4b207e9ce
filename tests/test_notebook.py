"""notebooks/quickstart.ipynb runs headless (shortened), reports a reward curve and held-out scores."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("QUICKSTART_STEPS", "2")
    monkeypatch.setenv("QUICKSTART_EVAL_PROMPTS", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "rollouts: 2" in out
    assert "held-out exact " in out and "(8 samples, same noise)" in out  # 2 prompts x 4 images
    assert (tmp_path / "logs" / "notebook_csv").exists()
    assert list((tmp_path / "logs" / "notebook_csv").glob("*/reward_curve.png"))
