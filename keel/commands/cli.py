"""The `keelgraph` command line: demo, ask, approve, history, eval, model, prune, serve, token."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from keelgraph.commands.exits import ExitCode, exit_code_table
from keelgraph.commands.target import DEFAULT_GRAPH, GraphNotLoaded, load_factory, load_graph, request_from
from keelgraph.contracts.errors import KeelgraphError, ThreadBusy, UserError
from keelgraph.settings import Settings

EXIT_OK = ExitCode.OK
EXIT_USAGE = ExitCode.USAGE
EXIT_FAILED = ExitCode.FAILED
EXIT_WAITING = ExitCode.WAITING
EXIT_NOT_FOUND = ExitCode.NOT_FOUND
EXIT_REJECTED = ExitCode.REJECTED
EXIT_REGRESSION = ExitCode.REGRESSION
EXIT_BUSY = ExitCode.BUSY
EXIT_GRAPH = ExitCode.GRAPH
EXIT_ERROR = ExitCode.CONFIG
"""The names earlier code and tests use; `ExitCode` (keelgraph.commands.exits) defines them."""
EXIT_CODES = {int(code): code.meaning for code in ExitCode}
USER_HELP = (
    "who is acting (the run's signed-in user; default $KEELGRAPH_USER, else the desk's demo user ada): "
    "tools bound to the user act for them"
)
_STATUS_CODES = {"ok": ExitCode.OK, "rejected": ExitCode.REJECTED, "failed": ExitCode.FAILED}


def _emit(args: argparse.Namespace, document: Any, text: str) -> None:
    """One JSON document on stdout with `--json`, else the text for a person."""
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, ensure_ascii=False, default=str))
    else:
        print(text)


def _result_text(result: dict[str, Any]) -> str:
    lines = [f"status  : {result.get('status')}"]
    if result.get("output") is not None:
        lines.append(
            "output  : "
            + json.dumps(result["output"], indent=2, ensure_ascii=False).replace("\n", "\n          ")
        )
    error = result.get("error") or {}
    if error:
        lines.append(
            f"error   : {error.get('type')} ({error.get('code')}): {error.get('message', '')}".rstrip(": ")
        )
        for problem in error.get("problems") or []:
            lines.append(f"          - {problem.get('field')}: {problem.get('reason')}")
            if problem.get("fix"):
                lines.append(f"            fix: {problem['fix']}")
    stats = result.get("stats") or {}
    if stats:
        keys = ("model_calls", "repairs", "tool_calls", "input_tokens", "output_tokens", "seconds")
        lines.append("cost    : " + ", ".join(f"{k}={stats.get(k, 0)}" for k in keys))
    return "\n".join(lines)


def _outcome(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """Print a run's result (or what it waits for) and return the exit code."""
    pauses = result.get("__interrupt__") or []
    if pauses:
        waiting = {"status": "waiting", "thread": args.thread, "interrupts": [p.value for p in pauses]}
        first = pauses[0].value
        calls = first.get("calls", []) if isinstance(first, dict) else []
        asked = "; ".join(f"{c.get('name')} {json.dumps(c.get('args'), ensure_ascii=False)}" for c in calls)
        _emit(
            args,
            waiting,
            f"status  : waiting for a person\nasks    : {asked or json.dumps(first, default=str)}",
        )
        names = [name for c in calls for name in (c.get("args") or {})][:1] or ["ARG"]
        how = (
            f"[--edit '{json.dumps(dict.fromkeys(names, '...'))}' | --reject REASON]"
            if calls
            else "--resume JSON"
        )
        print(
            f"decide with: keelgraph approve{_graph_flag(args)} --thread {args.thread} {how}", file=sys.stderr
        )
        return ExitCode.WAITING
    shown = {k: v for k, v in result.items() if not k.startswith("__")}
    _emit(args, {**shown, "thread": args.thread}, _result_text(shown))
    return _STATUS_CODES.get(str(result.get("status")), ExitCode.FAILED)


def _graph_flag(args: argparse.Namespace) -> str:
    return "" if args.graph == DEFAULT_GRAPH else f" --graph {args.graph}"


def _graph(args: argparse.Namespace) -> Any:
    """The compiled graph `--graph` names (default: the support desk), keeping its threads."""
    return load_graph(args.graph)


def _run_config(args: argparse.Namespace) -> Any:
    """The run's config: the thread, and who is acting (`--user`, else `$KEELGRAPH_USER`, else the
    desk's demo user when the graph is the desk; see `keelgraph.tools.identity`)."""
    configurable: dict[str, Any] = {"thread_id": args.thread}
    user = getattr(args, "user", None) or os.environ.get("KEELGRAPH_USER")
    if not user and args.graph == DEFAULT_GRAPH:
        from keelgraph.apps.support.demo import DEMO_USER

        user = DEMO_USER
    if user:
        from keelgraph.tools.identity import IDENTITY_KEY

        configurable[IDENTITY_KEY] = user
    return {"configurable": configurable}


def _run(args: argparse.Namespace, graph: Any, value: Any, config: Any) -> int:
    """Run one turn (a request or a resume) and report it; a run refused or cut off is an outcome too."""
    from keelgraph.contracts.errors import RunError, ThreadBusy

    try:
        result = graph.invoke(value, config)
    except ThreadBusy as exc:
        failure = exc.to_failure().model_dump(mode="json")
        _emit(args, {"status": "busy", "thread": args.thread, "error": failure}, f"status  : busy\n{exc}")
        return ExitCode.BUSY
    except RunError as exc:  # e.g. ModelUnavailable: no model answered
        return _outcome(
            args, {"status": "failed", "output": None, "error": exc.to_failure().model_dump(mode="json")}
        )
    return _outcome(args, result)


def _ask(args: argparse.Namespace) -> int:
    if args.request is None and args.input is None:
        raise UserError("give the request: keelgraph ask --thread T MESSAGE (or --input JSON)")
    graph = _graph(args)
    request = request_from(graph, args.request, args.input)
    return _run(args, graph, {"request": request}, _run_config(args))


def _decision(args: argparse.Namespace) -> dict[str, Any]:
    if args.reject is not None:
        return {"action": "reject", "reason": args.reject}
    if args.edit is not None:
        try:
            edit = json.loads(args.edit)
        except json.JSONDecodeError as exc:
            raise UserError(f"--edit is not JSON ({exc.msg}): give the arguments to change") from None
        return {"action": "edit", "args": edit}
    return {"action": "approve"}


def _approve(args: argparse.Namespace) -> int:
    from langgraph.types import Command

    graph = _graph(args)
    config = _run_config(args)
    pending = list(graph.get_state(config).interrupts)
    if not pending:
        raise UserError(f"thread {args.thread!r} is not waiting for a person's decision")
    if args.resume is not None:
        try:
            value = json.loads(args.resume)
        except json.JSONDecodeError as exc:
            raise UserError(f"--resume is not JSON ({exc.msg}): give the value the graph waits for") from None
        resume: Any = value if len(pending) == 1 else {p.id: value for p in pending}
        return _run(args, graph, Command(resume=resume), config)
    decision = _decision(args)
    answers: dict[str, Any] = {}
    for pause in pending:
        calls = pause.value.get("calls") if isinstance(pause.value, dict) else None
        if not calls:
            raise UserError(
                f"thread {args.thread!r} waits for a value keelgraph does not decide "
                f"({json.dumps(pause.value, default=str)[:200]}): answer it with --resume JSON"
            )
        answers[pause.id] = {call["id"]: decision for call in calls}
    resume = next(iter(answers.values())) if len(answers) == 1 else answers
    return _run(args, graph, Command(resume=resume), config)


def _history(args: argparse.Namespace) -> int:
    from keelgraph.graphs.history import transcript

    graph = _graph(args)
    state = graph.get_state({"configurable": {"thread_id": args.thread}})
    # The whole conversation: what earlier turns moved to the archive, then what the state holds.
    messages = transcript(graph.store, args.thread, state.values.get("messages", []))
    if not messages:
        print(f"no thread {args.thread!r} in the graph's checkpointer ({args.graph})", file=sys.stderr)
        return ExitCode.NOT_FOUND
    waiting = [i.value for i in state.interrupts]
    if args.json:
        document = {
            "thread": args.thread,
            "status": "waiting" if waiting else state.values.get("status"),
            "messages": [_message_json(m) for m in messages],
            "interrupts": waiting,
        }
        print(json.dumps(document, indent=2, ensure_ascii=False, default=str))
        return ExitCode.OK
    for message in messages:
        kind = message.additional_kwargs.get("keelgraph", "")
        tool_calls = getattr(message, "tool_calls", None) or []
        calls = f" {[(c['name'], c['args']) for c in tool_calls]}" if tool_calls else ""
        print(f"[{message.type}:{kind}] {str(message.content)[:300]}{calls}")
    if waiting:
        print(f"(waiting for a person: keelgraph approve{_graph_flag(args)} --thread {args.thread})")
    return ExitCode.OK


def _message_json(message: Any) -> dict[str, Any]:
    """One kept message in `history --json`."""
    return {
        "type": message.type,
        "kind": message.additional_kwargs.get("keelgraph", ""),
        "content": message.content,
        "tool_calls": [
            {"name": c["name"], "args": c["args"]} for c in getattr(message, "tool_calls", None) or []
        ],
    }


def _thresholds(pairs: Sequence[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            found[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--threshold {pair!r}: write NAME=NUMBER, e.g. correct=0.05") from None
        if not sep:
            raise UserError(f"--threshold {pair!r}: write NAME=NUMBER, e.g. correct=0.05")
    return found


def _eval(args: argparse.Namespace) -> int:
    import inspect
    import tempfile
    from datetime import UTC, datetime

    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.store.memory import InMemoryStore

    from keelgraph.commands.eval import load_dataset, read_report, recorded_cases, run_cli
    from keelgraph.commands.target import as_graph

    made = load_factory(args.graph)

    def factory(**kwargs: Any) -> Any:
        # A graph without a checkpointer of its own keeps the eval's threads in memory.
        return as_graph(made(**kwargs), args.graph, checkpointer=InMemorySaver, store=InMemoryStore)

    accepted = set(inspect.signature(made).parameters)
    instructions = args.instructions
    if instructions is not None and instructions.startswith("@"):
        try:
            instructions = Path(instructions[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--instructions {args.instructions}: {exc.strerror or exc}") from None
    if instructions is not None and "instructions" not in accepted:
        raise UserError(f"{args.graph} takes no `instructions` argument: --instructions cannot apply")
    if args.replay:
        # What the recorded threads were sent, read from the configured checkpointer.
        cases = recorded_cases(
            load_graph(args.graph), args.replay, args.replay_fields.split(",") if args.replay_fields else None
        )
        dataset = "replay:" + ",".join(args.replay)
    else:
        path = args.dataset or default_eval_dataset()
        cases = load_dataset(path)
        dataset = str(path)
    if args.case:
        unknown = sorted(set(args.case) - {c.id for c in cases})
        if unknown:
            raise UserError(f"no case(s) {unknown} in {dataset}")
        cases = [c for c in cases if c.id in set(args.case)]
    # Evaluations run on scratch data (a fresh shop, threads in memory, effects in memory): they
    # are repeatable and never touch the data of the deployed graph.
    from keelgraph.tools.ledger import MemoryLedger

    scratch = Path(tempfile.mkdtemp(prefix="keelgraph-eval-"))
    offered: dict[str, Any] = {
        "db_path": scratch / "shop.db",
        "checkpointer": InMemorySaver(),
        "effects": MemoryLedger(),
        "instructions": instructions,
    }
    kwargs = {k: v for k, v in offered.items() if k in accepted and v is not None}
    settings = Settings.from_env()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stem = "replay" if args.replay else Path(dataset).name.split(".")[0]
    out = args.out or settings.data_dir / "evals" / f"{stem}-{stamp}.json"
    meta = {
        "dataset": dataset,
        "graph": args.graph,
        "model": settings.model,
        "endpoint": settings.base_url or "embedded",
        "temperature": settings.temperature,
        "instructions": "custom" if instructions is not None else "default",
    }
    code = run_cli(
        factory,
        cases,
        out=out,
        baseline=args.baseline,
        save_baseline=args.save_baseline,
        thresholds=_thresholds(args.threshold or []),
        factory_args=kwargs,
        meta=meta,
        min_correct=args.min_correct,
        # With --json the table goes to stderr: stdout holds the one JSON document.
        print_=(lambda text: print(text, file=sys.stderr)) if args.json else print,
    )
    outcome = ExitCode.OK if code == 0 else ExitCode.REGRESSION
    if args.json:
        report = read_report(Path(out))
        status = "ok" if outcome == ExitCode.OK else "regression"
        document = {"status": status, "report_path": str(out), "baseline": args.baseline, **report}
        print(json.dumps(document, indent=2, ensure_ascii=False, default=str))
    return outcome


def default_eval_dataset() -> Path:
    """The main job's dataset, shipped with the package (`apps/support/evals/support.jsonl`)."""
    import keelgraph.apps.support

    return Path(keelgraph.apps.support.__file__).parent / "evals" / "support.jsonl"


def _model_status(args: argparse.Namespace, settings: Settings) -> int:
    """What `model status` reports: the endpoint, and for the embedded model its file and server."""
    import importlib.util
    import time

    import httpx

    from keelgraph.local.embedded import EMBEDDED_MODEL, LocalModelServer, cpu_share, server_owner

    status: dict[str, Any] = {"model": settings.model, "embedded": settings.embedded}
    if not settings.embedded:
        # A remote endpoint is not called here: `model status` starts and spends nothing.
        status |= {"endpoint": settings.base_url, "serving": None}
    else:
        url = LocalModelServer(settings).url
        began = time.monotonic()
        try:
            reply = httpx.get(f"{url}/models", timeout=2.0)
            ids = [m.get("id") for m in reply.json().get("data", [])]
            serving = reply.status_code == 200 and settings.model in ids
        except (httpx.HTTPError, ValueError, AttributeError):
            serving = False
        answer_ms = round((time.monotonic() - began) * 1000) if serving else None
        model_file = settings.cache_dir / "models" / EMBEDDED_MODEL.filename
        pid = server_owner(settings, settings.llama_port)
        status |= {
            "endpoint": url,
            "serving": serving,
            # Who serves it (a keelgraph-started server: clients wait for it, never start another),
            # how fast it answers, and how busy it is (cores in use; near `threads`: generating).
            "server_pid": pid,
            "answer_ms": answer_ms,
            "threads": settings.llama_threads,
            "cpu_cores_busy": cpu_share(pid) if pid is not None else None,
            "model_file": str(model_file),
            "model_file_verified": model_file.exists() and model_file.with_suffix(".verified").exists(),
            "llama_cpp_installed": importlib.util.find_spec("llama_cpp") is not None,
        }
    _emit(args, status, "\n".join(f"{k:<20} {v}" for k, v in status.items()))
    return ExitCode.OK


def _model(args: argparse.Namespace) -> int:
    from keelgraph.local.embedded import EMBEDDED_MODEL, LocalModelServer, ensure_model_file

    settings = Settings.from_env()
    if args.action == "status":
        return _model_status(args, settings)
    if args.action == "fetch":
        started = time.perf_counter()
        path = ensure_model_file(settings)
        print(
            f"{path} ({EMBEDDED_MODEL.name}, sha256 {EMBEDDED_MODEL.sha256[:12]}..., "
            f"{time.perf_counter() - started:.1f} s)"
        )
        return 0
    server = LocalModelServer(settings)
    url = server.start()
    print(f"embedded model {settings.model} serving at {url} (OpenAI-compatible); Ctrl-C stops it")
    if server.process is None:
        print("(an already running server was reused; it is not stopped by this command)")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.engine == "aegra":
        from keelgraph.serving import aegra

        return aegra.run(replicas=args.replicas, port=args.port)
    if args.replicas != 1:
        raise UserError(
            "`langgraph dev` is one process: use --engine aegra for --replicas (see deploy/README.md)"
        )
    from keelgraph.serving.serve import run

    return run(port=args.port)


def _token(args: argparse.Namespace) -> int:
    from keelgraph.serving.auth import TokenFile, token_file_path

    tokens = TokenFile(args.file or token_file_path())
    if args.action == "create":
        if not args.user:
            raise UserError("name the user: keelgraph token create USER")
        token = tokens.create(args.user, permissions=args.permission or (), label=args.label or "")
        # The token alone on stdout (scripts capture it); where it is kept, on stderr.
        print(token)
        print(
            f"token for {args.user!r} stored (as a hash) in {tokens.path}; it is not shown again",
            file=sys.stderr,
        )
        return 0
    if args.action == "revoke":
        if not args.user:
            raise UserError("name the user or token id: keelgraph token revoke USER|TOKEN_ID")
        count = tokens.revoke(args.user)
        print(f"revoked {count} token(s) from {tokens.path}")
        return 0 if count else EXIT_NOT_FOUND
    for info in tokens.list():
        perms = ",".join(info.permissions) or "-"
        print(f"{info.user}\t{info.token_id}\t{info.created_at}\t{perms}\t{info.label}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from keelgraph.apps.support.demo import run_demo

    return run_demo(args.thread)


def _prune(args: argparse.Namespace) -> int:
    from keelgraph.graphs.retention import parse_age, prune

    if args.keep_last is None and args.older_than is None and not args.vacuum:
        raise UserError("say what to prune: --keep-last N, --older-than AGE and/or --vacuum")
    path = (
        _checkpoint_file(args.graph) if args.graph else args.db or Settings.from_env().data_dir / "threads.db"
    )
    report = prune(
        path,
        keep_last=args.keep_last,
        older_than_s=parse_age(args.older_than) if args.older_than else None,
        vacuum=args.vacuum,
    )
    print(f"pruned {path}")
    print("\n".join(report.lines()))
    effects = path.parent / "effects.db"
    if args.older_than and effects.exists():
        from keelgraph.tools.ledger import SqliteLedger

        ledger = SqliteLedger(effects)
        dropped = ledger.prune(parse_age(args.older_than))
        ledger.close()
        print(f"pruned {effects}: {dropped} completed effect records older than {args.older_than}")
    return 0


def _checkpoint_file(spec: str) -> Path:
    """The SQLite file the graph `spec` names keeps its threads in."""
    import sqlite3

    graph = load_graph(spec)
    conn = getattr(graph.checkpointer, "conn", None)
    if isinstance(conn, sqlite3.Connection):
        files = [row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
        if files and files[0]:
            return Path(files[0])
    raise UserError(
        f"--graph {spec} keeps its threads in {type(graph.checkpointer).__name__}, not a SQLite file: "
        "prune works on SQLite checkpoint files (see keelgraph.graphs.retention)"
    )


class _Parser(argparse.ArgumentParser):
    """argparse, its usage errors on `ExitCode.USAGE` (2), a code no outcome uses."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _epilog() -> str:
    from keelgraph.commands.config import variables_help

    return (
        f"exit codes:\n{exit_code_table()}\n\n"
        f"environment (keelgraph config shows each one's effective value and source):\n{variables_help()}"
    )


def _config(args: argparse.Namespace) -> int:
    from keelgraph.commands.config import effective_variables, unknown_variables

    found = effective_variables()
    unknown = unknown_variables()
    document = {
        "settings": {v.setting: v.as_json()["value"] for v in found if v.setting},
        "variables": [v.as_json() for v in found],
        "unknown": unknown,
    }
    lines = [f"{v.name:<30} {_text(v.as_json()['value']):<40} ({v.source})" for v in found]
    if unknown:
        lines.append(f"\nset but not read by keelgraph (a typo?): {', '.join(unknown)}")
    _emit(args, document, "\n".join(lines))
    return ExitCode.OK


def _text(value: Any) -> str:
    if value is None or value == []:
        return "-"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _version() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("keelgraph")
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = "(not installed)"
    return f"keelgraph {ours} (langgraph {version('langgraph')}, Python {platform.python_version()})"


def _target(parser: argparse.ArgumentParser, *, json_help: str = "print one JSON document on stdout") -> None:
    """`--graph` and `--json`, the same on every command that runs a graph."""
    parser.add_argument(
        "--graph",
        default=DEFAULT_GRAPH,
        metavar="MODULE:FACTORY",
        help="the graph: module:factory or path/to/file.py:factory (as in langgraph.json) returning a "
        "keelgraph graph, compiled or not (default: the support desk)",
    )
    parser.add_argument("--json", action="store_true", help=json_help)


def _add_thread_commands(sub: Any) -> None:
    """`ask`, `approve` and `history`: commands on one thread of a graph (`--graph`, default the desk)."""
    ask = sub.add_parser(
        "ask", help="send one request to a graph (default: the support desk) in a persistent thread"
    )
    ask.add_argument("--thread", required=True, help="thread id; the same id continues the conversation")
    request = ask.add_mutually_exclusive_group(required=True)
    request.add_argument(
        "request",
        nargs="?",
        metavar="MESSAGE",
        help="plain text for the graph's one text field (the desk's `message`), or a JSON object as is",
    )
    request.add_argument(
        "--input", metavar="JSON", help="the request as JSON text (or @FILE), for structured input contracts"
    )
    _target(ask, json_help="print the result as one JSON document on stdout")
    ask.add_argument("--user", help=USER_HELP)
    ask.set_defaults(func=_ask)
    approve = sub.add_parser("approve", help="decide on the tool call(s) a thread is waiting for")
    approve.add_argument("--thread", required=True)
    decide = approve.add_mutually_exclusive_group()
    decide.add_argument("--edit", help="JSON of the arguments to change, then run it")
    decide.add_argument("--reject", metavar="REASON", help="do not run it; the reason goes to the model")
    decide.add_argument(
        "--resume",
        metavar="JSON",
        help="resume with this value (an interrupt that is not keelgraph's approval)",
    )
    _target(approve, json_help="print the result as one JSON document on stdout")
    approve.add_argument("--user", help=USER_HELP)
    approve.set_defaults(func=_approve)
    history = sub.add_parser("history", help="print what a thread kept (and what it waits for)")
    history.add_argument("--thread", required=True)
    _target(history, json_help="the thread as one JSON document: status, messages, interrupts")
    history.set_defaults(func=_history)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keelgraph",
        description=__doc__,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    config = sub.add_parser(
        "config", help="every KEELGRAPH_* variable: its effective value and where it came from"
    )
    config.add_argument("--json", action="store_true", help="as one JSON document")
    config.set_defaults(func=_config)
    demo = sub.add_parser("demo", help="run a short scripted session of the order-support assistant")
    demo.add_argument("--thread", help="thread id (default: a new one)")
    demo.set_defaults(func=_demo)
    _add_thread_commands(sub)
    ev = sub.add_parser(
        "eval",
        help="run a dataset through a graph, score it, compare with a baseline (exit 7 on a regression)",
    )
    ev.add_argument(
        "--dataset",
        type=Path,
        help="JSON Lines cases (default: the main job's, apps/support/evals/support.jsonl)",
    )
    _target(ev, json_help="print the report as one JSON document on stdout (the table goes to stderr)")
    ev.add_argument("--instructions", help="replace the graph's instructions: TEXT or @FILE")
    ev.add_argument("--baseline", type=Path, help="a saved report to compare with")
    ev.add_argument("--save-baseline", type=Path, help="also write this run's report here")
    ev.add_argument("--out", type=Path, help="the report (default: $KEELGRAPH_DATA_DIR/evals/NAME-TIME.json)")
    ev.add_argument(
        "--threshold",
        action="append",
        metavar="NAME=VALUE",
        help="contract|correct (drop in rate), repairs (rise per turn), tokens (relative rise); "
        "latency (relative rise of the median turn) is compared only when given",
    )
    ev.add_argument("--case", action="append", help="run only this case id (repeatable)")
    ev.add_argument(
        "--min-correct",
        type=float,
        metavar="RATE",
        help="also exit 7 when fewer turns than this are correct (0..1), with or without a baseline",
    )
    ev.add_argument(
        "--replay",
        action="append",
        metavar="THREAD",
        help="replay a recorded thread's requests instead of a dataset (repeatable)",
    )
    ev.add_argument(
        "--replay-fields", help="answer fields a replay must reproduce (default: all but free text)"
    )
    ev.set_defaults(func=_eval)
    model = sub.add_parser("model", help="the embedded local model")
    model.add_argument(
        "action",
        choices=["fetch", "serve", "status"],
        help="fetch: download and verify; serve: run the server; status: what is configured and running",
    )
    model.add_argument("--json", action="store_true", help="status: as one JSON document")
    model.set_defaults(func=_model)
    prune = sub.add_parser("prune", help="shrink the SQLite checkpoint file: old checkpoints, idle threads")
    where = prune.add_mutually_exclusive_group()
    where.add_argument(
        "--db", type=Path, help="the checkpoint database (default: $KEELGRAPH_DATA_DIR/threads.db)"
    )
    where.add_argument(
        "--graph", metavar="MODULE:FACTORY", help="the SQLite file this graph keeps its threads in (see ask)"
    )
    prune.add_argument("--keep-last", type=int, help="keep this many newest checkpoints per thread (>= 1)")
    prune.add_argument("--older-than", help="drop threads idle for longer than this: 30d, 12h, 90m")
    prune.add_argument(
        "--vacuum",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give freed space back (default)",
    )
    prune.set_defaults(func=_prune)
    serve = sub.add_parser("serve", help="serve langgraph.json's graphs with `langgraph dev`, offline")
    serve.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    serve.add_argument(
        "--engine",
        choices=["dev", "aegra"],
        default="dev",
        help="dev: `langgraph dev`, one process; aegra: Aegra replicas on KEELGRAPH_DATABASE_URL (PostgreSQL)",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with --engine aegra: server processes (ports --port, --port+1, ...)",
    )
    serve.set_defaults(func=_serve)
    token = sub.add_parser(
        "token", help="bearer tokens of the served graphs' users (see keelgraph.serving.auth)"
    )
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("user", nargs="?", help="create: the user; revoke: the user or a token id")
    token.add_argument("--permission", action="append", help="a permission to grant (repeatable)")
    token.add_argument("--label", help="a note kept with the token (who, what for)")
    token.add_argument(
        "--file",
        type=Path,
        help="token file (default: $KEELGRAPH_AUTH_TOKENS or $KEELGRAPH_DATA_DIR/tokens.json)",
    )
    token.set_defaults(func=_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is an `ExitCode` (`keelgraph --help` lists them)."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except GraphNotLoaded as exc:
        print(f"keelgraph: {exc}", file=sys.stderr)
        return ExitCode.GRAPH
    except ThreadBusy as exc:  # raised outside a run of ask/approve (e.g. while reading the thread)
        print(f"keelgraph: {exc}", file=sys.stderr)
        return ExitCode.BUSY
    except KeelgraphError as exc:
        print(f"keelgraph: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        print("keelgraph: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
