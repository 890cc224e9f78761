"""`keelgraph ask` stops at a ticket that needs approval; `keelgraph approve` decides, in a new call."""

from __future__ import annotations

import functools
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from keelgraph.apps.support import desk as support
from keelgraph.commands.cli import EXIT_ERROR, EXIT_WAITING, main
from keelgraph.testing import ScriptedChatModel, answer, call

ASK = '{"message": "My keyboard from order 1002 arrived damaged"}'


@pytest.fixture
def data(_data_dir: Path) -> Path:
    return _data_dir


def _script(monkeypatch: pytest.MonkeyPatch, script: list[Any]) -> None:
    model = ScriptedChatModel(script)
    monkeypatch.setattr(support, "make_graph", functools.partial(support.make_graph, model=model))


def _tickets(data: Path) -> list[tuple[Any, ...]]:
    return sqlite3.connect(data / "shop.db").execute("SELECT order_id, note FROM tickets").fetchall()


def test_ask_waits_then_approve_with_an_edit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    _script(
        monkeypatch,
        [
            call("open_ticket", order_id=1002, kind="damaged", note="keyboard damaged"),
            answer(reply="I opened ticket 1 for order 1002.", order_ids=[1002]),
        ],
    )
    assert main(["ask", "--json", "--thread", "t", ASK]) == EXIT_WAITING
    out, err = capsys.readouterr()
    waiting = json.loads(out)
    assert waiting["status"] == "waiting" and waiting["interrupts"][0]["calls"][0]["name"] == "open_ticket"
    assert "keelgraph approve --thread t" in err
    assert _tickets(data) == []  # nothing happened while waiting
    assert main(["approve", "--json", "--thread", "t", "--edit", '{"note": "keys broken, box crushed"}']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["output"]["ticket_id"] == 1
    assert _tickets(data) == [(1002, "keys broken, box crushed")]
    assert main(["approve", "--thread", "t"]) == EXIT_ERROR  # nothing waits any more
    assert "is not waiting for a person's decision" in capsys.readouterr().err


def test_approve_reject(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    _script(
        monkeypatch,
        [
            call("open_ticket", order_id=1002, kind="damaged", note="damaged"),
            answer(reply="A colleague will look at order 1002 first.", order_ids=[1002]),
        ],
    )
    assert main(["ask", "--json", "--thread", "t", ASK]) == EXIT_WAITING
    capsys.readouterr()
    assert main(["approve", "--json", "--thread", "t", "--reject", "send a photo first"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["output"]["action"] == "none"
    assert _tickets(data) == []
    assert main(["approve", "--thread", "t", "--edit", "{not json"]) == EXIT_ERROR
