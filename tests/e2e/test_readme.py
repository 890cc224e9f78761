"""The README's Python example runs as written, against the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import keelgraph

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_python_example(model_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(blocks) == 3  # the second, a served-graph client, runs in tests/e2e/test_served_auth.py,
    # the third (long-term memory) in tests/test_memory.py
    monkeypatch.setenv("KEELGRAPH_BASE_URL", model_server)
    monkeypatch.setenv("KEELGRAPH_MODEL", "qwen2.5-coder-0.5b-instruct")
    monkeypatch.setenv("KEELGRAPH_OUTPUT_STRATEGY", "json_object")
    namespace: dict[str, object] = {}
    try:
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    except keelgraph.RunError as error:  # the README promises an answer here, not a typed failure
        pytest.fail(f"the README example ended typed but not ok: {error}")
    forecast = namespace["forecast"]
    assert isinstance(forecast, namespace["Forecast"])  # type: ignore[arg-type]
    assert forecast.celsius == 21  # type: ignore[attr-defined]
