"""Execute notebooks/quickstart.ipynb with its defaults and save its outputs in place.

    HF_HUB_OFFLINE=1 python scripts/run_notebook.py [--timeout 3600]

The notebook runs in a temporary working directory (its ``logs/`` go there). Its last cell prints
the wall and CPU time of each part of the run; ``tests/test_notebook.py`` reads the saved outputs.
Stream outputs are saved as a notebook front end shows them (``coalesce_streams``: one stream per
cell, a progress bar's redraws after a carriage return collapsed to its last frame).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    with tempfile.TemporaryDirectory() as work:
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3", coalesce_streams=True,
                       resources={"metadata": {"path": work}}).execute()
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
