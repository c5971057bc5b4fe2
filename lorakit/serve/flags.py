"""The options of ``lorakit serve`` as Typer annotations, kept beside the server they configure so that
``lorakit/cli.py`` stays one line an option (the defaults are ``ServeOptions``'s), and ``to_options``,
which makes them a ``ServeOptions`` (keys from the environment when none is given)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from lorakit.serve.options import ServeOptions

Adapters = Annotated[
    list[str],
    typer.Option("--adapter", help="NAME=RUN_DIR: a lorakit run or a PEFT adapter directory (repeatable)."),
]
Base = Annotated[
    str | None, typer.Option("--base", help="The base model (for PEFT directories without a recipe).")
]
Host = Annotated[str, typer.Option("--host", help="Address to listen on.")]
Port = Annotated[int, typer.Option("--port", help="Port to listen on.")]
MaxBatchSize = Annotated[
    int, typer.Option("--max-batch-size", help="Most rows in one mixed-task forward pass.")
]
MaxWaitMs = Annotated[
    float, typer.Option("--max-wait-ms", help="Longest a request waits for others to share its batch.")
]
MaxInputs = Annotated[int, typer.Option("--max-inputs", help="Most inputs in one request (more: 413).")]
Merged = Annotated[
    bool, typer.Option("--merged", help="One merged base copy per adapter (more memory, no LoRA per row).")
]
Quantize = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="nf4 or int8: the shared base stored quantized (default: the run's model.quantize).",
    ),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
SummaryEvery = Annotated[
    float, typer.Option("--summary-every", help="Seconds between summary lines (rows/s, waits).")
]

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


def to_options(api_key: list[str] | None, admin_key: list[str] | None, **given: Any) -> ServeOptions:
    """The command's options as ``ServeOptions``; keys from ``LORAKIT_API_KEY`` / ``LORAKIT_ADMIN_KEY``
    when the command names none."""
    from lorakit.serve.options import ADMIN_KEY_ENV, KEY_ENV, ServeOptions, keys_from_env

    return ServeOptions(
        api_keys=keys_from_env(list(api_key or []), KEY_ENV),
        admin_keys=keys_from_env(list(admin_key or []), ADMIN_KEY_ENV),
        **given,
    )
