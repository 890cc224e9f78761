"""The served API's routes that LangGraph server answers without its auth, and which stay public.

LangGraph server checks tokens only on its API (threads, runs, assistants, store, crons). It also
answers, with no token at all: health checks (`/`, `/ok`), the API's description (`/docs`,
`/openapi.json`), `/info` and `/metrics`; and `langgraph dev` adds its own test and deploy routes
(`/internal/truncate` wipes every thread, `/internal/debug/thread/{id}` reads one, `/deploy` starts
a deployment). `langgraph.json` names `app` below as the server's custom app (`"http": {"app":
"keelgraph.serving.http:app"}`), whose middleware sees every request first:

- public on purpose: `/`, `/ok` (liveness, nothing else), `/docs` and `/openapi.json` (the API's
  shape, no data);
- `/info` needs a valid token, `/metrics` a valid token with the `metrics:read` permission (for a
  Prometheus scraper: `keelgraph token create prometheus --permission metrics:read`);
- `/internal/...` and `/deploy...` answer 404: keelgraph never serves them.

Everything else passes through to the server, which checks its token with `keelgraph.serving.auth`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langgraph_sdk import Auth
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from keelgraph.serving.auth import authenticate

__all__ = ["METRICS", "PUBLIC", "TOKEN_ONLY", "GuardServerRoutes", "app"]

PUBLIC = frozenset({"/", "/ok", "/docs", "/openapi.json"})
"""Answered without a token, on purpose."""
METRICS = "metrics:read"
TOKEN_ONLY: dict[str, str | None] = {"/info": None, "/metrics": METRICS}
"""Server routes outside its auth that need a valid token, and the permission each needs (None: any)."""
NEVER = ("/internal", "/deploy")
"""`langgraph dev`'s own test and deploy routes: never served by keelgraph."""
NOT_SERVED = "not found: keelgraph does not serve {path}"
NEEDS = "{path} needs the {permission!r} permission"


class GuardServerRoutes:
    """ASGI middleware: token checks for the server's routes that its auth leaves open (see the
    module's docstring). Every other request passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = await refuse(str(scope.get("path", "")), Headers(scope=scope).get("authorization"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def refuse(path: str, authorization: str | None) -> JSONResponse | None:
    """The answer that refuses a request for `path`, or None when it may go on."""
    if path.startswith(NEVER):
        return JSONResponse({"detail": NOT_SERVED.format(path=path)}, status_code=404)
    if path not in TOKEN_ONLY:
        return None
    try:
        user: Any = await asyncio.to_thread(authenticate, authorization)
    except Auth.exceptions.HTTPException as exc:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    except HTTPException as exc:  # 503: the server cannot check tokens now
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    permission = TOKEN_ONLY[path]
    if permission is not None and permission not in user.get("permissions", []):
        return JSONResponse({"detail": NEEDS.format(path=path, permission=permission)}, status_code=403)
    return None


app = Starlette(middleware=[Middleware(GuardServerRoutes)])
"""The custom app `langgraph.json` names (`"http": {"app": "keelgraph.serving.http:app"}`): no
routes of its own, only `GuardServerRoutes`."""
