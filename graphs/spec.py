"""What the nodes need that is not state: the contract, the tools, the models and the limits."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool

from keelgraph.contracts.contract import Contract
from keelgraph.contracts.decision import Strategy
from keelgraph.contracts.errors import BudgetExceeded
from keelgraph.runtime.cache import ModelCache
from keelgraph.runtime.models import ModelChain, ModelSource, Price
from keelgraph.tools.execution import policy_of
from keelgraph.tools.ledger import EffectLedger
from keelgraph.tools.pool import DEFAULT_WORKERS, ToolPool

__all__ = ["AgentSpec", "ModelSource", "refuses_feature"]

_log = logging.getLogger("keelgraph")


@dataclass(frozen=True)
class AgentSpec:
    """Everything the nodes need that is not state: the contract, tools, model and limits."""

    contract: Contract[Any, Any]
    tools: Mapping[str, BaseTool]
    model: ModelSource | ModelChain
    """A chat model, a factory, or a `keelgraph.runtime.models.ModelChain` (retries and fallbacks)."""
    strategy: Strategy
    max_tool_rounds: int = 4
    """Tool rounds per turn; after that the model must answer."""
    max_tool_calls: int | None = 16
    """Tool calls run per turn (None: no limit); calls past it are refused and the model answers."""
    max_thread_tool_calls: int | None = None
    """Tool calls run per thread, over all its turns (None: no limit)."""
    max_turn_tokens: int | None = None
    """Input + output tokens per turn, every model call counted (None: no limit). A call whose
    estimated cost would go past it is not made: the turn fails with `BudgetExceeded`."""
    max_thread_tokens: int | None = None
    """The same over the whole thread, all its turns (the `usage` channel)."""
    prices: Mapping[str, Price] = field(default_factory=dict)
    """Model name (`model_label`) -> `Price`, `"*"` for any other: each reply's cost is added to
    the turn's `stats["cost"]` and the thread's `usage["cost_micros"]` (millionths)."""
    max_turn_cost: float | None = None
    """Like `max_turn_tokens`, in the currency of `prices`."""
    max_thread_cost: float | None = None
    """Like `max_thread_tokens`, in the currency of `prices`."""
    refuse_tainted_writes: bool = True
    """Enforce tool policies' `from_user` and `scope` (see `keelgraph.tools.gate.doubt`): a doubtful
    call goes to a person where the tool's `approval` allows, and is refused otherwise."""
    history_tokens: int | None = 1000
    """What the model is shown of earlier turns (their requests and answers, newest first), up to
    this many estimated tokens. With a store, earlier turns leave the state for the thread's
    archive and are read back from it; None keeps every turn in the state (and shows them all)."""
    allow_repeat_tools: bool = False
    """Let the model call a tool again in a turn after it succeeded (off: small models loop)."""
    fallbacks: tuple[Strategy, ...] = ()
    """Strategies to move to, in order, when the endpoint refuses the current one."""
    effects: EffectLedger | Callable[[], EffectLedger] | None = None
    """Where completed `write`/`external` tool calls are recorded (None: no record, calls may
    repeat on resume). A callable is resolved at the first such call."""
    cache: ModelCache | None = None
    """Where identical model calls are answered from (None: no cache); see `keelgraph.runtime.cache`."""
    cache_sampled: bool = False
    """Also cache calls made at a temperature above 0. Off by default: a cached reply would freeze
    what is meant to be sampled (and repairs, which resample at `REPAIR_TEMPERATURE`, would get
    the same reply every time)."""
    tool_workers: int = DEFAULT_WORKERS
    """Threads the graph's tool calls run on at most (see `keelgraph.tools.pool.ToolPool`)."""
    turn_timeout_s: float | None = None
    """Seconds a turn may run (None: no limit); past it nothing more starts and the turn fails
    with `BudgetExceeded` (unit "seconds"). Tool deadlines are capped by the time left."""
    _chain: list[ModelChain] = field(default_factory=list, compare=False, repr=False)
    _ledgers: list[EffectLedger] = field(default_factory=list, compare=False, repr=False)
    tool_pool: ToolPool = field(init=False, compare=False, repr=False)
    """The graph's tool workers: `tool_workers` threads at most, one per call running or hung."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tool_pool", ToolPool(self.tool_workers))

    def turn_deadline(self, started: float | None) -> float | None:
        """When a turn that began at `started` (epoch seconds) must end; None without a limit."""
        if self.turn_timeout_s is None or started is None:
            return None
        return started + self.turn_timeout_s

    def out_of_time(
        self, started: float | None, usage: dict[str, int] | None = None
    ) -> BudgetExceeded | None:
        """The typed failure of a turn past `turn_timeout_s`, or None while it has time left."""
        deadline = self.turn_deadline(started)
        if deadline is None or started is None or time.time() < deadline:
            return None
        limit = float(self.turn_timeout_s or 0)
        return BudgetExceeded(
            "turn", limit=limit, spent=time.time() - started, estimate=0, usage=usage, unit="seconds"
        )

    def ledger(self) -> EffectLedger | None:
        if self.effects is None or not callable(self.effects):
            return self.effects
        if not self._ledgers:
            self._ledgers.append(self.effects())
        return self._ledgers[0]

    def ledger_for(self, tool: BaseTool) -> EffectLedger | None:
        """The ledger that records `tool`'s calls: None for a `read` tool (nothing to record)."""
        return None if policy_of(tool).side_effect == "read" else self.ledger()

    _moved: list[Strategy] = field(default_factory=list, compare=False, repr=False)

    @property
    def active_strategy(self) -> Strategy:
        """The strategy in use: the first one the endpoint has not refused."""
        return self._moved[-1] if self._moved else self.strategy

    def fall_back(self, error: BaseException, *, repeated: bool = False) -> Strategy | None:
        """Move to the next strategy if `error` says the endpoint does not support this one, or is
        a 500 that came back identical (`repeated`): some servers refuse a feature that way."""
        if not (refuses_feature(error) or repeated):
            return None
        chain = [self.strategy, *self.fallbacks]
        index = chain.index(self.active_strategy)
        if index + 1 >= len(chain):
            return None
        self._moved.append(chain[index + 1])
        _log.warning(
            "keelgraph: the endpoint refused the %s output strategy (%s); using %s from now on",
            chain[index],
            str(error)[:200],
            chain[index + 1],
        )
        return chain[index + 1]

    @property
    def chain(self) -> ModelChain:
        """The models to ask, in order, with their retry policy (one model: a chain of one)."""
        if isinstance(self.model, ModelChain):
            return self.model
        if not self._chain:
            self._chain.append(ModelChain((self.model,)))
        return self._chain[0]

    def chat_model(self) -> BaseChatModel:
        """The primary model."""
        return self.chain.model(0)

    @property
    def max_model_calls(self) -> int:
        """A hard ceiling per turn, so no combination of events can loop without end."""
        return 2 + self.max_tool_rounds + self.contract.repair_budget


_UNSUPPORTED = re.compile(
    r"response_format|json_schema|json_object|tool_choice|tools|function", re.IGNORECASE
)


def refuses_feature(error: BaseException) -> bool:
    """Whether an endpoint's error refuses a request feature (format, tools) rather than failing."""
    if isinstance(error, NotImplementedError):  # a chat model class without bind_tools
        return True
    status = getattr(error, "status_code", None)
    if status == 500:  # llama-cpp-python answers an unknown response_format with a 500
        return bool(re.search(r"response_format|json_schema", str(error)))
    return status in {400, 404, 422, 501} and bool(_UNSUPPORTED.search(str(error)))
