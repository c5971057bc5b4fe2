"""Prometheus metrics of ``lorakit serve`` (prometheus-client), in a registry of the app's own.

Label values are bounded: routes are the app's route templates (anything else is ``other``), statuses
are HTTP codes, reasons are the fixed names below, and adapter names are at most ``--max-adapters`` at a
time (an unloaded adapter's series is removed).
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REASONS = (
    "unauthorized",  # 401: no key or a wrong one
    "forbidden",  # 403: not an admin key, administration off, a path outside the root
    "body_too_large",  # 413: more than --max-body-bytes
    "too_many_inputs",  # 413: more than --max-inputs
    "input_too_long",  # 422: an input over --max-input-chars
    "invalid",  # 422: a body that does not match the schema, an adapter that does not fit
    "unknown_adapter",  # 404
    "conflict",  # 409: a name loaded already, or --max-adapters reached
    "queue_full",  # 429: --max-queue-rows reached
    "timeout",  # 503: queued past --request-timeout-s
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every instrument of the server, registered in ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_rows = Gauge("lorakit_queue_rows", "Rows waiting in the batcher's queue.", registry=r)
        self.batch_rows = Histogram(
            "lorakit_batch_rows", "Rows per mixed-task forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "lorakit_request_seconds",
            "Request latency, first byte in to response start, by route and status.",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("lorakit_rows", "Rows predicted, by adapter.", ["adapter"], registry=r)
        self.rejected = Counter(
            "lorakit_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r
        )
        for reason in REASONS:  # every reason present from the start, at 0
            self.rejected.labels(reason)
        self.adapters = Gauge("lorakit_adapters_loaded", "Adapters loaded.", registry=r)
        # Generation (the OpenAI-compatible routes): tokens by model (an adapter, or "(base)").
        self.generated_tokens = Counter(
            "lorakit_generated_tokens", "Tokens generated, by model.", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "lorakit_time_to_first_token_seconds",
            "From a generation request's arrival to its first token, per row.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "lorakit_inter_token_latency_seconds",
            "Between one row's consecutive tokens.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.decoding_rows = Gauge("lorakit_decoding_rows", "Rows in the decoding batch.", registry=r)
        self.step_rows = Histogram(
            "lorakit_decode_step_rows",
            "Rows of a decoding step (all adapters together), joining rows included.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.generation_queue_rows = Gauge(
            "lorakit_generation_queue_rows", "Generation rows waiting to join the decoding batch.", registry=r
        )

    def reject(self, reason: str) -> None:
        """Count one refused request."""
        self.rejected.labels(reason).inc()

    def forget_adapter(self, name: str) -> None:
        """Drop an unloaded adapter's series, so that names loaded over time do not pile up."""
        for counter in (self.rows, self.generated_tokens):
            with contextlib.suppress(KeyError):
                counter.remove(name)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
