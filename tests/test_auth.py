"""keelgraph.serving.auth: tokens, JWTs and the ownership rules, without a server (the e2e suite has one)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from langgraph_sdk import Auth
from langgraph_sdk.auth.types import AuthContext

from keelgraph.commands.cli import EXIT_ERROR, EXIT_NOT_FOUND, main
from keelgraph.contracts.errors import UserError
from keelgraph.serving import auth as kauth
from keelgraph.serving.auth import OWNER, TokenFile, authenticate, hash_token


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TokenFile:
    path = tmp_path / "tokens.json"
    monkeypatch.setenv("KEELGRAPH_AUTH_TOKENS", str(path))
    for key in ("SECRET", "PUBLIC_KEY", "ISSUER", "AUDIENCE"):
        monkeypatch.delenv(f"KEELGRAPH_AUTH_JWT_{key}", raising=False)
    monkeypatch.delenv("KEELGRAPH_AUTH_JWKS_URL", raising=False)
    return TokenFile(path)


def refused(header: str | None) -> str:
    with pytest.raises(Auth.exceptions.HTTPException) as caught:
        authenticate(header)
    assert caught.value.status_code == 401
    return str(caught.value.detail)


def test_tokens_are_stored_only_as_hashes(tokens: TokenFile) -> None:
    token = tokens.create("alice", permissions=["assistants:write"], label="ops laptop")
    text = tokens.path.read_text()
    assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(tokens.path.stat().st_mode) == 0o600
    [info] = tokens.list()
    assert (info.user, info.permissions, info.label) == ("alice", ("assistants:write",), "ops laptop")
    assert info.token_id == hash_token(token)[:12]


def test_authenticate_maps_a_bearer_token_to_its_user(tokens: TokenFile) -> None:
    alice, bob = tokens.create("alice", permissions=["assistants:write"]), tokens.create("bob")
    assert authenticate(f"Bearer {alice}") == {
        "identity": "alice",
        "permissions": ["assistants:write", "authenticated"],
    }
    assert authenticate(f"bearer   {bob} ")["identity"] == "bob"


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic abc", "Bearer <token>"),
        ("Bearer", "Bearer <token>"),
        ("Bearer kg_unknown", "unknown token"),
        ("Bearer x.y.z", "unknown token"),  # a JWT while none is configured
    ],
)
def test_bad_headers_get_401_with_what_to_do(tokens: TokenFile, header: str | None, says: str) -> None:
    tokens.create("alice")
    assert says in refused(header)


def test_revoked_and_new_tokens_apply_without_a_restart(tokens: TokenFile) -> None:
    first = tokens.create("alice")
    assert authenticate(f"Bearer {first}")["identity"] == "alice"
    second = tokens.create("alice")
    assert tokens.revoke(hash_token(first)[:12]) == 1  # one token, by its id
    assert "unknown token" in refused(f"Bearer {first}")
    assert authenticate(f"Bearer {second}")["identity"] == "alice"
    assert tokens.revoke("alice") == 1  # every token of a user
    assert "unknown token" in refused(f"Bearer {second}")
    assert tokens.revoke("nobody") == 0


def test_a_broken_token_file_is_a_clear_error(tokens: TokenFile) -> None:
    tokens.path.write_text("{not json")
    with pytest.raises(UserError, match="not a keelgraph token file"):
        tokens.list()
    with pytest.raises(UserError, match="1-200 characters without spaces"):
        TokenFile(tokens.path.with_name("other.json")).create("two words")


def test_jwt_with_a_shared_secret(tokens: TokenFile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_SECRET", "s" * 32)
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_ISSUER", "https://id.example")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "u-42", "iss": "https://id.example", "exp": now + 60, "scope": "a b"}
    good = jwt.encode(claims, "s" * 32, algorithm="HS256")
    assert authenticate(f"Bearer {good}") == {"identity": "u-42", "permissions": ["a", "b", "authenticated"]}
    expired = jwt.encode({**claims, "exp": now - 3600}, "s" * 32, algorithm="HS256")
    assert "expired" in refused(f"Bearer {expired}")
    forged = jwt.encode(claims, "t" * 32, algorithm="HS256")
    assert "not valid" in refused(f"Bearer {forged}")
    other_issuer = jwt.encode({**claims, "iss": "https://evil.example"}, "s" * 32, algorithm="HS256")
    assert "not valid" in refused(f"Bearer {other_issuer}")
    no_expiry = jwt.encode({"sub": "u-42", "iss": "https://id.example"}, "s" * 32, algorithm="HS256")
    assert "not valid" in refused(f"Bearer {no_expiry}")


def test_jwt_with_a_public_key_and_audience(
    tokens: TokenFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "idp.pem").write_bytes(pem)
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_PUBLIC_KEY", str(tmp_path / "idp.pem"))
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_AUDIENCE", "keelgraph")
    claims = {
        "sub": "alice@example.com",
        "aud": "keelgraph",
        "exp": int(time.time()) + 60,
        "permissions": ["x"],
    }
    token = jwt.encode(claims, private, algorithm="RS256")
    assert authenticate(f"Bearer {token}") == {
        "identity": "alice@example.com",
        "permissions": ["x", "authenticated"],
    }
    wrong_audience = jwt.encode({**claims, "aud": "another-app"}, private, algorithm="RS256")
    assert "not valid" in refused(f"Bearer {wrong_audience}")
    # The classic algorithm confusion: HS256 signed with the public key as the secret. Refused.
    confused = _hs256(claims, pem)
    assert "not valid" in refused(f"Bearer {confused}")


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing = f"{header}.{part(json.dumps(claims).encode())}"
    return f"{signing}.{part(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


class _User:
    def __init__(self, identity: str, permissions: tuple[str, ...] = ()) -> None:
        self.identity = identity
        self.permissions = permissions
        self.is_authenticated = True
        self.display_name = identity


def ctx(user: str, resource: str, action: str, permissions: tuple[str, ...] = ()) -> AuthContext:
    return AuthContext(
        user=_User(user, permissions),  # type: ignore[arg-type]
        permissions=list(permissions),
        resource=resource,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_threads_are_stamped_and_filtered_by_owner() -> None:
    value: dict[str, Any] = {"metadata": {OWNER: "mallory", "topic": "x"}}
    assert run(kauth._owned(ctx("alice", "threads", "create"), value)) == {OWNER: "alice"}
    assert value["metadata"] == {OWNER: "alice", "topic": "x"}
    empty: dict[str, Any] = {"metadata": None}
    run(kauth._owned(ctx("alice", "threads", "create_run"), empty))
    assert empty["metadata"] == {OWNER: "alice"}
    for action in ("read", "search", "delete"):
        untouched: dict[str, Any] = {"thread_id": "t"}
        assert run(kauth._owned(ctx("bob", "threads", action), untouched)) == {OWNER: "bob"}
        assert untouched == {"thread_id": "t"}


def test_assistants_are_readable_but_changed_only_with_permission() -> None:
    assert run(kauth._read_assistant(ctx("bob", "assistants", "read"), {})) is True
    with pytest.raises(Auth.exceptions.HTTPException) as caught:
        run(kauth._change_assistant(ctx("bob", "assistants", "create"), {}))
    assert caught.value.status_code == 403 and "assistants:write" in str(caught.value.detail)
    admin = ctx("root", "assistants", "update", ("assistants:write",))
    assert run(kauth._change_assistant(admin, {})) is True
    assert run(kauth._deny_unlisted(ctx("bob", "crons", "create"), {})) is False


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (("prefs",), ("alice", "prefs")),
        (("alice", "prefs"), ("alice", "prefs")),
        (("bob", "prefs"), ("alice", "bob", "prefs")),
        ((), ("alice",)),
    ],
)
def test_store_namespaces_live_under_the_user(given: tuple[str, ...], stored: tuple[str, ...]) -> None:
    value: dict[str, Any] = {"namespace": given, "key": "k"}
    assert run(kauth._own_namespace(ctx("alice", "store", "put"), value)) is True
    assert value["namespace"] == stored


def test_token_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.json"
    assert main(["token", "create", "alice", "--permission", "assistants:write", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("kg_") and TokenFile(path).lookup(token) == ("alice", ("assistants:write",))
    assert main(["token", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and token not in listed
    assert main(["token", "revoke", "alice", "--file", str(path)]) == 0
    assert main(["token", "revoke", "alice", "--file", str(path)]) == EXIT_NOT_FOUND
    assert main(["token", "create", "--file", str(path)]) == EXIT_ERROR
    assert "name the user" in capsys.readouterr().err
