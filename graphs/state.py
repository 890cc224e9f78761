"""The three declared state schemas of a keelgraph graph, and its run-time `Context`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.channels.last_value import LastValue
from langgraph.graph.message import add_messages

from keelgraph.contracts.boundary import stored_request

__all__ = ["Context", "InputState", "ModelAttempt", "OutputState", "State", "Stats", "Status", "add_usage"]

Status = Literal["ok", "rejected", "failed"]


def add_usage(left: dict[str, int] | None, right: dict[str, int] | None) -> dict[str, int]:
    """Reducer: token counts add up over the life of a thread."""
    total = dict(left or {})
    for key, value in (right or {}).items():
        total[key] = total.get(key, 0) + value
    return total


class ModelAttempt(TypedDict):
    """One request to a model: its answer, or the transport error that was retried or failed over."""

    model: str
    """The model's name (`keelgraph.runtime.models.model_label`)."""
    position: int
    """Its place in the model chain: 0 is the primary."""
    outcome: str
    """`ok`, or the error's type name (`OpenAIRateLimitError`, `OpenAITimeoutError`, `JSONDecodeError`...)."""
    status: int | None
    """The HTTP status of an error reply; None for an answer or a transport failure."""
    seconds: float
    """How long the request took."""
    wait_s: float
    """How long keelgraph waited after it before asking the same model again (0: it did not)."""


class Stats(TypedDict):
    """What one turn cost; returned with every answer and kept in the thread."""

    model_calls: int
    repairs: int
    """Failed attempts that were fed back to the model (bad output, failed check, bad call)."""
    recoveries: int
    """Output fixed without asking the model again (code fences, trailing commas...)."""
    tool_calls: int
    input_tokens: int
    output_tokens: int
    seconds: float
    model: str
    """The model that gave the turn's latest reply (see `model_attempts` for every request)."""
    transport_errors: int
    """Requests to a model that failed in transport (timeout, connection, 429, 5xx, bad body)."""
    model_attempts: list[ModelAttempt]
    """Every request to a model this turn, answered or not, in order."""
    cache_hits: int
    """Model calls answered from the graph's response cache (not counted in `model_calls`)."""
    cache_misses: int
    """Cacheable model calls the cache did not hold (made, and counted in `model_calls`)."""
    cost: float
    """What the turn's model replies cost, at the graph's `prices` (0 without prices)."""


class RequestChannel(LastValue[Any]):
    """The request as sent, for this run; in checkpoints, what `stored_request` keeps of it (the
    request itself when it is JSON data of at most 65,536 characters, else a bounded record with
    its size, SHA-256 and first characters), so no request can make a checkpoint crash or grow
    without bound. `validate_input` rejects a request that was kept as a record."""

    __slots__ = ()

    def checkpoint(self) -> Any:
        value = super().checkpoint()
        return stored_request(value) if self.is_available() else value


class InputState(TypedDict, total=False):
    """What a caller sends: one request per turn."""

    request: Annotated[Any, RequestChannel(Any)]
    """The request: a JSON object (dict) or JSON text. Validated against the contract's input."""
    request_id: str | None
    """The caller's id for this request (optional; or `configurable.keelgraph_request_id`): sent
    again, the same id returns the first result instead of running again, and a turn that was cut
    off (a crash) goes on where it stopped, so its effects happen once. 1-200 characters."""


class OutputState(TypedDict, total=False):
    """What a caller gets back: a validated answer or a typed failure, never both."""

    status: Status
    """`ok` (output is valid), `rejected` (the request was bad) or `failed` (repairs ran out)."""
    output: dict[str, Any] | None
    """The answer, validated against the contract's output model (JSON-ready)."""
    error: dict[str, Any] | None
    """A `keelgraph.Failure` as data: type, code, message, problems, attempts, usage."""
    stats: Stats
    """The cost of this turn."""
    attempts: list[dict[str, Any]]
    """This turn's failed attempts (`keelgraph.Attempt` as data: what the model wrote and what was
    wrong), including those a repair then fixed: what happened in a run that ended `ok`."""
    samples: list[dict[str, Any]]
    """The extra answers sampled for the contract's `judgement` fields this turn (raw text, the
    values of those fields), kept as the record of the vote."""
    replayed: bool
    """True when this result is an earlier one, returned again for a re-sent `request_id`."""


class State(InputState, OutputState, total=False):
    """Everything a thread keeps between nodes and turns."""

    messages: Annotated[list[AnyMessage], add_messages]
    """The conversation, tool calls and repairs included; each message is tagged by kind. With a
    store, only the turn in progress: earlier turns are in the thread's archive."""
    input: dict[str, Any] | None
    """This turn's request after validation."""
    tool_log: list[dict[str, Any]]
    """This turn's successful tool calls: name, args, output."""
    pending: dict[str, Any] | None
    """The model's latest answer (or why it could not be read), waiting for `check_output`."""
    tool_rounds: int
    """How many times `act` ran this turn."""
    answer_only: bool
    """Set when the model must answer now: no more tool calls this turn."""
    turn_request_id: str | None
    """The `request_id` this turn was sent with, and `turn_request_sha` the SHA-256 of its request."""
    turn_request_sha: str
    answered_requests: dict[str, dict[str, Any]]
    """The outcomes of the thread's last `ANSWERED_KEPT` finished turns sent with a request id, by id."""
    tool_next: bool
    """Set when a check asked for a tool result that was not there: the next step must call a tool."""
    pins: dict[str, Any]
    """Answer fields a check computed (`keelgraph.Computed`), by dotted path: the next repair's grammar
    holds them to these values."""
    started: float
    """When this turn began (epoch seconds)."""
    approvals: dict[str, dict[str, Any]]
    """This turn's decisions of a person on tool calls, by call id: approve, edit or reject."""
    rejected_calls: list[dict[str, Any]]
    """Calls a person rejected in this thread (name, args, reason): the same call is refused
    without asking again, so the model cannot loop on it."""
    turn: int
    """Turns this thread has had (each request, valid or not, starts one)."""
    archived_turns: int
    """Turns already moved, whole, to the thread's archive (see `keelgraph.graphs.history`)."""
    archive_head: str
    """The digest of the newest archived turn: where reading the earlier turns back from the
    archive starts (see `keelgraph.graphs.history.recent_history`)."""
    thread_tool_calls: int
    """Tool calls run in this thread, over all its turns (for `max_thread_tool_calls`)."""
    usage: Annotated[dict[str, int], add_usage]
    """Tokens spent by the whole thread."""
    awaiting_approval: list[str]
    """Call ids of the latest step that wait for a person's decision. Recorded by the node that
    made the step, so the router after it reads state only (no store or ledger access)."""
    cache_writes: list[dict[str, Any]]
    """This turn's model replies waiting for the response cache (key, message id, reply): written
    when the turn ends `ok`, dropped when rejected (see `keelgraph.runtime.cache`)."""


@dataclass(frozen=True)
class Context:
    """Run-time knobs passed per run (`graph.invoke(..., context=Context(user_id="u1"))`).

    Not who is acting: a served run's context comes from the request body, which any client
    writes. The signed-in user is the run's identity (`keelgraph.graphs.identity.current_identity`,
    set by the server's auth, or in process by `config={"configurable": {"keelgraph_user": ...}}`).
    """

    user_id: str | None = None
    """A caller's label for the run (for logs and checks), as sent: never authenticated, so never
    a reason to show or change anyone's data (bind such arguments with `from_identity`)."""
