"""The public surface is deliberate: adding or removing a name must show up here."""

import keelgraph


def test_exported_members() -> None:
    assert sorted(keelgraph.__all__) == sorted(
        [
            "Attempt", "BudgetExceeded", "CheckContext", "Computed", "Context", "Contract", "ContractError", "Failure", "GraphOptions", "GuardContext",
            "InputRejected", "KeelgraphError", "ModelUnavailable", "Price", "Problem", "RepairExhausted", "RunError", "Settings", "ThreadBusy", "ToolPolicy", "Uncertain", "UserError",
            "__version__", "build_graph", "chat_model", "default_model", "graph_builder", "sqlite_checkpointer",
            "unwrap", "with_policy",
        ]
    )  # fmt: skip
    for name in keelgraph.__all__:
        assert getattr(keelgraph, name) is not None


def test_layers_do_not_import_upwards() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1]
    for path in (root / "contracts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(
                    ("langgraph", "langchain", "keelgraph.graphs", "keelgraph.tools")
                ), f"{path.name} imports {node.module}: contracts are plain Pydantic"
