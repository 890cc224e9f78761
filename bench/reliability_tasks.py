"""The reliability benchmark's fixed task set: 50 tasks in three families, generated from one seed.

- extraction (20): a customer's order e-mail -> a nested, constrained `OrderRequest`.
- tools (15): a question that needs one of three tools with the right arguments -> `ToolReply`
  carrying the tool's exact result (results are not guessable without the call).
- facts (15): a product table and a lookup question -> `Fact` whose value must match the table.

Each family is one contract: instructions, input and output models, and the semantic checks a
careful developer would write for it. The checks only look at the request and at tool results;
none of them sees the expected answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.tools import BaseTool, tool
from pydantic import BaseModel, Field

from keelgraph import CheckContext, Contract
from keelgraph.contracts.evidence import not_copied
from keelgraph.tools import GuardContext, with_policy

SEED = 20261124

# -- extraction ---------------------------------------------------------------------------------

CATALOG = (
    "ceramic mug",
    "teapot",
    "tea towel",
    "coffee grinder",
    "french press",
    "milk jug",
    "sugar bowl",
    "espresso cup",
)
Product = Literal[
    "ceramic mug",
    "teapot",
    "tea towel",
    "coffee grinder",
    "french press",
    "milk jug",
    "sugar bowl",
    "espresso cup",
]


class LineItem(BaseModel):
    # The quantity first, as customers write it ("four espresso cups"), so the model reads them in order.
    quantity: int = Field(ge=1, le=20, description="how many the customer wants")
    product: Product = Field(description="the catalog name of the product")


class Address(BaseModel):
    street: str = Field(min_length=3, pattern=r"^[^,]+$", description="street and house number, nothing else")
    city: str = Field(min_length=2, pattern=r"^[^0-9]+$", description="the city name alone, no postcode")
    postcode: str = Field(pattern=r"^\d{5}$", description="five digits")


class OrderRequest(BaseModel):
    # No digits, "@", dots or brackets: the name alone, not the address around it. (A pattern that
    # demands a second word made the 0.5B model run on without a space until its token cap.)
    customer_name: str = Field(
        min_length=3, pattern=r"^[^0-9@()_,.]+$", description="full name of the customer, nothing else"
    )
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[a-z]+$")
    items: list[LineItem] = Field(min_length=1, max_length=4, description="every product ordered")
    ship_to: Address
    gift_wrap: bool = Field(description="true only if the customer asks for gift wrapping")


class Email(BaseModel):
    text: str = Field(min_length=10, max_length=2000)


EXTRACTION_INSTRUCTIONS = (
    "You read customer e-mails for a kitchenware shop and extract the order they contain. "
    f"The catalog products are: {', '.join(CATALOG)}. Use these exact names (singular). "
    "Copy names, e-mail address, street, city and postcode exactly as written."
)

_FIRST = [
    "Dana",
    "Omar",
    "Lena",
    "Tomasz",
    "Priya",
    "Malik",
    "Sofia",
    "Jonas",
    "Aiko",
    "Marta",
    "Kwame",
    "Elif",
]
_LAST = [
    "Ortiz",
    "Haddad",
    "Berg",
    "Nowak",
    "Raman",
    "Osei",
    "Rossi",
    "Weber",
    "Tanaka",
    "Silva",
    "Mensah",
    "Kaya",
]
_STREETS = [
    "Oak Street",
    "Mill Lane",
    "Harbour Road",
    "Linden Allee",
    "Station Road",
    "Rue Verte",
    "Park Avenue",
]
_CITIES = ["Springfield", "Lisbon", "Utrecht", "Gdansk", "Leeds", "Lyon", "Bergen", "Turin"]
_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_TEMPLATES = (
    "Hello,\nthis is {name} ({email}). I would like to order {items}. "
    "Please ship to {street}, {postcode} {city}.{gift}\nThanks!",
    "Hi there! {name} here. Could you send {items} to {street}, {city} {postcode}? "
    "My e-mail is {email}.{gift}",
    "Order request\nCustomer: {name}\nE-mail: {email}\nWanted: {items}\n"
    "Address: {street}, {postcode} {city}\n{gift}",
    "Dear shop, please deliver {items}. Address: {street}, {postcode} {city}.{gift} "
    "Best regards, {name} - {email}",
)


def _plural(product: str, n: int) -> str:
    if n == 1:
        return product
    if product.endswith(("sh", "ch", "ss")):
        return product + "es"
    return product + "s"


def _extraction_task(rng: random.Random, index: int) -> Task:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    name = f"{first} {last}"
    email = f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@{rng.choice(['example.com', 'mail.org', 'post.net'])}"
    products = rng.sample(CATALOG, rng.choice([1, 2, 2, 3]))
    items = [(p, rng.choice([1, 1, 2, 2, 3, 4, 6])) for p in products]
    spoken = []
    for product, n in items:
        count = _WORDS[n] if rng.random() < 0.3 else str(n)
        spoken.append(f"{count} {_plural(product, n)}")
    listed = spoken[0] if len(spoken) == 1 else ", ".join(spoken[:-1]) + " and " + spoken[-1]
    street = f"{rng.randint(2, 180)} {rng.choice(_STREETS)}"
    city, postcode = rng.choice(_CITIES), f"{rng.randint(10000, 99999)}"
    gift = rng.random() < 0.35
    text = rng.choice(_TEMPLATES).format(
        name=name,
        email=email,
        items=listed,
        street=street,
        city=city,
        postcode=postcode,
        gift=" It is a present, so please gift-wrap it." if gift else "",
    )
    expected = OrderRequest(
        customer_name=name,
        email=email,
        items=[LineItem(product=p, quantity=n) for p, n in items],  # type: ignore[arg-type]
        ship_to=Address(street=street, city=city, postcode=postcode),
        gift_wrap=gift,
    )
    return Task(
        id=f"extract-{index:02d}",
        family="extraction",
        request={"text": text},
        expected=expected.model_dump(),
    )


def _mentioned(product: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(product)}(e?s)?\b", text, re.IGNORECASE) is not None


def _quantity_written(n: int, text: str) -> bool:
    word = _WORDS.get(n)
    return re.search(rf"\b{n}\b", text) is not None or (
        word is not None and re.search(rf"\b{word}\b", text, re.IGNORECASE) is not None
    )


_EMAIL = re.compile(r"[^@\s()<>,;:]+@[^@\s()<>,;:]+\.[a-z]+")


def order_choices(ctx: CheckContext[Email]) -> dict[str, list[Any]]:
    """Values an order may hold given its e-mail: the products it names, the quantities it writes
    (as digits or words), the e-mail addresses and five-digit postcodes written in it. The grammar
    then keeps the model to them; the check does the rest."""
    text = ctx.input.text
    return {
        "items.product": [p for p in CATALOG if _mentioned(p, text)],
        "items.quantity": [n for n in range(1, 100) if _quantity_written(n, text)],
        "email": sorted(set(_EMAIL.findall(text))),
        "ship_to.postcode": sorted(set(re.findall(r"\b\d{5}\b", text))),
    }


def _written_quantity(product: str, text: str) -> int | None:
    """The quantity written right before a product's name ("two teapots", "3 milk jugs")."""
    counts = "|".join([r"\d+", *_WORDS.values()])
    found = re.search(rf"\b({counts})\s+{re.escape(product)}(e?s)?\b", text, re.IGNORECASE)
    if found is None:
        return None
    count = found.group(1).lower()
    return int(count) if count.isdigit() else next(n for n, w in _WORDS.items() if w == count)


def order_matches_email(order: OrderRequest, ctx: CheckContext[Email]) -> list[str]:
    """Every extracted value is written in the e-mail, and every product it names is extracted."""
    text = ctx.input.text
    low = text.lower()
    problems = []
    for label, value in (
        ("customer_name", order.customer_name),
        ("email", order.email),
        ("ship_to.street", order.ship_to.street),
        ("ship_to.city", order.ship_to.city),
        ("ship_to.postcode", order.ship_to.postcode),
    ):
        if complaint := not_copied(label, value.strip(), text, source="the e-mail"):
            problems.append(complaint)
    street = order.ship_to.street.strip()
    numbered = re.search(rf"\b\d+[a-z]?\s+{re.escape(street)}", text, re.IGNORECASE)
    if numbered and not re.search(r"\d", street):
        problems.append(f"ship_to.street {street!r} leaves out the house number; write {numbered.group()!r}")
    named = [p for p in CATALOG if _mentioned(p, text)]
    got = [item.product for item in order.items]
    # Each problem starts with the field it is about, so a repair changes that field alone.
    for product in named:
        if product not in got:
            problems.append(f"items do not include {product!r}, which the e-mail orders")
    # A problem with one item names it by index (items.1.quantity): the repair changes that alone.
    for i, product in enumerate(got):
        if product not in named:
            problems.append(f"items.{i}.product {product!r} is not a product the e-mail orders")
        elif product in got[:i]:
            problems.append(f"items.{i} lists {product!r} a second time; give each product once")
    for i, item in enumerate(order.items):
        written = _written_quantity(item.product, text)
        if written is not None and written != item.quantity:
            problems.append(
                f"items.{i}.quantity: the e-mail orders {written} of {item.product!r}, not {item.quantity}"
            )
        elif not _quantity_written(item.quantity, text):
            problems.append(
                f"items.{i}.quantity {item.quantity} of {item.product!r} is not written in the e-mail"
            )
    if order.gift_wrap and "gift" not in low:
        problems.append("gift_wrap is true but the e-mail does not ask for gift wrapping")
    return problems


# -- tools --------------------------------------------------------------------------------------

Currency = Literal["USD", "EUR", "GBP", "JPY", "CHF"]
Country = Literal["France", "Germany", "Japan", "Canada", "Brazil", "Kenya"]
_PER_USD = {"USD": 1.0, "EUR": 0.9137, "GBP": 0.7871, "JPY": 151.42, "CHF": 0.8812}
_ZONE = {"France": 4.35, "Germany": 4.1, "Japan": 11.9, "Canada": 8.7, "Brazil": 13.25, "Kenya": 15.6}
_STATUSES = ("shipped", "packing", "delivered", "on hold", "cancelled", "awaiting payment")


def _statuses(seed: int) -> dict[str, str]:
    rng = random.Random(seed + 1)
    return {f"ORD-{n}": rng.choice(_STATUSES) for n in rng.sample(range(1000, 9999), 40)}


ORDER_STATUS = _statuses(SEED)


def convert_amount(amount: float, source: str, target: str) -> str:
    return f"{amount / _PER_USD[source] * _PER_USD[target]:.2f} {target}"


def quote_shipping(weight_kg: float, country: str) -> str:
    return f"{_ZONE[country] + 2.15 * weight_kg:.2f} EUR"


def make_tools() -> list[BaseTool]:
    """The three tools of the `tools` family, each with the guard a careful developer adds."""

    @tool
    def convert_currency(amount: float, source: Currency, target: Currency) -> str:
        """Convert an amount of money from one currency to another at today's rate."""
        return convert_amount(amount, source, target)

    @tool
    def order_status(order_id: str) -> str:
        """Look up the delivery status of an order by its id (like ORD-1234)."""
        return ORDER_STATUS.get(order_id, "unknown order id")

    @tool
    def shipping_quote(weight_kg: float, country: Country) -> str:
        """Price of shipping a parcel of the given weight (kg) to a country."""
        return quote_shipping(weight_kg, country)

    def conversion_from_request(ctx: GuardContext) -> dict[str, list[Any]]:
        """The amount and currencies the customer wrote: the source is the currency written after
        the amount ("120 CHF"), the target one written elsewhere ("in GBP")."""
        said = str(ctx.request.get("text", ""))
        written = list(dict.fromkeys(_CURRENCY.findall(said)))
        held = list(dict.fromkeys(re.findall(rf"\d\s*{_CURRENCY.pattern}", said)))
        return {
            "amount": _numbers(said),
            "source": held or written,
            "target": [c for c in written if c not in held] or written,
        }

    def shipment_from_request(ctx: GuardContext) -> dict[str, list[Any]]:
        said = str(ctx.request.get("text", ""))
        return {"weight_kg": _numbers(said), "country": [c for c in _ZONE if c in said] or list(_ZONE)}

    def ids_from_request(ctx: GuardContext) -> dict[str, list[str]]:
        return {"order_id": re.findall(r"ORD-\d{4}", str(ctx.request.get("text", "")))}

    # Each tool is offered only for requests that hold what it needs: an amount and two currencies,
    # an order id, a weight and a country. "Has ORD-3897 shipped yet?" offers no shipping quote.
    def text(request: Mapping[str, Any]) -> str:
        return str(request.get("text", ""))

    def can_convert(request: Mapping[str, Any]) -> bool:
        return bool(_numbers(text(request))) and len(set(re.findall(_CURRENCY, text(request)))) >= 2

    def can_track(request: Mapping[str, Any]) -> bool:
        return re.search(r"ORD-\d{4}", text(request)) is not None

    def can_quote(request: Mapping[str, Any]) -> bool:
        return bool(_numbers(text(request))) and any(country in text(request) for country in _ZONE)

    return [
        with_policy(convert_currency, choices=conversion_from_request, offer_when=can_convert),
        with_policy(order_status, choices=ids_from_request, offer_when=can_track),
        with_policy(shipping_quote, choices=shipment_from_request, offer_when=can_quote),
    ]


_CURRENCY = re.compile(rf"\b({'|'.join(_PER_USD)})\b")


def _numbers(text: str) -> list[float]:
    """The numbers a customer wrote ("1,500" is 1500), without the digits of order ids."""
    text = re.sub(r"ORD-\d+", "", text).replace(",", "")
    return sorted({float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)})


class Question(BaseModel):
    text: str = Field(min_length=5, max_length=500)


class ToolReply(BaseModel):
    tool: Literal["convert_currency", "order_status", "shipping_quote"] = Field(
        description="the tool whose result answers the question"
    )
    result: str = Field(description="the tool's result, copied exactly")
    reply: str = Field(description="one short sentence for the customer")


class ToolCall(BaseModel):
    """What the bare prompt is asked for on tool tasks: it cannot run tools in one call."""

    tool: Literal["convert_currency", "order_status", "shipping_quote"]
    args: dict[str, Any]


TOOL_INSTRUCTIONS = (
    "You answer questions of a shop's customers. Use exactly one tool to get the fact, then answer "
    "with the tool's result copied exactly."
)


def reply_choices(ctx: CheckContext[Question]) -> dict[str, list[str]]:
    """Once a tool ran, the answer may only name it and quote what it returned."""
    return {
        "tool": sorted({r["name"] for r in ctx.tool_results}),
        "result": sorted({str(r["output"]) for r in ctx.tool_results}),
    }


def result_comes_from_tool(reply: ToolReply, ctx: CheckContext[Question]) -> list[str]:
    """The answer quotes what a tool returned this turn, from the tool it names."""
    returned = {str(r["output"]): r["name"] for r in ctx.tool_results}
    if not returned:
        return [f"no tool was called; call {reply.tool} first and answer with its result"]
    if reply.result.strip() not in returned:
        return [f"result {reply.result!r} is not what the tool returned; copy one of {sorted(returned)}"]
    if returned[reply.result.strip()] != reply.tool:
        return [f"that result came from {returned[reply.result.strip()]}, not {reply.tool}"]
    return []


def _tool_task(rng: random.Random, index: int) -> Task:
    kind = ("convert_currency", "order_status", "shipping_quote")[index % 3]
    if kind == "convert_currency":
        amount = rng.choice([12, 40, 75, 120, 250, 999, 1500, 18.5])
        source, target = rng.sample(list(_PER_USD), 2)
        text = rng.choice(
            [
                f"How much is {amount} {source} in {target}?",
                f"I have {amount} {source}. What is that in {target}?",
                f"Please convert {amount} {source} to {target}.",
            ]
        )
        args: dict[str, Any] = {"amount": amount, "source": source, "target": target}
        result = convert_amount(amount, source, target)
    elif kind == "order_status":
        order_id = rng.choice(sorted(ORDER_STATUS))
        text = rng.choice(
            [
                f"Where is my order {order_id}?",
                f"Hi, what's the status of {order_id}? I ordered last week.",
                f"Has {order_id} shipped yet?",
            ]
        )
        args = {"order_id": order_id}
        result = ORDER_STATUS[order_id]
    else:
        weight = rng.choice([0.5, 1, 2, 3.5, 7, 12])
        country = rng.choice(list(_ZONE))
        text = rng.choice(
            [
                f"What does it cost to ship a {weight} kg parcel to {country}?",
                f"Shipping price for {weight} kg to {country}, please.",
                f"I want to send {weight} kg to {country}. How much is shipping?",
            ]
        )
        args = {"weight_kg": weight, "country": country}
        result = quote_shipping(weight, country)
    return Task(
        id=f"tool-{index:02d}",
        family="tools",
        request={"text": text},
        expected={"tool": kind, "args": args, "result": result},
    )


# -- facts --------------------------------------------------------------------------------------

_GOODS = (
    "oak cutting board",
    "steel whisk",
    "glass carafe",
    "bamboo spatula",
    "cast iron pan",
    "linen apron",
    "pepper mill",
    "salad spinner",
    "bread knife",
    "butter dish",
)


class Row(BaseModel):
    sku: str = Field(pattern=r"^SKU-\d{3}$")
    name: str
    price: float = Field(ge=0)
    stock: int = Field(ge=0)


class Lookup(BaseModel):
    table: list[Row] = Field(min_length=1, max_length=20)
    question: str = Field(min_length=5, max_length=300)


class Fact(BaseModel):
    sku: str = Field(pattern=r"^SKU-\d{3}$", description="the sku of the row that answers the question")
    field: Literal["price", "stock"] = Field(description="the column that answers the question")
    value: float = Field(description="the value in that row and column")


FACT_INSTRUCTIONS = (
    "You answer questions about a shop's products using only the table in the request. "
    "Find the row the question is about and report its sku, the column asked for, and the value in it."
)


def render_lookup(lookup: Lookup) -> str:
    rows = "\n".join(f"{r.sku} | {r.name} | price {r.price:.2f} | stock {r.stock}" for r in lookup.table)
    return f"Products (sku | name | price | stock):\n{rows}\n\nQuestion: {lookup.question}"


def asked_rows(lookup: Lookup) -> list[Row]:
    """The rows the question names, by sku or by product name (all rows when it names none)."""
    question = lookup.question.lower()
    named = [r for r in lookup.table if r.sku.lower() in question or r.name.lower() in question]
    return named or list(lookup.table)


def asked_column(question: str) -> str | None:
    """The column a question asks for, when its wording says so."""
    low = question.lower()
    if re.search(r"\b(price|cost|costs|how much)\b", low):
        return "price"
    if re.search(r"\b(stock|how many|in stock)\b", low):
        return "stock"
    return None


def fact_choices(ctx: CheckContext[Lookup]) -> dict[str, list[Any]]:
    """A fact cites a row the question names, and a value written in the table."""
    table = ctx.input.table
    return {
        "sku": [r.sku for r in asked_rows(ctx.input)],
        "value": sorted({v for r in table for v in (r.price, r.stock)}),
    }


def fact_matches_table(fact: Fact, ctx: CheckContext[Lookup]) -> list[str]:
    """The cited row exists and is the one asked about, the column is the one asked for, and the
    value is the one in the table (a cross-checked fact)."""
    rows = {r.sku: r for r in ctx.input.table}
    row = rows.get(fact.sku)
    if row is None:
        return [f"sku {fact.sku} is not in the table; use one of {sorted(rows)}"]
    asked = asked_rows(ctx.input)
    if row not in asked:
        wanted = ", ".join(f"{r.sku} ({r.name})" for r in asked)
        return [f"sku {fact.sku} is the {row.name}; the question asks about {wanted}"]
    column = asked_column(ctx.input.question)
    if column is not None and fact.field != column:
        return [f"field {fact.field!r} is not what the question asks for; it asks for the {column}"]
    actual = float(getattr(row, fact.field))
    if abs(actual - fact.value) > 0.005:
        return [f"value: the {fact.field} of {fact.sku} ({row.name}) is {actual:g}, not {fact.value:g}"]
    return []


def _fact_task(rng: random.Random, index: int) -> Task:
    goods = rng.sample(_GOODS, 5)
    rows = [
        Row(
            sku=f"SKU-{rng.randint(100, 999)}",
            name=g,
            price=round(rng.uniform(3, 90), 2),
            stock=rng.randint(0, 250),
        )
        for g in goods
    ]
    row = rng.choice(rows)
    column: Literal["price", "stock"] = rng.choice(["price", "stock"])
    by_name = rng.random() < 0.6
    subject = f"the {row.name}" if by_name else row.sku
    if column == "price":
        question = rng.choice([f"What does {subject} cost?", f"What is the price of {subject}?"])
    else:
        question = rng.choice([f"How many of {subject} are in stock?", f"What is the stock of {subject}?"])
    value = float(getattr(row, column))
    return Task(
        id=f"fact-{index:02d}",
        family="facts",
        request=Lookup(table=rows, question=question).model_dump(),
        expected={"sku": row.sku, "field": column, "value": value},
    )


# -- the set ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    id: str
    family: Literal["extraction", "tools", "facts"]
    request: dict[str, Any]
    expected: dict[str, Any]


@dataclass(frozen=True)
class Family:
    """One contract per family; every method gets the same instructions and output model."""

    name: str
    contract: Contract[Any, Any]
    tools: Sequence[BaseTool] = field(default_factory=tuple)


def families() -> dict[str, Family]:
    return {
        "extraction": Family(
            "extraction",
            Contract(
                input=Email,
                output=OrderRequest,
                instructions=EXTRACTION_INSTRUCTIONS,
                checks=[order_matches_email],
                choices=order_choices,
                render=lambda e: e.text,
                name="extraction",
            ),
        ),
        "tools": Family(
            "tools",
            Contract(
                input=Question,
                output=ToolReply,
                instructions=TOOL_INSTRUCTIONS,
                checks=[result_comes_from_tool],
                choices=reply_choices,
                render=lambda q: q.text,
                needs_tool=True,  # the answer quotes a tool's result: no answer before a tool ran
                name="tools",
            ),
            tools=tuple(make_tools()),
        ),
        "facts": Family(
            "facts",
            Contract(
                input=Lookup,
                output=Fact,
                instructions=FACT_INSTRUCTIONS,
                checks=[fact_matches_table],
                choices=fact_choices,
                render=render_lookup,
                name="facts",
            ),
        ),
    }


def tasks(seed: int = SEED) -> list[Task]:
    """The fixed task set: the same 50 tasks for the same seed, on any machine."""
    rng = random.Random(seed)
    out = [_extraction_task(rng, i) for i in range(20)]
    out += [_tool_task(rng, i) for i in range(15)]
    out += [_fact_task(rng, i) for i in range(15)]
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.lower().split())
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[0]) if found else None


def correct(task: Task, output: Mapping[str, Any] | None, *, bare: bool = False) -> bool:
    """Is `output` (already validated against the family's model) the right answer?"""
    if output is None:
        return False
    exp = task.expected
    if task.family == "extraction":
        got = _norm(dict(output))
        want = _norm(exp)
        key: Callable[[Any], Any] = lambda item: item["product"]  # noqa: E731
        got["items"] = sorted(got.get("items", []), key=key)
        want["items"] = sorted(want["items"], key=key)
        return bool(got == want)
    if task.family == "tools":
        if bare:
            args = dict(output.get("args") or {})
            want_args = exp["args"]
            same = output.get("tool") == exp["tool"] and set(args) == set(want_args)
            return same and all(
                _norm(_as_number(args[k])) == _norm(_as_number(v)) for k, v in want_args.items()
            )
        result = str(output.get("result", ""))
        if exp["tool"] == "order_status":
            return output.get("tool") == exp["tool"] and _norm(result) == _norm(exp["result"])
        got_n, want_n = _number(result), _number(exp["result"])
        return (
            output.get("tool") == exp["tool"]
            and got_n is not None
            and abs(got_n - float(want_n or 0)) < 0.006
        )
    return (
        output.get("sku") == exp["sku"]
        and output.get("field") == exp["field"]
        and abs(float(output.get("value", -1)) - exp["value"]) < 0.006
    )


def _as_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
