"""The bodies of ``lorakit serve``'s API and the error responses each route documents in its OpenAPI
schema (every status the server can answer with, the same ``{"detail": ...}`` shape for all)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"


class InputRow(BaseModel):
    """One input: a text, and a second text for pair tasks (MRPC, STS-B, MNLI...)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    text_pair: str | None = None


class PredictRequest(BaseModel):
    """Inputs for one adapter."""

    model_config = ConfigDict(extra="forbid")
    adapter: str
    inputs: list[InputRow] = Field(min_length=1)


class OutputRow(BaseModel):
    """One output, the row ``lorakit predict`` writes: the label index (classification), the score
    (regression), the multi-hot row (multilabel) or the text (generation); its label name(s); the head's
    raw outputs."""

    adapter: str
    prediction: int | float | str | list[int]
    readable: str | float | list[str]
    scores: list[float] | None


class PredictResponse(BaseModel):
    """One output per input, in the inputs' order."""

    adapter: str
    outputs: list[OutputRow]


class AdapterInfo(BaseModel):
    """A loaded adapter: its path relative to ``--adapter-root`` (null for one given at start-up outside
    it), task, head, LoRA shape and the bytes its own tensors take."""

    name: str
    path: str | None
    task: str | None
    kind: str
    num_labels: int
    rank: int
    alpha: float
    targets: list[str]
    bytes: int


class AdapterList(BaseModel):
    """Every adapter loaded, in loading order."""

    adapters: list[AdapterInfo]


class LoadRequest(BaseModel):
    """An adapter to load: its name and its directory, relative to ``--adapter-root``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    path: str = Field(min_length=1, max_length=4096)


class Health(BaseModel):
    """The server is up, with this many adapters."""

    status: str
    adapters: int


class ErrorBody(BaseModel):
    """Every error: one line."""

    detail: str


ERRORS = {
    401: "No API key, or a wrong one (with `WWW-Authenticate: Bearer`); nothing was computed.",
    403: "Not allowed: administration is off, the key is not an admin key, or the path leaves the root.",
    404: "No adapter of that name is loaded.",
    409: "An adapter of that name is loaded already, or `--max-adapters` are loaded.",
    413: "The body is over `--max-body-bytes` (answered before it is all read), or more inputs than "
    "`--max-inputs`.",
    422: "The body does not match the schema, an input is over `--max-input-chars`, or the adapter "
    "directory does not fit the base model.",
    429: "The queue holds `--max-queue-rows` rows: nothing was queued; retry after `Retry-After` seconds.",
    500: "Internal error: the body names a request id; the server log has the traceback under it.",
    503: "The request waited in the queue past `--request-timeout-s` and was dropped.",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of these error statuses (500 always included)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 500}):
        out[code] = {"model": ErrorBody, "description": ERRORS[code]}
        if code in HEADERS:
            out[code]["headers"] = HEADERS[code]
    return out
