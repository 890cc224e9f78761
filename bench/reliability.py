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

Run:   .venv/bin/python bench/reliability.py            (about 40 minutes on 2 cores)
Quick: .venv/bin/python bench/reliability.py --quick    (3 tasks, 2 repeats: the smoke test CI runs)
Writes bench/results/reliability.{json,md,png} (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_tasks import SEED, Family, Task, ToolCall, correct, families, tasks

from keelgraph import build_graph
from keelgraph.contracts.decision import grammar_safe, inline_refs
from keelgraph.graphs.prompt import describe_fields
from keelgraph.local.embedded import LocalModelServer
from keelgraph.progress import Progress
from keelgraph.runtime.models import output_cap
from keelgraph.settings import Settings

METHODS = ("bare", "langchain", "keelgraph")
MAX_TOKENS = 512


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


def run_bare(family: Family, task: Task, llm: ChatOpenAI, meter: Meter) -> Outcome:
    contract = family.contract
    request = contract.render_input(contract.input.model_validate(task.request))
    if family.tools:
        target: type[BaseModel] = ToolCall
        tools = "\n".join(f"- {t.name}{json.dumps(t.args)}: {t.description}" for t in family.tools)
        ask = f"Tools you can call:\n{tools}\nChoose the one tool call that answers the question."
    else:
        target = contract.output
        ask = ""
    system = (
        f"{contract.instructions}\n{ask}\nReply with only a JSON object with these fields:\n{_fields(target)}"
    )
    reply = llm.invoke([SystemMessage(system), HumanMessage(request)], config={"callbacks": [meter]})
    text = str(reply.content)
    try:
        value = target.model_validate(json.loads(_strip_fences(text))).model_dump(mode="json")
    except (json.JSONDecodeError, ValidationError) as exc:
        return Outcome(False, False, text[:500], f"{type(exc).__name__}: {str(exc)[:300]}")
    return Outcome(True, correct(task, value, bare=bool(family.tools)), value, None)


def run_langchain(family: Family, task: Task, llm: ChatOpenAI, meter: Meter) -> Outcome:
    contract = family.contract
    request = contract.render_input(contract.input.model_validate(task.request))
    config: Any = {"callbacks": [meter], "recursion_limit": 12}
    if family.tools:
        from langchain.agents import create_agent

        agent = create_agent(
            llm,
            tools=list(family.tools),
            system_prompt=contract.instructions,
            response_format=contract.output,
        )
        state = agent.invoke({"messages": [HumanMessage(request)]}, config=config)
        parsed = state.get("structured_response")
        if parsed is None:
            last = state["messages"][-1]
            return Outcome(False, False, str(last.content)[:500], "no structured_response")
    else:
        schema = {
            "title": contract.output.__name__,
            **grammar_safe(inline_refs(contract.output.model_json_schema())),
        }
        structured = llm.with_structured_output(schema, method="function_calling", include_raw=True)
        result: Any = structured.invoke(
            [SystemMessage(contract.instructions), HumanMessage(request)], config=config
        )
        parsed = result["parsed"]
        if parsed is None:
            raw = result["raw"]
            shown = raw.tool_calls or raw.content
            return Outcome(
                False, False, str(shown)[:500], f"parsing_error: {str(result['parsing_error'])[:300]}"
            )
    try:
        value = contract.output.model_validate(parsed).model_dump(mode="json")
    except ValidationError as exc:
        return Outcome(False, False, parsed, f"ValidationError: {str(exc)[:300]}")
    return Outcome(True, correct(task, value), value, None)


def run_keelgraph(family: Family, task: Task, llm: ChatOpenAI, meter: Meter) -> Outcome:
    graph = build_graph(family.contract, family.tools, model=llm, checkpointer=None)
    result = graph.invoke({"request": task.request}, config={"callbacks": [meter]})
    if result["status"] != "ok":
        # Every attempt's raw output and problems: what a failure analysis needs.
        return Outcome(False, False, None, json.dumps(result.get("error"))[:8000])
    return Outcome(True, correct(task, result["output"]), result["output"], None)


RUNNERS: Mapping[str, Callable[[Family, Task, ChatOpenAI, Meter], Outcome]] = {
    "bare": run_bare,
    "langchain": run_langchain,
    "keelgraph": run_keelgraph,
}


# -- running and reporting ----------------------------------------------------------------------


def run_one(method: str, family: Family, task: Task, llm: ChatOpenAI) -> dict[str, Any]:
    meter = Meter()
    started = time.perf_counter()
    try:
        outcome = RUNNERS[method](family, task, llm, meter)
    except Exception as exc:  # a baseline blowing up is a data point, not the end of the benchmark
        outcome = Outcome(False, False, None, f"{type(exc).__name__}: {str(exc)[:300]}")
    return {
        "task": task.id,
        "family": task.family,
        "valid": outcome.valid,
        "correct": outcome.correct,
        "calls": meter.calls,
        "tokens": meter.input_tokens + meter.output_tokens,
        "seconds": round(time.perf_counter() - started, 3),
        "output": outcome.output,
        "error": outcome.error,
    }


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
    """Blocks by temperature, then in the order of METHODS (whatever order they ran in)."""
    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(blocks, key=lambda b: (b["temperature"], rank.get(b["method"], len(rank))))


def table(results: Mapping[str, Any]) -> str:
    repeats = results["config"]["repeats"]
    lines = [
        f"| method | temp | valid | pass^1 | pass^{repeats} | model calls / task | tokens / task | s / task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for block in _ordered(results["blocks"]):
        s = block["summary"]
        five = s.get(f"pass^{repeats}")
        lines.append(
            f"| {block['method']} | {block['temperature']} | {s['valid']:.1%} | {s['pass1']:.1%} | "
            f"{'-' if five is None else f'{five:.1%}'} | {s['calls_per_task']:.2f} | "
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
    fig, axes = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4), squeeze=False)
    colors = {"bare": "#9e9e9e", "langchain": "#4e79a7", "keelgraph": "#e15759"}
    for ax, temp in zip(axes[0], temps, strict=True):
        blocks = [b for b in _ordered(results["blocks"]) if b["temperature"] == temp]
        names = [*metrics, (f"pass^{repeats}", f"pass^{repeats}")] if temp > 0 and repeats > 1 else metrics
        width = 0.8 / max(1, len(blocks))
        for i, block in enumerate(blocks):
            values = [block["summary"].get(key, 0.0) * 100 for key, _ in names]
            xs = [j + (i - (len(blocks) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, values, width, label=block["method"], color=colors.get(block["method"]))
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(names)), [label for _, label in names])
        ax.set_ylim(0, 122)
        ax.set_ylabel("% of runs (pass^k: % of tasks)")
        ax.set_title(f"temperature {temp}")
        ax.legend(loc="upper center", ncol=len(blocks), fontsize=8, frameon=False)
    fig.suptitle(f"{results['config']['tasks']} tasks, {results['config']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(
    chosen: Sequence[Task],
    methods: Sequence[str],
    schedule: Sequence[tuple[float, int]],
    settings: Settings,
    partial: Path | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Every method on every task, method by method (so the server's prompt cache helps each alike).

    Each run is also appended to `partial` (JSON lines) as it ends, so a cut-off run keeps its data."""
    fams = families()
    total = sum(len(chosen) * reps for _, reps in schedule) * len(methods)
    blocks: list[dict[str, Any]] = []
    restarts = 0
    with LocalModelServer(settings) as server, Progress(total, "reliability", unit="runs") as bar:
        for temperature, repeats in schedule:
            for method in methods:
                runs = []
                for task in chosen:
                    for _ in range(repeats):
                        llm = _model(server.url, settings.model, temperature)
                        runs.append(run_one(method, fams[task.family], task, llm))
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
                    {"method": method, "temperature": temperature, "summary": summary, "runs": runs}
                )
                bar.say(
                    f"== {method} t={temperature}: {json.dumps({k: v for k, v in summary.items() if k != 'by_family'})}"
                )
    return blocks, restarts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 task per family, 2 repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per task at the sampling temperature")
    parser.add_argument("--temperature", type=float, default=0.7, help="the sampling temperature")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--families", default="extraction,tools,facts")
    parser.add_argument("--limit", type=int, default=0, help="at most this many tasks per family")
    parser.add_argument("--tasks", default="", help="only these task ids (comma-separated), for a quick look")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.repeats = args.limit or 1, min(args.repeats, 2)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    chosen = []
    for name in args.families.split(","):
        in_family = [t for t in tasks(args.seed) if t.family == name]
        chosen += in_family[: args.limit] if args.limit else in_family
    if args.tasks:
        chosen = [t for t in chosen if t.id in args.tasks.split(",")]
    settings = Settings.from_env()
    args.out.mkdir(parents=True, exist_ok=True)
    schedule = [(0.0, 1), (args.temperature, args.repeats)] if args.repeats else [(0.0, 1)]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "config": {
            "tasks": len(chosen),
            "repeats": args.repeats,
            "seed": args.seed,
            "model": settings.model,
            "max_tokens": MAX_TOKENS,
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "llama_threads": settings.llama_threads,
            "date": time.strftime("%Y-%m-%d"),
        },
        "blocks": [],
    }
    partial = args.out / "reliability.partial.jsonl"
    partial.unlink(missing_ok=True)
    blocks, restarts = run_all(chosen, methods, schedule, settings, partial)
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
