"""Context control: rigid input and output contracts, typed errors, robust output parsing."""

if (
    __name__ != "keelgraph.contracts"
):  # run from the repository root, the folder would import as a second package
    raise ImportError(
        f"import keelgraph.contracts, not {__name__}: the contracts/ folder is part of the keelgraph package "
        "(install it with `bash .ci/setup` or `pip install -e .`), and a second copy under another "
        "name would define its own classes that keelgraph's code does not catch"
    )

from keelgraph.contracts.boundary import LIMITS, Limits, check_text, check_value, safe_value
from keelgraph.contracts.contract import Check, CheckContext, Computed, Contract, OutputInvalid, Review
from keelgraph.contracts.decision import Strategy
from keelgraph.contracts.errors import (
    Attempt,
    BudgetExceeded,
    ContractError,
    Failure,
    InputRejected,
    KeelgraphError,
    ModelUnavailable,
    Problem,
    RepairExhausted,
    RunError,
    ThreadBusy,
    Uncertain,
    UserError,
    explain,
)
from keelgraph.contracts.evidence import closest_span, not_copied
from keelgraph.contracts.parsing import Parsed, ParseError, parse_json

__all__ = [
    "LIMITS",
    "Attempt",
    "BudgetExceeded",
    "Check",
    "CheckContext",
    "Computed",
    "Contract",
    "ContractError",
    "Failure",
    "InputRejected",
    "KeelgraphError",
    "Limits",
    "ModelUnavailable",
    "OutputInvalid",
    "ParseError",
    "Parsed",
    "Problem",
    "RepairExhausted",
    "Review",
    "RunError",
    "Strategy",
    "ThreadBusy",
    "Uncertain",
    "UserError",
    "check_text",
    "check_value",
    "closest_span",
    "explain",
    "not_copied",
    "parse_json",
    "safe_value",
]
