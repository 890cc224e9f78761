"""Every notebook runs top to bottom against the real model, so the docs cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"


def _text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed, in order."""
    return "\n".join(
        str(out.get("text", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def _check_quickstart(text: str) -> None:
    # The graph, as mermaid text.
    assert "validate_input" in text and "check_output" in text
    # Two turns and the bad request: each prints its status, whatever the small model did.
    assert text.count("status:") == 3
    assert text.count("status: rejected") == 1
    # The rejection names each field, what is wrong and the fix.
    assert re.search(r"^- member_id: Input should be a valid integer.*  ->  \S", text, re.MULTILINE)
    assert re.search(r"^- question: String should have at least 1 character.*  ->  \S", text, re.MULTILINE)
    # The persisted thread: both requests, the preloads and the rejected request were kept.
    assert text.count("| request    ]") == 2
    assert text.count("calls loans({'member_id': 1})") == 2
    assert "| rejected   ]" in text


CHECKS = {"01_quickstart.ipynb": _check_quickstart}


def test_every_notebook_is_checked() -> None:
    assert NOTEBOOKS, "no notebooks found"
    assert sorted(CHECKS) == [p.name for p in NOTEBOOKS]


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
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails.
    NotebookClient(
        nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    CHECKS[path.name](_text(nb))
