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


# -- who may sign in: empty and reserved users -----------------------------------------------------


@pytest.mark.parametrize("user", ["keelgraph", "KeelGraph-ops", "archive", "memory"])
def test_reserved_users_get_no_token_and_cannot_sign_in(tokens: TokenFile, user: str) -> None:
    with pytest.raises(UserError, match="reserved"):
        tokens.create(user)
    # A hand-written entry for one is refused when it is used.
    tokens.create("alice")
    data = json.loads(tokens.path.read_text())
    data["tokens"].append({"user": user, "sha256": hash_token(f"kg_{user}"), "permissions": []})
    tokens.path.write_text(json.dumps(data))
    said = refused(f"Bearer kg_{user}")
    assert "cannot sign in here" in said and "reserved" in said


def test_jwt_with_an_empty_or_reserved_subject_is_401(
    tokens: TokenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_SECRET", "s" * 32)
    exp = int(time.time()) + 60
    for sub, says in (("", "empty"), ("keelgraph", "reserved"), ("archive", "reserved"), ("a b", "spaces")):
        token = jwt.encode({"sub": sub, "exp": exp}, "s" * 32, algorithm="HS256")
        assert says in refused(f"Bearer {token}")
    claimed = jwt.encode(
        {"sub": "u-1", "exp": exp, "customer_id": 3, "iat": exp - 60}, "s" * 32, algorithm="HS256"
    )
    assert authenticate(f"Bearer {claimed}") == {
        "identity": "u-1",
        "permissions": ["authenticated"],
        "claims": {"customer_id": 3},  # what a deployment may map to its own principal
    }


# -- faults of the server's own: the last good set, or 503; never a 500 ----------------------------


def unavailable(header: str) -> str:
    from starlette.exceptions import HTTPException

    with pytest.raises(HTTPException) as caught:
        authenticate(header)
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "30"}
    return str(caught.value.detail)


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kauth, "_TOKENS", kauth._CachedTokens())
    monkeypatch.setattr(kauth, "_JWKS", {})
    monkeypatch.setattr(kauth, "_LOGGED", set())


def test_a_broken_token_file_keeps_the_last_good_set_logged_once(
    tokens: TokenFile, fresh_cache: None, caplog: pytest.LogCaptureFixture
) -> None:
    alice = tokens.create("alice")
    assert authenticate(f"Bearer {alice}")["identity"] == "alice"
    good = tokens.path.read_text()
    tokens.path.write_text('{"tokens": [oops')  # a hand edit gone wrong
    with caplog.at_level("ERROR", logger="keelgraph"):
        for _ in range(3):
            assert authenticate(f"Bearer {alice}")["identity"] == "alice"
        assert "unknown token" in refused("Bearer kg_other")
    [line] = [r.getMessage() for r in caplog.records]
    assert "cannot be read" in line and "last good set of tokens stays in use" in line
    tokens.path.write_text(good)
    assert authenticate(f"Bearer {alice}")["identity"] == "alice"


def test_a_broken_token_file_with_no_good_set_is_503(
    tokens: TokenFile, fresh_cache: None, caplog: pytest.LogCaptureFixture
) -> None:
    tokens.path.write_text("{not json")
    with caplog.at_level("ERROR", logger="keelgraph"):
        for _ in range(2):
            said = unavailable("Bearer kg_anything")
            assert "token file cannot be read" in said and "try again later" in said
    assert len(caplog.records) == 1 and "requests get 503" in caplog.records[0].getMessage()
    assert "missing" in refused(None)  # a request without a token is still the caller's fault: 401


def test_an_unreadable_token_file_is_like_a_broken_one(
    tokens: TokenFile, fresh_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = tokens.create("alice")
    assert authenticate(f"Bearer {alice}")["identity"] == "alice"

    def unreadable(self: TokenFile) -> list[dict[str, Any]]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(TokenFile, "_read", unreadable)
    tokens.path.write_text(tokens.path.read_text() + " ")  # changed: read again, and fails
    assert authenticate(f"Bearer {alice}")["identity"] == "alice"


def _jwks(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**public, "kid": kid, "use": "sig", "alg": "RS256"}]}


def test_jwks_every_bad_token_is_401_and_an_unreachable_provider_503(
    tokens: TokenFile, fresh_cache: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    monkeypatch.setenv("KEELGRAPH_AUTH_JWKS_URL", "https://id.example/.well-known/jwks.json")
    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", lambda self: _jwks(key, "k1"))
    exp = int(time.time()) + 60

    def signed(claims: dict[str, Any], kid: str = "k1", with_key: rsa.RSAPrivateKey = key) -> str:
        return jwt.encode({"exp": exp, **claims}, with_key, algorithm="RS256", headers={"kid": kid})

    assert authenticate(f"Bearer {signed({'sub': 'carol'})}")["identity"] == "carol"
    cases = {
        "a.b.c": "not valid",
        "!!!.???.###": "not valid",
        signed({"sub": "carol"}, kid="k9"): "a key the identity provider does not list",
        signed({"sub": "carol"}, with_key=other): "not valid",
        signed({"sub": "carol", "exp": exp - 7200}): "expired",
        signed({"sub": ""}): "empty",
        signed({"exp": exp}): "not valid",  # no sub
        _hs256({"sub": "carol", "exp": exp}, b"k1"): "does not list",  # an HS token names no key of the set
    }
    for token, says in cases.items():
        assert says in refused(f"Bearer {token}"), token

    def down(self: jwt.PyJWKClient) -> Any:
        raise jwt.PyJWKClientConnectionError("Fail to fetch data from the url, err: timed out")

    monkeypatch.setattr(kauth, "_JWKS", {})
    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", down)
    with caplog.at_level("ERROR", logger="keelgraph"):
        for _ in range(3):
            assert "key set cannot be fetched" in unavailable(f"Bearer {signed({'sub': 'carol'})}")
    assert len(caplog.records) == 1  # once, not once per request
    monkeypatch.setenv("KEELGRAPH_AUTH_JWKS_URL", "file:///etc/passwd")
    assert "key set cannot be fetched" in unavailable(f"Bearer {signed({'sub': 'carol'})}")


def test_an_unreadable_public_key_or_an_unexpected_fault_is_503(
    tokens: TokenFile, fresh_cache: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEELGRAPH_AUTH_JWT_PUBLIC_KEY", str(tmp_path / "missing.pem"))
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, "s" * 32, algorithm="HS256")
    assert "public key cannot be read" in unavailable(f"Bearer {token}")

    def broken(token: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(kauth, "_verify", broken)
    assert "could not check the token" in unavailable(f"Bearer {token}")


# -- what a signed-in user may do: name no identity, resume only with `approve` --------------------


def test_a_request_cannot_name_the_acting_user() -> None:
    named = [
        {"kwargs": {"config": {"configurable": {"keelgraph_user": "alice"}}}},
        {"kwargs": {"context": {"keelgraph_user": "alice"}}},
        {"payload": {"config": {"configurable": {"keelgraph_user": "alice"}}}},  # a cron
    ]
    for value in named:
        with pytest.raises(Auth.exceptions.HTTPException) as caught:
            run(kauth._owned(ctx("bob", "threads", "create_run", ("approve",)), value))
        assert caught.value.status_code == 403 and "keelgraph_user" in str(caught.value.detail)
    admin = ctx("root", "assistants", "create", ("assistants:write",))
    with pytest.raises(Auth.exceptions.HTTPException):
        run(kauth._change_assistant(admin, {"config": {"configurable": {"keelgraph_user": "alice"}}}))
    # The metadata is no run setting: a key of that name there is only data.
    plain = {"metadata": {"keelgraph_user": "x"}, "kwargs": {"input": {"keelgraph_user": "x"}}}
    assert run(kauth._owned(ctx("bob", "threads", "create_run"), plain)) == {OWNER: "bob"}


def test_resuming_or_writing_state_needs_the_approve_permission() -> None:
    resume = {"kwargs": {"command": {"resume": {"action": "approve"}}, "input": None}}
    steer = {"kwargs": {"command": {"update": {"approvals": {}}, "goto": "act"}}}
    for value in (resume, steer):
        with pytest.raises(Auth.exceptions.HTTPException) as caught:
            run(kauth._owned(ctx("alice", "threads", "create_run"), value))
        assert caught.value.status_code == 403 and "'approve' permission" in str(caught.value.detail)
        assert run(kauth._owned(ctx("alice", "threads", "create_run", ("approve",)), value)) == {
            OWNER: "alice"
        }
    with pytest.raises(Auth.exceptions.HTTPException) as caught:
        run(kauth._owned(ctx("alice", "threads", "update"), {"thread_id": "t"}))  # POST /threads/t/state
    assert "writing a thread's state" in str(caught.value.detail)
    assert run(kauth._owned(ctx("alice", "threads", "update", ("approve",)), {"thread_id": "t"}))
    # A plain run, a metadata update and a cancel need nothing more.
    assert run(
        kauth._owned(ctx("alice", "threads", "create_run"), {"kwargs": {"input": {}, "command": None}})
    )
    assert run(kauth._owned(ctx("alice", "threads", "update"), {"thread_id": "t", "metadata": {"a": 1}}))
    cancel = {"thread_id": "t", "action": "interrupt", "metadata": {"run_ids": [], "status": "x"}}
    assert run(kauth._owned(ctx("alice", "threads", "update"), cancel))


def test_store_namespaces_are_one_label_per_user() -> None:
    value: dict[str, Any] = {"namespace": ("prefs",), "key": "k"}
    assert run(kauth._own_namespace(ctx("ada@example.com", "store", "put"), value)) is True
    assert value["namespace"] == ("ada@example%2Ecom", "prefs")
    listing: dict[str, Any] = {"namespace": None}
    run(kauth._own_namespace(ctx("bob", "store", "list_namespaces"), listing))
    assert listing["namespace"] == ("bob",)


# -- the server's own routes: public on purpose, behind a token, or not served ---------------------


def test_server_routes_outside_the_api(tokens: TokenFile, fresh_cache: None) -> None:
    from keelgraph.serving.http import refuse

    alice, scraper = tokens.create("alice"), tokens.create("scraper", permissions=["metrics:read"])

    def status(path: str, token: str | None = None) -> int | None:
        answer = run(refuse(path, None if token is None else f"Bearer {token}"))
        return None if answer is None else answer.status_code

    for public in ("/", "/ok", "/docs", "/openapi.json", "/threads/search", "/runs/wait"):
        assert status(public) is None  # public on purpose, or checked by the server's auth
    assert status("/metrics") == 401 and status("/info") == 401
    assert status("/metrics", alice) == 403 and status("/info", alice) is None
    assert status("/metrics", scraper) is None
    for never in ("/internal/truncate", "/internal/debug/thread/x", "/deploy", "/deploy/1/stream"):
        assert status(never, scraper) == 404
    tokens.path.write_text("{broken")
    kauth._TOKENS = kauth._CachedTokens()
    assert status("/metrics", scraper) == 503
