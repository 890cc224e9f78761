"""The SQLite tools: read-only enforced by SQLite, parameters as data, row limits, deadlines, errors."""

from __future__ import annotations

import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import BaseTool

from keelgraph.contracts.errors import UserError
from keelgraph.tools.execution import policy_of, run_tool_call
from keelgraph.tools.sql import SQLError, sql_tools

SHOP = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    total_cents INTEGER, status TEXT);
CREATE TABLE order_lines (
    order_id INTEGER REFERENCES orders(id), line INTEGER, sku TEXT, PRIMARY KEY (order_id, line));
CREATE TABLE secrets (id INTEGER PRIMARY KEY, token TEXT);
CREATE VIEW big_orders AS SELECT id, total_cents FROM orders WHERE total_cents > 1000;
INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.com'), (3, 'Cy', NULL);
INSERT INTO orders VALUES (1, 1, 500, 'shipped'), (2, 1, 2500, 'delivered'), (3, 2, 1200, 'processing');
INSERT INTO order_lines VALUES (2, 1, 'A-1'), (2, 2, 'B-7');
INSERT INTO secrets VALUES (1, 's3cr3t');
"""

READ_ONLY = (
    "the database is read-only here: only SELECT statements can run; "
    "send one SELECT (or WITH ... SELECT) statement"
)
NO_ATTACH = (
    "ATTACH, DETACH and VACUUM are not allowed: only this database can be used; query its tables directly"
)
NO_PRAGMA = "PRAGMA statements are not allowed; call sql_schema for the tables and columns"
ALL_TABLES = "the tables are big_orders, customers, order_lines, orders, secrets"


def make_db(path: Path, script: str = SHOP, *, wal: bool = False) -> Path:
    with closing(sqlite3.connect(path)) as conn:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(script)
        conn.commit()
    return path


def select(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def by_name(path: Path, **options: Any) -> dict[str, BaseTool]:
    return {t.name: t for t in sql_tools(path, **options)}


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    folder = tmp_path / "db"
    folder.mkdir()
    return make_db(folder / "shop.db")


def query(tools: dict[str, BaseTool], sql: str, params: list[Any] | None = None) -> Any:
    return tools["sql_query"].invoke({"sql": sql, "params": params or []})


def refusal(
    tools: dict[str, BaseTool], sql: str, params: list[Any] | None = None, tool: str = "sql_query"
) -> str:
    with pytest.raises(SQLError) as caught:
        tools[tool].invoke({"sql": sql, "params": params or []})
    return str(caught.value)


def test_read_only_by_default_with_read_policies(shop: Path) -> None:
    tools = sql_tools(shop)
    assert [t.name for t in tools] == ["sql_schema", "sql_query"]
    assert [policy_of(t).side_effect for t in tools] == ["read", "read"]
    assert policy_of(tools[1]).timeout_s == 7.0  # the 5 s SQL deadline plus the backstop margin
    assert "?" in tools[1].description and "params" in tools[1].description


def test_schema_describes_tables_columns_keys_and_row_counts(shop: Path) -> None:
    assert by_name(shop)["sql_schema"].invoke({}) == "\n".join(
        [
            "VIEW big_orders: id INTEGER, total_cents INTEGER",
            "TABLE customers (3 rows): id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT",
            "TABLE order_lines (2 rows): order_id INTEGER REFERENCES orders(id), line INTEGER, sku TEXT, "
            "PRIMARY KEY (order_id, line)",
            "TABLE orders (3 rows): id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id), "
            "total_cents INTEGER, status TEXT",
            "TABLE secrets (1 row): id INTEGER PRIMARY KEY, token TEXT",
        ]
    )


def test_parameterised_select(shop: Path) -> None:
    result = query(
        by_name(shop), "SELECT name, email FROM customers WHERE id = ? OR name = ? ORDER BY id", [2, "Cy"]
    )
    assert result == {
        "columns": ["name", "email"],
        "rows": [["Bob", "bob@example.com"], ["Cy", None]],
        "truncated": False,
        "row_count": 2,
    }


@pytest.mark.parametrize(
    "attack",
    ["' OR '1'='1", "Ada' --", "Ada'; DROP TABLE customers; --", "x') UNION SELECT token FROM secrets --"],
)
def test_injection_in_a_param_stays_data(shop: Path, attack: str) -> None:
    result = query(by_name(shop), "SELECT name FROM customers WHERE name = ?", [attack])
    assert result == {"columns": ["name"], "rows": [], "truncated": False, "row_count": 0}
    assert select(shop, "SELECT count(*) FROM customers") == [(3,)]


def test_row_limit_reports_truncation(tmp_path: Path) -> None:
    db = make_db(tmp_path / "n.db", "CREATE TABLE nums (n INTEGER);")
    with closing(sqlite3.connect(db)) as conn:
        conn.executemany("INSERT INTO nums VALUES (?)", [(i,) for i in range(250)])
        conn.commit()
    tools = by_name(db, max_rows=10)
    cut = query(tools, "SELECT n FROM nums ORDER BY n")
    assert cut == {"columns": ["n"], "rows": [[i] for i in range(10)], "truncated": True, "row_count": 10}
    exact = query(tools, "SELECT n FROM nums ORDER BY n LIMIT 10")
    assert exact["truncated"] is False
    assert exact["row_count"] == 10
    shown = run_tool_call(tools["sql_query"], "c1", {"sql": "SELECT n FROM nums ORDER BY n"})
    assert shown.content.splitlines()[-2] == (
        "(only the first 10 rows; more matched: narrow the query with WHERE, LIMIT or an aggregate)"
    )


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO customers (name) VALUES ('Eve')", READ_ONLY),
        ("UPDATE customers SET name = 'Eve'", READ_ONLY),
        ("DELETE FROM customers", READ_ONLY),
        ("REPLACE INTO customers (id, name) VALUES (1, 'Eve')", READ_ONLY),
        ("WITH doomed AS (SELECT 1) DELETE FROM customers", READ_ONLY),
        ("DROP TABLE customers", READ_ONLY),
        ("CREATE TABLE evil (x)", READ_ONLY),
        ("CREATE TEMP TABLE scratch (x)", READ_ONLY),
        ("ALTER TABLE customers ADD COLUMN x", READ_ONLY),
        ("BEGIN", READ_ONLY),
        ("ATTACH DATABASE '{folder}/other.db' AS other", NO_ATTACH),
        ("VACUUM INTO '{folder}/copy.db'", NO_ATTACH),
        ("PRAGMA writable_schema = ON", NO_PRAGMA),
        ("PRAGMA journal_mode = WAL", NO_PRAGMA),
        ("PRAGMA table_info(customers)", NO_PRAGMA),
        (
            "SELECT load_extension('/tmp/evil.so')",
            "the function load_extension() is not allowed; use SQLite's built-in SQL functions",
        ),
    ],
)
def test_writes_are_refused_and_the_file_is_unchanged(shop: Path, sql: str, message: str) -> None:
    before = folder_bytes(shop.parent)
    assert refusal(by_name(shop), sql.format(folder=shop.parent)) == message
    assert folder_bytes(shop.parent) == before  # not a byte changed, no file created (ATTACH, VACUUM INTO)
    assert select(shop, "SELECT name FROM customers ORDER BY id") == [("Ada",), ("Bob",), ("Cy",)]


@pytest.mark.parametrize("sql", ["SELECT 1; SELECT 2", "SELECT name FROM customers; DROP TABLE customers"])
def test_multiple_statements_are_refused(shop: Path, sql: str) -> None:
    assert refusal(by_name(shop), sql) == (
        "only one statement can run per call; send each statement in its own call, without ';' between"
    )
    assert select(shop, "SELECT count(*) FROM customers") == [(3,)]


@pytest.mark.parametrize(
    ("sql", "params", "message"),
    [
        (
            "SELECT nmae FROM customers",
            [],
            "no such column: nmae; did you mean name? the columns of customers are id, name, email",
        ),
        ("SELECT * FROM custmers", [], f"no such table: custmers; did you mean customers? {ALL_TABLES}"),
        (
            "SELECT name FROM customers WHERE id = ?",
            [],
            "the statement has 1 ? placeholder(s) but params has 0 value(s); "
            "pass exactly one value in params for each ?, in order",
        ),
        (
            "SELEC name FROM customers",
            [],
            'near "SELEC": syntax error; fix the SQL: one SQLite statement, with ? where each value goes',
        ),
        (
            "SELECT id FROM customers JOIN orders ON orders.customer_id = customers.id",
            [],
            "ambiguous column name: id; qualify it with its table name or alias, e.g. some_table.id",
        ),
        ("-- nothing to run", [], "the statement returned no result; send one SELECT statement"),
        (
            "SELECT value FROM json_each(?)",
            ["[1, 2]"],
            "table-valued functions (json_each, json_tree, dbstat, ...) are not available here; "
            "use scalar functions such as json_extract() instead",
        ),
        (
            "SELECT length(randomblob(100000000))",
            [],
            "string or blob too big; select less: substr() or length() instead of a whole large value",
        ),
    ],
)
def test_errors_say_what_was_wrong_and_what_to_do(
    shop: Path, sql: str, params: list[Any], message: str
) -> None:
    assert refusal(by_name(shop), sql, params) == message


def test_runaway_query_is_stopped_by_the_deadline(tmp_path: Path) -> None:
    db = make_db(tmp_path / "big.db", "CREATE TABLE nums (n INTEGER);")
    with closing(sqlite3.connect(db)) as conn:
        conn.executemany("INSERT INTO nums VALUES (?)", [(i,) for i in range(2000)])
        conn.commit()
    tools = by_name(db, timeout_s=0.5)
    cross_join = "SELECT count(*) FROM nums a, nums b, nums c"  # 8e9 rows: minutes unless stopped
    started = time.monotonic()
    message = refusal(tools, cross_join)
    assert time.monotonic() - started < 2.5
    assert message == (
        "the statement ran longer than 0.5 s and was stopped; "
        "make it cheaper: filter with WHERE, join with ON conditions, add LIMIT, or aggregate"
    )
    # Through the executor, SQLite's deadline fires before the policy's backstop: a clear tool error.
    outcome = run_tool_call(tools["sql_query"], "c1", {"sql": cross_join})
    assert (outcome.ok, outcome.kind) == (False, "tool_error")
    assert outcome.seconds < 2.0
    assert query(tools, "SELECT count(*) FROM nums")["rows"] == [[2000]]  # the next call is unaffected


def test_tables_restriction_hides_and_denies_the_others(shop: Path) -> None:
    tools = by_name(shop, tables=["customers", "Orders"])
    assert tools["sql_schema"].invoke({}) == "\n".join(
        [
            "TABLE customers (3 rows): id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT",
            "TABLE orders (3 rows): id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id), "
            "total_cents INTEGER, status TEXT",
        ]
    )
    hidden = "the tables are customers, orders"
    for sql, table in [
        ("SELECT token FROM secrets", "secrets"),
        ("SELECT count(*) FROM secrets", "secrets"),
        ("SELECT name FROM customers WHERE EXISTS (SELECT 1 FROM secrets)", "secrets"),
        ("SELECT name, sql FROM sqlite_master", "sqlite_master"),
        # A CTE named like a listed table must not reach an unlisted one.
        ("WITH customers AS (SELECT token AS name FROM secrets) SELECT name FROM customers", "secrets"),
    ]:
        assert refusal(tools, sql) == f"no such table: {table}; {hidden}", sql
    assert (
        refusal(tools, "SELECT * FROM big_orders")
        == f"no such table: big_orders; did you mean orders? {hidden}"
    )
    joined = query(
        tools,
        "SELECT c.name, o.total_cents FROM customers c JOIN orders o ON o.customer_id = c.id WHERE o.id = ?",
        [2],
    )
    assert joined["rows"] == [["Ada", 2500]]


def test_a_listed_view_needs_its_base_tables_listed(shop: Path) -> None:
    with_base = by_name(shop, tables=["orders", "big_orders"])
    assert query(with_base, "SELECT id FROM big_orders ORDER BY id")["rows"] == [[2], [3]]
    alone = by_name(shop, tables=["big_orders"])
    assert alone["sql_schema"].invoke({}) == "VIEW big_orders: id INTEGER, total_cents INTEGER"
    assert refusal(alone, "SELECT id FROM big_orders") == (
        "no such table: orders; did you mean big_orders? the tables are big_orders"
    )


def test_a_key_into_a_hidden_table_is_not_named(shop: Path) -> None:
    assert by_name(shop, tables=["orders"])["sql_schema"].invoke({}) == (
        "TABLE orders (3 rows): id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, total_cents INTEGER, status TEXT"
    )


def test_writable_mode_inserts_updates_and_reports_rows_affected(shop: Path) -> None:
    tools = by_name(shop, writable=True)
    assert list(tools) == ["sql_schema", "sql_query", "sql_execute"]
    assert policy_of(tools["sql_execute"]).side_effect == "write"
    execute = tools["sql_execute"]
    inserted = execute.invoke(
        {"sql": "INSERT INTO customers (name, email) VALUES (?, ?)", "params": ["Dee", "dee@example.com"]}
    )
    assert inserted == {"rows_affected": 1, "last_row_id": 4}
    assert select(shop, "SELECT * FROM customers WHERE id = 4") == [(4, "Dee", "dee@example.com")]
    updated = execute.invoke(
        {"sql": "UPDATE orders SET status = ? WHERE customer_id = ?", "params": ["held", 1]}
    )
    assert updated["rows_affected"] == 2
    assert select(shop, "SELECT id FROM orders WHERE status = 'held' ORDER BY id") == [(1,), (2,)]
    deleted = execute.invoke(
        {"sql": "DELETE FROM orders WHERE status = ? RETURNING id", "params": ["processing"]}
    )
    assert deleted == {
        "rows_affected": 1,
        "last_row_id": None,
        "columns": ["id"],
        "rows": [[3]],
        "truncated": False,
    }
    assert select(shop, "SELECT count(*) FROM orders") == [(2,)]


@pytest.mark.parametrize(
    ("sql", "params", "message"),
    [
        (
            "INSERT INTO orders (customer_id, total_cents) VALUES (?, ?)",
            [99, 100],
            "FOREIGN KEY constraint failed; nothing was changed; a referenced row does not exist "
            "(or other rows still refer to this one): check the ids with sql_query",
        ),
        (
            "INSERT INTO customers (email) VALUES (?)",
            ["x@example.com"],
            "NOT NULL constraint failed: customers.name; nothing was changed; give a value for customers.name",
        ),
        (
            "INSERT INTO customers (id, name) VALUES (?, ?)",
            [1, "Ada again"],
            "UNIQUE constraint failed: customers.id; nothing was changed; "
            "a row with this customers.id already exists: use another value, or UPDATE that row",
        ),
    ],
)
def test_writes_that_break_a_constraint_change_nothing(
    shop: Path, sql: str, params: list[Any], message: str
) -> None:
    before = folder_bytes(shop.parent)
    assert refusal(by_name(shop, writable=True), sql, params, tool="sql_execute") == message
    assert folder_bytes(shop.parent) == before


def test_writable_mode_still_refuses_schema_changes_and_query_stays_read_only(shop: Path) -> None:
    tools = by_name(shop, writable=True)
    for sql in ["DROP TABLE customers", "CREATE TABLE evil (x)", "ALTER TABLE customers RENAME TO gone"]:
        assert refusal(tools, sql, tool="sql_execute") == (
            "changing the schema (CREATE, DROP, ALTER, ...) is not allowed; "
            "use INSERT, UPDATE or DELETE on the existing tables"
        )
    assert refusal(tools, "PRAGMA writable_schema = ON", tool="sql_execute") == NO_PRAGMA
    assert (
        refusal(tools, "INSERT INTO customers (name) VALUES ('Eve')")
        == READ_ONLY + "; change data with sql_execute"
    )
    restricted = by_name(shop, writable=True, tables=["customers"])
    assert refusal(restricted, "DELETE FROM secrets", tool="sql_execute") == (
        "no such table: secrets; the tables are customers"
    )
    assert select(shop, "SELECT count(*) FROM secrets") == [(1,)]
    assert [row[0] for row in select(shop, "SELECT name FROM sqlite_master WHERE type = 'table'")] == [
        "customers",
        "orders",
        "order_lines",
        "secrets",
    ]


def test_run_tool_call_reports_a_bad_query_as_an_error_outcome(shop: Path) -> None:
    tool = by_name(shop)["sql_query"]
    bad = run_tool_call(tool, "c1", {"sql": "SELECT nmae FROM customers WHERE id = ?", "params": [1]})
    assert (bad.ok, bad.kind) == (False, "tool_error")
    assert bad.content == (
        "ERROR: sql_query failed: SQLError: no such column: nmae; "
        "did you mean name? the columns of customers are id, name, email."
    )
    schema = run_tool_call(by_name(shop)["sql_schema"], "c0", {})
    assert schema.ok
    assert schema.content.splitlines()[2] == (
        "TABLE customers (3 rows): id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT"
    )
    good = run_tool_call(tool, "c2", {"sql": "SELECT name FROM customers WHERE id = ?", "params": [1]})
    assert good.ok
    assert good.output == {"columns": ["name"], "rows": [["Ada"]], "truncated": False, "row_count": 1}
    assert (
        good.content == '<tool_result name="sql_query">\ncolumns: ["name"]\n["Ada"]\n(1 row)\n</tool_result>'
    )
    bad_args: list[dict[str, Any]] = [
        {"sql": "SELECT ?", "params": [{"a": 1}]},
        {"sql": "SELECT ?", "params": [2**70]},
        {"sql": ""},
    ]
    for args in bad_args:
        outcome = run_tool_call(tool, "c3", args)
        assert (outcome.ok, outcome.kind) == (False, "tool_args"), args


def test_the_model_reads_a_refusal_whole_with_its_fix(shop: Path) -> None:
    """A refusal names SQL keywords in its fix; it must not be redacted like a foreign exception."""
    tool = by_name(shop)["sql_query"]
    refused = run_tool_call(tool, "c1", {"sql": "DELETE FROM orders"})
    assert refused.content == f"ERROR: sql_query failed: SQLError: {READ_ONLY}."
    schema = run_tool_call(by_name(shop, writable=True)["sql_execute"], "c2", {"sql": "DROP TABLE orders"})
    assert "[redacted]" not in schema.content
    assert "use INSERT, UPDATE or DELETE on the existing tables" in schema.content


def test_values_come_back_json_serialisable(tmp_path: Path) -> None:
    db = make_db(
        tmp_path / "v.db",
        "CREATE TABLE things (data BLOB, label TEXT);"
        "INSERT INTO things VALUES (x'000102', CAST(x'ff41' AS TEXT));",
    )
    result = query(
        by_name(db), "SELECT data, label, 1e999 AS big, 9223372036854775807 AS top, 0.5 AS half FROM things"
    )
    assert result["rows"] == [["<blob: 3 bytes>", "\ufffdA", "Infinity", 9223372036854775807, 0.5]]
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_a_wal_database_is_read_without_changing_it(tmp_path: Path) -> None:
    folder = tmp_path / "odd name #1?"  # the path goes into a file: URI and must be escaped there
    folder.mkdir()
    db = make_db(folder / "wal.db", wal=True)
    before = db.read_bytes()
    assert query(by_name(db), "SELECT count(*) FROM orders WHERE total_cents > ?", [1000])["rows"] == [[2]]
    assert db.read_bytes() == before


def test_calls_from_many_threads_each_use_their_own_connection(shop: Path) -> None:
    tool = by_name(shop)["sql_query"]

    def name_of(customer_id: int) -> Any:
        return tool.invoke({"sql": "SELECT name FROM customers WHERE id = ?", "params": [customer_id]})[
            "rows"
        ]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(name_of, [1, 2, 3, 1, 2, 3, 4])) == [
            [["Ada"]],
            [["Bob"]],
            [["Cy"]],
            [["Ada"]],
            [["Bob"]],
            [["Cy"]],
            [],
        ]


def test_misconfiguration_is_a_user_error(tmp_path: Path, shop: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(UserError, match="no SQLite database at"):
        sql_tools(missing)
    assert not missing.exists()  # never created by accident
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, just some text that is long enough" * 10)
    with pytest.raises(UserError, match="cannot be read as a SQLite database"):
        sql_tools(text)
    with pytest.raises(UserError, match="names secret, which"):
        sql_tools(shop, tables=["customers", "secret"])
    with pytest.raises(UserError, match="max_rows must be at least 1"):
        sql_tools(shop, max_rows=0)
