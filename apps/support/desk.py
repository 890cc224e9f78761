"""The main job: an order-support assistant over a real SQLite database of customers and orders."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from langchain_core.tools import BaseTool, StructuredTool
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from keelgraph.contracts.contract import CheckContext, Contract
from keelgraph.graphs.builder import build_graph
from keelgraph.graphs.memory import recall, remember
from keelgraph.graphs.state import Context, InputState, OutputState, State
from keelgraph.runtime.models import ModelSource
from keelgraph.tools.execution import Approval, GuardContext, with_policy
from keelgraph.tools.identity import Identity
from keelgraph.tools.ledger import EffectLedger

__all__ = [
    "DEMO_USERS",
    "CustomerOf",
    "SupportReply",
    "SupportRequest",
    "customer_lookup",
    "link_user",
    "make_contract",
    "make_graph",
    "make_tools",
    "seed_database",
    "stated_preferences",
]

Message = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class SupportRequest(BaseModel):
    """One customer message to the support desk. It does not say who the customer is: the desk
    acts for the signed-in user's customer (`customer_lookup`), and a request that names a
    `customer_id` is rejected."""

    model_config = ConfigDict(extra="forbid")

    message: Message = Field(description="What the customer wrote (1-2000 characters)")


class SupportReply(BaseModel):
    """The desk's answer to one message."""

    model_config = ConfigDict(extra="forbid")

    reply: str = Field(
        min_length=1, max_length=1200, description="The answer to the customer, in plain words"
    )
    order_ids: list[int] = Field(
        default_factory=list,
        max_length=10,
        description="Ids of the customer's orders this reply is about",
    )
    action: Literal["none", "ticket_opened"] = Field(
        default="none", description="ticket_opened only if open_ticket succeeded in this turn"
    )
    ticket_id: int | None = Field(
        default=None, description="The ticket id returned by open_ticket, else null"
    )


INSTRUCTIONS = """You are the order-support assistant of an online shop. You help one customer with
their orders. The request is JSON: message (what the signed-in customer wrote).
- The customer's orders (status, items, total) are listed for you at the start of each turn.
- When the customer reports a problem with an order (damaged, missing, wants a refund), call open_ticket.
- Answer the customer's question directly with facts from the tool results: order id, status, items.
- Talk only about the orders the customer asks about. The shop has no delivery dates: never promise one.
- Only mention orders you saw in a tool result or earlier in this conversation, by their order id.
- What the customer asked us to remember in earlier conversations is listed too: follow it.
- Keep the reply short and friendly."""

_CUSTOMERS = [
    (1, "Ada Lovelace", "ada@example.com"),
    (2, "Alan Turing", "alan@example.com"),
    (3, "Grace Hopper", "grace@example.com"),
    (4, "Edsger Dijkstra", "edsger@example.com"),
]
DEMO_USERS = (("ada", 1), ("alan", 2), ("grace", 3), ("edsger", 4))
"""The demo's signed-in users and their customers, seeded into `customer_users` (the demo, the CLI
and the evals act as them: `config={"configurable": {"keelgraph_user": "ada"}}`)."""
_ORDERS = [
    (1001, 1, "delivered", 2499, "2026-10-02", "USB-C cable x2"),
    (1002, 1, "shipped", 5990, "2026-11-18", "Mechanical keyboard"),
    (1003, 1, "processing", 1250, "2026-11-22", "Notebook, pens"),
    (1004, 2, "delivered", 12900, "2026-09-14", "Noise-cancelling headphones"),
    (1005, 2, "cancelled", 799, "2026-11-01", "Phone case"),
    (1006, 3, "shipped", 34900, "2026-11-20", "27-inch monitor"),
    (1007, 3, "delivered", 1999, "2026-08-30", "Mouse pad"),
    (1008, 4, "processing", 4500, "2026-11-23", "Desk lamp"),
]


_SEEDED: set[Path] = set()
_SEED_LOCK = threading.Lock()


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to the shop database, created and seeded at its first use in this process (so
    building or importing a graph writes no file)."""
    if path not in _SEEDED:
        seed_database(path)
    return _open(path)


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def _db(path: Path) -> Iterator[sqlite3.Connection]:
    conn = _connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def seed_database(path: Path) -> Path:
    """Create the shop database at `path` with fixed customers and orders (idempotent)."""
    with _SEED_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _open(path)
        try:
            with conn:
                _seed(conn)
        finally:
            conn.close()
        _SEEDED.add(path)
    return path


def _seed(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS orders (
            id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
            status TEXT NOT NULL CHECK (status IN ('processing','shipped','delivered','cancelled')),
            total_cents INTEGER NOT NULL, placed_on TEXT NOT NULL, items TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS tickets (
            id INTEGER PRIMARY KEY AUTOINCREMENT, order_id INTEGER NOT NULL REFERENCES orders(id),
            customer_id INTEGER NOT NULL REFERENCES customers(id),
            kind TEXT NOT NULL, note TEXT NOT NULL, created_at TEXT NOT NULL,
            UNIQUE (order_id, kind));
        CREATE TABLE IF NOT EXISTS customer_users (
            user TEXT PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id));
        """
    )
    conn.executemany("INSERT OR IGNORE INTO customers VALUES (?, ?, ?)", _CUSTOMERS)
    conn.executemany("INSERT OR IGNORE INTO orders VALUES (?, ?, ?, ?, ?, ?)", _ORDERS)
    conn.executemany("INSERT OR IGNORE INTO customer_users VALUES (?, ?)", DEMO_USERS)


def link_user(db_path: Path, user: str, customer_id: int) -> None:
    """Let the signed-in `user` act as customer `customer_id` (the shop's `customer_users` table).

    A deployment maps its users to customers here (or passes its own `customer_of` to
    `make_graph`, e.g. one reading a claim its identity provider puts in the token).
    """
    with _db(db_path) as conn:
        if conn.execute("SELECT 1 FROM customers WHERE id = ?", (customer_id,)).fetchone() is None:
            raise ValueError(f"there is no customer {customer_id}")
        conn.execute("INSERT OR REPLACE INTO customer_users VALUES (?, ?)", (user, customer_id))


CustomerOf = Callable[[Identity], int | None]
"""Who the signed-in user is in the shop: their customer id, or None (they may not use the desk)."""


def customer_lookup(db_path: Path) -> CustomerOf:
    """The desk's default `CustomerOf`: a `customer_id` claim from the identity provider when the
    token has one, else the user's row in the shop's `customer_users` table (`link_user`)."""

    def customer_of(identity: Identity) -> int | None:
        claim = identity.claims.get("customer_id")
        if isinstance(claim, int) and not isinstance(claim, bool) and claim >= 1:
            return claim
        with _db(db_path) as conn:
            row = conn.execute(
                "SELECT customer_id FROM customer_users WHERE user = ?", (identity.subject,)
            ).fetchone()
        return None if row is None else int(row["customer_id"])

    return customer_of


class ListOrdersArgs(BaseModel):
    customer_id: int = Field(ge=1, description="The customer's id")


class OpenTicketArgs(BaseModel):
    customer_id: int = Field(ge=1, description="The customer's id")
    order_id: int = Field(ge=1, description="The order the problem is about")
    kind: Literal["damaged", "missing", "refund", "other"] = Field(description="What went wrong")
    note: str = Field(min_length=1, max_length=500, description="The problem in the customer's words")


_PROBLEM_WORDS = re.compile(
    r"damag|broken|broke|missing|never (arrived|came)|lost|refund|return|wrong item|defect|ticket|complain",
    re.IGNORECASE,
)


_TICKET_CLAIM = re.compile(
    r"(open|opened|create|created|raise|raised|file|filed|submit|submitted) (a |an |the )?(support )?ticket"
    r"|ticket (has been|was|is|will be) (opened|created)"
)
_STATUSES = ("processing", "shipped", "delivered", "cancelled")


_NEGATED = re.compile(r"(\bnot|n't|\bnever|\bno longer)\s+(yet\s+|been\s+|be\s+)?$")


_CLAIMED = re.compile(
    r"\b(?:is|was|are|were|been|being|has|have|had|status|currently|now|already|it|\d{4,})\W+(?:\w+\W+){0,2}$"
)
"""What comes before a status word that states it ("is being processed", "has shipped", "status:
processing"), unlike "sent for further processing"."""


def _asserts(word: str, sentence: str) -> bool:
    """Whether `sentence` states `word` (a status) of its order: "was not delivered" does not, and
    neither does the word used otherwise ("for further processing")."""
    return any(
        _CLAIMED.search(sentence[: m.start()]) and not _NEGATED.search(sentence[: m.start()])
        for m in re.finditer(rf"\b{word}", sentence)
    )


def reports_problem(request: Mapping[str, Any]) -> bool:
    """Whether the customer reports a problem: only then may the assistant open a ticket."""
    return bool(_PROBLEM_WORDS.search(str(request.get("message", ""))))


def present_orders(result: Mapping[str, Any]) -> str:
    lines = [
        f"order {o['order_id']}: {o['items']} | status {o['status']} | total {o['total']} | placed {o['placed_on']}"
        for o in result["orders"]
    ]
    return "\n".join(lines) or "this customer has no orders"


def orders_in_conversation(ctx: GuardContext) -> dict[str, list[int]]:
    """A ticket may only be about an order the customer named, now or in the last answer."""
    message = str(ctx.request.get("message", ""))
    named = {int(i) for i in re.findall(r"\b(\d{4,})\b", message)}
    if ctx.earlier_answers:
        named |= set(ctx.earlier_answers[-1].get("order_ids", []))
    orders = [o for r in ctx.tool_results if r["name"] == "list_orders" for o in r["output"]["orders"]]
    named |= {o["order_id"] for o in orders if o["items"].lower() in message.lower()}
    return {"order_id": sorted(named)}


def _ticket_key(args: Mapping[str, Any], ctx: GuardContext) -> str:
    """One ticket per customer, order and kind, whatever the thread: the shop's own rule."""
    return f"ticket:{args['customer_id']}:{args['order_id']}:{args['kind']}"


_PREFERENCE = re.compile(
    r"\bi(?: would|'d)? (?:prefer|rather)\b"
    r"|\bplease (?:always|never|only|don't|do not)\b"
    r"|\b(?:always|never|only) (?:contact|call|phone|e-?mail|text|write|ship|send|deliver|use)\b"
    r"|\b(?:don't|do not) (?:call|phone|e-?mail|text|ship|send)\b"
    r"|\bfrom now on\b|\bin (?:the )?future\b",
    re.IGNORECASE,
)


def stated_preferences(message: str) -> list[str]:
    """The sentences of `message` that state a lasting preference, to remember for the customer.

    Deterministic on purpose: a 0.5B model asked to call a "remember" tool forgets to, or calls it
    for anything; these phrasings are what customers write.

    >>> stated_preferences("Where is order 1002? Please always contact me by email, not phone.")
    ['Please always contact me by email, not phone.']
    >>> stated_preferences("I prefer DHL")
    ['I prefer DHL']
    """
    sentences = re.split(r"(?<=[.!?;])\s+|\n", message)
    return [s.strip() for s in sentences if _PREFERENCE.search(s)]


class CustomerMemoryArgs(BaseModel):
    customer_id: int = Field(ge=1, description="The customer's id")
    message: str = Field(min_length=1, max_length=2000, description="What the customer wrote")


def present_memories(result: Mapping[str, Any]) -> str:
    if not result["memories"]:
        return "Nothing remembered about this customer from earlier conversations."
    lines = ["The customer asked us earlier to remember (follow it):"]
    return "\n".join([*lines, *(f"- {text}" for text in result["memories"])])


MemorySource = BaseStore | Callable[[], BaseStore]
"""The store of the customers' memories, or a function that opens it at first use."""


def _memory_tool(memory: MemorySource, customer_of: CustomerOf) -> BaseTool:
    opened: list[BaseStore] = []
    lock = threading.Lock()

    def memory_store() -> BaseStore:
        with lock:
            if not opened:
                opened.append(memory if isinstance(memory, BaseStore) else memory())
            return opened[0]

    def customer_memory(customer_id: int, message: str) -> dict[str, Any]:
        store = memory_store()
        saved = [remember(store, customer_id, text).text for text in stated_preferences(message)]
        found = recall(store, customer_id, message, limit=3)
        return {"memories": [m.text for m in found], "remembered": saved}

    tool = StructuredTool.from_function(
        customer_memory,
        name="customer_memory",
        description="Remember the preferences the customer states; recall those relevant to the message.",
        args_schema=CustomerMemoryArgs,
    )
    # Run by the graph at the start of every turn, never offered to the model. A write (it keeps
    # preferences), idempotent: the same preference is kept once (`keelgraph.graphs.memory.remember`).
    return with_policy(
        tool,
        side_effect="write",
        idempotent=True,
        timeout_s=30,  # the first call of a process loads the embedding model
        from_input=("message",),
        from_identity={"customer_id": customer_of},
        preload=True,
        offer_when=lambda request: False,
        present=present_memories,
    )


def make_tools(
    db_path: Path,
    *,
    ticket_approval: Approval = "always",
    memory: MemorySource | None = None,
    customer_of: CustomerOf | None = None,
) -> list[BaseTool]:
    """The desk's tools over the database at `db_path`: one read tool and one write tool, and with
    a `memory` store the customers' long-term memory (`customer_memory`, preloaded every turn).

    Every tool acts for the signed-in user's customer: `customer_id` is bound to the run's identity
    by `customer_of` (default `customer_lookup(db_path)`), never taken from the request or the
    model, which is not even shown it. A run without an identity, or with a user who is no
    customer, is refused (`keelgraph.tools.identity.IdentityRequired`) before any tool runs.

    Opening a ticket needs a person's approval (`ticket_approval`) and happens once per order and
    kind: the shop keeps one ticket per order and kind, and the effect ledger replays the first.
    A preference the customer states ("Please always contact me by email") is kept under the
    customer in `memory`, and every later turn, in any thread, is shown the customer's memories
    nearest in meaning to its message (`keelgraph.graphs.memory.recall`).
    """

    acting = customer_of or customer_lookup(db_path)

    def list_orders(customer_id: int) -> dict[str, Any]:
        with _db(db_path) as conn:
            rows = conn.execute(
                "SELECT id, status, total_cents, placed_on, items FROM orders WHERE customer_id = ? ORDER BY id",
                (customer_id,),
            ).fetchall()
        orders = [
            {
                "order_id": r["id"],
                "status": r["status"],
                "total": f"{r['total_cents'] / 100:.2f} EUR",
                "placed_on": r["placed_on"],
                "items": r["items"],
            }
            for r in rows
        ]
        return {"customer_id": customer_id, "orders": orders}

    def open_ticket(customer_id: int, order_id: int, kind: str, note: str) -> dict[str, Any]:
        with _db(db_path) as conn:
            owner = conn.execute("SELECT customer_id FROM orders WHERE id = ?", (order_id,)).fetchone()
            if owner is None or owner["customer_id"] != customer_id:
                mine = [
                    r["id"]
                    for r in conn.execute("SELECT id FROM orders WHERE customer_id = ?", (customer_id,))
                ]
                raise ValueError(
                    f"order {order_id} is not one of this customer's orders; their order ids are {mine}"
                )
            # One open ticket per order and kind: asking twice returns the first, never a duplicate.
            conn.execute(
                "INSERT OR IGNORE INTO tickets (order_id, customer_id, kind, note, created_at) VALUES (?, ?, ?, ?, ?)",
                (
                    order_id,
                    customer_id,
                    kind,
                    note,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )
            row = conn.execute(
                "SELECT id FROM tickets WHERE order_id = ? AND kind = ?", (order_id, kind)
            ).fetchone()
        return {"ticket_id": row["id"], "order_id": order_id, "kind": kind, "status": "open"}

    lister = StructuredTool.from_function(
        list_orders,
        name="list_orders",
        description="List the customer's orders with status, items, total and date.",
        args_schema=ListOrdersArgs,
    )
    opener = StructuredTool.from_function(
        open_ticket,
        name="open_ticket",
        description="Open a support ticket about one of the customer's orders (damaged, missing, refund, other).",
        args_schema=OpenTicketArgs,
    )
    tools = [
        with_policy(
            lister,
            side_effect="read",
            timeout_s=5,
            from_identity={"customer_id": acting},
            preload=True,
            present=present_orders,
        ),
        with_policy(
            opener,
            side_effect="write",
            timeout_s=5,
            from_identity={"customer_id": acting},
            offer_when=reports_problem,
            choices=orders_in_conversation,
            approval=ticket_approval,
            idempotency_key=_ticket_key,
            idempotent=True,
        ),
    ]
    # The memories first: the orders, what most answers are about, stay nearest the model's turn
    # (with the memories last, the 0.5B model echoed "Nothing remembered..." as its reply).
    return [_memory_tool(memory, acting), *tools] if memory is not None else tools


def acting_customer(ctx: CheckContext[SupportRequest]) -> int | None:
    """The customer this turn acts for: the one whose orders `list_orders` (bound to the signed-in
    user, preloaded every turn) listed."""
    for result in ctx.tool_results:
        if result["name"] == "list_orders":
            return int(result["output"]["customer_id"])
    return None


def orders_exist(db_path: Path, reply: SupportReply, ctx: CheckContext[SupportRequest]) -> list[str]:
    """Check: every order the answer names exists and belongs to the signed-in customer."""
    if not reply.order_ids:
        return []
    with _db(db_path) as conn:
        marks = ",".join("?" * len(reply.order_ids))
        rows = conn.execute(f"SELECT id, customer_id FROM orders WHERE id IN ({marks})", reply.order_ids)
        owners = {r["id"]: r["customer_id"] for r in rows}
    problems = []
    for order_id in reply.order_ids:
        if order_id not in owners:
            problems.append(f"order {order_id} does not exist; list only ids from list_orders")
        elif owners[order_id] != acting_customer(ctx):
            problems.append(f"order {order_id} belongs to another customer; never mention it")
    return problems


_STATUS_STEM = {
    "processing": "process",
    "shipped": "shipped",
    "delivered": "delivered",
    "cancelled": "cancel",
}
"""How a reply states each status ("is being processed", "was cancelled")."""
_DATE = re.compile(
    r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b"
    r"|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.? \d{1,2}\b"
    r"|\b\d{1,2}(?:st|nd|rd|th)? (?:of )?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b"
    r"|\b(?:tomorrow|next week|in \d+ days?)\b"
)
_ARRIVAL = re.compile(r"arriv|deliver|expect|reach|get it|receive|be there|ship")
_PLACED = re.compile(r"placed|ordered|order date|bought|purchased")
STATUS_LINE = "Order {order_id} ({items}) is {status}."
"""The sentence the desk adds when its reply leaves out the status of an order the customer asked about."""
NO_DELIVERY_DATE = (
    "the shop has no delivery date for order {order_id}; do not give a date for it, say that it is {status}"
)
NO_DELIVERY_DATES = "the shop has no delivery dates; do not give one, say the order's status instead"
NOT_ASKED = "the customer asked only about {asked}; leave out order {order_id} ({items})"
ECHO = "the reply repeats the customer's message; answer it with the facts of their orders"


def _orders(ctx: CheckContext[SupportRequest]) -> list[dict[str, Any]]:
    return [o for r in ctx.tool_results if r["name"] == "list_orders" for o in r["output"].get("orders", [])]


def _mentions(text: str, order: Mapping[str, Any]) -> bool:
    """Whether `text` (lower case) names `order`: by id, or by one of its items."""
    if re.search(rf"\b{order['order_id']}\b", text):
        return True
    parts = [p.strip().lower() for p in str(order["items"]).split(",")]
    return any(len(p) > 3 and re.sub(r" x\d+$", "", p) in text for p in parts)


def asked_orders(ctx: CheckContext[SupportRequest]) -> list[dict[str, Any]]:
    """The customer's orders this message asks about, by id or item (none: a general question)."""
    message = ctx.input.message.lower()
    return [o for o in _orders(ctx) if _mentions(message, o)]


def _states_status(text: str, order: Mapping[str, Any]) -> bool:
    return _asserts(_STATUS_STEM.get(order["status"], order["status"]), text)


def derive(answer: dict[str, Any], ctx: CheckContext[SupportRequest]) -> dict[str, Any]:
    """The facts of the system, not claims of the model: the orders named and the ticket opened."""
    # What was done is a fact of the system, not a claim of the model.
    given = answer.get("order_ids")
    ids: list[Any] = list(given) if isinstance(given, list) else []
    reply = str(answer.get("reply", "")).lower()
    for result in ctx.tool_results:
        for order in result["output"].get("orders", []) if result["name"] == "list_orders" else []:
            named = str(order["order_id"]) in reply or order["items"].lower() in reply
            if named and order["order_id"] not in ids:
                ids = [*ids, order["order_id"]]
    # The orders the customer asked about are the reply's subject whatever the model wrote, and
    # their status is stated: a fact the system knows, added when the model's reply leaves it out.
    text = answer.get("reply")
    asked = asked_orders(ctx)
    if asked:  # ids the model listed but neither asked about nor named in its reply are dropped
        kept = {o["order_id"] for o in asked} | {
            o["order_id"] for o in _orders(ctx) if _mentions(str(text or "").lower(), o)
        }
        ids = [i for i in ids if i in kept]
    for order in asked:
        if order["order_id"] not in ids:
            ids = [*ids, order["order_id"]]
        line = STATUS_LINE.format(**order)
        if isinstance(text, str) and text.strip() and not _states_status(text.lower(), order):
            text = f"{text.rstrip()} {line}"[:1200]
    if isinstance(text, str) and text.strip():
        answer["reply"] = text
    answer["order_ids"] = ids
    tickets = [r["output"] for r in ctx.tool_results if r["name"] == "open_ticket"]
    if tickets:
        answer["action"], answer["ticket_id"] = "ticket_opened", tickets[-1]["ticket_id"]
        if tickets[-1]["order_id"] not in ids:
            answer["order_ids"] = [*ids, tickets[-1]["order_id"]]
    else:
        answer["action"], answer["ticket_id"] = "none", None
    return answer


def action_happened(reply: SupportReply, ctx: CheckContext[SupportRequest]) -> list[str]:
    """Check: the answer's action is what the tools did in this turn."""
    tickets = [r["output"]["ticket_id"] for r in ctx.tool_results if r["name"] == "open_ticket"]
    if reply.action == "ticket_opened" and reply.ticket_id not in tickets:
        return [
            "action is ticket_opened but no such ticket was opened in this turn; call open_ticket "
            "first, or set action to none and ticket_id to null"
        ]
    if reply.action == "none" and tickets:
        return [
            f"open_ticket created ticket {tickets[-1]}: set action to ticket_opened and ticket_id to {tickets[-1]}"
        ]
    if reply.action == "none" and reply.ticket_id is not None:
        return ["ticket_id must be null when action is none"]
    return []


def claims_are_true(reply: SupportReply, ctx: CheckContext[SupportRequest]) -> list[str]:
    """Check: statuses, totals and tickets the reply states match the tool results."""
    problems = []
    text = reply.reply.lower()
    if reply.action == "none" and _TICKET_CLAIM.search(text):
        problems.append(
            "the reply says a ticket was opened, but none was: call open_ticket, or do not claim it"
        )
    known = {o["order_id"]: o for r in ctx.tool_results for o in r["output"].get("orders", [])}
    for sentence in re.split(r"(?<=[.!?;])\s+|\n", text):
        named = [known[int(i)] for i in re.findall(r"\b(\d{4,})\b", sentence) if int(i) in known]
        if not named:  # "The monitor arrives on ...": an order named by its items
            named = [o for o in known.values() if _item_words(o) & set(re.findall(r"[a-z]{4,}", sentence))]
        about_arrival = _ARRIVAL.search(sentence) and not _PLACED.search(sentence)
        if len(named) != 1:
            if about_arrival and _DATE.search(sentence):
                problems.append(NO_DELIVERY_DATES)  # a date for no order in particular is no better
            continue  # facts are attributed only where one order is named
        order = named[0]
        for word in _STATUSES:
            if word != order["status"] and _asserts(word, sentence):
                problems.append(f"order {order['order_id']} is {order['status']}, not {word}")
        total = order["total"].split()[0]
        for amount in re.findall(r"\b\d+\.\d{2}\b", sentence):
            if amount != total:
                problems.append(f"order {order['order_id']} costs {total} EUR, not {amount}")
        if about_arrival and _DATE.search(sentence):
            problems.append(NO_DELIVERY_DATE.format(**order))
    return problems


def _item_words(order: Mapping[str, Any]) -> set[str]:
    """The words of an order's items a customer names it by ("monitor", "keyboard")."""
    return set(re.findall(r"[a-z]{4,}", str(order.get("items", "")).lower())) - {"inch", "with", "pack"}


def answers_the_message(reply: SupportReply, ctx: CheckContext[SupportRequest]) -> list[str]:
    """Check: the reply answers a question instead of writing it back."""
    said, wrote = _words_of(reply.reply), _words_of(ctx.input.message)
    # Only a question written back is no answer; a statement echoed ("Please always e-mail me")
    # reads as an acknowledgement.
    asked = "?" in ctx.input.message
    if asked and wrote and len(said & wrote) >= 0.8 * len(said | wrote):
        return [ECHO]
    return []


def _words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def only_what_was_asked(reply: SupportReply, ctx: CheckContext[SupportRequest]) -> list[str]:
    """Check: a question about one order is answered about that order, not the customer's others."""
    asked = asked_orders(ctx)
    if not asked:
        return []
    text = reply.reply.lower()
    names = ", ".join(f"order {o['order_id']} ({o['items']})" for o in asked)
    return [
        NOT_ASKED.format(asked=names, **order)
        for order in _orders(ctx)
        if order not in asked and _mentions(text, order)
    ]


def make_contract(db_path: Path) -> Contract[SupportRequest, SupportReply]:
    """The desk's contract, with checks that cross-examine the answer against the database."""
    return Contract(
        input=SupportRequest,
        output=SupportReply,
        instructions=INSTRUCTIONS,
        checks=(
            partial(orders_exist, db_path),
            action_happened,
            claims_are_true,
            answers_the_message,
            only_what_was_asked,
        ),
        derive=derive,
        repair_budget=3,
        name="support",
    )


def make_graph(
    db_path: Path | None = None,
    *,
    model: ModelSource | None = None,
    checkpointer: Checkpointer | Literal["default"] = "default",
    ticket_approval: Approval = "always",
    effects: EffectLedger | Literal["default"] | None = "default",
    instructions: str | None = None,
    memory: BaseStore | Literal["default"] | None = "default",
    customer_of: CustomerOf | None = None,
) -> CompiledStateGraph[State, Context, InputState, OutputState]:
    """The order-support graph over the shop database (seeded on first use).

    It acts for the signed-in user's customer: `customer_of` maps the run's identity to a customer
    id (default `customer_lookup`: a `customer_id` claim, else the shop's `customer_users` table,
    see `link_user`). Served, the identity is the user the server authenticated; in process, pass
    `config={"configurable": {"keelgraph_user": "ada"}}` (`DEMO_USERS`); without one, a turn is
    refused with `IdentityRequired`.

    A ticket waits for a person's approval (an `interrupt`; `keelgraph approve` resumes it).
    `memory` keeps what customers ask the desk to remember, across their threads: "default" is
    the default store (`keelgraph.graphs.persistence.default_store`: semantic search when the
    memory extra is installed), which a served graph opens at its first turn; None turns it off.
    `instructions` replaces the desk's system instructions (to evaluate a new prompt with
    `keelgraph eval --instructions`).
    """
    from keelgraph.settings import Settings

    path = db_path or Settings.from_env().data_dir / "shop.db"
    contract = make_contract(path)
    if instructions is not None:
        contract = dataclasses.replace(contract, instructions=instructions)
    graph_store: BaseStore | Literal["default"] = "default"
    source: MemorySource | None = None
    if isinstance(memory, BaseStore):
        source = memory
        graph_store = memory if checkpointer is not None else "default"  # a served graph gets none
    elif memory == "default":
        from keelgraph.graphs.persistence import default_store

        if checkpointer == "default":  # the graph's own store, opened once
            graph_store = source = default_store()
        else:  # served (same target as graphs/serving.py) or own checkpointer: opened at first use
            source = default_store
    return build_graph(
        contract,
        make_tools(path, ticket_approval=ticket_approval, memory=source, customer_of=customer_of),
        model=model,
        checkpointer=checkpointer,
        effects=effects,
        store=graph_store,
        name="support",
    )
