"""The reliability benchmark's held-out task set: 45 tasks in five families the development set lacks.

The development set (`reliability_tasks.py`) was tuned together with the library. These tasks
were written afterwards, the way a new user writes them from the README alone: every contract,
check, instruction and expected answer below was fixed before any model ran on them, and none is
to be changed after seeing a run (add a new set instead). Seed `SEED` fixes the few generated
values; everything else is written out by hand.

- documents (9): invoices and receipts (plain text) -> `InvoiceData`: line items (description,
  quantity, unit_price, line_total), currency, issue date, discount, tax and total. Convention,
  stated in the instructions: a line sold by the pack counts packs (quantity 1 at 45.00 for
  "Business cards, 500 pcs ... 45.00", 1 when the line shows no count), never the pieces inside.
- tickets (9): a support ticket -> `Triage`: category, priority and product (fixed lists) and a
  summary of at most 120 characters. Category and priority are `Contract(judgement=...)` fields
  where `Contract` has that parameter (keelgraph samples them to measure agreement).
- two_tools (9): a question that needs two tool calls, the second using what the first returned
  (a customer's country, then a shipping rate; an order's amount, then a conversion; an order's
  SKU, then the stock; an order's customer id, then the customer) -> `ChainAnswer`.
- sql (9): a question over a small SQLite shop database (built here, in a temporary directory)
  answered through `keelgraph.tools.sql.sql_tools` -> `DataAnswer`: needs a WHERE, a JOIN, an
  aggregate or a GROUP BY.
- threads (9): two-turn conversations about one order; turn 2 needs turn 1 (the name, the order
  id, the quantity or price said before) -> `OrderSoFar` after every turn.

How answers are judged (`correct`, which sees the expected answer; the checks never do):
- numbers equal within 0.006; strings equal after lower-casing and collapsing white space;
- documents: date, currency, discount, tax and total equal; the same number of line items, matched
  by description: descriptions are compared on their text before the first "," or "(" (so "Business
  cards" and "Business cards, 500 pcs" are the same item), and quantity, unit_price and line_total
  must be equal;
- tickets: category, priority and product equal exactly. The summary cannot be compared with a
  reference, so it is judged by a rule: at most 120 characters, names the product (any case), is
  not a copy of the ticket (its words, lower-cased and without punctuation, are not a run of the
  ticket's words), and shares at least one other word of four or more letters with the ticket
  (not a stop word): it says something about this ticket;
- two_tools and sql: the value equal (a number: the first number written in the answer, so
  "27.40 EUR" is 27.4; a name: equal as a string); two_tools also needs `tools_used` to name both
  tools of the expected chain (more may be named);
- threads: every field of every turn equal; a task is correct only when every turn is.

The bare-prompt baseline gets one model call per turn and cannot run tools. On the tool families
(two_tools, sql) it is told the tools' names, arguments and descriptions, told it cannot call them,
and asked for the family's answer directly, in the same output model; it is judged by the same
`correct`. The values come from tools and cannot be guessed (prices, converted amounts, stock
counts, customers' names, sums over the database), so it mostly fails there: that is the honest
baseline for "one prompt, no system". (The development set instead asks the bare prompt for the
one tool call and judges its arguments; with two dependent calls the second call's arguments are
not knowable without running the first, so that rule does not carry over.)
"""

from __future__ import annotations

import atexit
import functools
import random
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

from langchain_core.tools import BaseTool, tool
from pydantic import BaseModel, Field

from keelgraph import CheckContext, Computed, Contract
from keelgraph.contracts.evidence import not_copied
from keelgraph.tools import with_policy
from keelgraph.tools.sql import sql_tools

SEED = 20270117
"""Fixes the generated values (the SQL orders); not the development set's seed."""

FamilyName = Literal["documents", "tickets", "two_tools", "sql", "threads"]
FAMILY_NAMES: tuple[FamilyName, ...] = ("documents", "tickets", "two_tools", "sql", "threads")
TOLERANCE = 0.006

_CENT = Decimal("0.01")


def _money(value: Decimal) -> Decimal:
    return value.quantize(_CENT, rounding=ROUND_HALF_UP)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _close(a: float, b: float) -> bool:
    return abs(a - b) < TOLERANCE


_NUMBER = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def _numbers_in(text: str) -> list[float]:
    """Every number written in `text` ("1,156.00" is 1156.0; "-20.53" is 20.53)."""
    return [float(n.replace(",", "")) for n in _NUMBER.findall(text)]


def _first_number(text: str) -> float | None:
    found = _numbers_in(text)
    return found[0] if found else None


def _written(value: float, text: str) -> bool:
    return any(_close(value, n) for n in _numbers_in(text))


def _fmt_number(value: float | Decimal) -> str:
    return f"{value:,.2f}"


# -- documents ----------------------------------------------------------------------------------

Currency = Literal["EUR", "USD", "GBP", "CHF"]
_CURRENCY_MARKS: dict[str, tuple[str, ...]] = {
    "EUR": ("EUR", "€"),
    "USD": ("USD", "$"),
    "GBP": ("GBP", "£"),
    "CHF": ("CHF",),
}
_SYMBOL = {"EUR": "€", "USD": "$", "GBP": "£", "CHF": "CHF "}
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


class Document(BaseModel):
    text: str = Field(min_length=20, max_length=4000)


class InvoiceLine(BaseModel):
    description: str = Field(
        min_length=2,
        max_length=80,
        description="the item as written on its line (keep pack sizes like '500 pcs'), without count or prices",
    )
    quantity: float = Field(
        gt=0, le=10_000, description="how many units or packs are charged (1 if no count)"
    )
    unit_price: float = Field(ge=0, description="the price of one unit or one pack")
    line_total: float = Field(ge=0, description="the line's amount: quantity times unit_price")


class InvoiceData(BaseModel):
    issue_date: str = Field(
        pattern=r"^\d{4}-\d{2}-\d{2}$", description="the date the document was issued, as YYYY-MM-DD"
    )
    currency: Currency = Field(description="the currency of the amounts")
    items: list[InvoiceLine] = Field(min_length=1, max_length=8, description="every line item, in order")
    discount: float = Field(ge=0, description="the amount taken off, as a positive number; 0 if none")
    tax: float = Field(ge=0, description="the tax amount (VAT, sales tax); 0 if none")
    total: float = Field(ge=0, description="the amount to pay")


DOCUMENT_INSTRUCTIONS = (
    "You read invoices and receipts and extract their data. List every line item with its description "
    "as written, its quantity, unit price and line total. A line sold by the pack or box (for example "
    "'Business cards, 500 pcs' or 'Copy paper A4, box of 5 reams') counts packs: the quantity is the "
    "number of packs charged (1 when the line shows no count) and the unit price is the price of one "
    "pack; never count the pieces inside a pack. Give the issue date as YYYY-MM-DD (not the due date), "
    "the currency code, the discount and the tax as positive amounts (0 when there is none), and the "
    "total to pay. Copy every number exactly as printed."
)


@dataclass(frozen=True)
class _Line:
    description: str
    quantity: Decimal
    unit: Decimal
    show_count: bool = True
    """False: the line prints its amount only (a pack, or a single item), so its quantity is 1."""

    @property
    def amount(self) -> Decimal:
        return _money(self.quantity * self.unit)


@dataclass(frozen=True)
class _Doc:
    layout: Literal["table", "receipt", "letter"]
    vendor: str
    number: str
    issued: date
    date_style: Literal["iso", "dotted", "day_month", "month_day", "day_mon"]
    currency: Currency
    lines: tuple[_Line, ...]
    discount_pct: Decimal = Decimal(0)
    discount_fixed: Decimal = Decimal(0)
    tax_label: str = ""
    tax_pct: Decimal = Decimal(0)
    due: date | None = None
    customer: str = "Fjord Design Studio"

    @property
    def subtotal(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal(0))

    @property
    def discount(self) -> Decimal:
        return self.discount_fixed or _money(self.subtotal * self.discount_pct / 100)

    @property
    def tax(self) -> Decimal:
        return _money((self.subtotal - self.discount) * self.tax_pct / 100)

    @property
    def total(self) -> Decimal:
        return self.subtotal - self.discount + self.tax


def _show_date(day: date, style: str) -> str:
    month = _MONTHS[day.month - 1]
    return {
        "iso": day.isoformat(),
        "dotted": f"{day.day:02d}.{day.month:02d}.{day.year}",
        "day_month": f"{day.day} {month} {day.year}",
        "month_day": f"{month} {day.day}, {day.year}",
        "day_mon": f"{day.day} {month[:3]} {day.year}",
    }[style]


def _date_forms(day: date) -> set[str]:
    """The ways a document may write a date (what the date check accepts)."""
    month = _MONTHS[day.month - 1]
    return {
        day.isoformat(),
        f"{day.day:02d}.{day.month:02d}.{day.year}",
        f"{day.day}.{day.month}.{day.year}",
        f"{day.day} {month} {day.year}",
        f"{day.day:02d} {month} {day.year}",
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month[:3]} {day.year}",
        f"{day.day:02d}/{day.month:02d}/{day.year}",
        f"{day.month:02d}/{day.day:02d}/{day.year}",
    }


def _qty(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def _render_table(doc: _Doc) -> str:
    rows = [
        doc.vendor,
        f"Invoice {doc.number}",
        f"Invoice date: {_show_date(doc.issued, doc.date_style)}",
    ]
    if doc.due:
        rows.append(f"Due date: {_show_date(doc.due, doc.date_style)}")
    rows += [
        f"Customer: {doc.customer}",
        f"All amounts in {doc.currency}",
        "",
        f"{'Description':<36}{'Qty':>5}{'Unit price':>13}{'Amount':>12}",
    ]
    for line in doc.lines:
        rows.append(
            f"{line.description:<36}{_qty(line.quantity):>5}{_fmt_number(line.unit):>13}{_fmt_number(line.amount):>12}"
        )
    rows.append(f"{'Subtotal':>54}{_fmt_number(doc.subtotal):>12}")
    if doc.discount:
        label = f"Discount {_qty(doc.discount_pct)}%" if doc.discount_pct else "Discount"
        rows.append(f"{label:>54}{'-' + _fmt_number(doc.discount):>12}")
    if doc.tax_pct:
        rows.append(f"{doc.tax_label + ' ' + _qty(doc.tax_pct) + '%':>54}{_fmt_number(doc.tax):>12}")
    rows.append(f"{'Total ' + doc.currency:>54}{_fmt_number(doc.total):>12}")
    return "\n".join(rows)


def _render_receipt(doc: _Doc) -> str:
    sym = _SYMBOL[doc.currency]
    rows = [
        doc.vendor.upper(),
        doc.customer,
        f"{_show_date(doc.issued, doc.date_style)}   {doc.number}",
        "-" * 44,
    ]
    for line in doc.lines:
        if line.show_count:
            text = f"{_qty(line.quantity)} x {line.description} @ {_fmt_number(line.unit)}"
        else:
            text = line.description
        rows.append(f"{text:<36}{_fmt_number(line.amount):>8}")
    rows.append("-" * 44)
    if doc.discount or doc.tax_pct:
        rows.append(f"{'Subtotal':<36}{_fmt_number(doc.subtotal):>8}")
    if doc.discount:
        label = f"Discount {_qty(doc.discount_pct)}%" if doc.discount_pct else "Member discount"
        rows.append(f"{label:<36}{'-' + _fmt_number(doc.discount):>8}")
    if doc.tax_pct:
        rows.append(f"{doc.tax_label + ' ' + _qty(doc.tax_pct) + '%':<36}{_fmt_number(doc.tax):>8}")
    rows += [f"{'TOTAL':<30}{sym + _fmt_number(doc.total):>14}", "Paid by card", "Thank you for your visit!"]
    return "\n".join(rows)


def _render_letter(doc: _Doc) -> str:
    sym = _SYMBOL[doc.currency]
    rows = [
        f"From: {doc.vendor}",
        f"To: {doc.customer}",
        f"Invoice {doc.number}, issued {_show_date(doc.issued, doc.date_style)}",
        "",
        "Items:",
    ]
    for line in doc.lines:
        if line.show_count:
            rows.append(
                f"- {line.description}: {_qty(line.quantity)} at {sym}{_fmt_number(line.unit)} = {sym}{_fmt_number(line.amount)}"
            )
        else:
            rows.append(f"- {line.description}: {sym}{_fmt_number(line.amount)}")
    if doc.discount:
        label = f"Discount ({_qty(doc.discount_pct)}%)" if doc.discount_pct else "Discount"
        rows.append(f"{label}: -{sym}{_fmt_number(doc.discount)}")
    if doc.tax_pct:
        rows.append(f"{doc.tax_label} ({_qty(doc.tax_pct)}%): {sym}{_fmt_number(doc.tax)}")
    rows.append(f"Amount due: {sym}{_fmt_number(doc.total)}")
    if doc.due:
        rows.append(f"Please pay by {_show_date(doc.due, doc.date_style)}.")
    rows.append("Thank you for your business.")
    return "\n".join(rows)


def _d(text: str) -> Decimal:
    return Decimal(text)


_DOCS: tuple[_Doc, ...] = (
    _Doc(
        "table",
        "Northwind Office Supply GmbH",
        "INV-2026-0412",
        date(2026, 3, 14),
        "dotted",
        "EUR",
        (
            _Line("Toner cartridge TN-421", _d("2"), _d("38.90")),
            _Line("Business cards, 500 pcs", _d("1"), _d("45.00")),
            _Line("Copy paper A4, box of 5 reams", _d("3"), _d("27.50")),
        ),
        tax_label="VAT",
        tax_pct=_d("19"),
        due=date(2026, 4, 13),
    ),
    _Doc(
        "receipt",
        "Corner Stationery",
        "Receipt 88213",
        date(2026, 3, 12),
        "day_month",
        "USD",
        (
            _Line("Ballpoint pens, pack of 10", _d("2"), _d("6.45")),
            _Line("Business cards, 500 pcs", _d("1"), _d("45.00"), show_count=False),
            _Line("USB-C cable 2 m", _d("1"), _d("9.75"), show_count=False),
        ),
        tax_label="Sales tax",
        tax_pct=_d("8.25"),
        customer="Elm Street, Springfield",
    ),
    _Doc(
        "letter",
        "Brightline Consulting Ltd",
        "BC-1187",
        date(2026, 2, 27),
        "month_day",
        "GBP",
        (
            _Line("Consulting, hours", _d("3.5"), _d("80.00")),
            _Line("Travel expenses", _d("1"), _d("42.60")),
        ),
        discount_pct=_d("5"),
        due=date(2026, 3, 27),
    ),
    _Doc(
        "table",
        "Alpen Buero AG",
        "R-77120",
        date(2026, 1, 9),
        "iso",
        "CHF",
        (
            _Line("Ergonomic mouse", _d("4"), _d("24.95")),
            _Line("Laptop stand", _d("4"), _d("41.30")),
            _Line("Whiteboard markers, set of 4", _d("5"), _d("7.80")),
        ),
        tax_label="VAT",
        tax_pct=_d("8.1"),
        customer="Kessler Architekten",
    ),
    _Doc(
        "receipt",
        "Print and Post",
        "Till 3 / 5521",
        date(2026, 4, 2),
        "iso",
        "EUR",
        (
            _Line("Hanging file folders, box of 25", _d("1"), _d("14.60"), show_count=False),
            _Line("Label printer tape 12 mm", _d("3"), _d("11.15")),
            _Line("Stapler heavy duty", _d("1"), _d("18.20")),
        ),
        customer="Station Square, Ghent",
    ),
    _Doc(
        "letter",
        "Harbour Print Co.",
        "HP-3090",
        date(2026, 3, 30),
        "day_mon",
        "USD",
        (
            _Line("Flyers A5, 1000 pcs", _d("2"), _d("64.00")),
            _Line("Posters A2", _d("15"), _d("3.40")),
            _Line("Design fee", _d("1"), _d("120.00"), show_count=False),
        ),
        discount_pct=_d("10"),
        tax_label="Sales tax",
        tax_pct=_d("7"),
        customer="Blue Door Bakery",
    ),
    _Doc(
        "table",
        "Office Interiors Ltd",
        "OI-55018",
        date(2026, 2, 3),
        "day_month",
        "GBP",
        (
            _Line("Office chair", _d("4"), _d("289.00")),
            _Line("Desk lamp LED", _d("4"), _d("32.99")),
            _Line("Cable tray", _d("2"), _d("17.45")),
        ),
        tax_label="VAT",
        tax_pct=_d("20"),
        due=date(2026, 3, 5),
        customer="Pennine Law LLP",
    ),
    _Doc(
        "receipt",
        "Market Hall Hardware",
        "No. 40711",
        date(2026, 5, 18),
        "dotted",
        "EUR",
        (
            _Line("Wood screws, box of 200", _d("2"), _d("8.95")),
            _Line("Masking tape 48 mm", _d("6"), _d("3.15")),
            _Line("Paint roller set", _d("1"), _d("12.40"), show_count=False),
        ),
        discount_fixed=_d("3.50"),
        customer="Market Hall, Leuven",
    ),
    _Doc(
        "letter",
        "Lakeside IT Services",
        "LIT-2026-061",
        date(2026, 6, 1),
        "month_day",
        "CHF",
        (
            _Line("Support hours", _d("2.5"), _d("120.00")),
            _Line("Backup drive 2 TB", _d("1"), _d("89.90")),
            _Line("Licence renewal, 5 seats", _d("1"), _d("250.00"), show_count=False),
        ),
        tax_label="VAT",
        tax_pct=_d("8.1"),
        due=date(2026, 7, 1),
        customer="Seeblick Hotel",
    ),
)


def _render_doc(doc: _Doc) -> str:
    return {"table": _render_table, "receipt": _render_receipt, "letter": _render_letter}[doc.layout](doc)


def _document_tasks() -> list[Task]:
    out = []
    for i, doc in enumerate(_DOCS):
        expected = InvoiceData(
            issue_date=doc.issued.isoformat(),
            currency=doc.currency,
            items=[
                InvoiceLine(
                    description=line.description,
                    quantity=float(line.quantity),
                    unit_price=float(line.unit),
                    line_total=float(line.amount),
                )
                for line in doc.lines
            ],
            discount=float(doc.discount),
            tax=float(doc.tax),
            total=float(doc.total),
        )
        out.append(
            Task(
                id=f"doc-{i:02d}",
                family="documents",
                turns=[{"text": _render_doc(doc)}],
                expected=[expected.model_dump(mode="json")],
            )
        )
    return out


def _printed_total(text: str) -> float | None:
    """The amount on the document's last "Total" / "Amount due" line (not "Subtotal")."""
    found = None
    for line in text.splitlines():
        low = line.lower()
        if re.search(r"\b(total|amount due)\b", low) and "subtotal" not in low:
            numbers = _numbers_in(line)
            if numbers:
                found = numbers[-1]
    return found


def _has_line(text: str, pattern: str) -> bool:
    return any(re.search(pattern, line, re.IGNORECASE) and _numbers_in(line) for line in text.splitlines())


def document_currency(ctx: CheckContext[Document]) -> dict[str, list[Any]]:
    """The currencies whose code or symbol the document writes."""
    return {
        "currency": [c for c, marks in _CURRENCY_MARKS.items() if any(m in ctx.input.text for m in marks)]
    }


def invoice_adds_up(data: InvoiceData, ctx: CheckContext[Document]) -> list[str | Computed]:
    """Line totals are quantity x unit price, and the total is the lines less discount plus tax, and
    the total the document prints."""
    problems: list[str | Computed] = []
    for i, item in enumerate(data.items):
        product = round(item.quantity * item.unit_price, 2)
        if not _close(product, item.line_total):
            problems.append(
                f"items.{i}.line_total {item.line_total:.2f} is not quantity x unit_price "
                f"({item.quantity:g} x {item.unit_price:.2f} = {product:.2f})"
            )
    printed = _printed_total(ctx.input.text)
    if printed is not None and not _close(printed, data.total):
        # The document prints it: a value the check knows is written in, not asked for (`Computed`).
        problems.append(
            Computed("total", printed, f"total {data.total:.2f} is not the total the document prints")
        )
    lines = round(sum(item.line_total for item in data.items), 2)
    made = round(lines - data.discount + data.tax, 2)
    if not _close(made, data.total):
        problems.append(
            f"items: the line totals add up to {lines:.2f}, less discount {data.discount:.2f} plus tax "
            f"{data.tax:.2f} that makes {made:.2f}, not the total {data.total:.2f}; "
            "list every line of the document with its amount, and the discount and tax as printed"
        )
    return problems


def invoice_is_written(data: InvoiceData, ctx: CheckContext[Document]) -> list[str]:
    """Every value is written in the document: numbers, descriptions, the date (not only as a due
    date), the currency; a discount or tax line is not left out."""
    text = ctx.input.text
    problems = []
    for i, item in enumerate(data.items):
        if complaint := not_copied(
            f"items.{i}.description", item.description.strip(), text, source="the document"
        ):
            problems.append(complaint)
        # A line that shows no count is one unit or one pack.
        if item.quantity != 1 and not _written(item.quantity, text):
            problems.append(f"items.{i}.quantity {item.quantity:g} is not written in the document")
        for name in ("unit_price", "line_total"):
            value = getattr(item, name)
            if not _written(value, text):
                problems.append(f"items.{i}.{name} {value:.2f} is not written in the document")
    for name in ("discount", "tax", "total"):
        value = getattr(data, name)
        if value and not _written(value, text):
            problems.append(f"{name} {value:.2f} is not written in the document")
    if not data.discount and _has_line(text, r"\bdiscount\b"):
        problems.append("discount is 0 but the document has a discount line; write its amount")
    if not data.tax and _has_line(text, r"\b(vat|tax)\b"):
        problems.append("tax is 0 but the document has a tax line; write its amount")
    try:
        issued = date.fromisoformat(data.issue_date)
    except ValueError:
        return [*problems, f"issue_date {data.issue_date!r} is not a real date"]
    forms = _date_forms(issued)
    where = [line for line in text.splitlines() if any(form in line for form in forms)]
    if not where:
        problems.append(f"issue_date {data.issue_date} is not written in the document")
    elif all(re.search(r"\b(due|pay by)\b", line, re.IGNORECASE) for line in where):
        problems.append(
            f"issue_date {data.issue_date} is the due date; give the date the document was issued"
        )
    if not any(mark in text for mark in _CURRENCY_MARKS[data.currency]):
        problems.append(f"currency {data.currency} is not the document's currency")
    return problems


# -- tickets ------------------------------------------------------------------------------------

PRODUCTS = ("ShopFront", "PayDesk", "StockRoom", "TeamInbox", "BookKeep")
ProductName = Literal["ShopFront", "PayDesk", "StockRoom", "TeamInbox", "BookKeep"]
Category = Literal["billing", "bug", "account_access", "how_to", "feature_request"]
Priority = Literal["low", "normal", "high", "urgent"]


class Ticket(BaseModel):
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1, max_length=3000)


class Triage(BaseModel):
    category: Category
    priority: Priority
    product: ProductName = Field(description="the product the ticket is about")
    summary: str = Field(
        min_length=10, max_length=120, description="one sentence in your own words for the support team"
    )


TICKET_INSTRUCTIONS = (
    "You triage support tickets for our products: ShopFront (online store), PayDesk (payments and "
    "invoicing), StockRoom (inventory), TeamInbox (shared e-mail) and BookKeep (accounting).\n"
    "category: billing (charges, invoices, refunds, plan prices); bug (the product does something "
    "wrong or shows an error); account_access (signing in, passwords, locked accounts, user "
    "permissions); how_to (how to do something the product already does); feature_request (something "
    "the product does not do).\n"
    "priority: urgent (the customer's business is stopped now: nobody can sell, get paid, sign in or "
    "work, or data is being lost); high (something important is broken, or the customer was charged "
    "wrongly, but work goes on); normal (a problem with a workaround, or a question about a bill); "
    "low (how-to questions, wishes and feedback).\n"
    "product: the product the problem is in. summary: one sentence of at most 120 characters, in your "
    "own words, that names the product."
)

_STOP = frozenset(
    {
        "this",
        "that",
        "with",
        "have",
        "from",
        "your",
        "they",
        "were",
        "what",
        "when",
        "which",
        "will",
        "would",
        "could",
        "should",
        "about",
        "there",
        "their",
        "them",
        "then",
        "than",
        "been",
        "into",
        "also",
        "just",
        "only",
        "some",
        "very",
        "more",
        "most",
        "since",
        "each",
        "does",
        "doesn",
        "please",
        "thanks",
        "thank",
        "hello",
        "regards",
    }
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _is_copy(summary: str, ticket: Ticket) -> bool:
    said = " ".join(_words(summary))
    source = " ".join(_words(f"{ticket.subject} {ticket.body}"))
    return bool(said) and f" {said} " in f" {source} "


def _product_named(product: str, text: str) -> bool:
    return product.lower() in text.lower()


def ticket_products(ctx: CheckContext[Ticket]) -> dict[str, list[Any]]:
    """The products the ticket names."""
    said = f"{ctx.input.subject} {ctx.input.body}"
    return {"product": [p for p in PRODUCTS if _product_named(p, said)]}


def triage_fits_ticket(triage: Triage, ctx: CheckContext[Ticket]) -> list[str]:
    """The product is one the ticket names; the summary names it and is not a copy of the ticket."""
    said = f"{ctx.input.subject}\n{ctx.input.body}"
    problems = []
    if not _product_named(triage.product, said):
        named = [p for p in PRODUCTS if _product_named(p, said)]
        problems.append(f"product {triage.product} is not mentioned in the ticket; it names {named}")
    if not _product_named(triage.product, triage.summary):
        problems.append(f"summary does not name the product {triage.product}")
    if _is_copy(triage.summary, ctx.input):
        problems.append("summary copies the ticket's words; write it in your own words")
    return problems


def _summary_ok(summary: str, product: str, ticket: Ticket) -> bool:
    """The summary rule of `correct` (see the module docstring)."""
    others = {
        w
        for w in _words(f"{ticket.subject} {ticket.body}")
        if len(w) >= 4 and w not in _STOP and w != product.lower()
    }
    return (
        len(summary) <= 120
        and _product_named(product, summary)
        and not _is_copy(summary, ticket)
        and any(w in others for w in _words(summary))
    )


_TICKETS: tuple[tuple[str, str, Category, Priority, ProductName, str], ...] = (
    (
        "Checkout down - customers can't pay",
        "Since 9:10 this morning every customer who clicks Pay in our ShopFront store gets 'Error 502'. "
        "We have not taken a single order for two hours. Please help right away!",
        "bug",
        "urgent",
        "ShopFront",
        "ShopFront checkout fails with Error 502 for every customer, so no orders can be taken.",
    ),
    (
        "Charged twice for March",
        "Hello, our card was charged 49.00 twice on 1 March for the PayDesk Team plan. "
        "Please refund the duplicate charge.",
        "billing",
        "high",
        "PayDesk",
        "Customer was billed twice for the PayDesk Team plan in March and wants the duplicate refunded.",
    ),
    (
        "Export stock counts?",
        "Hi, in StockRoom I'd like to export the current stock counts of all items to a CSV file for our "
        "accountant. Where do I find that?",
        "how_to",
        "low",
        "StockRoom",
        "Customer asks how to export all current StockRoom stock counts as a CSV file.",
    ),
    (
        "Dark mode please",
        "We would love a dark mode in TeamInbox. Our night shift finds the bright white screen tiring. "
        "Keep up the good work!",
        "feature_request",
        "low",
        "TeamInbox",
        "Request for a dark mode in TeamInbox for the customer's night shift.",
    ),
    (
        "Whole team locked out",
        "Since the password reset this morning nobody in our company can sign in to BookKeep: the login "
        "page says 'account locked' for all six of us. We have to close the month today.",
        "account_access",
        "urgent",
        "BookKeep",
        "All users of the company are locked out of BookKeep after a password reset.",
    ),
    (
        "New accountant cannot see invoices",
        "Our new accountant Mia was added to PayDesk last week, but she cannot open the invoices page; "
        "it says she lacks permission. She is working from the exported PDFs for now.",
        "account_access",
        "normal",
        "PayDesk",
        "A new PayDesk user lacks the permission to open invoices; PDF exports are the workaround.",
    ),
    (
        "Product pages show prices without VAT",
        "We use BookKeep for our accounts and that is all fine. But since Monday's update, ShopFront "
        "shows every price on our product pages without VAT. Checkout still charges the right amount, "
        "but customers are confused and some complain.",
        "bug",
        "high",
        "ShopFront",
        "Since the Monday update ShopFront product pages show prices without VAT; checkout is right.",
    ),
    (
        "Line on our invoice",
        "Could you explain what the line 'Extra warehouse 15.00' on our StockRoom invoice means? We are "
        "not sure whether we ever added a second warehouse.",
        "billing",
        "normal",
        "StockRoom",
        "Customer asks what the 'Extra warehouse' charge on their StockRoom invoice is for.",
    ),
    (
        "Big attachments fail in Firefox",
        "Attachments over 10 MB fail to upload in TeamInbox when we use Firefox; the progress bar stops "
        "at 99%. In Chrome it works, so we are using Chrome for now.",
        "bug",
        "normal",
        "TeamInbox",
        "TeamInbox uploads of attachments over 10 MB fail in Firefox; Chrome works as a workaround.",
    ),
)


def _ticket_tasks() -> list[Task]:
    out = []
    for i, (subject, body, category, priority, product, summary) in enumerate(_TICKETS):
        expected = Triage(category=category, priority=priority, product=product, summary=summary)
        out.append(
            Task(
                id=f"ticket-{i:02d}",
                family="tickets",
                turns=[Ticket(subject=subject, body=body).model_dump()],
                expected=[expected.model_dump(mode="json")],
            )
        )
    return out


# -- two tools ----------------------------------------------------------------------------------

ToolName = Literal["customer_lookup", "order_lookup", "convert_currency", "shipping_rate", "stock_level"]
Country = Literal["Portugal", "Norway", "Nigeria", "Singapore", "Estonia", "Chile"]
Money = Literal["EUR", "USD", "GBP", "NOK", "SGD", "CHF"]

CUSTOMERS: dict[str, dict[str, str]] = {
    "CU-3817": {"name": "Ines Duarte", "country": "Portugal", "tier": "gold"},
    "CU-2290": {"name": "Henrik Lund", "country": "Norway", "tier": "standard"},
    "CU-5146": {"name": "Amara Eze", "country": "Nigeria", "tier": "standard"},
    "CU-7702": {"name": "Chen Wei", "country": "Singapore", "tier": "silver"},
    "CU-4431": {"name": "Olga Petrova", "country": "Estonia", "tier": "gold"},
    "CU-6058": {"name": "Mateo Ruiz", "country": "Chile", "tier": "silver"},
}
ORDERS: dict[str, dict[str, Any]] = {
    "OR-50213": {"customer_id": "CU-2290", "amount": 3184.0, "currency": "NOK", "sku": "SKU-48213"},
    "OR-61877": {"customer_id": "CU-4431", "amount": 212.35, "currency": "GBP", "sku": "SKU-90377"},
    "OR-73402": {"customer_id": "CU-6058", "amount": 96.8, "currency": "USD", "sku": "SKU-15564"},
    "OR-28815": {"customer_id": "CU-7702", "amount": 455.2, "currency": "SGD", "sku": "SKU-73021"},
}
STOCK: dict[str, dict[str, Any]] = {
    "SKU-48213": {"units_in_stock": 137, "warehouse": "Rotterdam"},
    "SKU-90377": {"units_in_stock": 12, "warehouse": "Tallinn"},
    "SKU-15564": {"units_in_stock": 58, "warehouse": "Valencia"},
    "SKU-73021": {"units_in_stock": 301, "warehouse": "Rotterdam"},
}
# Base price (EUR) and price per kg of a parcel to each country.
RATES: dict[str, tuple[Decimal, Decimal]] = {
    "Portugal": (_d("6.40"), _d("1.85")),
    "Norway": (_d("11.20"), _d("2.35")),
    "Nigeria": (_d("18.75"), _d("4.10")),
    "Singapore": (_d("15.30"), _d("3.65")),
    "Estonia": (_d("7.95"), _d("1.55")),
    "Chile": (_d("21.40"), _d("4.45")),
}
PER_EUR: dict[str, Decimal] = {
    "EUR": _d("1"),
    "USD": _d("1.0842"),
    "GBP": _d("0.8563"),
    "NOK": _d("11.6215"),
    "SGD": _d("1.4587"),
    "CHF": _d("0.9612"),
}


def lookup_customer(customer_id: str) -> dict[str, Any]:
    found = CUSTOMERS.get(customer_id.strip().upper())
    if found is None:
        return {"error": f"no customer with id {customer_id}"}
    return {"customer_id": customer_id.strip().upper(), **found}


def lookup_order(order_id: str) -> dict[str, Any]:
    found = ORDERS.get(order_id.strip().upper())
    if found is None:
        return {"error": f"no order with id {order_id}"}
    return {"order_id": order_id.strip().upper(), **found}


def convert(amount: float, source: str, target: str) -> dict[str, Any]:
    value = _money(Decimal(str(amount)) / PER_EUR[source] * PER_EUR[target])
    return {"amount": float(value), "currency": target}


def rate(country: str, weight_kg: float) -> dict[str, Any]:
    base, per_kg = RATES[country]
    return {"price": float(_money(base + per_kg * Decimal(str(weight_kg)))), "currency": "EUR"}


def stock(sku: str) -> dict[str, Any]:
    found = STOCK.get(sku.strip().upper())
    if found is None:
        return {"error": f"no product with sku {sku}"}
    return {"sku": sku.strip().upper(), **found}


def make_chain_tools() -> list[BaseTool]:
    """The five tools of the two_tools family: read-only lookups and calculators."""

    @tool
    def customer_lookup(customer_id: str) -> dict[str, Any]:
        """Look up a customer by id (like CU-1234): their name, country and tier."""
        return lookup_customer(customer_id)

    @tool
    def order_lookup(order_id: str) -> dict[str, Any]:
        """Look up an order by id (like OR-12345): the customer id, the amount and currency, and the SKU of the item."""
        return lookup_order(order_id)

    @tool
    def convert_currency(amount: float, source: Money, target: Money) -> dict[str, Any]:
        """Convert an amount of money from one currency to another at today's rate."""
        return convert(amount, source, target)

    @tool
    def shipping_rate(country: Country, weight_kg: float) -> dict[str, Any]:
        """The price in EUR of shipping a parcel of the given weight (kg) to a country."""
        return rate(country, weight_kg)

    @tool
    def stock_level(sku: str) -> dict[str, Any]:
        """How many units of a product (by SKU, like SKU-12345) are in stock, and in which warehouse."""
        return stock(sku)

    return [
        with_policy(t, side_effect="read", timeout_s=5)
        for t in (customer_lookup, order_lookup, convert_currency, shipping_rate, stock_level)
    ]


class Question(BaseModel):
    text: str = Field(min_length=5, max_length=500)


class ChainAnswer(BaseModel):
    value: str = Field(
        min_length=1,
        max_length=100,
        description="the answer, copied from the last tool's result: a number as digits, or a name",
    )
    tools_used: list[ToolName] = Field(
        min_length=1, max_length=4, description="the tools you called for it, in order"
    )


CHAIN_INSTRUCTIONS = (
    "You answer questions of a shop's staff with its tools. Each question needs two tool calls: the "
    "first looks something up, the second uses what the first returned. Answer with the value from "
    "the second tool's result, copied exactly, and list the tools you used in order."
)


def _scalars(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _scalars(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _scalars(v)]
    return [value]


def _same(a: Any, b: Any) -> bool:
    """One value equals another: numbers within the tolerance, text without case and spacing."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    numbers = []
    for v in (a, b):
        if isinstance(v, (int, float)):
            numbers.append(float(v))
        else:
            try:
                numbers.append(float(str(v).replace(",", "")))
            except ValueError:
                break
    if len(numbers) == 2:
        return _close(numbers[0], numbers[1])
    return _norm(str(a)) == _norm(str(b))


def _dependent_results(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The calls of this turn that took an argument from an earlier call's result."""
    out = []
    for j, call in enumerate(results):
        # What earlier calls found out: their results, less what they were asked with (an echoed id).
        learned = [
            s
            for r in results[:j]
            for s in _scalars(r["output"])
            if not any(_same(s, a) for a in _scalars(r.get("args", {})))
        ]
        if any(_same(a, s) for a in _scalars(call.get("args", {})) for s in learned):
            out.append(call)
    return out


def chain_choices(ctx: CheckContext[Question]) -> dict[str, list[Any]]:
    """Once tools ran, the answer may only quote what they returned and name the tools that ran."""
    return {
        "value": sorted({str(s) for r in ctx.tool_results for s in _scalars(r["output"])}),
        "tools_used": sorted({r["name"] for r in ctx.tool_results}),
    }


def answer_comes_from_second_call(answer: ChainAnswer, ctx: CheckContext[Question]) -> list[str]:
    """Two calls ran, the second using the first's result, and the value is what the second returned."""
    results = list(ctx.tool_results)
    if not results:
        return ["no tool was called; look the fact up first, then call the tool that needs it"]
    problems = []
    ran = [r["name"] for r in results]
    if sorted(set(answer.tools_used)) != sorted(set(ran)):
        problems.append(f"tools_used {answer.tools_used} is not what ran; this turn called {ran}")
    dependent = _dependent_results(results)
    if not dependent:
        return [
            *problems,
            f"value: only {ran} ran, and no call used another's result; call the tool that takes what "
            f"{ran[-1]} returned",
        ]
    quoted = [s for r in dependent for s in _scalars(r["output"])]
    if not any(_same(answer.value, s) for s in quoted):
        shown = sorted({str(s) for s in quoted})
        problems.append(f"value {answer.value!r} is not in the second call's result; copy one of {shown}")
    return problems


# (question, expected calls (name, args) in order, the field of the last result that answers it)
_CHAINS: tuple[tuple[str, tuple[tuple[str, dict[str, Any]], ...], str], ...] = (
    (
        "What would it cost to ship a 4.5 kg parcel to customer CU-3817?",
        (
            ("customer_lookup", {"customer_id": "CU-3817"}),
            ("shipping_rate", {"country": "Portugal", "weight_kg": 4.5}),
        ),
        "price",
    ),
    (
        "Customer CU-5146 wants a 2 kg parcel sent to them. What is the shipping price?",
        (
            ("customer_lookup", {"customer_id": "CU-5146"}),
            ("shipping_rate", {"country": "Nigeria", "weight_kg": 2}),
        ),
        "price",
    ),
    (
        "How much is shipping 12 kg to customer CU-7702?",
        (
            ("customer_lookup", {"customer_id": "CU-7702"}),
            ("shipping_rate", {"country": "Singapore", "weight_kg": 12}),
        ),
        "price",
    ),
    (
        "What is order OR-50213 worth in EUR?",
        (
            ("order_lookup", {"order_id": "OR-50213"}),
            ("convert_currency", {"amount": 3184.0, "source": "NOK", "target": "EUR"}),
        ),
        "amount",
    ),
    (
        "Please convert the amount of order OR-61877 to USD.",
        (
            ("order_lookup", {"order_id": "OR-61877"}),
            ("convert_currency", {"amount": 212.35, "source": "GBP", "target": "USD"}),
        ),
        "amount",
    ),
    (
        "How many units of the item in order OR-73402 are in stock?",
        (("order_lookup", {"order_id": "OR-73402"}), ("stock_level", {"sku": "SKU-15564"})),
        "units_in_stock",
    ),
    (
        "Is the product from order OR-28815 still in stock? How many units are left?",
        (("order_lookup", {"order_id": "OR-28815"}), ("stock_level", {"sku": "SKU-73021"})),
        "units_in_stock",
    ),
    (
        "Which country does the customer of order OR-61877 live in?",
        (("order_lookup", {"order_id": "OR-61877"}), ("customer_lookup", {"customer_id": "CU-4431"})),
        "country",
    ),
    (
        "What is the name of the customer who placed order OR-73402?",
        (("order_lookup", {"order_id": "OR-73402"}), ("customer_lookup", {"customer_id": "CU-6058"})),
        "name",
    ),
)

_CALLABLES: dict[str, Any] = {
    "customer_lookup": lookup_customer,
    "order_lookup": lookup_order,
    "convert_currency": convert,
    "shipping_rate": rate,
    "stock_level": stock,
}


def _chain_tasks() -> list[Task]:
    out = []
    for i, (question, calls, key) in enumerate(_CHAINS):
        last_name, last_args = calls[-1]
        value = _CALLABLES[last_name](**last_args)[key]
        expected = ChainAnswer(value=str(value), tools_used=[name for name, _ in calls])
        out.append(
            Task(
                id=f"chain-{i:02d}",
                family="two_tools",
                turns=[{"text": question}],
                expected=[expected.model_dump(mode="json")],
                calls=[[{"name": name, "args": args} for name, args in calls]],
            )
        )
    return out


# -- sql ----------------------------------------------------------------------------------------

_SQL_CUSTOMERS = (
    (1, "Lars Eriksen", "Oslo", "Norway", "2024-03-11"),
    (2, "Mona Schulz", "Berlin", "Germany", "2024-05-02"),
    (3, "Jakob Wagner", "Munich", "Germany", "2024-06-19"),
    (4, "Chloe Martin", "Lyon", "France", "2024-07-30"),
    (5, "Ana Ribeiro", "Porto", "Portugal", "2024-09-04"),
    (6, "Tom Baker", "Leeds", "United Kingdom", "2024-10-22"),
    (7, "Greta Vogel", "Berlin", "Germany", "2024-11-15"),
    (8, "Pieter de Vries", "Utrecht", "Netherlands", "2025-01-08"),
    (9, "Sara Lind", "Oslo", "Norway", "2025-02-14"),
    (10, "Felix Braun", "Hamburg", "Germany", "2025-03-27"),
    (11, "Nina Kowalska", "Gdansk", "Poland", "2025-05-05"),
    (12, "Hugo Petit", "Lyon", "France", "2025-06-18"),
    (13, "Ida Berg", "Berlin", "Germany", "2025-08-01"),
    (14, "Omar Farouk", "Leeds", "United Kingdom", "2025-09-12"),
)
_SQL_PRODUCTS = (
    (1, "Walnut desk organiser", "desk", 34.50),
    (2, "Brass desk lamp", "lighting", 89.00),
    (3, "Linen notebook", "paper", 12.75),
    (4, "Clip-on reading light", "lighting", 24.90),
    (5, "Oak pen tray", "desk", 18.20),
    (6, "Recycled copy paper", "paper", 6.40),
    (7, "Arc floor lamp", "lighting", 149.00),
    (8, "Leather mouse pad", "desk", 27.30),
    (9, "Dot grid journal", "paper", 15.95),
    (10, "Cable organiser box", "desk", 22.60),
)
_STATUSES = ("delivered", "delivered", "shipped", "processing", "cancelled")


def _sql_orders(seed: int) -> list[tuple[int, int, int, int, str, str]]:
    rng = random.Random(seed)
    rows = []
    for n in range(30):
        month = rng.randint(1, 4)
        rows.append(
            (
                1001 + n,
                rng.randint(1, len(_SQL_CUSTOMERS)),
                rng.randint(1, len(_SQL_PRODUCTS)),
                rng.randint(1, 6),
                f"2026-{month:02d}-{rng.randint(1, 28):02d}",
                rng.choice(_STATUSES),
            )
        )
    return rows


@functools.cache
def shop_database(seed: int = SEED) -> Path:
    """The sql family's database, built once per process in a temporary directory (same rows on
    every machine: `SEED` fixes the orders)."""
    folder = tempfile.mkdtemp(prefix="keelgraph-heldout-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "shop.db"
    conn = sqlite3.connect(path)
    try:
        conn.executescript(
            """
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL,
                                    country TEXT NOT NULL, joined TEXT NOT NULL);
            CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
                                   price REAL NOT NULL);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                                 product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL,
                                 order_date TEXT NOT NULL, status TEXT NOT NULL);
            """
        )
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", _SQL_CUSTOMERS)
        conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", _SQL_PRODUCTS)
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", _sql_orders(seed))
        conn.commit()
    finally:
        conn.close()
    return path


# (question, the reference query that answers it, its params)
_SQL_QUESTIONS: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    (
        "How many orders have the status 'cancelled'?",
        "SELECT COUNT(*) FROM orders WHERE status = ?",
        ("cancelled",),
    ),
    (
        "What is the name of the customer who placed order 1017?",
        "SELECT c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = ?",
        (1017,),
    ),
    (
        "How many units of the 'Walnut desk organiser' have been ordered in total, over all orders?",
        "SELECT SUM(o.quantity) FROM orders o JOIN products p ON p.id = o.product_id WHERE p.name = ?",
        ("Walnut desk organiser",),
    ),
    (
        "What is the average price of the products in the 'lighting' category?",
        "SELECT AVG(price) FROM products WHERE category = ?",
        ("lighting",),
    ),
    (
        "Which city has the most customers?",
        "SELECT city FROM customers GROUP BY city ORDER BY COUNT(*) DESC LIMIT 1",
        (),
    ),
    (
        "What is the total value (quantity times price) of all orders placed by Greta Vogel, whatever their status?",
        "SELECT SUM(o.quantity * p.price) FROM orders o JOIN products p ON p.id = o.product_id "
        "JOIN customers c ON c.id = o.customer_id WHERE c.name = ?",
        ("Greta Vogel",),
    ),
    (
        "Which product has been ordered in the largest total quantity?",
        "SELECT p.name FROM orders o JOIN products p ON p.id = o.product_id GROUP BY p.id "
        "ORDER BY SUM(o.quantity) DESC LIMIT 1",
        (),
    ),
    (
        "How many different customers from Germany have placed at least one order?",
        "SELECT COUNT(DISTINCT o.customer_id) FROM orders o JOIN customers c ON c.id = o.customer_id "
        "WHERE c.country = ?",
        ("Germany",),
    ),
    (
        "How many orders were placed in March 2026?",
        "SELECT COUNT(*) FROM orders WHERE order_date BETWEEN ? AND ?",
        ("2026-03-01", "2026-03-31"),
    ),
)

# The GROUP BY questions must have one answer, not a tie the LIMIT 1 breaks by chance.
_NO_TIE = {
    4: "SELECT COUNT(*) AS n FROM customers GROUP BY city ORDER BY n DESC LIMIT 2",
    6: "SELECT SUM(quantity) AS n FROM orders GROUP BY product_id ORDER BY n DESC LIMIT 2",
}


def _as_answer(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.2f}"
    return str(value)


class DataAnswer(BaseModel):
    answer: str = Field(
        min_length=1, max_length=200, description="the answer, from the query result: a number or a name"
    )


SQL_INSTRUCTIONS = (
    "You answer questions about the shop's data with SQL. Call sql_schema to see the tables, then "
    "sql_query to compute the answer. Answer with the value from the query result, copied exactly "
    "(a number may be rounded to 2 decimals): a number or a name, nothing else."
)


def answer_is_in_a_query_result(answer: DataAnswer, ctx: CheckContext[Question]) -> list[str]:
    """The answer is a value some `sql_query` of this turn returned."""
    cells = [
        cell
        for r in ctx.tool_results
        if r["name"] == "sql_query" and isinstance(r["output"], Mapping)
        for row in r["output"].get("rows", [])
        for cell in row
    ]
    if not cells:
        return [
            "no query ran; call sql_query with a SELECT that computes the answer, then answer with its value"
        ]
    if any(_same(answer.answer, cell) for cell in cells if cell is not None):
        return []
    shown = sorted({str(c) for c in cells})[:20]
    return [
        f"answer {answer.answer!r} is not a value your queries returned ({shown}); copy one, or query again"
    ]


def _sql_tasks() -> list[Task]:
    conn = sqlite3.connect(shop_database())
    try:
        for i, query in _NO_TIE.items():
            top = [n for (n,) in conn.execute(query)]
            if len(top) > 1 and top[0] == top[1]:
                raise AssertionError(f"sql question {i} has a tie: {top}")
        out = []
        for i, (question, sql, params) in enumerate(_SQL_QUESTIONS):
            ((value,),) = conn.execute(sql, params).fetchall()
            out.append(
                Task(
                    id=f"sql-{i:02d}",
                    family="sql",
                    turns=[{"text": question}],
                    expected=[DataAnswer(answer=_as_answer(value)).model_dump()],
                    calls=[[{"name": "sql_query", "args": {"sql": sql, "params": list(params)}}]],
                )
            )
        return out
    finally:
        conn.close()


# -- threads ------------------------------------------------------------------------------------

STATIONERY = (
    "desk lamp",
    "notebook",
    "fountain pen",
    "stapler",
    "paper tray",
    "ink cartridge",
    "pencil case",
    "wall calendar",
)
Stationery = Literal[
    "desk lamp",
    "notebook",
    "fountain pen",
    "stapler",
    "paper tray",
    "ink cartridge",
    "pencil case",
    "wall calendar",
]


class Message(BaseModel):
    text: str = Field(min_length=1, max_length=1000)


class OrderSoFar(BaseModel):
    customer_name: str = Field(min_length=2, max_length=60, description="the customer's full name")
    order_id: str = Field(pattern=r"^ORD-\d{4}$", description="the order id, like ORD-1234")
    product: Stationery = Field(description="the product ordered, by its catalog name (singular)")
    quantity: int = Field(ge=1, le=99)
    unit_price: float = Field(gt=0, description="the price of one item")
    total: float = Field(ge=0, description="quantity times unit_price, to the cent")


THREAD_INSTRUCTIONS = (
    "You keep track of one customer's order during a chat. After every message, reply with the order "
    "as it stands now: the customer's name, the order id, the product (catalog names: "
    f"{', '.join(STATIONERY)}), the quantity, the unit price and the total (quantity times unit price, "
    "to the cent). Keep what the customer said earlier unless they change it."
)

_PRODUCT_WORDS = "|".join(re.escape(p) for p in STATIONERY)
_NAMED = re.compile(
    r"\b(?:[Ii]'m|[Ii] am|[Tt]his is|[Mm]y name is)\s+([A-Z][a-z]+(?: [A-Z][a-z]+)?)|\b([A-Z][a-z]+ [A-Z][a-z]+) here\b"
)


def _stated_quantity(text: str) -> int | None:
    """A quantity the message states: a count before a product ("3 desk lamps") or "change it to 5"."""
    found = re.search(rf"\b(\d+)\s+(?:{_PRODUCT_WORDS})s?\b", text, re.IGNORECASE) or re.search(
        r"\b(?:change it to|make it|to)\s+(\d+)\b(?![.,]\d)", text, re.IGNORECASE
    )
    return int(found.group(1)) if found else None


def order_follows_message(order: OrderSoFar, ctx: CheckContext[Message]) -> list[str | Computed]:
    """The total is quantity x unit price; what this message states (a name, an order id, a
    product, a quantity, a price) is what the order now holds. (Earlier turns are not visible here.)"""
    text = ctx.input.text
    problems: list[str | Computed] = []
    made = round(order.quantity * order.unit_price, 2)
    if not _close(made, order.total):
        problems.append(Computed("total", made, f"total {order.total:.2f} is not quantity x unit_price"))
    ids = re.findall(r"\bORD-\d{4}\b", text)
    if ids and order.order_id not in ids:
        problems.append(f"order_id {order.order_id} is not the order the message names; it names {ids}")
    products = [p for p in STATIONERY if re.search(rf"\b{re.escape(p)}s?\b", text, re.IGNORECASE)]
    if products and order.product not in products:
        problems.append(f"product {order.product!r} is not what the message orders; it names {products}")
    quantity = _stated_quantity(text)
    if quantity is not None and quantity != order.quantity:
        problems.append(f"quantity {order.quantity} is not what the message says; it says {quantity}")
    prices = [float(p) for p in re.findall(r"\b\d+\.\d{2}\b", text)]
    if prices and not any(_close(p, order.unit_price) for p in prices):
        problems.append(f"unit_price {order.unit_price:.2f} is not the price the message gives ({prices})")
    named = [a or b for a, b in _NAMED.findall(text)]
    if (
        named
        and all(_norm(n) != _norm(order.customer_name) for n in named)
        and (complaint := not_copied("customer_name", order.customer_name, named[0], source="the message"))
    ):
        problems.append(complaint)
    return problems


# (name, order id, product, quantity, price, turn-1 template, turn-2 kind, turn-2 values)
_THREADS: tuple[tuple[str, str, str, int, str, int, str, tuple[Any, ...]], ...] = (
    ("Rhea Castillo", "ORD-4411", "desk lamp", 3, "24.90", 0, "quantity", (5,)),
    ("Bruno Lemaire", "ORD-2087", "notebook", 12, "3.45", 1, "add", (4,)),
    ("Yusuf Demir", "ORD-7350", "fountain pen", 2, "38.60", 2, "swap", ("pencil case", "7.95")),
    ("Hanna Koskinen", "ORD-1964", "stapler", 4, "11.30", 0, "price", ("12.05",)),
    ("Ravi Menon", "ORD-5528", "paper tray", 6, "9.85", 1, "repeat", ()),
    ("Kofi Boateng", "ORD-3172", "ink cartridge", 8, "17.40", 2, "quantity", (3,)),
    ("Mirela Popescu", "ORD-6645", "wall calendar", 10, "6.75", 0, "add", (5,)),
    ("Sven Aalto", "ORD-8023", "notebook", 7, "4.20", 1, "swap", ("fountain pen", "21.50")),
    ("Lucia Ferraro", "ORD-2916", "desk lamp", 2, "46.80", 2, "repeat", ()),
)
_OPENINGS = (
    "Hi, I'm {name}. My order {oid} is for {n} {items} at {price} each. What's the total?",
    "Hello! {name} here, order {oid}: {n} {items}, {price} each. Can you confirm the total?",
    "This is {name}. I placed order {oid} for {n} {items} at {price} apiece. How much is that?",
)


def _order(name: str, oid: str, product: str, quantity: int, price: str) -> dict[str, Any]:
    total = _money(Decimal(price) * quantity)
    return OrderSoFar(
        customer_name=name,
        order_id=oid,
        product=product,
        quantity=quantity,
        unit_price=float(price),
        total=float(total),
    ).model_dump()


def _thread_tasks() -> list[Task]:
    out = []
    for i, (name, oid, product, n, price, opening, kind, values) in enumerate(_THREADS):
        first = _OPENINGS[opening].format(name=name, oid=oid, n=n, items=product + "s", price=price)
        before = _order(name, oid, product, n, price)
        if kind == "quantity":
            (m,) = values
            second = f"Change it to {m}, please, and tell me the new total."
            after = _order(name, oid, product, m, price)
        elif kind == "add":
            (k,) = values
            second = f"Add {k} more, please. What's the total now?"
            after = _order(name, oid, product, n + k, price)
        elif kind == "swap":
            other, other_price = values
            second = f"Actually, make them {other}s instead, at {other_price} each. Same quantity."
            after = _order(name, oid, other, n, other_price)
        elif kind == "price":
            (new_price,) = values
            second = f"The {product} price went up to {new_price} each. What's my total now?"
            after = _order(name, oid, product, n, new_price)
        else:
            second = "Sorry, can you repeat my order back to me, with the total?"
            after = before
        out.append(
            Task(
                id=f"thread-{i:02d}",
                family="threads",
                turns=[{"text": first}, {"text": second}],
                expected=[before, after],
            )
        )
    return out


# -- the set ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    id: str
    family: FamilyName
    turns: list[dict[str, Any]]
    """The requests of one thread, in order (one for single-turn families)."""
    expected: list[dict[str, Any]]
    """The right output after each turn."""
    calls: list[list[dict[str, Any]]] = field(default_factory=list)
    """Per turn, the tool calls (`{"name", "args"}`) a right answer rests on: for tests, which run
    the real tools to build the check context. The harness does not read it."""


@dataclass(frozen=True)
class Family:
    """One contract per family; every method gets the same instructions and output model."""

    name: str
    contract: Contract[Any, Any]
    tools: Sequence[BaseTool] = field(default_factory=tuple)
    options: Mapping[str, Any] = field(default_factory=dict)
    """`build_graph` options for keelgraph (the sql family may query more than once)."""


def families() -> dict[str, Family]:
    return {
        "documents": Family(
            "documents",
            Contract(
                input=Document,
                output=InvoiceData,
                instructions=DOCUMENT_INSTRUCTIONS,
                checks=[invoice_adds_up, invoice_is_written],
                choices=document_currency,
                render=lambda d: d.text,
                name="documents",
            ),
        ),
        "tickets": Family(
            "tickets",
            Contract(
                input=Ticket,
                output=Triage,
                instructions=TICKET_INSTRUCTIONS,
                checks=[triage_fits_ticket],
                choices=ticket_products,
                render=lambda t: f"Subject: {t.subject}\n\n{t.body}",
                name="tickets",
                judgement=("category", "priority"),
            ),
        ),
        "two_tools": Family(
            "two_tools",
            Contract(
                input=Question,
                output=ChainAnswer,
                instructions=CHAIN_INSTRUCTIONS,
                checks=[answer_comes_from_second_call],
                choices=chain_choices,
                render=lambda q: q.text,
                needs_tool=True,
                name="two_tools",
            ),
            tools=tuple(make_chain_tools()),
        ),
        "sql": Family(
            "sql",
            Contract(
                input=Question,
                output=DataAnswer,
                instructions=SQL_INSTRUCTIONS,
                checks=[answer_is_in_a_query_result],
                render=lambda q: q.text,
                needs_tool=True,
                name="sql",
            ),
            tools=tuple(sql_tools(shop_database())),
            # README: "after a tool succeeded the model is not offered it again in that turn": a
            # first query that answers the wrong thing must be followed by another.
            options={"allow_repeat_tools": True},
        ),
        "threads": Family(
            "threads",
            Contract(
                input=Message,
                output=OrderSoFar,
                instructions=THREAD_INSTRUCTIONS,
                checks=[order_follows_message],
                render=lambda m: m.text,
                name="threads",
            ),
        ),
    }


def tasks() -> list[Task]:
    """The held-out set: the same 45 tasks on any machine, in family order."""
    return [*_document_tasks(), *_ticket_tasks(), *_chain_tasks(), *_sql_tasks(), *_thread_tasks()]


# -- judging ------------------------------------------------------------------------------------


def _core(description: str) -> str:
    """A description's text before the first "," or "(" (case and spacing aside)."""
    return _norm(re.split(r"[,(]", description, maxsplit=1)[0]).strip(" .:-")


def _value_ok(got: Any, want: str) -> bool:
    """A value answer: numbers by the first number written, names as strings."""
    try:
        wanted = float(want)
    except ValueError:
        return _norm(str(got)) == _norm(want)
    number = _first_number(str(got))
    return number is not None and _close(number, wanted)


def _document_ok(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    if got.get("issue_date") != want["issue_date"] or got.get("currency") != want["currency"]:
        return False
    if not all(_close(float(got.get(k, -1)), float(want[k])) for k in ("discount", "tax", "total")):
        return False
    items, wanted = list(got.get("items") or []), list(want["items"])
    if len(items) != len(wanted):
        return False
    left = list(items)
    for w in wanted:
        match = next(
            (
                g
                for g in left
                if _core(str(g.get("description", ""))) == _core(w["description"])
                and all(
                    _close(float(g.get(k, -1)), float(w[k])) for k in ("quantity", "unit_price", "line_total")
                )
            ),
            None,
        )
        if match is None:
            return False
        left.remove(match)
    return True


def correct(task: Task, turn: int, output: Mapping[str, Any] | None) -> bool:
    """Is `output` (already validated against the family's model) the right answer to turn `turn`?

    The same rule for every method, the bare prompt included (see the module docstring)."""
    if output is None:
        return False
    want = task.expected[turn]
    if task.family == "documents":
        return _document_ok(output, want)
    if task.family == "tickets":
        ticket = Ticket.model_validate(task.turns[turn])
        return (
            all(output.get(k) == want[k] for k in ("category", "priority", "product"))
            and isinstance(output.get("summary"), str)
            and _summary_ok(output["summary"], want["product"], ticket)
        )
    if task.family == "two_tools":
        named = set(output.get("tools_used") or [])
        return _value_ok(output.get("value", ""), want["value"]) and set(want["tools_used"]) <= named
    if task.family == "sql":
        return _value_ok(output.get("answer", ""), want["answer"])
    # threads: every field
    return all(
        _close(float(output.get(k, -1)), float(want[k]))
        if k in ("unit_price", "total")
        else _norm(str(output.get(k, ""))) == _norm(str(want[k]))
        for k in want
    )
