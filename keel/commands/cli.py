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

from keelgraph.contracts.errors import KeelgraphError, UserError
from keelgraph.settings import Settings

EXIT_OK = 0
EXIT_REGRESSION = 1
"""`eval`: the run regressed against its baseline (or scored under `--min-correct`)."""
EXIT_REJECTED = 2
"""`ask`/`approve`: the request was rejected (`InputRejected`)."""
EXIT_FAILED = 3
"""`ask`/`approve`: the turn ended in a typed failure (repairs or a budget spent)."""
EXIT_WAITING = 4
"""`ask`/`approve`: the run waits for a person's decision (`keelgraph approve`)."""
EXIT_NOT_FOUND = 5
"""`history`: no such thread; `token revoke`: no such token."""
EXIT_USAGE = 64
"""The command line itself is wrong (argparse's usage errors; 2 would collide with a rejection)."""
EXIT_ERROR = 78
"""keelgraph refused to run: a configuration or developer mistake, or a thread not in the state the
command needs; the message says what to do."""

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_REGRESSION: "eval regressed",
    EXIT_REJECTED: "request rejected",
    EXIT_FAILED: "typed failure",
    EXIT_WAITING: "waiting for a person",
    EXIT_NOT_FOUND: "nothing found",
    EXIT_USAGE: "usage error",
    EXIT_ERROR: "configuration or usage mistake reported by keelgraph",
}
DEFAULT_GRAPH = "keelgraph.apps.support.desk:make_graph"
USER_HELP = (
    "who is acting (the run's signed-in user; default $KEELGRAPH_USER, else the desk's demo user ada): "
    "tools bound to the user act for them"
)


def _outcome(result: dict[str, Any], thread: str) -> int:
    """Print a run's result (or what it waits for) and return the exit code."""
    pauses = result.get("__interrupt__") or []
    if pauses:
        waiting = {"status": "waiting", "approval": pauses[0].value}
        print(json.dumps(waiting, indent=2, default=str))
        print(
            f"waiting for a person: keelgraph approve --thread {thread} "
            '[--edit \'{"note": "..."}\' | --reject REASON]',
            file=sys.stderr,
        )
        return EXIT_WAITING
    print(json.dumps(result, indent=2, default=str))
    return {"ok": 0, "rejected": EXIT_REJECTED}.get(str(result.get("status")), EXIT_FAILED)


def _graph(args: argparse.Namespace) -> Any:
    """The compiled graph `--graph module:factory` names (default: the support desk)."""
    return _load_factory(args.graph)()


def _run_config(args: argparse.Namespace) -> Any:
    """The run's config: the thread, and who is acting (`--user`, else `$KEELGRAPH_USER`, else the
    desk's demo user when the graph is the desk; see `keelgraph.tools.identity`)."""
    configurable: dict[str, Any] = {"thread_id": args.thread}
    user = args.user or os.environ.get("KEELGRAPH_USER")
    if not user and args.graph == DEFAULT_GRAPH:
        from keelgraph.apps.support.demo import DEMO_USER

        user = DEMO_USER
    if user:
        from keelgraph.tools.identity import IDENTITY_KEY

        configurable[IDENTITY_KEY] = user
    return {"configurable": configurable}


def _ask(args: argparse.Namespace) -> int:
    graph = _graph(args)
    return _outcome(graph.invoke({"request": args.request}, _run_config(args)), args.thread)


def _approve(args: argparse.Namespace) -> int:
    from langgraph.types import Command

    graph = _graph(args)
    config = _run_config(args)
    pending = [i.value for i in graph.get_state(config).interrupts]
    if not pending:
        raise UserError(f"thread {args.thread!r} is not waiting for a person's decision")
    decision: dict[str, Any] = {"action": "approve"}
    if args.reject is not None:
        decision = {"action": "reject", "reason": args.reject}
    elif args.edit is not None:
        try:
            edit = json.loads(args.edit)
        except json.JSONDecodeError as exc:
            raise UserError(f"--edit is not JSON ({exc.msg}): give the arguments to change") from None
        decision = {"action": "edit", "args": edit}
    resume = {call["id"]: decision for call in pending[0]["calls"]}
    return _outcome(graph.invoke(Command(resume=resume), config), args.thread)


def _history(args: argparse.Namespace) -> int:
    from keelgraph.graphs.history import transcript

    graph = _graph(args)
    state = graph.get_state({"configurable": {"thread_id": args.thread}})
    # The whole conversation: what earlier turns moved to the archive, then what the state holds.
    messages = transcript(graph.store, args.thread, state.values.get("messages", []))
    if not messages:
        print(
            f"no thread {args.thread!r} in {Settings.from_env().data_dir / 'threads.db'}",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    for message in messages:
        if args.json:
            print(json.dumps(_message_json(message), ensure_ascii=False, default=str))
            continue
        kind = message.additional_kwargs.get("keelgraph", "")
        tool_calls = getattr(message, "tool_calls", None) or []
        calls = f" {[(c['name'], c['args']) for c in tool_calls]}" if tool_calls else ""
        print(f"[{message.type}:{kind}] {str(message.content)[:300]}{calls}")
    return 0


def _message_json(message: Any) -> dict[str, Any]:
    """One kept message as a JSON line of `history --json`."""
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

    from keelgraph.commands.eval import load_dataset, recorded_cases, run_cli

    factory = _load_factory(args.graph)
    accepted = set(inspect.signature(factory).parameters)
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
            factory(), args.replay, args.replay_fields.split(",") if args.replay_fields else None
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
    from langgraph.checkpoint.memory import InMemorySaver

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
    return run_cli(
        factory,
        cases,
        out=out,
        baseline=args.baseline,
        save_baseline=args.save_baseline,
        thresholds=_thresholds(args.threshold or []),
        factory_args=kwargs,
        meta=meta,
        min_correct=args.min_correct,
    )


def default_eval_dataset() -> Path:
    """The main job's dataset, shipped with the package (`apps/support/evals/support.jsonl`)."""
    import keelgraph.apps.support

    return Path(keelgraph.apps.support.__file__).parent / "evals" / "support.jsonl"


def _load_factory(spec: str) -> Any:
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--graph {spec}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, attr or "make_graph", None)
    if not callable(factory):
        raise UserError(f"--graph {spec}: {module_name} has no callable {attr or 'make_graph'}")
    return factory


def _model(args: argparse.Namespace) -> int:
    from keelgraph.local.embedded import EMBEDDED_MODEL, LocalModelServer, ensure_model_file

    settings = Settings.from_env()
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
    path = args.db or Settings.from_env().data_dir / "threads.db"
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


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on `EXIT_USAGE`, so they never read as an outcome."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    variables = "\n".join(f"  {name}" for name in Settings.variables())
    return f"exit codes:\n{codes}\n\nenvironment (keelgraph config shows the effective values):\n{variables}"


def _config(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    shown = {k: (v if "key" not in k else ("set" if v else None)) for k, v in settings.as_dict().items()}
    if args.json:
        print(json.dumps(shown, default=str, indent=2))
    else:
        for key, value in shown.items():
            print(f"{key:<22} {value}")
    return 0


def _add_thread_commands(sub: Any) -> None:
    """`ask`, `approve` and `history`: commands on one thread of a graph (`--graph`, default the desk)."""
    ask = sub.add_parser("ask", help="send one request to the order-support assistant in a persistent thread")
    ask.add_argument("--thread", required=True, help="thread id; the same id continues the conversation")
    ask.add_argument("request", help='the request as JSON, e.g. \'{"message": "Hi"}\'')
    ask.add_argument(
        "--graph", default=DEFAULT_GRAPH, help=f"module:factory of the graph (default {DEFAULT_GRAPH})"
    )
    ask.add_argument("--user", help=USER_HELP)
    ask.set_defaults(func=_ask)
    approve = sub.add_parser("approve", help="decide on the tool call a thread is waiting for (a ticket)")
    approve.add_argument("--thread", required=True)
    approve.add_argument(
        "--graph", default=DEFAULT_GRAPH, help="module:factory of the graph (default: the desk)"
    )
    decide = approve.add_mutually_exclusive_group()
    decide.add_argument("--edit", help="JSON of the arguments to change, then run it")
    decide.add_argument("--reject", metavar="REASON", help="do not run it; the reason goes to the model")
    approve.add_argument("--user", help=USER_HELP)
    approve.set_defaults(func=_approve)
    history = sub.add_parser("history", help="print what a thread kept")
    history.add_argument("--thread", required=True)
    history.add_argument(
        "--graph", default=DEFAULT_GRAPH, help="module:factory of the graph (default: the desk)"
    )
    history.add_argument("--json", action="store_true", help="one JSON object per message")
    history.set_defaults(func=_history)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    __version__ = version("keelgraph")
    parser = _Parser(
        prog="keelgraph",
        description=__doc__,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keelgraph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    config = sub.add_parser("config", help="print the effective settings (from KEELGRAPH_* variables)")
    config.add_argument("--json", action="store_true", help="as one JSON object")
    config.set_defaults(func=_config)
    demo = sub.add_parser("demo", help="run a short scripted session of the order-support assistant")
    demo.add_argument("--thread", help="thread id (default: a new one)")
    demo.set_defaults(func=_demo)
    _add_thread_commands(sub)
    ev = sub.add_parser(
        "eval",
        help="run a dataset through a graph, score it, compare with a baseline (exit 1 on a regression)",
    )
    ev.add_argument(
        "--dataset",
        type=Path,
        help="JSON Lines cases (default: the main job's, apps/support/evals/support.jsonl)",
    )
    ev.add_argument(
        "--graph",
        default="keelgraph.apps.support.desk:make_graph",
        help="MODULE:FACTORY building the graph (default: the main job)",
    )
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
        help="also exit 1 when fewer turns than this are correct (0..1), with or without a baseline",
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
        choices=["fetch", "serve"],
        help="fetch: download and verify; serve: run the server",
    )
    model.set_defaults(func=_model)
    prune = sub.add_parser("prune", help="shrink the SQLite checkpoint file: old checkpoints, idle threads")
    prune.add_argument(
        "--db", type=Path, help="the checkpoint database (default: $KEELGRAPH_DATA_DIR/threads.db)"
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
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeelgraphError as exc:
        print(f"keelgraph: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    raise SystemExit(main())
