"""The CLI on any graph (`--graph module:factory`), its exit codes, `--version`, `--json`, `config`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from keelgraph import Contract, build_graph, sqlite_checkpointer
from keelgraph.commands import cli
from keelgraph.commands.cli import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_REJECTED,
    EXIT_USAGE,
    main,
)
from keelgraph.testing import ScriptedChatModel, answer


class Ask(BaseModel):
    city: str


class Reply(BaseModel):
    city: str


def echo_graph() -> Any:
    """A graph that is not the demo: answers with the city it was asked about."""
    from keelgraph.settings import Settings

    def step(messages: list[Any]) -> dict[str, Any]:
        asked = json.loads(str(messages[-1].content))
        return answer(city=asked["city"])

    return build_graph(
        Contract(input=Ask, output=Reply, instructions="Echo the city.", repair_budget=0),
        model=ScriptedChatModel([step], repeat_last=True),
        checkpointer=sqlite_checkpointer(Settings.from_env().data_dir / "echo.db"),
        store=None,
        strategy="json_object",
    )


def failing_graph() -> Any:
    return build_graph(
        Contract(input=Ask, output=Reply, instructions="Echo.", repair_budget=0),
        model=ScriptedChatModel(["not json"], repeat_last=True),
        checkpointer=None,
        strategy="json_object",
    )


GRAPH = "tests.test_cli:echo_graph"


@pytest.fixture(autouse=True)
def _data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEELGRAPH_DATA_DIR", str(tmp_path))


def test_every_exit_code_is_distinct_and_documented(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(EXIT_CODES) == len(set(EXIT_CODES)) == 8
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for code, what in EXIT_CODES.items():
        assert f"{code:>3}  {what}" in shown
    assert "KEELGRAPH_BASE_URL" in shown and "KEELGRAPH_DATABASE_URL" in shown


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "keelgraph 0.1.0"


@pytest.mark.parametrize("argv", [["bogus"], ["ask"], ["ask", "--thread", "t"], ["history"]])
def test_usage_errors_never_collide_with_outcomes(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == EXIT_USAGE != EXIT_REJECTED


def test_ask_and_history_on_a_graph_that_is_not_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ask", "--graph", GRAPH, "--thread", "e1", '{"city": "Oslo"}']) == 0
    assert json.loads(capsys.readouterr().out)["output"] == {"city": "Oslo"}
    assert main(["ask", "--graph", GRAPH, "--thread", "e1", '{"town": "Oslo"}']) == EXIT_REJECTED
    capsys.readouterr()
    assert main(["history", "--graph", GRAPH, "--thread", "e1", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["kind"] for line in lines] == ["request", "answer", "rejected"]
    assert main(["history", "--graph", GRAPH, "--thread", "nobody"]) == EXIT_NOT_FOUND


def test_a_failed_turn_and_a_bad_graph_spec_have_their_own_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["ask", "--graph", "tests.test_cli:failing_graph", "--thread", "f", '{"city": "x"}'])
        == EXIT_FAILED
    )
    assert main(["ask", "--graph", "tests.no_such_module:g", "--thread", "f", "{}"]) == EXIT_ERROR
    assert "cannot import tests.no_such_module" in capsys.readouterr().err


def test_config_shows_the_effective_settings_without_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEELGRAPH_API_KEY", "sk-secret")
    monkeypatch.setenv("KEELGRAPH_MODEL", "m1")
    assert main(["config", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] == "m1" and shown["api_key"] == "set"
    assert "sk-secret" not in json.dumps(shown)
    assert cli.DEFAULT_GRAPH == "keelgraph.apps.support.desk:make_graph"
