"""The exposure options of ``lorakit serve`` as Typer annotations, kept beside the server they configure
so that ``lorakit/cli.py`` stays one line an option (the defaults are ``ServeOptions``'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ApiKeys = Annotated[
    list[str] | None,
    typer.Option("--api-key", help="Require Authorization: Bearer KEY (repeatable; or LORAKIT_API_KEY)."),
]
AdminKeys = Annotated[
    list[str] | None,
    typer.Option("--admin-key", help="A key that may also load/unload adapters (or LORAKIT_ADMIN_KEY)."),
]
Insecure = Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback --host without any key.")]
AdapterRoot = Annotated[
    Path | None,
    typer.Option("--adapter-root", help="Allow POST/DELETE /v1/adapters, for directories under DIR."),
]
MaxAdapters = Annotated[int, typer.Option("--max-adapters", help="Most adapters loaded (more: 409).")]
MaxBodyBytes = Annotated[
    int, typer.Option("--max-body-bytes", help="Largest request body (more: 413, before it is read).")
]
MaxInputChars = Annotated[
    int, typer.Option("--max-input-chars", help="Longest text of an input (more: 422).")
]
MaxNewTokens = Annotated[
    int, typer.Option("--max-new-tokens", help="Most tokens a generation adapter may decode (more: refused).")
]
MaxQueueRows = Annotated[
    int, typer.Option("--max-queue-rows", help="Most rows waiting (more: 429 with Retry-After).")
]
RequestTimeout = Annotated[
    float, typer.Option("--request-timeout-s", help="Longest a request may wait queued (more: 503).")
]
MaxConnections = Annotated[int, typer.Option("--max-connections", help="Most open connections (more: 503).")]
PublicMetrics = Annotated[bool, typer.Option("--public-metrics", help="Serve GET /metrics without a key.")]
