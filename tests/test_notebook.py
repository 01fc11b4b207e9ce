"""notebooks/quickstart.ipynb: its saved outputs show learning (held-out scores before/after, a
reward curve, the same prompts drawn before and after), and it runs headless (shortened)."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs)


def test_committed_notebook_shows_learning():
    """What a reader opens on GitHub: the default run's executed outputs."""
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    outputs = _outputs(nb)
    text = _text(outputs)
    assert "30 rollouts, 12 held-out prompts x 4 images" in text  # the defaults, not a shortened run
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # before/after, the reward curve
    assert "IProgress" not in text and "Traceback" not in text
    shapes = re.search(r"held-out shapes +: (\d\.\d+) -> (\d\.\d+) +\(48 samples, same noise\)", text)
    assert shapes and float(shapes.group(2)) > float(shapes.group(1)), text[-2000:]  # the held-out score rose
    curve = re.search(r"mean reward of the first (\d+): (\d\.\d+), of the last \d+: (\d\.\d+)", text)
    assert curve and float(curve.group(3)) > float(curve.group(2))  # the training reward rose
    assert re.search(r"this run: \d+ s wall, \d+ s CPU", text)


@pytest.mark.xfail(strict=False, reason="open (issue 25): in a fresh kernel Lightning's 'GPU available' lines "
                   "and tqdm's IProgress warning still print; the notebook's filters run before Lightning sets its logger")
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    for cell in nb.cells:  # execute from scratch: no saved output may pass the checks below
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("QUICKSTART_STEPS", "2")
    monkeypatch.setenv("QUICKSTART_EVAL_PROMPTS", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = _outputs(nb)
    out = _text(outputs)
    assert "rollouts: 2;" in out and "rollout 2/2" in out  # the progress bar's last line
    assert "held-out shapes_exact" in out and "(8 samples, same noise)" in out  # 2 prompts x 4 images
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # inline, not written by Agg
    assert "IProgress" not in out and "GPU available" not in out
    assert (tmp_path / "logs" / "notebook_csv").exists()
