"""API keys: ``Authorization: Bearer KEY`` on every route but ``GET /health`` (and ``GET /metrics`` with
``--public-metrics``), checked in a pure ASGI middleware before the body is read or anything computed.

A key is compared with every configured key by ``hmac.compare_digest``, all of them each time, so that the
time taken says nothing about which key, or how much of one, matched. Logs name a key by its id (the
first 8 hex digits of its SHA-256), never by the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from lorakit.serve.asgi import send_error
from lorakit.serve.metrics import Metrics

ANONYMOUS = "anonymous"  # who acts when the server runs without keys (loopback or --insecure)


def key_id(key: str) -> str:
    """The name logs give a key: ``key-`` and 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a key id (or ``anonymous``) and whether it may administer adapters."""

    key_id: str
    admin: bool


class Keys:
    """The API keys and the admin keys (an admin key is also an API key)."""

    def __init__(self, api_keys: Iterable[str], admin_keys: Iterable[str]) -> None:
        admin = set(admin_keys)
        self._keys = [(k.encode(), k in admin) for k in dict.fromkeys([*api_keys, *admin])]

    @property
    def on(self) -> bool:
        """Whether requests need a key."""
        return bool(self._keys)

    def identify(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization`` header; None for a missing, malformed or wrong key."""
        if not self._keys:
            return Principal(ANONYMOUS, admin=True)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        candidate = given.strip().encode()
        found: tuple[bytes, bool] | None = None
        for key, admin in self._keys:  # no early exit: every key is compared, whichever matches
            if hmac.compare_digest(candidate, key):
                found = (key, admin)
        return None if found is None else Principal(key_id(found[0].decode()), found[1])


class AuthMiddleware:
    """Refuses a request without a valid key with 401 and ``WWW-Authenticate: Bearer``; otherwise puts
    its ``Principal`` in ``request.state.principal``."""

    def __init__(self, app: ASGIApp, keys: Keys, public: set[tuple[str, str]], metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.public = public  # (method, path) pairs open to all
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if (scope["method"], scope["path"]) in self.public:
            state["principal"] = Principal(ANONYMOUS, admin=False)
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        principal = self.keys.identify(header)
        if principal is None:
            self.metrics.reject("unauthorized")
            detail = "a valid API key is needed: Authorization: Bearer KEY"
            unread = scope["method"] not in ("GET", "HEAD")
            await send_error(send, 401, detail, {"WWW-Authenticate": "Bearer"}, close=unread)
            return
        state["principal"] = principal
        await self.app(scope, receive, send)
