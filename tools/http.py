"""An HTTP API as a tool: allowed hosts only, bounded time and size, a validated response."""

from __future__ import annotations

import codecs
import ipaddress
import json
import logging
import re
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, ClassVar, Final
from urllib.parse import quote

import httpx
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, ValidationError

from keelgraph.contracts.errors import KeelgraphError, UserError, explain
from keelgraph.tools.execution import SideEffect, with_policy
from keelgraph.tools.retry import Backoff, retry_after

__all__ = [
    "ArgumentRejected",
    "HostNotAllowed",
    "HttpStatusError",
    "HttpTimeout",
    "HttpToolError",
    "HttpUnreachable",
    "ResponseInvalid",
    "ResponseTooLarge",
    "http_tool",
]

_log = logging.getLogger("keelgraph")

_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
# RFC 9110 idempotent methods: repeating one has the effect of sending it once.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_QUERY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS: Final = 5
_BACKOFF_S: Final = 0.5
_EXCERPT_BYTES: Final = 4_096
_EXCERPT_CHARS: Final = 300
_SECRET_CHARS: Final = 8
# Content negotiation, not credentials: kept across origins and never masked.
_PUBLIC_HEADERS: Final = frozenset(
    {"accept", "accept-encoding", "accept-language", "cache-control", "content-type", "user-agent"}
)
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class HttpToolError(KeelgraphError, ToolException):
    """An HTTP tool call failed; the message says what went wrong and what the model should do.

    `run_tool_call` reports it to the model as an error outcome; `code` is stable to match on.
    """

    code: ClassVar[str] = "http_error"


class ArgumentRejected(HttpToolError):
    """An argument cannot be put into the URL (e.g. `..` as a path segment): the model must fix it."""

    code = "http_argument_rejected"


class HostNotAllowed(HttpToolError):
    """The call (or a redirect) would leave the tool's host allowlist; nothing was sent there."""

    code = "http_host_not_allowed"

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class HttpStatusError(HttpToolError):
    """The API answered with a status other than 2xx (after any retries)."""

    code = "http_status"

    def __init__(self, message: str, *, status: int, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        """How long the API asked to wait before the next call, when it said."""


class HttpUnreachable(HttpToolError):
    """No answer could be had: the connection failed or broke on every attempt."""

    code = "http_unreachable"


class HttpTimeout(HttpUnreachable):
    """Every attempt ran out of time."""

    code = "http_timeout"


class ResponseInvalid(HttpToolError):
    """The API answered 2xx, but not with what the tool's response schema says."""

    code = "http_response_invalid"


class ResponseTooLarge(HttpToolError):
    """A JSON response was larger than `max_response_bytes`; reading stopped at the cap."""

    code = "http_response_too_large"


@dataclass(frozen=True)
class _Endpoint:
    """One declared API call; calling it with the tool's validated arguments performs the call."""

    name: str
    method: str
    url: str
    path_params: tuple[str, ...]
    args: type[BaseModel]
    response: type[BaseModel] | None
    allow_hosts: tuple[str, ...]
    timeout_s: float
    retries: int
    max_retry_wait_s: float
    max_response_bytes: int
    headers: Mapping[str, str] = field(repr=False)
    client: httpx.Client = field(repr=False)

    @property
    def backoff(self) -> Backoff:
        """0.5 s, 1 s, 2 s, ... up to `max_retry_wait_s`, which also caps a server-asked wait."""
        return Backoff(_BACKOFF_S, cap_s=self.max_retry_wait_s)

    @property
    def budget_s(self) -> float:
        """The most one call may take: every attempt at its timeout plus every wait between them."""
        return self.timeout_s * (self.retries + 1) + self.max_retry_wait_s * self.retries

    def __call__(self, **arguments: Any) -> dict[str, Any]:
        try:
            return _call(self, arguments)
        except HttpToolError as exc:
            # The API may echo a credential (e.g. an Authorization header) in its error text.
            exc.args = tuple(_redact(str(a), self.headers) for a in exc.args)
            raise


@dataclass(frozen=True)
class _Reply:
    """What was read of one response: at most `max_response_bytes` of its (decoded) body."""

    status: int
    reason: str
    url: httpx.URL
    headers: httpx.Headers
    body: bytes
    truncated: bool


def http_tool(
    name: str,
    description: str,
    *,
    url: str,
    args: type[BaseModel],
    allow_hosts: Sequence[str],
    method: str = "GET",
    response: type[BaseModel] | None = None,
    timeout_s: float = 10.0,
    retries: int = 2,
    max_retry_wait_s: float = 5.0,
    max_response_bytes: int = 1_000_000,
    headers: Mapping[str, str] | None = None,
    side_effect: SideEffect | None = None,
    client: httpx.Client | None = None,
) -> BaseTool:
    """Declare one HTTP API call as a tool the model can use, with a keelgraph policy attached.

    `url` is a template: each `{name}` is filled with the argument of that name, percent-encoded
    as one path segment (a value cannot change the path or the host). The other arguments go to
    the query string (GET, HEAD, OPTIONS, DELETE) or to a JSON body (POST, PUT, PATCH), by their
    aliases; None values are left out.

    - `allow_hosts`: exact hosts or `*.example.com` (any subdomain). The filled URL and every
      redirect hop are checked before anything is sent; the configured `headers` are dropped when a
      redirect leaves the original scheme, host and port.
    - `timeout_s`: the limit for each attempt (connecting, and waiting for the whole body).
    - `retries`: idempotent methods are retried on timeouts, broken connections and 429/502/503/504,
      with exponential backoff (0.5 s, 1 s, 2 s, ...) capped at `max_retry_wait_s`, honouring
      `retry-after-ms`/`Retry-After` up to that cap (a longer wait is reported to the model instead). Any method is
      retried when the connection could not be opened, since nothing was sent.
    - `max_response_bytes`: the body is streamed and reading stops past the cap. Text is returned
      cut, with a note; JSON that does not fit is an error.
    - `response`: the 2xx JSON body is validated against it (a `RootModel` for a list); a mismatch
      is an error naming the field.
    - `headers` (e.g. credentials) are never put into the tool's output or its errors; should the
      API echo one, values of 8 or more characters are masked (standard content-negotiation
      headers such as `Accept` and `User-Agent` are not secrets and are left alone).
    - `side_effect`: inferred from `method` (GET, HEAD, OPTIONS read; others `external`).
    - `client`: an `httpx.Client` to send with (tests pass one on an `httpx.MockTransport`); by
      default each tool has its own client, which keeps no cookies between calls.

    The tool returns `{"status": 200, "body": ...}` (plus `truncated` and `note` when text was
    cut). Non-2xx answers, refused hosts, timeouts and invalid responses raise `HttpToolError`
    subclasses whose message tells the model what to do next. The policy's deadline is set just
    above the call's own time budget; change the policy with `with_policy(tool, ...)`.

    >>> import httpx
    >>> from pydantic import BaseModel
    >>> class OrderQuery(BaseModel):
    ...     order_id: str
    >>> class Order(BaseModel):
    ...     id: str
    ...     status: str
    >>> def api(request: httpx.Request) -> httpx.Response:
    ...     return httpx.Response(200, json={"id": request.url.path.split("/")[-1], "status": "shipped"})
    >>> get_order = http_tool(
    ...     "get_order",
    ...     "Look up one order by its id.",
    ...     url="https://api.example.com/orders/{order_id}",
    ...     args=OrderQuery,
    ...     response=Order,
    ...     allow_hosts=["api.example.com"],
    ...     headers={"Authorization": "Bearer sk-test"},
    ...     client=httpx.Client(transport=httpx.MockTransport(api)),
    ... )
    >>> get_order.invoke({"order_id": "A-17"})
    {'status': 200, 'body': {'id': 'A-17', 'status': 'shipped'}}
    """
    verb = method.upper()
    hosts = tuple(_normalise_allowed(h) for h in allow_hosts)
    endpoint = _Endpoint(
        name=name,
        method=verb,
        url=url,
        path_params=_placeholders(url),
        args=args,
        response=response,
        allow_hosts=hosts,
        timeout_s=float(timeout_s),
        retries=retries,
        max_retry_wait_s=float(max_retry_wait_s),
        max_response_bytes=max_response_bytes,
        headers=dict(headers or {}),
        client=client if client is not None else _default_client(),
    )
    _check_declaration(endpoint)
    tool = StructuredTool(name=name, description=description, args_schema=args, func=endpoint)
    effect: SideEffect = side_effect or ("read" if verb in _READ_METHODS else "external")
    return with_policy(tool, timeout_s=endpoint.budget_s + 1.0, side_effect=effect)


def _default_client() -> httpx.Client:
    # A tool serves every user: a cookie set for one call must not ride along on another's.
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.Client(cookies=no_cookies, follow_redirects=False)


def _placeholders(template: str) -> tuple[str, ...]:
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(
            f"url template {template!r} is malformed ({exc}); write `{{{{` for a literal brace"
        ) from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise UserError(
                f"url template placeholder {{{name}}} must be a bare argument name, without format or conversion"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _normalise_allowed(entry: str) -> str:
    host = entry.strip().lower().rstrip(".")
    wildcard = host.startswith("*.")
    bare = host.removeprefix("*.")
    ip = _ip(bare)
    if ip is not None and not wildcard:
        return ip
    try:
        ascii_host = httpx.URL(f"http://{bare}/").raw_host.decode("ascii").rstrip(".") if bare else ""
    except (httpx.InvalidURL, UnicodeError):
        ascii_host = ""
    if not _HOST.match(ascii_host) or ":" in bare:
        raise UserError(
            f"allow_hosts entry {entry!r} is not a host: write an exact host such as "
            "'api.example.com' or '127.0.0.1' (no scheme, port or path) or a wildcard such as '*.example.com'"
        )
    return f"*.{ascii_host}" if wildcard else ascii_host


def _ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _url_host(url: httpx.URL) -> str:
    """The URL's host as the allowlist spells it: lower-case ASCII (IDNA), no trailing dot."""
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    return _ip(host) or host


def _check_declaration(endpoint: _Endpoint) -> None:
    where = f"http_tool {endpoint.name!r}"
    if not _TOOL_NAME.match(endpoint.name):
        raise UserError(f"{where}: a tool name is 1-64 letters, digits, '_' or '-' (model APIs require it)")
    if endpoint.method not in _METHODS:
        raise UserError(f"{where}: method {endpoint.method!r} is not one of {', '.join(sorted(_METHODS))}")
    if not (isinstance(endpoint.args, type) and issubclass(endpoint.args, BaseModel)):
        raise UserError(f"{where}: args must be a Pydantic model class")
    if endpoint.response is not None and not (
        isinstance(endpoint.response, type) and issubclass(endpoint.response, BaseModel)
    ):
        raise UserError(f"{where}: response must be a Pydantic model class or None")
    missing = [p for p in endpoint.path_params if p not in endpoint.args.model_fields]
    if missing:
        raise UserError(
            f"{where}: url placeholder(s) {', '.join(missing)} are not fields of {endpoint.args.__name__}; "
            f"its fields are: {', '.join(endpoint.args.model_fields) or '(none)'}"
        )
    scheme, sep, rest = endpoint.url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if not sep or scheme.lower() not in {"http", "https"}:
        raise UserError(f"{where}: url must start with http:// or https:// (got {endpoint.url!r})")
    if "{" in authority or "@" in authority:
        raise UserError(
            f"{where}: the host part of the url must be fixed, with no placeholder or credentials; "
            "pass credentials in headers"
        )
    if not endpoint.allow_hosts:
        raise UserError(f"{where}: allow_hosts is empty; list the hosts the tool may call")
    host = _url_host(httpx.URL(f"{scheme}://{authority}/"))
    if not _host_allowed(host, endpoint.allow_hosts):
        raise UserError(
            f"{where}: the url's host {host!r} is not in allow_hosts {list(endpoint.allow_hosts)}"
        )
    if endpoint.timeout_s <= 0 or endpoint.max_retry_wait_s < 0:
        raise UserError(f"{where}: timeout_s must be positive and max_retry_wait_s not negative")
    if endpoint.retries < 0 or endpoint.max_response_bytes <= 0:
        raise UserError(f"{where}: retries must be 0 or more and max_response_bytes positive")
    bad = [k for k, v in endpoint.headers.items() if not isinstance(v, str)]
    if bad:
        raise UserError(f"{where}: header value(s) for {', '.join(bad)} must be strings")


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def _check_url(endpoint: _Endpoint, url: httpx.URL, *, hop: int) -> None:
    """Refuse a URL outside http(s) or the allowlist, before anything is sent to it."""
    host = _url_host(url)
    via = "the API redirected to" if hop else "the call's URL points to"
    if url.scheme not in {"http", "https"}:
        raise HostNotAllowed(
            f"{via} a {url.scheme or 'relative'}: URL, and this tool speaks only http(s); "
            "the call was stopped -> do not retry it; answer without this data",
            host=host,
        )
    if not _host_allowed(host, endpoint.allow_hosts):
        raise HostNotAllowed(
            f"{via} host {host!r}, which this tool may not contact (allowed: "
            f"{', '.join(endpoint.allow_hosts)}); nothing was sent there -> do not retry the call; "
            "answer without this data",
            host=host,
        )


def _call(endpoint: _Endpoint, arguments: Mapping[str, Any]) -> dict[str, Any]:
    values = endpoint.args.model_validate(dict(arguments), by_name=True)
    url = _fill(endpoint, values)
    _check_url(endpoint, url, hop=0)
    rest = values.model_dump(mode="json", by_alias=True, exclude=set(endpoint.path_params), exclude_none=True)
    params = {k: _query_value(v) for k, v in rest.items()} if endpoint.method in _QUERY_METHODS else None
    body = rest if endpoint.method not in _QUERY_METHODS else None
    reply = _send(endpoint, url, params, body)
    return _result(endpoint, values, reply)


def _fill(endpoint: _Endpoint, values: BaseModel) -> httpx.URL:
    """The template with each placeholder replaced by its argument, encoded as one path segment."""
    dumped = values.model_dump(mode="json", include=set(endpoint.path_params))
    parts: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(endpoint.url):
        parts.append(literal)
        if name is None:
            continue
        value = dumped.get(name)
        text = value if isinstance(value, str) else json.dumps(value)
        if value is None or text in {"", ".", ".."}:
            raise ArgumentRejected(
                f"argument {name}={value!r} cannot be used in the URL (it must be a non-empty value, "
                "not '.' or '..') -> send the actual identifier"
            )
        parts.append(quote(text, safe=""))
    return httpx.URL("".join(parts))


def _query_value(value: Any) -> Any:
    if isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
    ):
        return json.dumps(value, separators=(",", ":"))
    return value


def _send(endpoint: _Endpoint, url: httpx.URL, params: Mapping[str, Any] | None, body: Any) -> _Reply:
    """Send with retries inside the call's time budget; returns the last reply, 2xx or not."""
    deadline = time.monotonic() + endpoint.budget_s
    idempotent = endpoint.method in _IDEMPOTENT
    attempts = endpoint.retries + 1
    wait: float | None
    for attempt in range(1, attempts + 1):
        try:
            reply = _exchange(endpoint, url, params, body, deadline)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # A connection that never opened carried nothing: safe to retry for any method.
            never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            wait = endpoint.backoff.delay(attempt)
            if attempt >= attempts or not (idempotent or never_sent) or time.monotonic() + wait >= deadline:
                raise _unreachable(endpoint, url, exc, attempt) from exc
            _log.info("http tool %s: %s, retrying in %.1f s", endpoint.name, type(exc).__name__, wait)
        except httpx.HTTPError as exc:  # not transient (a bad proxy, an undecodable body): do not retry
            raise _unreachable(endpoint, url, exc, attempt) from exc
        else:
            if reply.status not in _RETRY_STATUSES or not idempotent or attempt >= attempts:
                return reply
            wait = endpoint.backoff.delay(attempt, retry_after=retry_after(reply.headers))
            if wait is None or time.monotonic() + wait >= deadline:
                return reply  # waiting past the budget helps no one: the model hears when to try again
            _log.info("http tool %s: HTTP %d, retrying in %.1f s", endpoint.name, reply.status, wait)
        _sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _unreachable(endpoint: _Endpoint, url: httpx.URL, exc: httpx.HTTPError, tries: int) -> HttpToolError:
    what = f"{endpoint.method} {_shown(url)}"
    times = f"{tries} attempt{'s' if tries > 1 else ''}"
    if isinstance(exc, httpx.TimeoutException):
        return HttpTimeout(
            f"{what} got no answer within {endpoint.timeout_s:g} s ({times}) -> "
            "try again later, or answer without this data"
        )
    if isinstance(exc, httpx.TransportError):
        return HttpUnreachable(
            f"{what} failed: {type(exc).__name__}: {exc or 'connection error'} ({times}) -> "
            "the service is unreachable; try again later, or answer without this data"
        )
    return HttpToolError(
        f"{what} sent a response that could not be read ({type(exc).__name__}: {exc}) -> "
        "do not repeat the call; answer without this data"
    )


def _exchange(
    endpoint: _Endpoint, url: httpx.URL, params: Mapping[str, Any] | None, body: Any, deadline: float
) -> _Reply:
    """One attempt: send, follow allowed redirects by hand, read the body up to the cap."""
    method = endpoint.method
    headers = dict(endpoint.headers)
    if not any(k.lower() == "accept" for k in headers):
        headers["Accept"] = "application/json, */*;q=0.5"
    origin = (url.scheme, url.raw_host, url.port)
    started = time.monotonic()
    for hop in range(_MAX_REDIRECTS + 1):
        _check_url(endpoint, url, hop=hop)
        limit = min(started + endpoint.timeout_s, deadline)
        left = limit - time.monotonic()
        if left <= 0:
            raise httpx.ReadTimeout("the attempt's time ran out")
        request = endpoint.client.build_request(
            method, url, params=params, json=body, headers=headers, timeout=httpx.Timeout(left)
        )
        response = endpoint.client.send(request, stream=True, follow_redirects=False)
        try:
            location = response.headers.get("location")
            if response.status_code in _REDIRECTS and location:
                url = request.url.join(location)
                params = None  # the query is now part of the new URL
                if response.status_code == 303 or (response.status_code in {301, 302} and method == "POST"):
                    method, body = ("HEAD" if method == "HEAD" else "GET"), None
                if (url.scheme, url.raw_host, url.port) != origin:
                    # Credentials stay with their origin; content negotiation goes along.
                    headers = {k: v for k, v in headers.items() if k.lower() in _PUBLIC_HEADERS}
                continue
            cap = endpoint.max_response_bytes if response.is_success else _EXCERPT_BYTES
            return _read(endpoint, response, cap, limit)
        finally:
            response.close()
    raise HttpToolError(
        f"{endpoint.method} {_shown(url)} redirected more than {_MAX_REDIRECTS} times -> "
        "do not retry; answer without this data"
    )


def _read(endpoint: _Endpoint, response: httpx.Response, cap: int, limit: float) -> _Reply:
    """Stream at most `cap` bytes of the body; stop at `limit` (monotonic time) like a timeout."""
    chunks: list[bytes] = []
    size = 0
    truncated = False
    declared = response.headers.get("content-length", "")
    if (
        response.is_success
        and declared.isdigit()
        and int(declared) > cap
        and _expects_json(endpoint, response.headers)
    ):
        truncated = True  # JSON cut short is useless: do not read it at all
    elif endpoint.method != "HEAD":
        for chunk in response.iter_bytes():
            if size + len(chunk) > cap:
                chunks.append(chunk[: cap - size])
                size, truncated = cap, True
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > limit:
                raise httpx.ReadTimeout("the body did not arrive in time", request=response.request)
    return _Reply(
        status=response.status_code,
        reason=response.reason_phrase or httpx.codes.get_reason_phrase(response.status_code),
        url=response.request.url,
        headers=response.headers,
        body=b"".join(chunks),
        truncated=truncated,
    )


def _expects_json(endpoint: _Endpoint, headers: httpx.Headers) -> bool:
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return endpoint.response is not None or kind == "application/json" or kind.endswith("+json")


def _charset(headers: httpx.Headers) -> str:
    match = re.search(r"charset=\"?([\w.:-]+)", headers.get("content-type", ""), re.IGNORECASE)
    if match:
        try:
            return codecs.lookup(match.group(1)).name
        except LookupError:
            pass
    return "utf-8"


def _text(reply: _Reply) -> str:
    # An incremental decoder drops a character cut in half at the cap instead of garbling it.
    decoder = codecs.getincrementaldecoder(_charset(reply.headers))(errors="replace")
    return decoder.decode(reply.body, final=not reply.truncated)


def _result(endpoint: _Endpoint, values: BaseModel, reply: _Reply) -> dict[str, Any]:
    if not 200 <= reply.status < 300:
        raise _status_error(endpoint, values, reply)
    out: dict[str, Any] = {"status": reply.status}
    no_body = endpoint.method == "HEAD" or reply.status in {204, 205}
    if no_body or (not reply.body and not reply.truncated and endpoint.response is None):
        out["body"] = None
        return out
    what = f"{endpoint.method} {_shown(reply.url)}"
    if _expects_json(endpoint, reply.headers):
        if reply.truncated:
            raise ResponseTooLarge(
                f"{what} sent more than {endpoint.max_response_bytes:,} bytes of JSON, more than this tool "
                "reads -> ask for less (a narrower filter, a smaller page or limit)"
            )
        try:
            parsed = json.loads(reply.body) if reply.body else None
        except ValueError:
            if endpoint.response is not None:
                raise ResponseInvalid(
                    f"{what} did not answer with JSON (got {_excerpt(_text(reply))!r}) -> the service "
                    "answered in an unexpected form; do not repeat the call; answer without this data"
                ) from None
            out["body"] = _redact_data(_text(reply), endpoint.headers)
            out["note"] = "the response claimed to be JSON but is not; shown as text"
            return out
        out["body"] = _redact_data(_validated(endpoint, what, parsed), endpoint.headers)
        return out
    out["body"] = _redact_data(_text(reply), endpoint.headers)
    if reply.truncated:
        out["truncated"] = True
        out["note"] = (
            f"the response was cut at {endpoint.max_response_bytes:,} bytes; only its start is shown"
        )
    return out


def _validated(endpoint: _Endpoint, what: str, parsed: Any) -> Any:
    if endpoint.response is None:
        return parsed
    try:
        return endpoint.response.model_validate(parsed).model_dump(mode="json")
    except ValidationError as exc:
        problems = explain(exc, prefix="body", model=endpoint.response)
        shown = "; ".join(f"{p.field}: {p.reason}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ResponseInvalid(
            f"{what} answered, but not as {endpoint.response.__name__} expects: {shown}{more} -> the "
            "service sent data in an unexpected shape; do not repeat the call; answer without this data"
        ) from None


def _status_error(endpoint: _Endpoint, values: BaseModel, reply: _Reply) -> HttpStatusError:
    status = reply.status
    asked = retry_after(reply.headers)
    if status == 404:
        ids = ", ".join(f"{p}={getattr(values, p)!r}" for p in endpoint.path_params)
        hint = (
            f"check {ids}: it may be mistyped or not exist; do not repeat the call with the same value"
            if ids
            else "nothing was found for these arguments; check them before calling again"
        )
    elif status in {401, 403}:
        hint = "the tool's credentials were refused; changing the arguments will not help, tell the user"
    elif status in {408, 429}:
        later = f" (the service asks to wait {asked:g} s)" if asked is not None else ""
        hint = f"the service is busy; try again later{later}, or answer without this data"
    elif 400 <= status < 500:
        hint = "fix the arguments as the response says and call again"
    elif status >= 500:
        later = f" (the service asks to wait {asked:g} s)" if asked is not None else ""
        hint = f"the service failed; try again later{later}, or answer without this data"
    else:
        hint = "the service answered unexpectedly; do not repeat the call"
    excerpt = _excerpt(_text(reply))
    said = f": {excerpt}" if excerpt else ""
    return HttpStatusError(
        f"HTTP {status} {reply.reason} from {endpoint.method} {_shown(reply.url)}{said} -> {hint}",
        status=status,
        retry_after_s=asked,
    )


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else f"{flat[:_EXCERPT_CHARS]}... [cut]"


def _shown(url: httpx.URL) -> str:
    """The URL without query or fragment: enough to tell which call failed, no tokens from a query."""
    return str(url.copy_with(query=None, fragment=None))


def _secrets(headers: Mapping[str, str]) -> list[str]:
    """The configured header values to mask, longest first (a whole value before its parts)."""
    found: set[str] = set()
    for name, value in headers.items():
        if name.lower() not in _PUBLIC_HEADERS:
            found.add(value.strip())
            found.update(value.split())  # the token alone, from "Bearer <token>"
    return sorted((s for s in found if len(s) >= _SECRET_CHARS), key=len, reverse=True)


def _redact(text: str, headers: Mapping[str, str]) -> str:
    for secret in _secrets(headers):
        text = text.replace(secret, "[redacted]")
    return text


def _redact_data(data: Any, headers: Mapping[str, str]) -> Any:
    """`data` with every configured header value masked, in case the API echoes a credential."""
    if not headers:
        return data
    if isinstance(data, str):
        return _redact(data, headers)
    if isinstance(data, list):
        return [_redact_data(v, headers) for v in data]
    if isinstance(data, dict):
        return {_redact(str(k), headers): _redact_data(v, headers) for k, v in data.items()}
    return data
