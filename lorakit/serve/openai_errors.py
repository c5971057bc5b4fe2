"""Errors of the OpenAI-compatible routes in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, whichever layer answers: the routes raise ``OpenAIRejected`` (a ``Rejected`` with the field
at fault and a code), the app's exception handlers shape it (``openai_answer``), and ``OpenAIErrorShape``
reshapes the ``{"detail": ...}`` answers of the layers outside the app (API keys 401, body limit 413,
queue gate 429, 500s) on these paths only: every other route keeps ``{"detail": ...}``.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorakit.serve.limits import Rejected
from lorakit.serve.openai_schemas import error_body

OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})


class OpenAIRejected(Rejected):
    """A refused request on an OpenAI route: status, metrics reason, message, the field at fault, a code."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, reason, message, headers)
        self.param = param
        self.code = code


def openai_answer(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """The JSON answer of an error on an OpenAI route."""
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


class OpenAIErrorShape:
    """Pure ASGI: on the OpenAI paths, an error answer whose body is ``{"detail": ...}`` is sent as
    ``{"error": {...}}`` instead, same status and headers. Outermost, so it sees every layer's answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in OPENAI_PATHS:
            await self.app(scope, receive, send)
            return
        held: Message | None = None

        async def reshaping(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message  # sent with the body, once the body is known
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            start, held = held, None
            body = message.get("body", b"")
            try:
                found = json.loads(body)
            except ValueError:
                found = None
            if isinstance(found, dict) and set(found) == {"detail"}:
                body = json.dumps(error_body(start["status"], str(found["detail"]))).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
                message = {**message, "body": body}
            await send(start)
            await send(message)

        await self.app(scope, receive, reshaping)
