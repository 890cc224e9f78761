"""Who is acting: identities, the `from_identity` binding at the tool gate, and the desk's mapping."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from pydantic import BaseModel

from keelgraph import Contract, UserError, build_graph, with_policy
from keelgraph.apps.support.desk import customer_lookup, link_user, seed_database
from keelgraph.graphs.identity import current_identity
from keelgraph.graphs.memory import memory_namespace
from keelgraph.graphs.prompt import tool_args_schema
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools.gate import bind_identity, final_args
from keelgraph.tools.identity import (
    IDENTITY_KEY,
    Identity,
    IdentityRequired,
    identity_from_config,
    namespace_label,
    subject_problem,
)


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("", "empty"),
        ("two words", "spaces"),
        ("tab\there", "spaces"),
        ("nul\x00", "control"),
        ("x" * 201, "longer than 200"),
        ("keelgraph", "reserved"),
        ("KeelGraph-admin", "reserved"),
        ("keelgraph_user", "reserved"),
        ("archive", "reserved"),
        ("MEMORY", "reserved"),
        (42, "not text"),
    ],
)
def test_empty_and_reserved_subjects_are_refused(subject: Any, says: str) -> None:
    why = subject_problem(subject)
    assert why is not None and says in why
    with pytest.raises(IdentityRequired, match="cannot be a user's identity"):
        Identity(subject)


@pytest.mark.parametrize("subject", ["alice", "alice@example.com", "auth0|5f3a", "ügur", "user-1.2"])
def test_ordinary_subjects_are_accepted(subject: str) -> None:
    assert subject_problem(subject) is None
    assert Identity(subject).subject == subject


def test_namespace_labels_hold_no_period_and_never_merge_two_subjects() -> None:
    subjects = ["a.b", "a%2Eb", "a%b", "a_b", "ab"]
    labels = [namespace_label(s) for s in subjects]
    assert all("." not in label for label in labels)
    assert len(set(labels)) == len(subjects)
    assert memory_namespace("ada@example.com") == ("keelgraph", "memory", "ada@example%2Ecom")


class _ProxyUser:
    """What LangGraph server puts in `langgraph_auth_user`: an `identity` and a `dict()`."""

    identity = "alice"

    def dict(self) -> dict[str, Any]:
        return {"identity": "alice", "permissions": ["x"], "claims": {"customer_id": 7}}


def test_identity_of_every_form() -> None:
    assert Identity.of("ada") == Identity("ada")
    assert Identity.of({"identity": "ada", "permissions": ["approve"]}).can("approve")
    made = Identity.of(_ProxyUser())
    assert (made.subject, made.permissions, dict(made.claims)) == ("alice", ("x",), {"customer_id": 7})
    assert Identity.of(made) is made
    with pytest.raises(IdentityRequired, match="keelgraph_user must be a user id"):
        Identity.of(3.5)


def test_a_served_run_reads_only_the_servers_user() -> None:
    assert identity_from_config(None) is None
    assert identity_from_config({"configurable": {}}) is None
    assert identity_from_config({"configurable": {IDENTITY_KEY: "ada"}}) == Identity("ada")
    served = {"configurable": {"langgraph_auth_user": _ProxyUser(), IDENTITY_KEY: "mallory"}}
    found = identity_from_config(served)
    assert found is not None and found.subject == "alice"  # the request's keelgraph_user is ignored
    permissions = {**served["configurable"], "langgraph_auth_permissions": ["approve", "authenticated"]}
    found = identity_from_config({"configurable": permissions})
    assert found is not None and found.permissions == ("approve", "authenticated")
    # Served without an authenticated user: no identity, whatever the request said.
    assert identity_from_config({"configurable": {"langgraph_auth_user": None, IDENTITY_KEY: "ada"}}) is None
    assert current_identity() is None  # outside a graph run


def _account(account: str, amount: int) -> str:
    """Move money out of an account."""
    return f"moved {amount} from {account}"


def _tool(**policy: Any) -> Any:
    return with_policy(StructuredTool.from_function(_account, name="move"), **policy)


def test_a_bound_argument_is_set_from_the_identity_and_hidden_from_the_model() -> None:
    tool = _tool(from_identity={"account": lambda who: f"acct-{who.subject}"})
    ada = Identity("ada")
    args = final_args(tool, {"account": "victim", "amount": 5}, {"account": "victim-too"}, ada)
    assert args == {"account": "acct-ada", "amount": 5}
    shown = tool_args_schema(tool)
    assert list(shown["properties"]) == ["amount"] and shown["required"] == ["amount"]
    with pytest.raises(IdentityRequired, match=r"move takes account from the signed-in user.*keelgraph_user"):
        final_args(tool, {"amount": 5}, {})


def test_an_identity_the_mapping_does_not_know_is_refused() -> None:
    def unknown(who: Identity) -> str:
        raise KeyError(who.subject)

    for mapping in (lambda who: None, unknown):
        tool = _tool(from_identity={"account": mapping})
        with pytest.raises(IdentityRequired, match="the signed-in user 'ada' has no account for move"):
            bind_identity(tool, Identity("ada"))


def test_an_argument_comes_from_one_place_only() -> None:
    with pytest.raises(UserError, match="cannot be bound to the identity and also taken"):
        _tool(from_identity={"account": str}, from_input=("account",))
    with pytest.raises(UserError, match="cannot be bound to the identity and also taken"):
        _tool(from_identity={"account": str}, from_user=("account",))
    with pytest.raises(UserError, match="maps argument names to functions"):
        _tool(from_identity={"account": "acct-1"})


class Ask(BaseModel):
    message: str


class Done(BaseModel):
    reply: str


def _graph(script: list[Any], **policy: Any) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(script)
    tool = _tool(from_identity={"account": lambda who: f"acct-{who.subject}"}, side_effect="write", **policy)
    graph = build_graph(
        Contract(input=Ask, output=Done, instructions="Move money."),
        [tool],
        model=model,
        strategy="json_object",
        checkpointer=InMemorySaver(),
        effects=None,
    )
    return graph, model


def _prompt(messages: list[BaseMessage]) -> str:
    return "\n".join(str(m.content) for m in messages)


def test_the_model_cannot_name_the_account_and_a_run_without_identity_is_refused() -> None:
    script = [call("move", account="victim", amount=5), answer(reply="done")]
    graph, model = _graph(script)
    config: Any = {"configurable": {"thread_id": "t", IDENTITY_KEY: "ada"}}
    result = graph.invoke({"request": {"message": "move 5"}}, config)
    assert result["status"] == "ok"
    [ran] = graph.get_state(config).values["tool_log"]
    assert ran["args"] == {"account": "acct-ada", "amount": 5} and ran["output"] == "moved 5 from acct-ada"
    assert "move(amount: integer)" in _prompt(model.calls[0]["messages"])  # never asked for the account
    graph, _ = _graph(script)
    with pytest.raises(IdentityRequired, match="this run has none"):
        graph.invoke({"request": {"message": "move 5"}}, {"configurable": {"thread_id": "t"}})


def test_an_approvers_edit_cannot_move_a_bound_argument() -> None:
    script = [call("move", amount=5), answer(reply="done")]
    graph, _ = _graph(script, approval="always")
    config: Any = {"configurable": {"thread_id": "t", IDENTITY_KEY: "ada"}}
    paused = graph.invoke({"request": {"message": "move 5"}}, config)
    [ask] = paused["__interrupt__"][0].value["calls"]
    assert ask["args"] == {"amount": 5, "account": "acct-ada"}
    edit = {"action": "edit", "args": {"account": "victim", "amount": 7}}
    result = graph.invoke(Command(resume=edit), config)
    assert result["status"] == "ok"
    [ran] = graph.get_state(config).values["tool_log"]
    assert ran["args"] == {"account": "acct-ada", "amount": 7}  # the amount changed, the account did not


def test_the_desk_maps_users_to_customers(tmp_path: Path) -> None:
    db = seed_database(tmp_path / "shop.db")
    customer_of = customer_lookup(db)
    assert customer_of(Identity("ada")) == 1 and customer_of(Identity("grace")) == 3
    assert customer_of(Identity("zoe")) is None
    link_user(db, "zoe", 4)
    assert customer_of(Identity("zoe")) == 4
    assert customer_of(Identity("idp-user", claims={"customer_id": 2})) == 2  # the provider's claim
    assert customer_of(Identity("ada", claims={"customer_id": True})) == 1  # not a customer id
    with pytest.raises(ValueError, match="no customer 99"):
        link_user(db, "zoe", 99)
    rows = (
        sqlite3.connect(db).execute("SELECT user, customer_id FROM customer_users ORDER BY user").fetchall()
    )
    assert ("zoe", 4) in rows and ("ada", 1) in rows
