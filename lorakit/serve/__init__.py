"""``lorakit serve``: one process, one base model, every task's adapter beside it, over HTTP.

``batcher``: rows of concurrent requests gathered into mixed-task batches on one worker thread, in a
queue bounded in rows; ``decoding`` and ``decode_queue``: generation adapters decoded in one mixed-adapter
batch with a KV cache, requests joining at step boundaries, behind the OpenAI-compatible routes
(``openai_routes``); ``app``: the FastAPI routes; ``asgi``, ``auth``, ``limits``: request ids and 500s,
API keys, the body limit; ``admin``: loading adapters contained in ``--adapter-root``; ``metrics``:
Prometheus; ``options``: every option checked. Here: loading the model and running uvicorn until SIGINT
or SIGTERM. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""

from __future__ import annotations

import copy
import logging
import signal
from collections.abc import Sequence

from lorakit.errors import UserError
from lorakit.serve.options import ServeOptions, check_generation_length, check_options

__all__ = ["ServeOptions", "serve"]


def serve(specs: Sequence[str], base: str | None = None, options: ServeOptions | None = None) -> None:
    """Load the base model with the adapters ``specs`` (``NAME=RUN_DIR``) and serve them over HTTP until
    SIGINT or SIGTERM: then stop accepting, finish the requests in flight, and return.

    ``options.merged``: each adapter merged into its own base copy instead (one full model per task in
    memory); ``options.summary_every``: seconds between the info-level summary lines."""
    o = options or ServeOptions()
    try:
        import uvicorn

        from lorakit.serve.app import Service, create_app
    except ImportError as exc:
        hint = f"needs the serve extra: pip install 'lorakit[serve]' ({exc})"
        raise UserError(hint, where="lorakit serve") from None
    from lorakit.predict import MergedPredictor, Predictor, read_sources
    from lorakit.serve.batcher import Batcher
    from lorakit.serve.decode_queue import scheduler_for
    from lorakit.serve.metrics import Metrics

    check_options(o)
    if not specs:
        raise UserError("name at least one adapter", where="--adapter")
    if len(specs) > o.max_adapters:
        raise UserError(f"{len(specs)} adapters, more than {o.max_adapters}", where="--max-adapters")
    sources = list(read_sources(specs, base, None).values())
    for source in sources:
        check_generation_length(source, o.max_new_tokens)
    predictor = (MergedPredictor if o.merged else Predictor)(sources, base)
    metrics = Metrics()
    batcher = Batcher(predictor, o.max_batch_size, o.max_wait_ms, o.summary_every, o.max_queue_rows, metrics)
    service = Service(predictor, batcher, base, o, metrics)
    service.generation = scheduler_for(predictor, batcher, o.max_batch_size, o.max_queue_rows, metrics)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    # Log lines carry their time: the audit lines of adapter administration say when.
    log_config["formatters"]["default"]["fmt"] = "%(asctime)s %(levelprefix)s %(message)s"
    ours = {"handlers": ["default"], "level": o.log_level.upper(), "propagate": False}
    log_config["loggers"]["lorakit"] = ours
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            host=o.host,
            port=o.port,
            log_config=log_config,
            log_level=o.log_level,
            access_log=o.log_level == "debug",  # one line per request is the batch lines' job, at debug
            # Open connections are bounded (503 past it): each holds at most --max-body-bytes of body.
            limit_concurrency=o.max_connections,
            server_header=False,
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
        raise RuntimeError(f"could not serve on {o.host}:{o.port} (the log line above says why)")
    logging.getLogger("lorakit.serve").info("stopped")
