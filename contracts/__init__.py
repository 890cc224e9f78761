"""Context control: rigid input and output contracts, typed errors, robust output parsing."""

from keelgraph.contracts.contract import Check, CheckContext, Contract, OutputInvalid
from keelgraph.contracts.errors import (
    Attempt,
    BudgetExceeded,
    ContractError,
    Failure,
    InputRejected,
    KeelgraphError,
    Problem,
    RepairExhausted,
    RunError,
    UserError,
    explain,
)
from keelgraph.contracts.evidence import closest_span, not_copied
from keelgraph.contracts.parsing import Parsed, ParseError, parse_json

__all__ = [
    "Attempt",
    "BudgetExceeded",
    "Check",
    "CheckContext",
    "Contract",
    "ContractError",
    "Failure",
    "InputRejected",
    "KeelgraphError",
    "OutputInvalid",
    "ParseError",
    "Parsed",
    "Problem",
    "RepairExhausted",
    "RunError",
    "UserError",
    "closest_span",
    "explain",
    "not_copied",
    "parse_json",
]
