"""SQL over a SQLite database as tools: read-only by default, parameterised, row-limited, self-describing."""

from __future__ import annotations

import difflib
import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keelgraph.contracts.errors import UserError
from keelgraph.contracts.parsing import INT64_MAX, INT64_MIN
from keelgraph.tools.execution import with_policy

__all__ = ["SQLError", "sql_tools"]

SQLValue = bool | int | float | str | None
"""A value bound to one `?` placeholder (JSON has no bytes, so blobs cannot be sent)."""

_MAX_VALUE_BYTES = 16 * 2**20
"""No string, blob or row may grow past this: `randomblob(2e9)` fails instead of taking memory."""
_PROGRESS_STEPS = 1_000
"""SQLite virtual-machine steps between two deadline checks (microseconds apart)."""
_HIDDEN_PREFIX = "sqlite_"
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})
_FORBIDDEN_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})

_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE})
_ROW_WRITES = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})
_OTHER_DATABASES = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})
_TRANSACTIONS = frozenset({sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT})


class SQLError(ValueError, ToolException):
    """A statement the database refused, or stopped: `reason` says why and `fix` what to send instead.

    The SQL tools raise it, so `run_tool_call` hands the message to the model as its next prompt.
    It is a `ToolException` (a message written for the model), so it is shown whole: redacting it
    like an arbitrary exception would cut the fix at its first SQL keyword ("only [redacted]").

    >>> str(SQLError("no such column: nmae", "did you mean name?"))
    'no such column: nmae; did you mean name?'
    """

    def __init__(self, reason: str, fix: str) -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}; {fix}")


def _schema_change() -> SQLError:
    return SQLError(
        "changing the schema (CREATE, DROP, ALTER, ...) is not allowed",
        "use INSERT, UPDATE or DELETE on the existing tables",
    )


class SchemaArgs(BaseModel):
    """`sql_schema` takes no arguments."""

    model_config = ConfigDict(extra="forbid")


class QueryArgs(BaseModel):
    """One statement and the values for its `?` placeholders."""

    model_config = ConfigDict(extra="forbid")

    sql: str = Field(
        min_length=1,
        max_length=20_000,
        description="One SQLite statement. Write ? where each value goes, never the value itself.",
    )
    params: list[SQLValue] = Field(
        default_factory=list,
        max_length=500,
        description="The values for the ? placeholders, in order (text, numbers, true/false or null).",
    )

    @field_validator("params", mode="before")
    @classmethod
    def _fits_in_64_bits(cls, value: Any) -> Any:
        # Checked before the union, which would otherwise turn 2**70 into an inexact float.
        if isinstance(value, list):
            for item in value:
                if (
                    isinstance(item, int)
                    and not isinstance(item, bool)
                    and not INT64_MIN <= item <= INT64_MAX
                ):
                    raise ValueError(f"{item} does not fit in 64 bits; pass such a number as text")
        return value


@dataclass
class _Deadline:
    """SQLite's progress handler: aborts the running statement once `seconds` have passed."""

    seconds: float
    expired: bool = False

    def __post_init__(self) -> None:
        self._at = time.monotonic() + self.seconds

    def __call__(self) -> int:
        if time.monotonic() >= self._at:
            self.expired = True
            return 1  # non-zero: SQLite stops the statement with "interrupted"
        return 0


@dataclass
class _Guard:
    """SQLite's authorizer for the model's statement: reads always, row writes only when `write`.

    Views and triggers are not trusted to reach unlisted tables: the authorizer reports the
    innermost view, trigger *or* CTE as the source, and a CTE can borrow any view's name.
    """

    allowed: dict[str, str] | None
    """Lower-cased name -> name of each table the model may use; None: every table."""
    write: bool
    writable_database: bool
    denied: SQLError | None = None
    """Why the first denied action was denied (SQLite itself only says "not authorized")."""
    selecting: bool = False
    """The statement began as a SELECT."""

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        refusal = self._check(action, arg1, arg2)
        if refusal is None:
            return sqlite3.SQLITE_OK
        if self.denied is None:
            self.denied = refusal
        return sqlite3.SQLITE_DENY

    def _check(self, action: int, arg1: str | None, arg2: str | None) -> SQLError | None:
        if action in _READ_ACTIONS:
            self.selecting = True
            return None
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() in _FORBIDDEN_FUNCTIONS:
                return SQLError(
                    f"the function {arg2}() is not allowed", "use SQLite's built-in SQL functions"
                )
            return None
        if action == sqlite3.SQLITE_READ:
            return self._table(arg1 or "", writing=False)
        if action == sqlite3.SQLITE_PRAGMA:
            return SQLError("PRAGMA statements are not allowed", "call sql_schema for the tables and columns")
        if action in _OTHER_DATABASES:
            return SQLError(
                "ATTACH, DETACH and VACUUM are not allowed: only this database can be used",
                "query its tables directly",
            )
        if not self.write and self.selecting and (arg1 or "").lower() in _SCHEMA_TABLES:
            # How SQLite registers a table-valued function (json_each, dbstat) as the query is prepared.
            return SQLError(
                "table-valued functions (json_each, json_tree, dbstat, ...) are not available here",
                "use scalar functions such as json_extract() instead",
            )
        if not self.write:
            fix = "send one SELECT (or WITH ... SELECT) statement"
            if self.writable_database:
                fix += "; change data with sql_execute"
            return SQLError("the database is read-only here: only SELECT statements can run", fix)
        if action in _ROW_WRITES:
            return self._table(arg1 or "", writing=True)
        if action in _TRANSACTIONS:
            return SQLError(
                "transaction statements (BEGIN, COMMIT, SAVEPOINT) are not needed",
                "send the one statement alone: each call commits on its own",
            )
        return _schema_change()

    def _table(self, name: str, *, writing: bool) -> SQLError | None:
        internal = name.lower().startswith(_HIDDEN_PREFIX)
        if writing and name.lower() in _SCHEMA_TABLES:  # how CREATE, DROP and ALTER reach the authorizer
            return _schema_change()
        if self.allowed is None:
            if writing and internal:
                return SQLError(
                    "SQLite's own tables cannot be changed", "use INSERT, UPDATE or DELETE on the data tables"
                )
            return None
        if name.lower() in self.allowed:
            return None
        # The same words as SQLite's own error: an unlisted table cannot be told from a missing one.
        return SQLError(
            f"no such table: {name}", _tables_hint(name, sorted(self.allowed.values(), key=str.lower))
        )


def _tables_hint(name: str, tables: Sequence[str]) -> str:
    if not tables:
        return "the database has no tables"
    close = difflib.get_close_matches(name, tables, n=1)
    shown = ", ".join(tables[:40]) + (f" and {len(tables) - 40} more" if len(tables) > 40 else "")
    return (f"did you mean {close[0]}? " if close else "") + f"the tables are {shown}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(raw: bytes) -> str:
    # Invalid UTF-8 in a TEXT column must not fail the whole query.
    return raw.decode("utf-8", errors="replace")


def _cell(value: Any) -> Any:
    """A value as JSON can carry it: blobs become a placeholder, infinities text."""
    if isinstance(value, bytes):
        return f"<blob: {len(value)} bytes>"
    if isinstance(value, float) and not math.isfinite(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _present_rows(output: Any) -> str:
    """`sql_query`'s result for the model: the column names, then one JSON list per row.

    >>> print(_present_rows({"columns": ["id"], "rows": [[1], [2]], "truncated": False, "row_count": 2}))
    columns: ["id"]
    [1]
    [2]
    (2 rows)
    """
    if not isinstance(output, dict) or "rows" not in output:
        return json.dumps(output, ensure_ascii=False, default=str)
    lines = [f"columns: {json.dumps(output.get('columns', []), ensure_ascii=False)}"]
    lines += [json.dumps(row, ensure_ascii=False, default=str) for row in output["rows"]]
    count = len(output["rows"])
    if output.get("truncated"):
        lines.append(
            f"(only the first {count} rows; more matched: narrow the query with WHERE, LIMIT or an aggregate)"
        )
    else:
        lines.append(f"({count} row{'' if count == 1 else 's'})")
    return "\n".join(lines)


class _Database:
    """One SQLite file and the rules for reaching it; every call opens its own connection."""

    def __init__(
        self, path: Path, *, writable: bool, max_rows: int, timeout_s: float, tables: Sequence[str] | None
    ) -> None:
        if max_rows < 1:
            raise UserError(f"sql_tools: max_rows must be at least 1, not {max_rows}")
        if not timeout_s > 0:
            raise UserError(f"sql_tools: timeout_s must be positive, not {timeout_s}")
        if not path.is_file():
            raise UserError(f"sql_tools: no SQLite database at {path}; create it first (it is never created)")
        self.path = path.resolve()
        self.writable = writable
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.allowed: dict[str, str] | None = None
        try:
            existing = self._objects()
        except (sqlite3.Error, SQLError) as exc:
            raise UserError(f"sql_tools: {path} cannot be read as a SQLite database ({exc})") from exc
        if tables is not None:
            by_lower = {name.lower(): name for name, _ in existing}
            unknown = [t for t in tables if t.lower() not in by_lower]
            if unknown:
                raise UserError(
                    f"sql_tools: tables= names {', '.join(unknown)}, which {path} does not have; "
                    f"it has {', '.join(by_lower.values()) or 'no tables'}"
                )
            self.allowed = {t.lower(): by_lower[t.lower()] for t in tables}

    @contextmanager
    def _connect(
        self, *, write: bool, guard: _Guard | None = None
    ) -> Iterator[tuple[sqlite3.Connection, _Deadline]]:
        """A fresh connection (tools run in worker threads), closed on exit, under one deadline."""
        deadline = _Deadline(self.timeout_s)
        uri = f"{self.path.as_uri()}?mode={'rw' if write else 'ro'}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise SQLError(
                f"the database could not be opened ({exc})", "tell the user it is unavailable"
            ) from exc
        try:
            conn.text_factory = _text
            # Read-only twice over (file opened read-only, query_only); writes keep declared foreign keys.
            conn.execute("PRAGMA foreign_keys = ON" if write else "PRAGMA query_only = ON")
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
            conn.set_progress_handler(deadline, _PROGRESS_STEPS)
            if guard is not None:
                conn.set_authorizer(guard)
            yield conn, deadline
        finally:
            conn.close()

    def _objects(self) -> list[tuple[str, str]]:
        """(name, "table" | "view") of the tables and views the model may see, by name."""
        with self._connect(write=False) as (conn, _):
            rows = conn.execute(
                "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name"
            ).fetchall()
        found = [(str(n), str(t)) for n, t in rows if not str(n).lower().startswith(_HIDDEN_PREFIX)]
        if self.allowed is None:
            return found
        return [(n, t) for n, t in found if n.lower() in self.allowed]

    def _guard(self, *, write: bool) -> _Guard:
        return _Guard(self.allowed, write=write, writable_database=self.writable)

    def schema(self) -> str:
        """The visible tables and views: columns with types, keys, and row counts."""
        objects = self._objects()
        if not objects:
            return "(the database has no tables)"
        visible = {name.lower() for name, _ in objects}
        lines: list[str] = []
        with self._connect(write=False) as (conn, deadline):
            for name, kind in objects:
                try:
                    lines.append(_describe(conn, deadline, name, kind, visible))
                except sqlite3.Error as exc:  # e.g. a virtual table whose module is not loaded
                    lines.append(f"{kind.upper()} {name}: (cannot be described: {exc})")
        return "\n".join(lines)

    def query(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any]:
        """Run one read-only statement; at most `max_rows` rows come back."""
        guard = self._guard(write=False)
        with self._connect(write=False, guard=guard) as (conn, deadline):
            try:
                cursor = conn.execute(sql, list(params))
                described = cursor.description
                rows = cursor.fetchmany(self.max_rows + 1) if described is not None else []
            except (sqlite3.Error, ValueError, OverflowError) as exc:
                raise self._explain(exc, sql, guard, deadline) from exc
        if described is None:
            raise SQLError("the statement returned no result", "send one SELECT statement")
        kept = [[_cell(v) for v in row] for row in rows[: self.max_rows]]
        return {
            "columns": [str(d[0]) for d in described],
            "rows": kept,
            "truncated": len(rows) > self.max_rows,
            "row_count": len(kept),
        }

    def execute(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any]:
        """Run one INSERT, UPDATE or DELETE (committed at once) and count the rows it changed."""
        guard = self._guard(write=True)
        with self._connect(write=True, guard=guard) as (conn, deadline):
            try:
                cursor = conn.execute(sql, list(params))
                described = cursor.description
                returned: list[Any] = []
                if described is not None:  # RETURNING: keep the first rows, let the rest run through
                    returned = cursor.fetchmany(self.max_rows + 1)
                    for _ in cursor:
                        pass
                result: dict[str, Any] = {
                    "rows_affected": max(cursor.rowcount, 0),
                    # A fresh connection has inserted nothing before: 0 means this statement did not either.
                    "last_row_id": cursor.lastrowid or None,
                }
            except (sqlite3.Error, ValueError, OverflowError) as exc:
                raise self._explain(exc, sql, guard, deadline, writing=True) from exc
        if described is not None:
            result["columns"] = [str(d[0]) for d in described]
            result["rows"] = [[_cell(v) for v in row] for row in returned[: self.max_rows]]
            result["truncated"] = len(returned) > self.max_rows
        return result

    def _catalog(self) -> dict[str, list[str]]:
        """Visible table name -> column names, for error messages (empty when unreadable)."""
        try:
            objects = self._objects()
            with self._connect(write=False) as (conn, _):
                return {
                    name: [str(r[0]) for r in conn.execute("SELECT name FROM pragma_table_info(?)", (name,))]
                    for name, _ in objects
                }
        except (sqlite3.Error, SQLError):
            return {}

    def _explain(
        self, exc: Exception, sql: str, guard: _Guard, deadline: _Deadline, *, writing: bool = False
    ) -> SQLError:
        """The refusal as the model should read it: what was wrong, and what to send instead."""
        if deadline.expired:
            return SQLError(
                f"the statement ran longer than {self.timeout_s:g} s and was stopped"
                + ("; nothing was changed" if writing else ""),
                "make it cheaper: filter with WHERE, join with ON conditions, add LIMIT, or aggregate",
            )
        if guard.denied is not None:
            return guard.denied
        message = str(exc)
        if "one statement at a time" in message:
            return SQLError(
                "only one statement can run per call",
                "send each statement in its own call, without ';' between",
            )
        if found := re.search(r"statement uses (\d+), and there are (\d+) supplied", message):
            return SQLError(
                f"the statement has {found[1]} ? placeholder(s) but params has {found[2]} value(s)",
                "pass exactly one value in params for each ?, in order",
            )
        if "binding parameter" in message:
            return SQLError(
                message.rstrip("."), "write ? where each value goes and pass the values in params"
            )
        if found := re.match(r"no such column: (.+)", message):
            return SQLError(message, self._columns_hint(found[1], sql))
        if found := re.match(r"no such table: (.+)", message):
            name = found[1].rsplit(".", maxsplit=1)[-1]
            return SQLError(message, _tables_hint(name, list(self._catalog())))
        if found := re.match(r"ambiguous column name: (.+)", message):
            return SQLError(message, f"qualify it with its table name or alias, e.g. some_table.{found[1]}")
        if message.startswith("no such function"):
            return SQLError(
                message, "use SQLite's built-in functions (strftime() for dates, || to join text)"
            )
        if "syntax error" in message or message == "incomplete input":
            return SQLError(message, "fix the SQL: one SQLite statement, with ? where each value goes")
        if found := re.match(r"(NOT NULL|UNIQUE|CHECK|FOREIGN KEY) constraint failed(?:: (.+))?", message):
            fixes = {
                "NOT NULL": f"give a value for {found[2]}",
                "UNIQUE": f"a row with this {found[2]} already exists: use another value, or UPDATE that row",
                "CHECK": "the values break a rule of the table: use allowed values",
                "FOREIGN KEY": "a referenced row does not exist (or other rows still refer to this one): "
                "check the ids with sql_query",
            }
            return SQLError(message + "; nothing was changed", fixes[found[1]])
        if "too big" in message:
            return SQLError(message, "select less: substr() or length() instead of a whole large value")
        if "locked" in message or "busy" in message:
            return SQLError("the database is busy (another connection is writing)", "try again shortly")
        return SQLError(message, "check the statement against sql_schema and SQLite's syntax")

    def _columns_hint(self, column: str, sql: str) -> str:
        catalog = self._catalog()
        mentioned = {
            t: cols
            for t, cols in catalog.items()
            if re.search(rf"(?<![\w$]){re.escape(t)}(?![\w$])", sql, re.I)
        }
        if not mentioned:
            return "call sql_schema for the tables and their columns"
        bare = column.rsplit(".", maxsplit=1)[-1]
        known = [c for cols in mentioned.values() for c in cols]
        close = difflib.get_close_matches(bare, known, n=1)
        parts = [f"the columns of {t} are {', '.join(cols)}" for t, cols in mentioned.items()]
        return (f"did you mean {close[0]}? " if close else "") + "; ".join(parts)


def _describe(conn: sqlite3.Connection, deadline: _Deadline, name: str, kind: str, visible: set[str]) -> str:
    """One line per table: `TABLE orders (5 rows): id INTEGER PRIMARY KEY, customer_id INTEGER ...`."""
    columns = conn.execute('SELECT name, type, "notnull", pk FROM pragma_table_info(?) ORDER BY cid', (name,))
    info = [(str(n), str(t or ""), bool(nn), int(pk)) for n, t, nn, pk in columns.fetchall()]
    keys = conn.execute(
        'SELECT id, "table", "from", "to" FROM pragma_foreign_key_list(?) ORDER BY id, seq', (name,)
    ).fetchall()
    links: dict[int, list[tuple[str, str, str | None]]] = {}
    for key_id, parent, child_col, parent_col in keys:
        links.setdefault(int(key_id), []).append((str(parent), str(child_col), parent_col))
    inline: dict[str, str] = {}
    trailing: list[str] = []
    for parts in links.values():
        parent = parts[0][0]
        if parent.lower() not in visible:  # a key into a hidden table would name it
            continue
        targets = [p for _, _, p in parts if p is not None]
        ref = f"REFERENCES {parent}" + (f"({', '.join(targets)})" if targets else "")
        if len(parts) == 1:
            inline[parts[0][1]] = ref
        else:
            trailing.append(f"FOREIGN KEY ({', '.join(c for _, c, _ in parts)}) {ref}")
    primary = [n for n, _, _, pk in sorted(info, key=lambda c: c[3]) if pk]
    described = []
    for col, col_type, not_null, pk in info:
        words = [col, col_type] if col_type else [col]
        if pk and len(primary) == 1:
            words.append("PRIMARY KEY")
        if not_null:
            words.append("NOT NULL")
        if col in inline:
            words.append(inline[col])
        described.append(" ".join(words))
    if len(primary) > 1:
        trailing.insert(0, f"PRIMARY KEY ({', '.join(primary)})")
    body = ", ".join(described + trailing)
    if kind == "view":
        return f"VIEW {name}: {body}"
    return f"TABLE {name} ({_count(conn, deadline, name)}): {body}"


def _count(conn: sqlite3.Connection, deadline: _Deadline, name: str) -> str:
    if deadline.expired:
        return "rows not counted"
    try:
        (count,) = conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()
    except sqlite3.OperationalError:
        if deadline.expired:
            return "rows not counted"
        raise
    return f"{count} row{'' if count == 1 else 's'}"


def sql_tools(
    path: str | Path,
    *,
    writable: bool = False,
    max_rows: int = 200,
    timeout_s: float = 5.0,
    tables: Sequence[str] | None = None,
) -> list[BaseTool]:
    """Tools that let a model read (and, if `writable`, change) the SQLite database at `path`.

    Returns `sql_schema` (tables, columns, keys, row counts) and `sql_query` (one read-only
    statement, values bound to `?` placeholders, at most `max_rows` rows, stopped after
    `timeout_s`), plus `sql_execute` (one INSERT, UPDATE or DELETE) when `writable`. SQLite itself
    enforces the rules: `sql_query` opens the file read-only with `query_only` on, and an
    authorizer refuses writes, schema changes, PRAGMA, ATTACH, extensions, and every table not in
    `tables` (when given; views and triggers need their base tables listed too). The file must
    exist. Each tool carries a keelgraph policy; re-wrap with `with_policy` to change it.

    >>> import sqlite3, tempfile
    >>> db = f"{tempfile.mkdtemp()}/pets.db"
    >>> conn = sqlite3.connect(db)
    >>> _ = conn.execute("CREATE TABLE pets (id INTEGER PRIMARY KEY, name TEXT)")
    >>> conn.close()
    >>> schema, query = sql_tools(db)
    >>> query.invoke({"sql": "SELECT count(*) AS n FROM pets WHERE name = ?", "params": ["Rex"]})
    {'columns': ['n'], 'rows': [[0]], 'truncated': False, 'row_count': 1}
    """
    database = _Database(Path(path), writable=writable, max_rows=max_rows, timeout_s=timeout_s, tables=tables)
    # The SQL deadline fires first; the policy's is the backstop for a call stuck elsewhere.
    backstop = timeout_s + 2.0
    schema = StructuredTool.from_function(
        func=database.schema,
        name="sql_schema",
        description=(
            "Describe the SQL database: each table with its columns (name and type), primary and "
            "foreign keys (REFERENCES) and row count. Call it before writing SQL."
        ),
        args_schema=SchemaArgs,
    )
    query = StructuredTool.from_function(
        func=database.query,
        name="sql_query",
        description=(
            f"Run one read-only SQLite SELECT statement and get its columns and up to {max_rows} rows. "
            "Never write a value into the SQL text: write ? where it goes and pass it in params, "
            "e.g. sql='SELECT id, total FROM orders WHERE customer_id = ? AND status = ?', "
            'params=[42, "shipped"]. Call sql_schema first for the tables and columns. '
            "If truncated is true, more rows matched: narrow the query or aggregate."
        ),
        args_schema=QueryArgs,
    )
    tools = [
        with_policy(schema, side_effect="read", timeout_s=backstop, max_output_chars=8_000),
        with_policy(
            query, side_effect="read", timeout_s=backstop, max_output_chars=8_000, present=_present_rows
        ),
    ]
    if writable:
        execute = StructuredTool.from_function(
            func=database.execute,
            name="sql_execute",
            description=(
                "Change data with one SQLite INSERT, UPDATE or DELETE statement, committed at once; "
                "returns rows_affected and last_row_id. Write ? where each value goes and pass the values "
                "in params, e.g. sql='UPDATE orders SET status = ? WHERE id = ?', params=[\"cancelled\", 7]. "
                "Schema changes (CREATE, DROP, ALTER) are refused. Read with sql_query."
            ),
            args_schema=QueryArgs,
        )
        tools.append(with_policy(execute, side_effect="write", timeout_s=backstop))
    return tools
