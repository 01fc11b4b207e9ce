"""notebooks/quickstart.ipynb runs headless (shortened): a reward curve, held-out scores through
``trainer.validate``, before/after images through ``trainer.predict``, all shown inline."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_committed_notebook_has_its_outputs_saved():
    """What a reader opens on GitHub: the executed outputs, images included."""
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    outputs = _outputs(nb)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # before/after, one sheet, the curve
    assert "held-out shapes_exact" in "".join(o.get("text", "") for o in outputs)


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
    out = "".join(o.get("text", "") for o in outputs)
    assert "rollouts: 2" in out
    assert "held-out shapes_exact" in out and "(8 samples, same noise)" in out  # 2 prompts x 4 images
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # inline, not written by Agg
    assert (tmp_path / "logs" / "notebook_csv").exists()
    for stage in ("before", "after"):  # predict's files: 2 prompts x 4 PNGs, sheets, table
        folder = tmp_path / "logs" / "notebook_predict" / stage
        assert len(list(folder.glob("*/*.png"))) == 8 and (folder / "contact_sheet.png").exists()
        assert "(8 images, 2 prompts)" in (folder / "scores.md").read_text()
