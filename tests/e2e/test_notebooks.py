"""Every notebook runs top to bottom against the real model, so the docs cannot rot.

Each notebook ends with a code cell of assertions about what it showed; a failing assertion (or any
failing cell) fails the test with the cell and its traceback. The committed copies carry their
outputs, so they read well on a code host without running them.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
EXPECTED = [
    "01_prompt_to_product.ipynb",
    "02_contracts.ipynb",
    "03_memory.ipynb",
    "04_tools.ipynb",
    "05_serving.ipynb",
    "06_production.ipynb",
]


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]


def test_the_six_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_with_outputs_and_closing_assertions(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code"
    # Run in order, top to bottom, and saved with what they printed.
    counts = [cell.get("execution_count") for cell in cells]
    assert all(isinstance(c, int) for c in counts), f"{path.name}: a code cell was saved without running"
    assert counts == sorted(counts), f"{path.name}: cells were run out of order ({counts})"
    assert any(cell.get("outputs") for cell in cells), f"{path.name}: saved without outputs"
    errors = [o for cell in cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: saved with an error output"
    # The last code cell checks what the notebook showed.
    assert "assert " in cells[-1].source, f"{path.name}: the last code cell must hold its assertions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, model_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no {KERNEL!r} Jupyter kernel: install ipykernel in this environment")
    # The kernel is a child process: it inherits these (and the per-test KEELGRAPH_DATA_DIR).
    monkeypatch.setenv("KEELGRAPH_BASE_URL", model_server)
    monkeypatch.setenv("KEELGRAPH_MODEL", "qwen2.5-coder-0.5b-instruct")
    monkeypatch.setenv("KEELGRAPH_OUTPUT_STRATEGY", "json_object")
    nb = nbformat.read(path, as_version=4)
    started = time.monotonic()
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    # (the closing assertions included).
    NotebookClient(
        nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    print(f"{path.name}: executed in {time.monotonic() - started:.1f} s")
