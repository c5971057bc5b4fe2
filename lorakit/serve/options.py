"""The options of ``lorakit serve`` in one place, each checked before anything loads: a bad one is a
``UserError`` naming its flag (one line, exit 2)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import UserError

if TYPE_CHECKING:
    from lorakit.predict import AdapterSource

LOG_LEVELS = ("debug", "info", "warning", "error")
KEY_ENV = "LORAKIT_API_KEY"  # several keys: separated by commas
ADMIN_KEY_ENV = "LORAKIT_ADMIN_KEY"
MIN_KEY_CHARS = 16  # a key short enough to guess is refused, not silently accepted


@dataclass
class ServeOptions:
    """Everything ``lorakit serve`` is told besides the adapters."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_inputs: int = 1024
    merged: bool = False
    quantize: str | None = None  # the shared base's quantization (--quantize); None: the runs' own
    log_level: str = "info"
    summary_every: float = 60.0
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)
    insecure: bool = False
    adapter_root: Path | None = None
    max_adapters: int = 64
    max_body_bytes: int = 2 * 1024 * 1024
    max_input_chars: int = 20_000
    max_new_tokens: int = 256
    max_queue_rows: int = 4096
    request_timeout_s: float = 30.0
    max_connections: int = 256
    public_metrics: bool = False

    @property
    def keys_on(self) -> bool:
        """Whether requests need a key."""
        return bool(self.api_keys or self.admin_keys)


def keys_from_env(given: list[str], env: str) -> list[str]:
    """Keys from the option, else from the environment variable ``env`` (comma-separated)."""
    if given:
        return [k.strip() for k in given]
    return [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: loopback only when every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_options(o: ServeOptions) -> None:
    """UserError naming the first bad option; resolves ``adapter_root`` to its real path."""
    at_least_one = {
        "--max-batch-size": o.max_batch_size,
        "--max-inputs": o.max_inputs,
        "--max-adapters": o.max_adapters,
        "--max-body-bytes": o.max_body_bytes,
        "--max-input-chars": o.max_input_chars,
        "--max-new-tokens": o.max_new_tokens,
        "--max-queue-rows": o.max_queue_rows,
        "--max-connections": o.max_connections,
    }
    for flag, value in at_least_one.items():
        if value < 1:
            raise UserError("must be at least 1", where=flag)
    if o.max_wait_ms < 0:
        raise UserError("must be at least 0", where="--max-wait-ms")
    if not 0 <= o.port <= 65535:
        raise UserError("must be a port number, 0 to 65535", where="--port")
    if o.summary_every <= 0:
        raise UserError("must be more than 0 seconds", where="--summary-every")
    if o.request_timeout_s <= 0:
        raise UserError("must be more than 0 seconds", where="--request-timeout-s")
    if o.log_level not in LOG_LEVELS:
        raise UserError(f"expected one of {', '.join(LOG_LEVELS)}", where="--log-level")
    if o.max_queue_rows < o.max_inputs:  # else a request within --max-inputs could never be admitted
        raise UserError(f"must be at least --max-inputs ({o.max_inputs})", where="--max-queue-rows")
    for flag, keys in (("--api-key", o.api_keys), ("--admin-key", o.admin_keys)):
        for key in keys:
            if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
                raise UserError(f"a key needs at least {MIN_KEY_CHARS} characters and no spaces", where=flag)
    if not o.keys_on and not o.insecure and not is_loopback(o.host):
        raise UserError(
            f"{o.host} is reachable from other machines: give --api-key (or {KEY_ENV}), "
            "or --insecure to serve without keys",
            where="--host",
        )
    if o.adapter_root is not None:
        if not o.adapter_root.is_dir():
            raise UserError("not a directory", where=f"--adapter-root {o.adapter_root}")
        o.adapter_root = o.adapter_root.resolve()


def check_generation_length(source: AdapterSource, max_new_tokens: int) -> None:
    """UserError for a generation adapter whose recipe decodes more than ``max_new_tokens`` tokens."""
    if source.kind != "generation":
        return
    from lorakit.generate import decoding

    wanted = decoding(source.recipe).max_new_tokens
    if wanted > max_new_tokens:
        raise UserError(
            f"decodes up to {wanted} new tokens (generation.max_new_tokens), more than --max-new-tokens "
            f"{max_new_tokens}",
            where=source.where,
        )
