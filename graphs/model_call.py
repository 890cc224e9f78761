"""One model call of the `reason` node: what is offered, how it is bound, cached, retried and
failed over."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.tools import BaseTool

from keelgraph.contracts.decision import ANSWER, Strategy, decision_schema, grammar_safe, inline_refs
from keelgraph.contracts.errors import ModelUnavailable
from keelgraph.contracts.repair import RepairPlan
from keelgraph.contracts.suspend import Invoke, Sleep, Steps, drive
from keelgraph.graphs.events import draft_config
from keelgraph.graphs.prompt import render, system_prompt, tool_args_schema
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import ModelAttempt, State
from keelgraph.graphs.turn import answered_position, guard_context, stuck
from keelgraph.runtime.cache import cache_key, effective_temperature
from keelgraph.runtime.models import (
    ModelChain,
    http_status,
    is_malformed,
    is_transient,
    model_label,
    refuses_required_choice,
    remember_tool_choice,
    tool_choice_for,
)
from keelgraph.tools.execution import allowed_values, policy_of

__all__ = [
    "DECISIVE_REPAIR_TEMPERATURE",
    "REPAIR_TEMPERATURE",
    "Asked",
    "CacheNote",
    "allowed_tools",
    "ask",
    "asking",
    "bind",
    "cache_write",
    "first_position",
    "offered_schemas",
    "prompt_messages",
    "repair_temperature",
    "without_reply",
]

_log = logging.getLogger("keelgraph")


REPAIR_TEMPERATURE = 1.0
"""Repairs that must get away from a greedy answer resample at this temperature. A small model's
next-token distribution is so peaked that at 0.5 it wrote its rejected answer again token for token;
at 1.0 two of six such tasks were repaired. Shown its rejected draft, it copied it even at 1.0, so
drafts stay out of the prompt."""

DECISIVE_REPAIR_TEMPERATURE = 0.0
"""A repair whose grammar rules the rejected answer out (`RepairPlan.decisive`) cannot write it again,
so it takes the model's most likely answer among the rest instead of resampling. So does the first
repair of an answer that was sampled (model temperature above 0, or unknown): the rejected answer
was a draw, and the model's most likely answer, told what was wrong, is its best one (on the 0.5B
model at temperature 0.7 extraction repairs at 1.0 broke quantities that had been right)."""


def repair_temperature(model: BaseChatModel, plan: RepairPlan | None, attempts: int) -> float | None:
    """The temperature of the next model call of a turn with `attempts` failed attempts so far
    (None: the model's own), by the rule of `DECISIVE_REPAIR_TEMPERATURE` and `REPAIR_TEMPERATURE`."""
    if not attempts:
        return None
    if plan is not None and plan.decisive:
        return DECISIVE_REPAIR_TEMPERATURE
    own = getattr(model, "temperature", None)
    sampled = not isinstance(own, (int, float)) or own > 0
    return DECISIVE_REPAIR_TEMPERATURE if sampled and attempts == 1 else REPAIR_TEMPERATURE


def offered_schemas(state: State, tools: list[BaseTool]) -> dict[str, dict[str, Any]]:
    """Each offered tool's argument schema, narrowed by its policy's choices for this context."""
    ctx = guard_context(state)
    schemas = {}
    for tool in tools:
        schema = tool_args_schema(tool)
        for arg, values in allowed_values(tool, ctx).items():
            if arg in schema.get("properties", {}):
                schema["properties"][arg] = {**schema["properties"][arg], "enum": values}
        schemas[tool.name] = schema
    return schemas


def allowed_tools(state: State, spec: AgentSpec) -> list[BaseTool]:
    if state.get("answer_only") or state.get("tool_rounds", 0) >= spec.max_tool_rounds:
        return []
    used = {entry["name"] for entry in state.get("tool_log", [])}
    request = state.get("input") or {}
    allowed = []
    for name, tool in spec.tools.items():
        gate = policy_of(tool).offer_when
        if (spec.allow_repeat_tools or name not in used) and (gate is None or gate(request)):
            allowed.append(tool)
    return allowed


def bind(
    model: BaseChatModel,
    strategy: Strategy,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    schemas: dict[str, dict[str, Any]],
    *,
    final: bool = True,
    choice: str | None = None,
) -> Runnable[LanguageModelInput, BaseMessage]:
    """`model` bound to ask for one step under `strategy`. For `tool_calling`, `choice` names the
    one tool the model must call (default: any tool, as the endpoint accepts it; see
    `keelgraph.runtime.models.tool_choice_for`). Schemas go out grammar-safe on every path: servers
    compile tool parameters into grammars too (a `maxLength` of 1,000 crashed llama-cpp-python's
    server), and the contract checks the original schema anyway."""
    if strategy == "tool_calling":
        answer_tool = {
            "type": "function",
            "function": {
                "name": ANSWER,
                "description": "Give the final answer. Call this once, when you are done.",
                "parameters": grammar_safe(inline_refs(answer)),
            },
        }
        if choice is None:
            choice = tool_choice_for(model) if allowed else ANSWER
        # The tools as the grammar paths show them: without `from_identity` arguments, and with the
        # policy's allowed values for this context, so no strategy asks the model who is acting.
        tools: list[dict[str, Any]] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": grammar_safe(inline_refs(schemas.get(tool.name) or tool_args_schema(tool))),
                },
            }
            for tool in allowed
        ]
        offered = tools if allowed and not final else [*tools, answer_tool]
        return model.bind_tools(offered, tool_choice=choice)
    schema = decision_schema(answer, schemas, final=final)
    if strategy == "json_object":
        # llama.cpp / vLLM style: JSON mode constrained by a schema (a grammar on the server). A
        # bound extra_body replaces the model's own, so keep what it had (an output cap, say).
        fmt = {"type": "json_object", "schema": schema}
        extra = getattr(model, "extra_body", None) or {}
        return model.bind(extra_body={**extra, "response_format": fmt})
    if strategy == "json_schema":
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "step", "schema": schema, "strict": False},
        }
        return model.bind(response_format=fmt)
    return model


def first_position(state: State, spec: AgentSpec) -> int:
    """Where in the model chain this call starts: past the models that handed over after failed
    repairs, and at the model that answered last in this turn (a model that just failed over is
    not asked again until the next turn), or the one after it when that model wrote its rejected
    answer again (`turn.stuck`)."""
    attempts = state.get("attempts", [])
    last = answered_position(state.get("stats", {}))
    if stuck(attempts) and last + 1 < len(spec.chain.models):
        last += 1  # it wrote its rejected answer again: the next model of the chain takes the turn
    return max(spec.chain.first_position(len(attempts)), last)


def _record(model: str, position: int, began: float, exc: BaseException | None = None) -> ModelAttempt:
    return ModelAttempt(
        model=model,
        position=position,
        outcome="ok" if exc is None else type(exc).__name__,
        status=None if exc is None else http_status(exc),
        seconds=round(time.monotonic() - began, 3),
        wait_s=0.0,
    )


def prompt_messages(
    state: State,
    spec: AgentSpec,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    schemas: dict[str, dict[str, Any]],
    *,
    final: bool = True,
) -> list[BaseMessage]:
    """The messages the model is sent now, under the active strategy (`final=False`: a step that
    must call a tool, see `ask`)."""
    strategy = spec.active_strategy
    system = system_prompt(spec.contract.instructions, answer, allowed, strategy, schemas, final=final)
    return render(state.get("messages", []), system, strategy)


@dataclass(frozen=True)
class CacheNote:
    """How the response cache took part in one model call."""

    key: str | None = None
    """The call's cache key; None when it is not cacheable (no cache, or sampled)."""
    hit: bool = False


def _cache_lookup(
    spec: AgentSpec,
    model: BaseChatModel,
    bound: Runnable[LanguageModelInput, BaseMessage],
    prompt: list[BaseMessage],
) -> tuple[CacheNote, AIMessage | None]:
    """The call's cache key and the cached reply, if any (a cache that fails is a miss)."""
    if spec.cache is None:
        return CacheNote(), None
    kwargs = dict(bound.kwargs) if isinstance(bound, RunnableBinding) else {}
    temperature = effective_temperature(model, kwargs)
    if temperature is not None and temperature > 0 and not spec.cache_sampled:
        return CacheNote(), None
    key = cache_key(model, spec.active_strategy, prompt, kwargs)
    try:
        found = spec.cache.get(key)
    except Exception as exc:  # an optimisation must not fail a turn
        _log.warning("keelgraph: response cache lookup failed (%s); asking the model", exc)
        found = None
    if found is None:
        return CacheNote(key), None
    calls = [
        {"name": c["name"], "args": c["args"], "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
        for c in found.get("tool_calls", [])
    ]
    reply = AIMessage(
        found.get("content", ""),
        tool_calls=calls,
        usage_metadata={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        response_metadata={"keelgraph_cache": "hit"},
    )
    return CacheNote(key, hit=True), reply


def cache_write(spec: AgentSpec, entries: Sequence[Mapping[str, Any]]) -> None:
    """Store the replies of a turn that ended ok (a cache that fails only logs)."""
    if spec.cache is None:
        return
    for entry in entries:
        try:
            spec.cache.put(str(entry["key"]), entry["value"])
        except Exception as exc:
            _log.warning("keelgraph: response cache write failed (%s)", exc)


def without_reply(entries: Sequence[dict[str, Any]], message_id: str | None) -> list[dict[str, Any]]:
    """The pending cache writes less the one of a rejected reply."""
    return [e for e in entries if e.get("id") != message_id]


_LEAKED = re.compile(r"^\s*functions\.([A-Za-z0-9_.\-]+):?\s*(\{.*\})?\s*$", re.DOTALL)


def _leaked_call(reply: BaseMessage, names: set[str]) -> BaseMessage | str:
    """A tool call the endpoint wrote as text, made a tool call.

    With `tool_choice="auto"`, llama-cpp-python's `chatml-function-calling` handler can return the
    call's own syntax as the message text (`functions.get_order:`, with or without the arguments).
    Arguments present: they become the call. Only the name (one of `names`): the model chose that
    tool, and the name is returned, to ask again with the choice pinned to it (one more request).
    Any other text is left as it is.
    """
    if not isinstance(reply, AIMessage) or not isinstance(reply.content, str):
        return reply
    found = _LEAKED.match(reply.content)
    if found is None or found.group(1) not in names:
        return reply
    name, raw = found.group(1), found.group(2)
    if raw is not None:
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        if isinstance(args, dict):
            call = {"name": name, "args": args, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
            return AIMessage("", tool_calls=[call], usage_metadata=reply.usage_metadata,
                             response_metadata=reply.response_metadata)  # fmt: skip
    return name


@dataclass(frozen=True)
class _Request:
    """One step asked of one model: what `bind` needs, and the sampling temperature."""

    model: BaseChatModel
    strategy: Strategy
    schema: dict[str, Any]
    allowed: list[BaseTool]
    schemas: dict[str, dict[str, Any]]
    final: bool
    heat: float | None

    def bound(self, choice: str | None = None) -> Runnable[LanguageModelInput, BaseMessage]:
        out = bind(self.model, self.strategy, self.schema, self.allowed, self.schemas, final=self.final,
                   choice=choice)  # fmt: skip
        return out if self.heat is None else out.bind(temperature=self.heat)

    def invoking(
        self, bound: Runnable[LanguageModelInput, BaseMessage], prompt: list[BaseMessage]
    ) -> Steps[BaseMessage]:
        reply = yield Invoke(bound, prompt, draft_config())  # streamed tokens are drafts (`graphs.events`)
        if self.strategy == "tool_calling" and isinstance(reply, AIMessage) and not reply.tool_calls:
            names = {t.name for t in self.allowed} | ({ANSWER} if self.final or not self.allowed else set())
            found = _leaked_call(reply, names)
            reply = (
                (yield Invoke(self.bound(found), prompt, draft_config())) if isinstance(found, str) else found
            )
        return cast(BaseMessage, reply)


def _probe_choice(
    exc: BaseException, strategy: Strategy, allowed: list[BaseTool], model: BaseChatModel
) -> bool:
    """Whether to ask again with `tool_choice="auto"`: the endpoint may refuse "required"
    (llama-cpp-python answers it with a bare 500). The probe's answer settles it for the process."""
    if (
        strategy != "tool_calling"
        or not allowed
        or not refuses_required_choice(exc)
        or tool_choice_for(model) != "required"
    ):
        return False
    remember_tool_choice(model, required_refused=True)
    return True


def _retry_wait(
    chain: ModelChain, position: int, exc: BaseException, failed: int, malformed: int
) -> float | None:
    """Seconds to wait before asking the same model again, or None to move on to the next one.
    A malformed body is a provider fault worth one more try; a second one moves on."""
    name = model_label(chain.model(position))
    wait = None if malformed > 1 else chain.wait(exc, failed)
    if wait is None:
        if position + 1 < len(chain.models):
            _log.warning(
                "keelgraph: model %s failed (%s, %d request(s)); failing over to %s",
                name, type(exc).__name__, failed, model_label(chain.model(position + 1)),
            )  # fmt: skip
        return None
    _log.info("keelgraph: model %s: %s; retrying in %.2f s", name, type(exc).__name__, wait)
    return wait


Asked = tuple[BaseMessage, list[ModelAttempt], CacheNote]
"""The reply, every request it took, and how the cache took part."""


def ask(
    state: State,
    spec: AgentSpec,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    plan: RepairPlan | None = None,
    *,
    final: bool = True,
    temperature: float | None = None,
) -> Asked:
    """`asking`, blocking."""
    return drive(asking(state, spec, answer, allowed, plan, final=final, temperature=temperature))


def asking(
    state: State,
    spec: AgentSpec,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    plan: RepairPlan | None = None,
    *,
    final: bool = True,
    temperature: float | None = None,
) -> Steps[Asked]:
    """One model call, with every request it took, answered from the response cache if it holds
    the identical call (see `keelgraph.runtime.cache`).

    The models of the chain are asked in turn, each bound with the tools and output format of the
    active strategy: a transient error is retried on the same model with backoff (see
    `keelgraph.runtime.models.ModelChain`), then the next model takes over; when none answers,
    `ModelUnavailable` ends the node. An endpoint that refuses the strategy moves the graph down the
    strategy chain; any other error is raised as it is. A repair's `plan` (see `_repair_plan`)
    gives the answer schema the output format is bound with; the prompt describes `answer`. With
    `final=False` (and tools allowed) the model may only call a tool (`Contract.needs_tool`). A
    `temperature` overrides the repair rule's (`repair_temperature`). As steps
    (`keelgraph.contracts.suspend`): `ask` runs it blocking, the async `reason` node awaiting.
    """
    chain = spec.chain
    schemas = offered_schemas(state, allowed)
    tried: list[ModelAttempt] = []
    last: BaseException | None = None
    repairs = len(state.get("attempts") or [])
    for position in range(first_position(state, spec), len(chain.models)):
        model = chain.model(position)
        name = model_label(model)
        failed = malformed = 0
        refused: str | None = None  # the text of the last 500, to tell a refusal from a fault
        probed = probing = False  # asking with tool_choice="auto" after "required" failed, once
        while True:
            strategy = spec.active_strategy
            prompt = prompt_messages(state, spec, answer, allowed, schemas, final=final)
            began = time.monotonic()
            try:
                heat = temperature if temperature is not None else repair_temperature(model, plan, repairs)
                request = _Request(
                    model, strategy, plan.schema if plan else answer, allowed, schemas, final, heat
                )
                bound = request.bound()
                note, cached = _cache_lookup(spec, model, bound, prompt)
                if cached is not None:
                    hit = _record(name, position, began)
                    return cached, [{**hit, "outcome": "cached"}], note
                reply = yield from request.invoking(bound, prompt)
            except Exception as exc:
                if not probed and _probe_choice(exc, strategy, allowed, model):
                    probed = probing = True
                    continue
                if probing:
                    remember_tool_choice(model, required_refused=False)  # "auto" failed too: a fault
                    probing = False
                # An endpoint that refuses this way of asking (no json_schema, no tools, or the same
                # 500 twice) gets the next one, once per graph.
                repeated = http_status(exc) == 500 and str(exc) == refused
                if spec.fall_back(exc, repeated=repeated) is not None:
                    continue
                refused = str(exc) if http_status(exc) == 500 else None
                tried.append(_record(name, position, began, exc))
                if not is_transient(exc):
                    raise
                last, failed = exc, failed + 1
                malformed += is_malformed(exc)
                wait = _retry_wait(chain, position, exc, failed, malformed)
                if wait is None:
                    break
                tried[-1]["wait_s"] = round(wait, 3)
                yield Sleep(wait)
                continue
            if probing:
                _log.warning('keelgraph: %s refused tool_choice="required"; asking with "auto" now', name)
            tried.append(_record(name, position, began))
            return reply, tried, note
    assert last is not None  # every position made at least one request
    raise ModelUnavailable([dict(a) for a in tried], last) from last
