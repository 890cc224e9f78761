"""Every notebook runs top to bottom against the real model, so the docs cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


def _text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        str(out.get("text", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, model_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEELGRAPH_BASE_URL", model_server)
    monkeypatch.setenv("KEELGRAPH_MODEL", "qwen2.5-coder-0.5b-instruct")
    monkeypatch.setenv("KEELGRAPH_OUTPUT_STRATEGY", "json_object")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    text = _text(nb)
    if path.name == "01_quickstart.ipynb":
        assert "validate_input" in text and "check_output" in text
        assert text.count("status:") == 3
        assert "- member_id: Input should be a valid integer" in text
        assert "- question: String should have at least 1 character" in text
        assert "| rejected   ]" in text
