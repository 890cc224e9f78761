"""`keelgraph config`: every KEELGRAPH_* variable, its effective value and where that value came from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from keelgraph.settings import Settings

__all__ = ["OTHER_VARIABLES", "Variable", "effective_variables", "unknown_variables", "variables_help"]

OTHER_VARIABLES: dict[str, str] = {
    "KEELGRAPH_USER": "who ask/approve act for without --user (the desk's default: its demo user ada)",
    "KEELGRAPH_AUTH_TOKENS": "serving: the bearer-token file (default $KEELGRAPH_DATA_DIR/tokens.json)",
    "KEELGRAPH_AUTH_JWT_SECRET": "serving: verify JWTs signed with this HS256/384/512 secret",
    "KEELGRAPH_AUTH_JWT_PUBLIC_KEY": "serving: verify JWTs with the public key in this PEM file",
    "KEELGRAPH_AUTH_JWKS_URL": "serving: verify JWTs with the keys published at this URL",
    "KEELGRAPH_AUTH_JWT_ISSUER": "serving: the `iss` a JWT must carry",
    "KEELGRAPH_AUTH_JWT_AUDIENCE": "serving: the `aud` a JWT must carry",
    "KEELGRAPH_LOG": "json: one JSON log record per node run on stderr (tracing)",
}
"""The variables keelgraph reads outside `Settings` (the CLI, serving's auth, logging)."""
SECRETS = frozenset({"KEELGRAPH_API_KEY", "KEELGRAPH_AUTH_JWT_SECRET"})
"""Shown only as "set": never printed."""


@dataclass(frozen=True)
class Variable:
    """One environment variable as keelgraph sees it now."""

    name: str
    setting: str | None
    """The `Settings` field it sets (None for the variables outside `Settings`)."""
    value: Any
    """The effective value (a secret: "set" or None)."""
    source: str
    """`environment`, `environment (OPENAI_API_KEY)`, `default` or `default (XDG_DATA_HOME)`."""
    about: str = ""

    def as_json(self) -> dict[str, Any]:
        value = str(self.value) if isinstance(self.value, Path) else self.value
        value = list(value) if isinstance(value, tuple) else value
        return {"name": self.name, "setting": self.setting, "value": value, "source": self.source}


def setting_variables() -> dict[str, str]:
    """`Settings` field -> its variable (`Settings.variables()` lists them in field order)."""
    names = [f.name for f in fields(Settings)]
    return dict(zip(names, (v.split()[0] for v in Settings.variables()[: len(names)]), strict=True))


def _source(name: str, env: Mapping[str, str]) -> str:
    if env.get(name):
        return "environment"
    if name == "KEELGRAPH_API_KEY" and env.get("OPENAI_API_KEY"):
        return "environment (OPENAI_API_KEY)"
    if name == "KEELGRAPH_DATA_DIR" and env.get("XDG_DATA_HOME"):
        return "default (XDG_DATA_HOME)"
    if name == "KEELGRAPH_CACHE_DIR" and env.get("XDG_CACHE_HOME"):
        return "default (XDG_CACHE_HOME)"
    return "default"


def _shown(name: str, value: Any) -> Any:
    if name in SECRETS:
        return "set" if value else None
    return value


def effective_variables(env: Mapping[str, str] | None = None) -> list[Variable]:
    """Every variable keelgraph reads, with its effective value and source (secrets masked)."""
    env = os.environ if env is None else env
    settings = Settings.from_env(env)
    found = [
        Variable(name, field, _shown(name, getattr(settings, field)), _source(name, env))
        for field, name in setting_variables().items()
    ]
    for name, about in OTHER_VARIABLES.items():
        value: Any = env.get(name) or None
        if name == "KEELGRAPH_AUTH_TOKENS" and value is None:
            value = settings.data_dir / "tokens.json"
        found.append(Variable(name, None, _shown(name, value), _source(name, env), about))
    return found


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """KEELGRAPH_* variables that are set but that keelgraph never reads (a typo?)."""
    env = os.environ if env is None else env
    known = {*setting_variables().values(), *OTHER_VARIABLES}
    return sorted(name for name in env if name.startswith("KEELGRAPH_") and name not in known)


def _setting_docs() -> dict[str, str]:
    """Each `Settings` field's docstring, first sentence, without its variable's name."""
    import ast
    import inspect
    import itertools
    import re

    import keelgraph.settings

    tree = ast.parse(inspect.getsource(keelgraph.settings))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings").body
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = re.sub(r"^KEELGRAPH_[A-Z_]+(=\S+)?:?\s*", "", " ".join(after.value.value.split()))
            text = re.split(r"(?<!e\.g)\. ", text)[0].rstrip(".")
            docs[node.target.id] = text if len(text) <= 80 else text[:77].rsplit(" ", 1)[0] + "..."
    return docs


def variables_help() -> str:
    """The variables as `keelgraph --help` lists them, each with what it sets."""
    docs = _setting_docs()
    lines = [f"  {name:<30} {docs.get(field, '')}" for field, name in setting_variables().items()]
    lines += [f"  {name:<30} {about}" for name, about in OTHER_VARIABLES.items()]
    return "\n".join(lines)
