"""Size limits of ``lorakit serve``: the body, checked while it streams in (a pure ASGI middleware: a body
over ``--max-body-bytes`` is answered 413 before the rest of it is read, and the connection closed), and
the inputs of a request (``--max-inputs``, ``--max-input-chars``), checked before anything is tokenized.
And the queue's gate: while the queue has no room for a single row, a prediction is answered 429 before
its body is parsed (the body is read and dropped chunk by chunk, so the connection stays open for the
client's retry and nothing of it is held).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorakit.serve.asgi import send_error
from lorakit.serve.metrics import Metrics


class Rejected(HTTPException):
    """A refused request: its status, its one-line detail and the reason the metrics count it under."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)
        self.reason = reason


class BodyLimitMiddleware:
    """Reads a request's body up to ``max_bytes``, then hands it to the app; past it: 413 at once.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read; a chunked
    body is counted as it arrives. Either way at most ``max_bytes`` of a body are held per request."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def _refuse(self, send: Send, size: str) -> None:
        self.metrics.reject("body_too_large")
        detail = f"request body {size}, more than the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await send_error(send, 413, detail, close=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"of {int(declared)} bytes")
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(send, f"over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def busy_detail(queued: int, limit: int) -> str:
    """The one-line body of a 429."""
    return f"busy: {queued} rows queued, the limit is {limit} (--max-queue-rows)"


RETRY_AFTER = {"Retry-After": "1"}


class QueueGate:
    """``POST /v1/predict`` answered 429 at once while the queue is full (``queued()`` at ``limit``): no
    JSON parsed, no validation, no route run. A request that might fit goes on; the batcher's ``submit``
    then decides exactly, with the request's row count. ``paths``: more POST routes, each gated by its
    own queue's count (the generation routes, by the decoding queue's)."""

    def __init__(
        self,
        app: ASGIApp,
        queued: Callable[[], int],
        limit: int,
        max_bytes: int,
        metrics: Metrics,
        paths: Mapping[str, Callable[[], int]] | None = None,
    ) -> None:
        self.app = app
        self.gates = {"/v1/predict": queued, **(paths or {})}
        self.limit = limit
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gate = (
            self.gates.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        queued = gate() if gate is not None else 0
        if gate is None or queued < self.limit:  # room for one row at least: the route decides
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        over = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        total = 0
        while not over:  # drop the body as it comes, so that the connection can carry the retry
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            total += len(message.get("body", b""))
            over = total > self.max_bytes
            if not message.get("more_body", False):
                break
        self.metrics.reject("queue_full")
        await send_error(send, 429, busy_detail(queued, self.limit), RETRY_AFTER, close=over)


def check_inputs(inputs: Sequence[Any], max_inputs: int, max_chars: int) -> None:
    """Rejected (413) for more inputs than ``max_inputs``; (422) for a text over ``max_chars``."""
    if len(inputs) > max_inputs:
        detail = f"{len(inputs)} inputs, more than the limit of {max_inputs} (--max-inputs)"
        raise Rejected(413, "too_many_inputs", detail)
    for i, row in enumerate(inputs):
        for name in ("text", "text_pair"):
            text = getattr(row, name, None)
            if text is not None and len(text) > max_chars:
                detail = (
                    f"inputs.{i}.{name}: {len(text)} characters, more than the limit of {max_chars} "
                    "(--max-input-chars)"
                )
                raise Rejected(422, "input_too_long", detail)
