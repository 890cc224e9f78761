"""Does the system beat the prompt? The reliability benchmark, on the embedded model over HTTP.

Runs the fixed task set of `bench/reliability_tasks.py` (50 tasks: nested extraction, tool use
with arguments, answers cross-checked against a table) three ways, on the same model server:

- bare:      the prompt with the answer's fields written into it (described exactly as keelgraph
             describes them), one call, parse what comes back;
- langchain: what a LangChain user picks instead: `with_structured_output(method="function_calling")`
             (the default `json_schema` method is refused by the llama.cpp server, and a schema with
             a `pattern` crashes it, so the baseline gets the grammar-safe schema keelgraph sends and
             its reply is validated against the same Pydantic model), and for tasks with tools
             `create_agent(model, tools, response_format=...)`;
- keelgraph: `build_graph(contract, tools)` with the family's contract and checks.

At temperature 0 each task runs once; at 0.7 (the usual sampling temperature) five times:
pass^1 is the share of correct runs, pass^5 the share of tasks correct in all five runs.

Two task sets (`--set dev|heldout|both`, default both), each reported on its own (its own blocks
and table rows, a `set` key in every block and run, a `set` column in the table):

- dev:     `bench/reliability_tasks.py`, the 50 tasks tuned together with the library;
- heldout: `bench/heldout_tasks.py`, 45 tasks in five other families written from the README before
           any model ran on them, some of two turns (each method keeps the conversation: the bare
           prompt its earlier requests and replies as messages, LangChain the message history,
           keelgraph one thread on an `InMemorySaver` per task). A task is correct only when every
           turn is. The file's SHA-256 is recorded in the results (`heldout_sha256`).

`--set dev` runs and writes exactly what the benchmark did before the held-out set existed (plus
`refused` and `valid_but_wrong` in each summary); with `both` the dev set runs first, in the same
order, so its numbers are those of a `--set dev` run on a fresh server.

Run:   .venv/bin/python bench/reliability.py            (both sets: about 80 minutes on 2 cores)
Quick: .venv/bin/python bench/reliability.py --quick    (1 task per family, 2 repeats: a smoke test)
Writes bench/results/reliability.{json,md,png} (or --out DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heldout_tasks
from reliability_tasks import SEED, ToolCall, correct, families, tasks

from keelgraph import build_graph
from keelgraph.contracts.decision import grammar_safe, inline_refs
from keelgraph.graphs.prompt import describe_fields
from keelgraph.local.embedded import LocalModelServer
from keelgraph.progress import Progress
from keelgraph.runtime.models import ModelChain, output_cap
from keelgraph.settings import LARGER_MODEL_NAME, Settings

METHODS = ("bare", "langchain", "keelgraph", "cascade")
"""`cascade` is keelgraph with the larger local model taking a turn after two failed repairs
(`ModelChain(handover_after=2)`, the same server serving both): its own column, with its cost."""
DEFAULT_METHODS = ("bare", "langchain", "keelgraph")
HANDOVER_AFTER = 2
SETS = ("dev", "heldout")
MAX_TOKENS = 512
HELDOUT_FILE = Path(__file__).resolve().parent / "heldout_tasks.py"


def heldout_sha256() -> str:
    """The first 12 hex digits of the held-out task file's SHA-256: which held-out set ran."""
    return hashlib.sha256(HELDOUT_FILE.read_bytes()).hexdigest()[:12]


class Meter(BaseCallbackHandler):
    """Counts model calls and tokens of everything run under it (all three methods alike)."""

    def __init__(self) -> None:
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.calls += 1

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        for gens in response.generations:
            for gen in gens:
                usage = (
                    getattr(gen.message, "usage_metadata", None) if isinstance(gen, ChatGeneration) else None
                )
                if usage:
                    self.input_tokens += usage["input_tokens"]
                    self.output_tokens += usage["output_tokens"]


@dataclass
class Outcome:
    valid: bool
    correct: bool
    output: Any
    error: str | None
    refused: bool = False
    """keelgraph ended the run with a typed failure (status other than "ok")."""
    turns: list[dict[str, bool]] | None = None
    """Held-out tasks: each turn's valid / correct / refused."""


@dataclass(frozen=True)
class TaskSet:
    """A task set as the runners see it: its families and tasks, each task's turns, and its judge."""

    name: str
    families: Mapping[str, Any]
    tasks: Sequence[Any] = field(default_factory=tuple)

    @property
    def heldout(self) -> bool:
        return self.name == "heldout"

    def turns(self, task: Any) -> list[dict[str, Any]]:
        return list(task.turns) if self.heldout else [task.request]

    def correct(self, task: Any, turn: int, output: Any, *, bare: bool = False) -> bool:
        """The set's own rule: the dev set scores a bare tool task by its tool call (`bare`); the
        held-out set judges every method's answer alike."""
        if self.heldout:
            return heldout_tasks.correct(task, turn, output)
        return correct(task, output, bare=bare)

    def combine(self, turns: Sequence[Outcome]) -> Outcome:
        """One run's outcome from its turns' (a dev task has one turn and keeps its old shape)."""
        if not self.heldout:
            return turns[0]
        errors = [f"turn {i + 1}: {t.error}" for i, t in enumerate(turns) if t.error]
        return Outcome(
            valid=all(t.valid for t in turns),
            correct=all(t.correct for t in turns),
            output=[t.output for t in turns],
            error="\n".join(errors)[:16000] or None,
            refused=any(t.refused for t in turns),
            turns=[{"valid": t.valid, "correct": t.correct, "refused": t.refused} for t in turns],
        )


def task_set(name: str, seed: int = SEED) -> TaskSet:
    """`dev` (the seed's 50 tasks) or `heldout` (the fixed 45)."""
    if name == "dev":
        return TaskSet("dev", families(), tasks(seed))
    if name == "heldout":
        return TaskSet("heldout", heldout_tasks.families(), heldout_tasks.tasks())
    raise ValueError(f"unknown task set {name!r}; choose from {SETS}")


def _model(url: str, model: str, temperature: float) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=url,
        api_key="not-needed",  # type: ignore[arg-type]
        temperature=temperature,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        extra_body=output_cap(url, MAX_TOKENS),  # the cap llama.cpp honours, for every method alike
        timeout=180,
        max_retries=1,
    )


def _alive(url: str) -> bool:
    try:
        return httpx.get(f"{url}/models", timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def _fields(model: type[BaseModel]) -> str:
    return describe_fields(inline_refs(model.model_json_schema()))


def _strip_fences(text: str) -> str:
    found = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    return (found.group(1) if found else text).strip()


# -- the three methods --------------------------------------------------------------------------


def _tool_list(tools: Sequence[Any]) -> str:
    return "\n".join(f"- {t.name}{json.dumps(t.args)}: {t.description}" for t in tools)


def run_bare(ts: TaskSet, family: Any, task: Any, llm: BaseChatModel, meter: Meter) -> Outcome:
    contract = family.contract
    if family.tools and not ts.heldout:
        target: type[BaseModel] = ToolCall
        ask = f"Tools you can call:\n{_tool_list(family.tools)}\nChoose the one tool call that answers the question."
    elif family.tools:
        # One call cannot run tools: the bare prompt is told what they are and asked for the answer.
        target = contract.output
        ask = (
            f"These tools hold the facts, but you cannot call them in this reply:\n{_tool_list(family.tools)}\n"
            "Answer directly with the values you expect them to give."
        )
    else:
        target = contract.output
        ask = ""
    system = (
        f"{contract.instructions}\n{ask}\nReply with only a JSON object with these fields:\n{_fields(target)}"
    )
    messages: list[BaseMessage] = [SystemMessage(system)]
    turns = []
    for i, request in enumerate(ts.turns(task)):
        messages.append(HumanMessage(contract.render_input(contract.input.model_validate(request))))
        reply = llm.invoke(messages, config={"callbacks": [meter]})
        text = str(reply.content)
        messages.append(AIMessage(text))  # the next turn sees this reply, as a chat would
        try:
            value = target.model_validate(json.loads(_strip_fences(text))).model_dump(mode="json")
        except (json.JSONDecodeError, ValidationError) as exc:
            turns.append(Outcome(False, False, text[:500], f"{type(exc).__name__}: {str(exc)[:300]}"))
            continue
        turns.append(Outcome(True, ts.correct(task, i, value, bare=bool(family.tools)), value, None))
    return ts.combine(turns)


def run_langchain(ts: TaskSet, family: Any, task: Any, llm: BaseChatModel, meter: Meter) -> Outcome:
    contract = family.contract
    config: Any = {"callbacks": [meter], "recursion_limit": 12}
    history: list[BaseMessage] = []
    turns = []
    if family.tools:
        from langchain.agents import create_agent

        agent = create_agent(
            llm,
            tools=list(family.tools),
            system_prompt=contract.instructions,
            response_format=contract.output,
        )
    else:
        schema = {
            "title": contract.output.__name__,
            **grammar_safe(inline_refs(contract.output.model_json_schema())),
        }
        structured = llm.with_structured_output(schema, method="function_calling", include_raw=True)
    for i, request in enumerate(ts.turns(task)):
        human = HumanMessage(contract.render_input(contract.input.model_validate(request)))
        if family.tools:
            state = agent.invoke({"messages": [*history, human]}, config=config)
            history = list(state["messages"])  # the agent's own history, tool calls included
            parsed = state.get("structured_response")
            if parsed is None:
                last = state["messages"][-1]
                turns.append(Outcome(False, False, str(last.content)[:500], "no structured_response"))
                continue
        else:
            result: Any = structured.invoke(
                [SystemMessage(contract.instructions), *history, human], config=config
            )
            parsed = result["parsed"]
            if parsed is None:
                raw = result["raw"]
                shown = raw.tool_calls or raw.content
                history += [human, AIMessage(str(shown))]
                turns.append(
                    Outcome(
                        False, False, str(shown)[:500], f"parsing_error: {str(result['parsing_error'])[:300]}"
                    )
                )
                continue
            history += [human, AIMessage(json.dumps(parsed, default=str))]
        try:
            value = contract.output.model_validate(parsed).model_dump(mode="json")
        except ValidationError as exc:
            turns.append(Outcome(False, False, parsed, f"ValidationError: {str(exc)[:300]}"))
            continue
        turns.append(Outcome(True, ts.correct(task, i, value), value, None))
    return ts.combine(turns)


def run_keelgraph(ts: TaskSet, family: Any, task: Any, llm: BaseChatModel, meter: Meter) -> Outcome:
    if not ts.heldout:
        graph = build_graph(family.contract, family.tools, model=llm, checkpointer=None)
        result = graph.invoke({"request": task.request}, config={"callbacks": [meter]})
        if result["status"] != "ok":
            # Every attempt's raw output and problems: what a failure analysis needs.
            return Outcome(False, False, None, json.dumps(result.get("error"))[:8000], refused=True)
        return Outcome(True, correct(task, result["output"]), result["output"], None)
    # One thread per task, kept in memory: each turn is one invoke on it.
    graph = build_graph(
        family.contract,
        family.tools,
        model=llm,
        checkpointer=InMemorySaver(),
        **dict(getattr(family, "options", {})),
    )
    config: Any = {"callbacks": [meter], "configurable": {"thread_id": f"{task.id}-{uuid4().hex[:12]}"}}
    turns = []
    for i, request in enumerate(ts.turns(task)):
        result = graph.invoke({"request": request}, config=config)
        if result["status"] != "ok":
            turns.append(Outcome(False, False, None, json.dumps(result.get("error"))[:8000], refused=True))
            continue
        turns.append(Outcome(True, ts.correct(task, i, result["output"]), result["output"], None))
    return ts.combine(turns)


RUNNERS: Mapping[str, Callable[[TaskSet, Any, Any, BaseChatModel, Meter], Outcome]] = {
    "bare": run_bare,
    "langchain": run_langchain,
    "keelgraph": run_keelgraph,
    "cascade": run_keelgraph,  # given a ModelChain of the two local models (see `run_all`)
}


# -- running and reporting ----------------------------------------------------------------------


def run_one(method: str, ts: TaskSet, task: Any, llm: BaseChatModel) -> dict[str, Any]:
    meter = Meter()
    started = time.perf_counter()
    try:
        outcome = RUNNERS[method](ts, ts.families[task.family], task, llm, meter)
    except Exception as exc:  # a baseline blowing up is a data point, not the end of the benchmark
        outcome = Outcome(False, False, None, f"{type(exc).__name__}: {str(exc)[:300]}")
    run = {
        "task": task.id,
        "family": task.family,
        "valid": outcome.valid,
        "correct": outcome.correct,
        "refused": outcome.refused,
        "calls": meter.calls,
        "tokens": meter.input_tokens + meter.output_tokens,
        "seconds": round(time.perf_counter() - started, 3),
        "output": outcome.output,
        "error": outcome.error,
    }
    if outcome.turns is not None:
        run["turns"] = outcome.turns
    return run


def summarize(runs: Sequence[dict[str, Any]], repeats: int) -> dict[str, Any]:
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    n = len(runs)
    summary = {
        "tasks": len(by_task),
        "runs": n,
        "valid": round(sum(r["valid"] for r in runs) / n, 4),
        "pass1": round(sum(r["correct"] for r in runs) / n, 4),
        # What each method hands on that is wrong, and what keelgraph stopped with a typed failure.
        "valid_but_wrong": round(sum(r["valid"] and not r["correct"] for r in runs) / n, 4),
        "refused": round(sum(bool(r.get("refused")) for r in runs) / n, 4),
        "calls_per_task": round(sum(r["calls"] for r in runs) / n, 2),
        "tokens_per_task": round(sum(r["tokens"] for r in runs) / n, 1),
        "seconds_per_task": round(sum(r["seconds"] for r in runs) / n, 2),
    }
    if repeats > 1:
        summary[f"pass^{repeats}"] = round(
            sum(all(r["correct"] for r in rs) for rs in by_task.values()) / len(by_task), 4
        )
    fams: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        fams.setdefault(r["family"], []).append(r)
    summary["by_family"] = {
        f: {
            "valid": round(sum(r["valid"] for r in rs) / len(rs), 4),
            "pass1": round(sum(r["correct"] for r in rs) / len(rs), 4),
        }
        for f, rs in fams.items()
    }
    return summary


def _ordered(blocks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Blocks by set, then temperature, then in the order of METHODS (whatever order they ran in)."""
    rank = {m: i for i, m in enumerate(METHODS)}
    sets = {name: i for i, name in enumerate(SETS)}
    return sorted(
        blocks,
        key=lambda b: (sets.get(b.get("set", "dev"), 0), b["temperature"], rank.get(b["method"], len(rank))),
    )


def _labelled(results: Mapping[str, Any]) -> bool:
    """Whether the blocks carry their set (any run but `--set dev`)."""
    return any("set" in b for b in results["blocks"])


def table(results: Mapping[str, Any]) -> str:
    repeats = results["config"]["repeats"]
    if not _labelled(results):  # `--set dev`: the table as it always was
        lines = [
            f"| method | temp | valid | pass^1 | pass^{repeats} | model calls / task | tokens / task | s / task |",
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines = [
            f"| set | method | temp | valid | pass^1 | pass^{repeats} | valid but wrong | refused | "
            "model calls / task | tokens / task | s / task |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for block in _ordered(results["blocks"]):
        s = block["summary"]
        five = s.get(f"pass^{repeats}")
        lead = f"| {block['set']} " if "set" in block else ""
        extra = (
            f"{s.get('valid_but_wrong', 0):.1%} | {s.get('refused', 0):.1%} | " if _labelled(results) else ""
        )
        lines.append(
            f"{lead}| {block['method']} | {block['temperature']} | {s['valid']:.1%} | {s['pass1']:.1%} | "
            f"{'-' if five is None else f'{five:.1%}'} | {extra}{s['calls_per_task']:.2f} | "
            f"{s['tokens_per_task']:.0f} | {s['seconds_per_task']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    repeats = results["config"]["repeats"]
    metrics = [("valid", "valid output"), ("pass1", "pass^1")]
    temps = sorted({b["temperature"] for b in results["blocks"]})
    sets = [name for name in SETS if any(b.get("set", "dev") == name for b in results["blocks"])]
    fig, axes = plt.subplots(len(sets), len(temps), figsize=(5.5 * len(temps), 4 * len(sets)), squeeze=False)
    colors = {"bare": "#9e9e9e", "langchain": "#4e79a7", "keelgraph": "#e15759", "cascade": "#f28e2b"}
    for row, name in zip(axes, sets, strict=True):
        for ax, temp in zip(row, temps, strict=True):
            blocks = [
                b
                for b in _ordered(results["blocks"])
                if b["temperature"] == temp and b.get("set", "dev") == name
            ]
            names = (
                [*metrics, (f"pass^{repeats}", f"pass^{repeats}")] if temp > 0 and repeats > 1 else metrics
            )
            width = 0.8 / max(1, len(blocks))
            for i, block in enumerate(blocks):
                values = [block["summary"].get(key, 0.0) * 100 for key, _ in names]
                xs = [j + (i - (len(blocks) - 1) / 2) * width for j in range(len(names))]
                bars = ax.bar(xs, values, width, label=block["method"], color=colors.get(block["method"]))
                ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.set_xticks(range(len(names)), [label for _, label in names])
            ax.set_ylim(0, 122)
            ax.set_ylabel("% of runs (pass^k: % of tasks)")
            ax.set_title(f"{name} set, temperature {temp}" if _labelled(results) else f"temperature {temp}")
            ax.legend(loc="upper center", ncol=max(1, len(blocks)), fontsize=8, frameon=False)
    fig.suptitle(f"{results['config']['tasks']} tasks, {results['config']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(
    chosen: Sequence[tuple[TaskSet, Sequence[Any]]],
    methods: Sequence[str],
    schedule: Sequence[tuple[float, int]],
    settings: Settings,
    partial: Path | None = None,
    *,
    label: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Every method on every task, set by set (the dev set first), method by method (so the
    server's prompt cache helps each alike). With `label`, every block and run names its set.

    Each run is also appended to `partial` (JSON lines) as it ends, so a cut-off run keeps its data."""
    total = sum(len(picked) * reps for _, picked in chosen for _, reps in schedule) * len(methods)
    blocks: list[dict[str, Any]] = []
    restarts = 0
    if "cascade" in methods:
        settings = dataclasses.replace(settings, cascade=True)  # one server, both models
    with LocalModelServer(settings) as server, Progress(total, "reliability", unit="runs") as bar:
        for ts, picked in chosen:
            tag: dict[str, Any] = {"set": ts.name} if label else {}
            for temperature, repeats in schedule:
                for method in methods:
                    runs = []
                    for task in picked:
                        for _ in range(repeats):
                            llm: Any = _model(server.url, settings.model, temperature)
                            if method == "cascade":
                                larger = _model(server.url, LARGER_MODEL_NAME, temperature)
                                llm = ModelChain((llm, larger), handover_after=HANDOVER_AFTER)
                            runs.append({**tag, **run_one(method, ts, task, llm)})
                            if partial is not None:
                                with partial.open("a") as f:
                                    f.write(
                                        json.dumps({"method": method, "temperature": temperature, **runs[-1]})
                                        + "\n"
                                    )
                            if "Connection" in str(runs[-1]["error"]) and not _alive(server.url):
                                # A request can crash the server (a bad grammar did): restart and count it.
                                restarts += 1
                                bar.say(f"model server down; restarting it (restart {restarts})")
                                server.start()
                        last = runs[-1]
                        bar.advance(
                            repeats,
                            note=f"{method:9} t={temperature} {task.id}: "
                            f"{sum(r['correct'] for r in runs[-repeats:])}/{repeats} correct, "
                            f"{last['calls']} calls, {last['seconds']:.1f} s"
                            + (f"  ({last['error'][:120]})" if last["error"] else ""),
                        )
                    summary = summarize(runs, repeats)
                    blocks.append(
                        {
                            **tag,
                            "method": method,
                            "temperature": temperature,
                            "summary": summary,
                            "runs": runs,
                        }
                    )
                    shown = json.dumps({k: v for k, v in summary.items() if k != "by_family"})
                    bar.say(f"== {ts.name + ' ' if label else ''}{method} t={temperature}: {shown}")
    return blocks, restarts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set",
        dest="task_set",
        choices=(*SETS, "both"),
        default="both",
        help="the development set, the held-out set, or both (each reported on its own)",
    )
    parser.add_argument("--quick", action="store_true", help="1 task per family, 2 repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per task at the sampling temperature")
    parser.add_argument("--temperature", type=float, default=0.7, help="the sampling temperature")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {','.join(METHODS)}")
    parser.add_argument(
        "--families",
        default="",
        help="only these families (comma-separated; default: every family of each set)",
    )
    parser.add_argument("--limit", type=int, default=0, help="at most this many tasks per family")
    parser.add_argument("--tasks", default="", help="only these task ids (comma-separated), for a quick look")
    parser.add_argument(
        "--seed", type=int, default=SEED, help="the dev set's seed (the held-out set is fixed)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: methods and families must exist in the chosen sets."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.repeats = args.limit or 1, min(args.repeats, 2)
    args.sets = list(SETS) if args.task_set == "both" else [args.task_set]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    known: dict[str, list[str]] = {"dev": list(families()), "heldout": list(heldout_tasks.FAMILY_NAMES)}
    args.families = [f for f in args.families.split(",") if f]
    offered = [f for name in args.sets for f in known[name]]
    missing = [f for f in args.families if f not in offered]
    if missing:
        parser.error(f"unknown families {missing} for --set {args.task_set}; choose from {offered}")
    return args


def choose(args: argparse.Namespace) -> list[tuple[TaskSet, list[Any]]]:
    """The tasks to run, per set (a set with none left out), in the order of its families."""
    chosen = []
    for name in args.sets:
        ts = task_set(name, args.seed)
        picked: list[Any] = []
        for family in args.families or list(ts.families):
            if family not in ts.families:
                continue
            in_family = [t for t in ts.tasks if t.family == family]
            picked += in_family[: args.limit] if args.limit else in_family
        if args.tasks:
            picked = [t for t in picked if t.id in args.tasks.split(",")]
        if picked:
            chosen.append((ts, picked))
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = choose(args)
    if not chosen:
        _parser().error("no task matches --families / --tasks in the chosen set(s)")
    label = args.sets != ["dev"]  # `--set dev` writes exactly what it always did
    settings = Settings.from_env()
    args.out.mkdir(parents=True, exist_ok=True)
    schedule = [(0.0, 1), (args.temperature, args.repeats)] if args.repeats else [(0.0, 1)]
    started = time.perf_counter()
    config: dict[str, Any] = {
        "tasks": sum(len(picked) for _, picked in chosen),
        "repeats": args.repeats,
        "seed": args.seed,
        "model": settings.model,
        "max_tokens": MAX_TOKENS,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "llama_threads": settings.llama_threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    if label:
        config["sets"] = [ts.name for ts, _ in chosen]
        config["tasks_by_set"] = {ts.name: len(picked) for ts, picked in chosen}
    if any(ts.heldout for ts, _ in chosen):
        config["heldout_seed"] = heldout_tasks.SEED
        config["heldout_sha256"] = heldout_sha256()
    results: dict[str, Any] = {"config": config, "blocks": []}
    partial = args.out / "reliability.partial.jsonl"
    partial.unlink(missing_ok=True)
    blocks, restarts = run_all(chosen, args.methods, schedule, settings, partial, label=label)
    partial.unlink(missing_ok=True)  # the complete results follow
    results["blocks"] = blocks
    results["config"]["server_restarts"] = restarts
    results["config"]["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    (args.out / "reliability.json").write_text(json.dumps(results, indent=1) + "\n")
    md = table(results)
    (args.out / "reliability.md").write_text(md + "\n")
    plot(results, args.out / "reliability.png")
    print(md)
    print(f"wrote {args.out / 'reliability.json'}, reliability.md and reliability.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
