"""The outermost layer of ``lorakit serve``, a pure ASGI middleware: a request id for every request, its
latency observed by route and status whatever answered it (auth, limits or a route), and any exception
turned into a 500 that says "internal error" and the request id, never a path or the exception's text:
the traceback goes to the server log under that id."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorakit.serve.metrics import Metrics

log = logging.getLogger("lorakit.serve")
REQUEST_ID_HEADER = "x-request-id"


async def send_error(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """A ``{"detail": ...}`` JSON answer from a middleware (the routes' error shape); ``close``: the body
    was not read, so the connection ends with this answer rather than reading the rest."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestMiddleware:
    """Request ids (``request.state.request_id``, the ``X-Request-ID`` header), latency metrics, 500s."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        response = {"started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["started"] = True
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
                message = {**message, "headers": headers}
                seconds = time.perf_counter() - started
                self.metrics.latency.labels(_route(scope), str(message["status"])).observe(seconds)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error, request id %s (%s %s)", request_id, scope["method"], scope["path"])
            if response["started"]:
                raise  # too late for a 500: the server closes the connection
            await send_error(send_with_id, 500, f"internal error (request id {request_id})")


def _route(scope: Scope) -> str:
    """The route template the request matches (``/v1/adapters/{name}``), else ``other``."""
    app: Any = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "other"
