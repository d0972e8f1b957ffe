"""Re-execute the notebooks in place, keeping their outputs, so that a reader of the repository sees them.

    python notebooks/execute.py                 # every notebook, at the quick size
    GEOMETRY_DEMO_DIR=demo-report python notebooks/execute.py 03_demo_figures.ipynb   # on a full demo's output

Each notebook runs in a fresh kernel in a temporary directory; figures are inline PNGs at a modest
resolution (the inline backend's 72 dpi), so the committed files stay small. CI executes them again
(tests/test_notebooks.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def _kept(outputs: list) -> list:
    """A reader's outputs: no stderr (progress bars, library warnings), and a figure that the inline backend
    displayed and the cell also returned shown once."""
    shown = [o for o in outputs if not (o.output_type == "stream" and o.get("name") == "stderr")]
    returned = {o.data.get("image/png") for o in shown if o.output_type == "execute_result" and "data" in o}
    return [o for o in shown
            if not (o.output_type == "display_data" and o.get("data", {}).get("image/png") in returned)]


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("GEOMETRY_QUICK", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)  # no run-specific noise in the diff
        if cell.cell_type == "code":
            cell.outputs = _kept(cell.outputs)
    nbformat.write(nb, path)
    print(f"executed {path.name} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        execute(HERE / name)
