"""``lorakit serve``: one process, one base model, every task's adapter beside it, over HTTP.

``batcher``: rows of concurrent requests gathered into mixed-task batches on one worker thread; ``app``:
the FastAPI routes and their errors; here: checking the options, loading the model and running uvicorn
until SIGINT or SIGTERM. Needs the ``serve`` extra (FastAPI and uvicorn).
"""

from __future__ import annotations

import copy
import logging
import signal
from collections.abc import Sequence

from lorakit.errors import UserError

__all__ = ["serve"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def _check_options(
    max_batch_size: int, max_wait_ms: float, max_inputs: int, port: int, level: str, summary_every: float
) -> None:
    if max_batch_size < 1:
        raise UserError("must be at least 1", where="--max-batch-size")
    if max_wait_ms < 0:
        raise UserError("must be at least 0", where="--max-wait-ms")
    if max_inputs < 1:
        raise UserError("must be at least 1", where="--max-inputs")
    if not 0 <= port <= 65535:
        raise UserError("must be a port number, 0 to 65535", where="--port")
    if summary_every <= 0:
        raise UserError("must be more than 0 seconds", where="--summary-every")
    if level not in LOG_LEVELS:
        raise UserError(f"expected one of {', '.join(LOG_LEVELS)}", where="--log-level")


def serve(
    specs: Sequence[str],
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 64,
    max_wait_ms: float = 5.0,
    max_inputs: int = 1024,
    merged: bool = False,
    log_level: str = "info",
    summary_every: float = 60.0,
) -> None:
    """Load the base model with the adapters ``specs`` (``NAME=RUN_DIR``) and serve them over HTTP until
    SIGINT or SIGTERM: then stop accepting, finish the requests in flight, and return.

    ``merged``: each adapter merged into its own base copy instead (one full model per task in memory);
    ``summary_every``: seconds between the info-level summary lines."""
    try:
        import uvicorn

        from lorakit.serve.app import Service, create_app
    except ImportError as exc:
        hint = f"needs the serve extra: pip install 'lorakit[serve]' ({exc})"
        raise UserError(hint, where="lorakit serve") from None
    from lorakit.predict import MergedPredictor, Predictor, read_sources
    from lorakit.serve.batcher import Batcher

    _check_options(max_batch_size, max_wait_ms, max_inputs, port, log_level, summary_every)
    if not specs:
        raise UserError("name at least one adapter", where="--adapter")
    sources = list(read_sources(specs, base, None).values())
    predictor = (MergedPredictor if merged else Predictor)(sources, base)
    batcher = Batcher(predictor, max_batch_size, max_wait_ms, summary_every)
    service = Service(predictor, batcher, base, max_inputs)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    ours = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    log_config["loggers"]["lorakit"] = ours
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            host=host,
            port=port,
            log_config=log_config,
            log_level=log_level,
            access_log=log_level == "debug",  # one line per request is the batch lines' job, at debug
        )
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handler that
    # was there before it: this one ignores it, so that a graceful stop ends with exit status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except SystemExit:  # uvicorn's way out of a failed start (a busy port): told below as a failure
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise RuntimeError(f"could not serve on {host}:{port} (the log line above says why)")
    logging.getLogger("lorakit.serve").info("stopped")
