"""Drift detection: run a dataset of cases through a graph, score it, compare with a baseline.

A prompt that worked last month can quietly stop working: a new model version, an edited
instruction, a changed tool. `keelgraph eval` (and `evaluate()` here) runs a fixed dataset through
the graph, scores every turn, stores the result as JSON, and compares it with a saved baseline:
a drop in contract pass rate or correctness, or a rise in repairs or tokens (or latency, when
asked) beyond the thresholds, is a regression and the command exits 1.

A dataset is a JSON Lines file, one case per line. A case is one thread of one or more turns:

    {"id": "status-of-1002", "user": "ada", "input": {"message": "Where is order 1002?"},
     "expect": {"status": "ok", "output": {"order_ids": {"includes": [1002]},
                                            "reply": {"contains": "shipped"}}}}
    {"id": "ticket-follow-up", "turns": [
        {"input": {...}, "expect": {...}},
        {"input": {...}, "expect": {"tools": ["open_ticket"], "output": {"action": "ticket_opened"}}}]}

`expect` (every key optional; an empty expectation only asks for status `ok`):
- `status`: `ok` (default), `rejected` or `failed`: how the turn must end.
- `output`: field -> matcher. A plain value must be equal; an object holds one or more of
  `equals`, `contains` (text: case-insensitive substring; list: member), `contains_any` (list of
  substrings), `not_contains`, `includes` (list holds all), `excludes` (list holds none),
  `one_of`, `regex` (searched, case-insensitive), `min`, `max`.
- `fields`: for a rejection, the input fields the error must name.
- `tools`: tool names that must have run in the turn; `no_tools`: names that must not have.
A turn's `approve` (default true) decides calls that wait for a person: approve or reject.
A case's `user` (optional) is who signs in for its thread: the run's `keelgraph_user`, which tools
bound to the identity act for (see `keelgraph.tools.identity`).

A turn *passes the contract* when it ends in its expected status (a valid answer, or the
expected typed rejection); it is *correct* when every expectation holds. Recorded threads can be
turned into cases too (`recorded_cases`), to replay real traffic against a new model or prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keelgraph.contracts.errors import UserError
from keelgraph.progress import Progress
from keelgraph.tools.identity import IDENTITY_KEY

Graph = Any
"""A compiled LangGraph graph with keelgraph's state (`invoke`, `get_state`)."""

_OPS = frozenset(
    {
        "equals",
        "contains",
        "contains_any",
        "not_contains",
        "includes",
        "excludes",
        "one_of",
        "regex",
        "min",
        "max",
    }
)
_EXPECT_KEYS = frozenset({"status", "output", "fields", "tools", "no_tools"})
_STATUSES = frozenset({"ok", "rejected", "failed"})

DEFAULT_THRESHOLDS: dict[str, float] = {
    "contract": 0.10,
    "correct": 0.10,
    "repairs": 0.50,
    "tokens": 0.30,
}
"""How far a run may move from its baseline before it is a regression: `contract` and `correct`
are drops in rate (0.10 = ten points), `repairs` a rise in repairs per turn, `tokens` a relative
rise (0.30 = 30% more tokens per turn). `latency` (a relative rise of the median turn, e.g. 1.0 =
twice as slow) is compared only when given: it moves with the machine's load as much as with the
graph, so it is a regression only between runs on a machine you control."""
OPTIONAL_THRESHOLDS = frozenset({"latency"})


LATENCY_FLOOR_S = 0.5
"""A median latency that grew by less than this many seconds is never a regression: below it,
machine load moves the number more than any change to the graph does."""


@dataclass(frozen=True)
class Turn:
    """One request of a case and what must come of it."""

    input: Any
    expect: Mapping[str, Any] = field(default_factory=dict)
    approve: bool = True


@dataclass(frozen=True)
class Case:
    """One thread of one or more turns."""

    id: str
    turns: tuple[Turn, ...]
    tags: tuple[str, ...] = ()
    user: str | None = None
    """Who signs in for the case's thread (the run's `keelgraph_user`); None: no one."""


def _check_matcher(where: str, matcher: Any) -> None:
    if isinstance(matcher, Mapping) and matcher and set(matcher) <= _OPS:
        for op in ("contains_any", "includes", "excludes", "one_of"):
            if op in matcher and not isinstance(matcher[op], list):
                raise UserError(f"{where}: {op} takes a list")
        if "regex" in matcher:
            try:
                re.compile(str(matcher["regex"]))
            except re.error as exc:
                raise UserError(f"{where}: regex does not compile ({exc})") from None


def _check_expect(where: str, expect: Any) -> Mapping[str, Any]:
    if not isinstance(expect, Mapping):
        raise UserError(f"{where}: expect must be an object")
    unknown = set(expect) - _EXPECT_KEYS
    if unknown:
        raise UserError(f"{where}: unknown expect key(s) {sorted(unknown)}; use {sorted(_EXPECT_KEYS)}")
    if expect.get("status", "ok") not in _STATUSES:
        raise UserError(f"{where}: status must be one of {sorted(_STATUSES)}")
    output = expect.get("output", {})
    if not isinstance(output, Mapping):
        raise UserError(f"{where}: expect.output must be an object of field -> matcher")
    for name, matcher in output.items():
        _check_matcher(f"{where}: output.{name}", matcher)
    for key in ("fields", "tools", "no_tools"):
        if key in expect and not isinstance(expect[key], list):
            raise UserError(f"{where}: expect.{key} must be a list of names")
    return expect


def parse_case(data: Any, where: str = "case") -> Case:
    """A case from its JSON form; a clear `UserError` naming the line and the problem otherwise."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: a case must be a JSON object")
    case_id = data.get("id")
    if not isinstance(case_id, str) or not case_id.strip():
        raise UserError(f'{where}: every case needs an "id" (text)')
    where = f"{where} ({case_id})"
    raw_turns = data.get("turns")
    if raw_turns is None:
        if "input" not in data:
            raise UserError(f'{where}: give "input" (and "expect"), or "turns"')
        raw_turns = [{k: data[k] for k in ("input", "expect", "approve") if k in data}]
    if not isinstance(raw_turns, list) or not raw_turns:
        raise UserError(f'{where}: "turns" must be a non-empty list')
    turns = []
    for number, turn in enumerate(raw_turns, 1):
        if not isinstance(turn, Mapping) or "input" not in turn:
            raise UserError(f'{where}, turn {number}: a turn is an object with "input"')
        expect = _check_expect(f"{where}, turn {number}", turn.get("expect", {}))
        turns.append(Turn(input=turn["input"], expect=expect, approve=bool(turn.get("approve", True))))
    tags = data.get("tags", [])
    user = data.get("user")
    if user is not None and (not isinstance(user, str) or not user.strip()):
        raise UserError(f'{where}: "user" must be the id of who signs in (text)')
    return Case(id=case_id, turns=tuple(turns), tags=tuple(str(t) for t in tags), user=user)


def load_dataset(path: Path) -> list[Case]:
    """The cases of a JSON Lines file (blank lines and lines starting with `//` are skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read the dataset {path}: {exc.strerror or exc}") from None
    cases: list[Case] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg} at column {exc.colno})") from None
        cases.append(parse_case(data, f"{path.name}:{number}"))
    ids = [c.id for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise UserError(f"{path}: case ids must be unique; repeated: {twice}")
    if not cases:
        raise UserError(f"{path}: no cases")
    return cases


# --- scoring -------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _match_op(op: str, want: Any, value: Any) -> bool:
    if op == "equals":
        return bool(value == want)
    if op == "contains":
        if isinstance(value, list):
            return bool(want in value)
        return str(want).lower() in _text(value).lower()
    if op == "contains_any":
        return any(str(w).lower() in _text(value).lower() for w in want)
    if op == "not_contains":
        if isinstance(value, list):
            return bool(want not in value)
        return str(want).lower() not in _text(value).lower()
    if op in {"includes", "excludes"}:
        items = value if isinstance(value, list) else []
        return all(w in items for w in want) if op == "includes" else not any(w in items for w in want)
    if op == "one_of":
        return bool(value in want)
    if op == "regex":
        return re.search(str(want), _text(value), re.IGNORECASE) is not None
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None:
        return False
    return bool(number >= want) if op == "min" else bool(number <= want)


def match(matcher: Any, value: Any) -> list[str]:
    """What does not hold of `value` under `matcher` (empty: it matches)."""
    if isinstance(matcher, Mapping) and matcher and set(matcher) <= _OPS:
        return [
            f"{op} {json.dumps(want, default=str)} fails for {_text(value)[:120]}"
            for op, want in matcher.items()
            if not _match_op(op, want, value)
        ]
    return [] if value == matcher else [f"expected {_text(matcher)[:120]}, got {_text(value)[:120]}"]


def score_turn(expect: Mapping[str, Any], result: Mapping[str, Any], tools_run: Sequence[str]) -> list[str]:
    """Every expectation of a turn that does not hold (empty: the turn is correct)."""
    status = result.get("status")
    want = expect.get("status", "ok")
    if status != want:
        error = result.get("error") or {}
        why = f" ({error.get('type')}: {str(error.get('message', ''))[:160]})" if error else ""
        return [f"status {status}, expected {want}{why}"]
    failures: list[str] = []
    output = result.get("output") or {}
    for name, matcher in (expect.get("output") or {}).items():
        if name not in output:
            failures.append(f"output.{name} is missing")
            continue
        failures += [f"output.{name}: {why}" for why in match(matcher, output[name])]
    if expect.get("fields"):
        named = {
            str(p.get("field", "")).split(".")[0] for p in (result.get("error") or {}).get("problems", [])
        }
        failures += [f"the rejection does not name {f!r}" for f in expect["fields"] if f not in named]
    failures += [f"tool {t} did not run" for t in expect.get("tools", []) if t not in tools_run]
    failures += [f"tool {t} ran" for t in expect.get("no_tools", []) if t in tools_run]
    return failures


@dataclass
class TurnResult:
    status: str
    expected: str
    contract: bool
    correct: bool
    failures: list[str]
    output: Any
    repairs: int
    model_calls: int
    tokens: int
    seconds: float
    tools: list[str]


@dataclass
class CaseResult:
    id: str
    turns: list[TurnResult]

    @property
    def correct(self) -> bool:
        return all(t.correct for t in self.turns)


def _resume(graph: Graph, config: Any, result: dict[str, Any], approve: bool) -> dict[str, Any]:
    from langgraph.types import Command

    for _ in range(4):  # each resume may reach another call that needs a person
        pauses = result.get("__interrupt__") or []
        if not pauses:
            break
        decision = {"action": "approve"} if approve else {"action": "reject", "reason": "not now (eval)"}
        resume = {call["id"]: decision for call in pauses[0].value["calls"]}
        result = graph.invoke(Command(resume=resume), config)
    return result


def run_turn(graph: Graph, config: Any, turn: Turn) -> TurnResult:
    """Send one turn (deciding approvals as the turn says) and score what came back."""
    started = time.perf_counter()
    try:
        result = _resume(graph, config, graph.invoke({"request": turn.input}, config), turn.approve)
        if result.get("__interrupt__"):
            result = {
                "status": "waiting",
                "error": {"type": "Waiting", "message": "still waits for a person"},
            }
    except Exception as exc:
        result = {"status": "crashed", "error": {"type": type(exc).__name__, "message": str(exc)}}
    seconds = time.perf_counter() - started
    try:
        log = graph.get_state(config).values.get("tool_log") or []
    except Exception:
        log = []
    tools = [str(entry.get("name")) for entry in log]
    failures = score_turn(turn.expect, result, tools)
    stats = result.get("stats") or {}
    expected = str(turn.expect.get("status", "ok"))
    return TurnResult(
        status=str(result.get("status")),
        expected=expected,
        contract=result.get("status") == expected,
        correct=not failures,
        failures=failures,
        output=result.get("output") if result.get("status") == "ok" else result.get("error"),
        repairs=int(stats.get("repairs", 0)),
        model_calls=int(stats.get("model_calls", 0)),
        tokens=int(stats.get("input_tokens", 0)) + int(stats.get("output_tokens", 0)),
        seconds=round(seconds, 3),
        tools=tools,
    )


def run_case(graph: Graph, case: Case, run_id: str) -> CaseResult:
    """Run a case's turns in one new thread."""
    config: Any = {"configurable": {"thread_id": f"eval-{run_id}-{case.id}"}}
    if case.user is not None:
        config["configurable"][IDENTITY_KEY] = case.user
    return CaseResult(id=case.id, turns=[run_turn(graph, config, turn) for turn in case.turns])


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(cases: Sequence[CaseResult]) -> dict[str, float]:
    """The run's scores: rates over turns (and cases), means per turn, latency quantiles."""
    turns = [t for c in cases for t in c.turns]
    n = len(turns) or 1
    seconds = [t.seconds for t in turns]
    return {
        "cases": len(cases),
        "turns": len(turns),
        "contract": round(sum(t.contract for t in turns) / n, 4),
        "correct": round(sum(t.correct for t in turns) / n, 4),
        "cases_correct": round(sum(c.correct for c in cases) / (len(cases) or 1), 4),
        "repairs": round(sum(t.repairs for t in turns) / n, 3),
        "model_calls": round(sum(t.model_calls for t in turns) / n, 3),
        "tokens": round(sum(t.tokens for t in turns) / n, 1),
        "latency_p50": round(statistics.median(seconds) if seconds else 0.0, 3),
        "latency_p95": round(_quantile(seconds, 0.95), 3),
        "crashed": sum(t.status == "crashed" for t in turns),
    }


# --- running and comparing ----------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate(
    graph: Graph,
    cases: Sequence[Case],
    *,
    label: str = "eval",
    meta: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every case (each in a new thread) and return the report: summary, cases, metadata."""
    run_id = uuid.uuid4().hex[:8]
    results: list[CaseResult] = []
    bar = progress or Progress(len(cases), label)
    started = time.perf_counter()
    try:
        for case in cases:
            result = run_case(graph, case, run_id)
            results.append(result)
            marks = " ".join("ok" if t.correct else f"FAIL({t.status})" for t in result.turns)
            bar.advance(note=f"{case.id}: {marks}")
    finally:
        if progress is None:
            bar.close()
    return {
        "version": 1,
        "run_id": run_id,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 2),
        "dataset_sha": _digest([asdict(c) for c in cases]),
        **dict(meta or {}),
        "summary": summarize(results),
        "cases": [{"id": c.id, "correct": c.correct, "turns": [asdict(t) for t in c.turns]} for c in results],
    }


@dataclass(frozen=True)
class Regression:
    metric: str
    baseline: float
    now: float
    limit: str

    def __str__(self) -> str:
        return f"{self.metric}: {self.baseline} -> {self.now} (allowed: {self.limit})"


def compare(
    report: Mapping[str, Any], baseline: Mapping[str, Any], thresholds: Mapping[str, float] | None = None
) -> list[Regression]:
    """The metrics of `report` that moved beyond the thresholds from `baseline` (empty: no drift)."""
    limits = {**DEFAULT_THRESHOLDS, **dict(thresholds or {})}
    known = set(DEFAULT_THRESHOLDS) | OPTIONAL_THRESHOLDS
    unknown = set(limits) - known
    if unknown:
        raise UserError(f"unknown threshold(s) {sorted(unknown)}; use {sorted(known)}")
    now, base = report["summary"], same_cases(report, baseline)
    found: list[Regression] = []
    for metric in ("contract", "correct"):
        if base[metric] - now[metric] > limits[metric] + 1e-9:
            found.append(Regression(metric, base[metric], now[metric], f"a drop of {limits[metric]:.2f}"))
    if now["repairs"] - base["repairs"] > limits["repairs"] + 1e-9:
        found.append(Regression("repairs", base["repairs"], now["repairs"], f"+{limits['repairs']} per turn"))
    for metric, key, floor in (("tokens", "tokens", 0.0), ("latency", "latency_p50", LATENCY_FLOOR_S)):
        grew = now[key] - base[key]
        if metric not in limits:
            continue
        if base[key] > 0 and now[key] > base[key] * (1 + limits[metric]) + 1e-9 and grew > floor:
            found.append(Regression(key, base[key], now[key], f"+{limits[metric]:.0%}"))
    if now.get("crashed", 0) > base.get("crashed", 0):
        found.append(
            Regression("crashed", base.get("crashed", 0), now["crashed"], "no more than the baseline")
        )
    return found


def same_cases(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> Mapping[str, Any]:
    """The baseline's summary over the cases `report` ran: all of them, or, for a run of some cases
    (`--case`), the baseline's own results for just those, so a subset is compared like for like."""
    ran = [c.get("id") for c in report.get("cases", [])]
    recorded = {c.get("id"): c for c in baseline.get("cases", [])}
    if not ran or set(ran) == set(recorded) or not set(ran) < set(recorded):
        return dict(baseline["summary"])
    turns = [t for i in ran for t in recorded[i].get("turns", [])]
    n = len(turns) or 1
    seconds = [float(t.get("seconds", 0.0)) for t in turns]
    return {
        **baseline["summary"],
        "cases": len(ran),
        "turns": len(turns),
        "contract": round(sum(bool(t.get("contract")) for t in turns) / n, 4),
        "correct": round(sum(bool(t.get("correct")) for t in turns) / n, 4),
        "cases_correct": round(sum(bool(recorded[i].get("correct")) for i in ran) / len(ran), 4),
        "repairs": round(sum(t.get("repairs", 0) for t in turns) / n, 3),
        "model_calls": round(sum(t.get("model_calls", 0) for t in turns) / n, 3),
        "tokens": round(sum(t.get("tokens", 0) for t in turns) / n, 1),
        "latency_p50": round(statistics.median(seconds) if seconds else 0.0, 3),
        "latency_p95": round(_quantile(seconds, 0.95), 3),
        "crashed": sum(t.get("status") == "crashed" for t in turns),
    }


def newly_failing(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """Ids of cases correct in the baseline and not now (for the reader; not itself a regression)."""
    before = {c["id"]: c["correct"] for c in baseline.get("cases", [])}
    return [c["id"] for c in report["cases"] if before.get(c["id"]) and not c["correct"]]


def read_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read the baseline {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"the baseline {path} is not JSON ({exc.msg}); save one with --save-baseline"
        ) from None
    if not isinstance(data, dict) or "summary" not in data:
        raise UserError(f"{path} is not an eval report; save one with --save-baseline")
    return data


def write_report(report: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# --- recorded threads ----------------------------------------------------------------------


def _free_text(value: Any) -> bool:
    return isinstance(value, str) and (len(value) > 40 or " " in value.strip())


def recorded_cases(
    graph: Graph, thread_ids: Iterable[str], fields: Sequence[str] | None = None
) -> list[Case]:
    """Cases replaying what recorded threads were sent, expecting what they answered then.

    Each turn's request and outcome come from the thread's checkpoints (the last checkpoint of
    each turn). The replay expects the same status and, for answers, the same values of `fields`
    (default: every field that is not free text, i.e. numbers, lists, flags and one-word values).
    """
    cases = []
    for thread_id in thread_ids:
        config: Any = {"configurable": {"thread_id": thread_id}}
        ends: dict[int, Mapping[str, Any]] = {}
        for snapshot in graph.get_state_history(config):
            values = snapshot.values
            turn = values.get("turn")
            if snapshot.next or not isinstance(turn, int) or turn in ends or "status" not in values:
                continue
            ends[turn] = values
        if not ends:
            raise UserError(f"thread {thread_id!r} has no finished turns to replay")
        turns = []
        for number in sorted(ends):
            values = ends[number]
            expect: dict[str, Any] = {"status": values["status"]}
            output = values.get("output") if values["status"] == "ok" else None
            if isinstance(output, Mapping):
                keep = fields or [k for k, v in output.items() if not _free_text(v)]
                expect["output"] = {k: output[k] for k in keep if k in output}
            turns.append(Turn(input=values.get("request"), expect=expect))
        cases.append(Case(id=f"replay-{thread_id}", turns=tuple(turns), tags=("replay",)))
    return cases


# --- printing ------------------------------------------------------------------------------


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_table(report: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """The per-case table and the summary (with the baseline beside it when there is one)."""
    lines = [_row(["case", "turns", "status", "correct", "repairs", "tokens", "s", "why not"])]
    lines.append(_row(["---", "---:", "---", "---", "---:", "---:", "---:", "---"]))
    for case in report["cases"]:
        turns = case["turns"]
        why = "; ".join(f for t in turns for f in t["failures"])[:110]
        lines.append(
            _row(
                [
                    case["id"],
                    len(turns),
                    ",".join(t["status"] for t in turns),
                    "yes" if case["correct"] else "NO",
                    sum(t["repairs"] for t in turns),
                    sum(t["tokens"] for t in turns),
                    f"{sum(t['seconds'] for t in turns):.1f}",
                    why,
                ]
            )
        )
    now = report["summary"]
    names = [
        ("contract", "contract pass rate (turns)", "{:.1%}"),
        ("correct", "correct (turns)", "{:.1%}"),
        ("cases_correct", "correct (cases)", "{:.1%}"),
        ("repairs", "repairs / turn", "{:.2f}"),
        ("model_calls", "model calls / turn", "{:.2f}"),
        ("tokens", "tokens / turn", "{:.0f}"),
        ("latency_p50", "latency p50 (s)", "{:.2f}"),
        ("latency_p95", "latency p95 (s)", "{:.2f}"),
    ]
    lines += ["", _row(["metric", "now", *(["baseline"] if baseline else [])])]
    lines.append(_row(["---", "---:", *(["---:"] if baseline else [])]))
    base = same_cases(report, baseline) if baseline else {}
    for key, title, fmt in names:
        cells = [title, fmt.format(now[key])]
        if baseline:
            cells.append(fmt.format(base.get(key, 0)))
        lines.append(_row(cells))
    return "\n".join(lines)


def run_cli(
    graph_factory: Callable[..., Graph],
    cases: Sequence[Case],
    *,
    out: Path,
    baseline: Path | None = None,
    save_baseline: Path | None = None,
    thresholds: Mapping[str, float] | None = None,
    factory_args: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    min_correct: float | None = None,
    print_: Callable[[str], None] = print,
) -> int:
    """What `keelgraph eval` does once its arguments are read; returns the exit code."""
    base = read_report(baseline) if baseline else None
    if base is not None:
        compare(base, base, thresholds)  # unknown threshold names fail before any model call
    graph = graph_factory(**dict(factory_args or {}))
    report = evaluate(graph, cases, label="eval", meta=meta)
    write_report(report, out)
    print_(format_table(report, base))
    print_(f"\nreport: {out}")
    if save_baseline:
        write_report(report, save_baseline)
        print_(f"baseline saved: {save_baseline}")
    below = min_correct is not None and report["summary"]["correct"] < min_correct - 1e-9
    if below:
        print_(
            f"BELOW --min-correct: {report['summary']['correct']:.1%} of turns correct, {min_correct:.1%} required"
        )
    if base is None:
        return 1 if below else 0
    if base.get("dataset_sha") != report["dataset_sha"]:
        print_("note: the baseline was taken on a different version of the dataset")
    regressions = compare(report, base, thresholds)
    lost = newly_failing(report, base)
    if lost:
        print_(f"cases correct in the baseline, not now: {', '.join(lost)}")
    if regressions:
        print_("REGRESSION against the baseline:\n" + "\n".join(f"  - {r}" for r in regressions))
        return 1
    print_("no regression against the baseline")
    return 1 if below else 0
