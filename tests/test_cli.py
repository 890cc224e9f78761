"""The CLI on any graph (`--graph`), every exit code, `--version`, `--json`, `config`, install hints."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keelgraph.commands.cli import main
from keelgraph.commands.config import effective_variables, setting_variables
from keelgraph.commands.exits import ExitCode
from keelgraph.settings import install_hint
from tests import cli_graphs

ROOT = Path(__file__).parents[1]
NOTES = "tests.cli_graphs:notes"
TRIPS = "tests.cli_graphs:trips"


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KEELGRAPH_DATA_DIR", str(tmp_path))
    cli_graphs.SAVED.clear()
    return tmp_path


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    """The one JSON document a `--json` command printed: nothing else is on stdout."""
    return json.loads(capsys.readouterr().out)


def test_exit_codes_are_distinct_and_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert (int(ExitCode.USAGE), int(ExitCode.CRASH)) == (2, 1)  # argparse's and Python's own codes
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == ExitCode.OK
    shown = capsys.readouterr().out
    for code in ExitCode:
        assert f"{int(code):>3}  {code.meaning}" in shown
    for name in (*setting_variables().values(), "KEELGRAPH_USER", "KEELGRAPH_AUTH_TOKENS", "KEELGRAPH_LOG"):
        assert name in shown


def test_version_names_keelgraph_and_langgraph(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == ExitCode.OK
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"keelgraph {version('keelgraph')} (langgraph {version('langgraph')}, Python ")


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus"],
        ["ask"],
        ["ask", "--thread", "t"],
        ["history"],
        ["ask", "--thread", "t", "hi", "--input", "{}"],
    ],
)
def test_usage_errors_exit_2_and_collide_with_no_outcome(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == ExitCode.USAGE


def test_ask_approve_history_on_a_graph_that_is_not_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    # A plain message fills the contract's one text field.
    assert main(["ask", "--graph", NOTES, "--thread", "n", "hello"]) == ExitCode.OK
    assert "you wrote: hello" in capsys.readouterr().out
    # The write tool waits for a person (exit 4); a later call (a new graph, as a new process) decides.
    assert main(["ask", "--graph", NOTES, "--thread", "n", "save milk", "--json"]) == ExitCode.WAITING
    out, err = capsys.readouterr()
    waiting = json.loads(out)
    assert waiting["status"] == "waiting" and waiting["interrupts"][0]["calls"][0]["args"] == {"text": "milk"}
    assert f"keelgraph approve --graph {NOTES} --thread n" in err
    assert cli_graphs.SAVED == []
    assert main(["approve", "--graph", NOTES, "--thread", "n", "--json"]) == ExitCode.OK
    done = _json(capsys)
    assert done["status"] == "ok" and done["output"] == {"reply": "saved as note 1", "note_id": 1}
    assert cli_graphs.SAVED == ["milk"]
    # A rejected request (exit 6) is kept in the thread too.
    assert main(["ask", "--graph", NOTES, "--thread", "n", "--input", '{"txt": 1}']) == ExitCode.REJECTED
    assert "text: Field required" in capsys.readouterr().out
    assert main(["history", "--graph", NOTES, "--thread", "n", "--json"]) == ExitCode.OK
    kept = _json(capsys)
    assert kept["thread"] == "n" and kept["status"] == "rejected" and kept["interrupts"] == []
    kinds = [m["kind"] for m in kept["messages"]]
    assert kinds[:2] == ["request", "answer"] and kinds[-1] == "rejected"
    assert {"name": "save_note", "args": {"text": "milk"}} in [
        c for m in kept["messages"] for c in m["tool_calls"]
    ]
    assert main(["history", "--graph", NOTES, "--thread", "n"]) == ExitCode.OK
    assert "[human:request]" in capsys.readouterr().out
    assert main(["history", "--graph", NOTES, "--thread", "nobody"]) == ExitCode.NOT_FOUND


def test_approve_reject_and_the_thread_state_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ask", "--graph", NOTES, "--thread", "r", "save eggs"]) == ExitCode.WAITING
    capsys.readouterr()
    assert main(["history", "--graph", NOTES, "--thread", "r", "--json"]) == ExitCode.OK
    assert _json(capsys)["status"] == "waiting"
    assert main(["approve", "--graph", NOTES, "--thread", "r", "--edit", "{not json"]) == ExitCode.CONFIG
    assert "--edit is not JSON" in capsys.readouterr().err
    assert (
        main(["approve", "--graph", NOTES, "--thread", "r", "--reject", "no eggs", "--json"]) == ExitCode.OK
    )
    assert _json(capsys)["output"]["reply"] == "not saved" and cli_graphs.SAVED == []
    assert main(["approve", "--graph", NOTES, "--thread", "r"]) == ExitCode.CONFIG
    assert "is not waiting for a person's decision" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["tests.cli_graphs:notes_builder", "tests/cli_graphs.py:notes_served"])
def test_a_builder_or_a_served_graph_gets_the_default_checkpointer(
    spec: str, capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    assert main(["ask", "--graph", spec, "--thread", "s", "save tea"]) == ExitCode.WAITING
    # A file path, like langgraph.json's entries, and the same thread from another spelling of the graph.
    assert (
        main(["approve", "--graph", str(ROOT / "tests" / "cli_graphs.py") + ":notes", "--thread", "s"]) == 0
    )
    assert "saved as note" in capsys.readouterr().out
    assert (data_dir / "threads.db").exists()


def test_structured_input_goes_in_with_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        main(["ask", "--graph", TRIPS, "--thread", "t", "--input", '{"city": "Oslo", "days": 3}', "--json"])
        == 0
    )
    assert _json(capsys)["output"] == {"city": "Oslo", "days": 3}
    request = tmp_path / "trip.json"
    request.write_text('{"city": "Bergen", "days": 2}')
    assert main(["ask", "--graph", TRIPS, "--thread", "t", "--input", f"@{request}", "--json"]) == 0
    assert _json(capsys)["output"]["city"] == "Bergen"
    assert main(["ask", "--graph", TRIPS, "--thread", "t", '{"city": "Rome", "days": 1}']) == 0  # JSON as is
    capsys.readouterr()
    assert main(["ask", "--graph", TRIPS, "--thread", "t", "Oslo for 3 days"]) == ExitCode.CONFIG
    assert "fields city, days" in capsys.readouterr().err
    assert main(["ask", "--graph", TRIPS, "--thread", "t", "--input", '{"city": "Oslo", "days": 99}']) == 6


def test_a_failed_turn_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["ask", "--graph", "tests.cli_graphs:broken", "--thread", "f", "hi", "--json"])
        == ExitCode.FAILED
    )
    result = _json(capsys)
    assert result["status"] == "failed" and result["error"]["type"] == "RepairExhausted"


def test_a_thread_another_run_holds_exits_8(capsys: pytest.CaptureFixture[str]) -> None:
    cli_graphs.BUSY_CODES.clear()
    assert main(["ask", "--graph", "tests.cli_graphs:busy", "--thread", "b", "first"]) == ExitCode.OK
    assert cli_graphs.BUSY_CODES == [ExitCode.BUSY]
    assert "status  : busy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("tests.no_such_module:g", "cannot import tests.no_such_module"),
        ("tests/no_such_file.py:g", "no file tests/no_such_file.py"),
        ("tests.cli_graphs:nothing", "has no 'nothing'"),
        ("tests.cli_graphs:SAVED", "is a list, not a graph factory"),
        ("tests.cli_graphs:not_a_graph", "returned a dict, not a graph"),
        ("tests.cli_graphs:plain_langgraph", "not a keelgraph one"),
        ("tests.cli_graphs:needs_arguments", "the factory needs arguments"),
    ],
)
def test_a_graph_that_cannot_be_loaded_exits_9(
    spec: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ask", "--graph", spec, "--thread", "x", "hi"]) == ExitCode.GRAPH
    assert says in capsys.readouterr().err


def test_eval_on_a_graph_that_is_not_the_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dataset = tmp_path / "trips.jsonl"
    cases = [
        {"id": "oslo", "input": {"city": "Oslo", "days": 3}, "expect": {"output": {"city": "Oslo"}}},
        {"id": "bad", "input": {"city": "", "days": 3}, "expect": {"status": "rejected", "fields": ["city"]}},
    ]
    dataset.write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    base = tmp_path / "base.json"
    argv = ["eval", "--graph", TRIPS, "--dataset", str(dataset), "--out", str(tmp_path / "r.json")]
    assert main([*argv, "--save-baseline", str(base), "--json"]) == ExitCode.OK
    report = _json(capsys)  # the table went to stderr
    assert report["status"] == "ok" and report["summary"]["correct"] == 1.0 and report["graph"] == TRIPS
    # A prompt that answers Rome for every city regresses against that baseline: exit 7.
    rome = tmp_path / "rome.txt"
    rome.write_text("Always Rome.")
    monkey = ["--instructions", f"@{rome}", "--baseline", str(base)]
    orig = cli_graphs._plan_step
    try:
        cli_graphs._plan_step = lambda messages: orig(messages) | {"answer": {"city": "Rome", "days": 3}}
        assert main([*argv, *monkey, "--json"]) == ExitCode.REGRESSION
    finally:
        cli_graphs._plan_step = orig
    assert _json(capsys)["status"] == "regression"
    assert main([*argv, "--min-correct", "1.0"]) == ExitCode.OK
    assert "contract pass rate" in capsys.readouterr().out
    assert (
        main(["eval", "--graph", "tests.cli_graphs:notes_builder", "--instructions", "x"]) == ExitCode.CONFIG
    )
    assert main(["eval", "--graph", "tests.cli_graphs:nothing"]) == ExitCode.GRAPH


def test_prune_the_file_a_graph_keeps_its_threads_in(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    for n in range(3):
        assert main(["ask", "--graph", NOTES, "--thread", "p", f"note {n}"]) == 0
    before = (
        sqlite3.connect(data_dir / "threads.db").execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
    )
    capsys.readouterr()
    assert main(["prune", "--graph", NOTES, "--keep-last", "1"]) == ExitCode.OK
    assert f"pruned {data_dir / 'threads.db'}" in capsys.readouterr().out
    after = sqlite3.connect(data_dir / "threads.db").execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
    assert after == 1 < before
    assert main(["history", "--graph", NOTES, "--thread", "p"]) == ExitCode.OK  # the thread's state is kept
    assert main(["prune", "--graph", "tests.cli_graphs:nothing", "--vacuum"]) == ExitCode.GRAPH
    with pytest.raises(SystemExit) as done:
        main(["prune", "--graph", NOTES, "--db", "x.db"])
    assert done.value.code == ExitCode.USAGE


def test_config_shows_every_variable_its_value_and_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv("KEELGRAPH_API_KEY", "sk-secret")
    monkeypatch.setenv("KEELGRAPH_MODEL", "m1")
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_SECRET", "jwt-secret")
    monkeypatch.setenv("KEELGRAPH_MODLE", "typo")
    monkeypatch.delenv("KEELGRAPH_TIMEOUT", raising=False)
    assert main(["config", "--json"]) == ExitCode.OK
    shown = _json(capsys)
    assert "secret" not in json.dumps(shown)
    assert shown["settings"]["model"] == "m1" and shown["settings"]["api_key"] == "set"
    by_name = {v["name"]: v for v in shown["variables"]}
    assert by_name["KEELGRAPH_MODEL"]["source"] == "environment"
    assert by_name["KEELGRAPH_TIMEOUT"] == {
        "name": "KEELGRAPH_TIMEOUT",
        "setting": "timeout_s",
        "value": 120.0,
        "source": "default",
    }
    assert by_name["KEELGRAPH_DATA_DIR"]["value"] == str(data_dir)
    assert by_name["KEELGRAPH_AUTH_JWT_SECRET"]["value"] == "set"
    assert shown["unknown"] == ["KEELGRAPH_MODLE"]
    assert main(["config"]) == ExitCode.OK
    text = capsys.readouterr().out
    assert re.search(r"KEELGRAPH_MODEL +m1 +\(environment\)", text) and "KEELGRAPH_MODLE" in text


def test_every_settings_field_has_its_variable() -> None:
    for field, name in setting_variables().items():
        assert name.removeprefix("KEELGRAPH_").lower()[:4] == field[:4], (field, name)
    monkey = {"OPENAI_API_KEY": "k", "XDG_DATA_HOME": "/xdg"}
    found = {v.name: v.source for v in effective_variables(monkey)}
    assert found["KEELGRAPH_API_KEY"] == "environment (OPENAI_API_KEY)"
    assert found["KEELGRAPH_DATA_DIR"] == "default (XDG_DATA_HOME)"


def test_model_status_starts_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    monkeypatch.setenv("KEELGRAPH_LLAMA_PORT", str(free))
    monkeypatch.delenv("KEELGRAPH_BASE_URL", raising=False)
    assert main(["model", "status", "--json"]) == ExitCode.OK
    status = _json(capsys)
    assert status["embedded"] is True and status["serving"] is False
    assert status["endpoint"].startswith(f"http://127.0.0.1:{free}")
    monkeypatch.setenv("KEELGRAPH_BASE_URL", "http://models.example/v1")
    assert main(["model", "status", "--json"]) == ExitCode.OK
    assert _json(capsys) == {
        "model": "gpt-4o-mini",
        "embedded": False,
        "endpoint": "http://models.example/v1",
        "serving": None,
    }


def test_a_crash_exits_1_with_its_traceback(tmp_path: Path) -> None:
    crash = tmp_path / "crash.py"
    crash.write_text(
        "from tests.cli_graphs import notes\n"
        "def make_graph():\n"
        "    graph = notes()\n"
        "    graph.invoke = None  # a bug in the user's code\n"
        "    return graph\n"
    )
    env = {"KEELGRAPH_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "keelgraph", "ask", "--graph", str(crash), "--thread", "c", "hi"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == ExitCode.CRASH, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "TypeError" in done.stderr


def test_install_hints_name_commands_that_work() -> None:
    editable = {"url": "file:///src/kg", "dir_info": {"editable": True}}
    assert install_hint("postgres", installed_from=editable).startswith("pip install -e '/src/kg[postgres]'")
    wheel = {"url": "file:///w/keelgraph-0.1.0-py3-none-any.whl", "archive_info": {}}
    assert install_hint("serve", installed_from=wheel).startswith(
        "pip install 'keelgraph[serve] @ file:///w/keelgraph-0.1.0-py3-none-any.whl'"
    )
    git = {"url": "https://example.org/kg.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}
    assert "'keelgraph[memory] @ git+https://example.org/kg.git@abc123'" in install_hint(
        "memory", installed_from=git
    )
    unknown = install_hint("local", installed_from={})
    assert "pip install -e '.[local]'" in unknown and "keelgraph[local] @ file:///" in unknown
    # No message anywhere tells users to install the unpublished `keelgraph[...]` from an index.
    bare = re.compile(r"""pip install ['"]?keelgraph\[[a-z,]+\]['"]?(?! @)""")
    for folder in ("keel", "contracts", "tools", "graphs", "apps"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not bare.search(path.read_text()), path


def test_ctrl_c_exits_130_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from keelgraph.commands import cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_history", interrupted)
    assert main(["history", "--thread", "t"]) == ExitCode.INTERRUPTED == 130
    assert capsys.readouterr().err == "keelgraph: interrupted\n"
