"""The bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``) in OpenAI's shapes, and their error body ``{"error": {"message", "type", "param",
"code"}}``.

Fields OpenAI defines that would change what is generated and that lorakit does not do are accepted only
at their neutral value (``n`` 1, ``echo`` false, no ``logprobs``, penalties 0, no ``logit_bias``): any
other value is a 400 naming the field, as is any field OpenAI does not define, rather than a silent
difference from what the client asked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 4  # as OpenAI: up to four stop sequences


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    """``include_usage``: a last chunk with ``usage`` (and no choices) before ``[DONE]``."""

    include_usage: bool = False


class _Sampling(_Body):
    """What both routes share: the model, decoding, stop strings, streaming."""

    model: str = Field(min_length=1, description="An adapter's name, or the base model's for the bare base.")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (the most likely token each step).")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="Sampling reproducible for the same seed and request.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end the text.")
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: dict[str, float] | None = Field(None, max_length=0)

    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: continue each prompt (the text as it is, no template)."""

    prompt: str | list[str] = Field(description="A prompt, or a list of them: one choice each.")
    max_tokens: int | None = Field(None, ge=1, description="Default 16, as OpenAI's.")
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class TextPart(_Body):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One message; ``developer`` is read as ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one text."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages rendered by the model's chat template, continued as
    the assistant's turn."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: --max-new-tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: Literal[False] | None = None
    top_logprobs: None = None


class Usage(BaseModel):
    """Token counts of a request (every prompt and choice together)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """One prompt's continuation."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    """``object: text_completion``; a streamed chunk has the same shape (its ``usage`` null)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    """The generated turn."""

    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    """The generated message and why it ended."""

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    """``object: chat.completion``. Streamed: ``chat.completion.chunk`` objects whose choices carry a
    ``delta`` (the role first, then content pieces) instead of a message."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """A model requests may name: the base (``root`` itself) or an adapter on it (``parent`` the base)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    """Every model served: the base first, then the adapters in loading order."""

    object: Literal["list"]
    data: list[ModelCard]


class OpenAIError(BaseModel):
    """What went wrong: a one-line message, OpenAI's error type, the field at fault, a short code."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error of these routes."""

    error: OpenAIError


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
ERROR_CODES = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded", 503: "timeout"}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` for an answer of ``status``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or ERROR_CODES.get(status)}
    }


OPENAI_ERRORS = {
    400: "Invalid request: the body does not match the schema, an option lorakit does not support, "
    "`max_tokens` over `--max-new-tokens`, a prompt over `--max-input-chars` or longer than the model's "
    "positions leave room for, more prompts than `--max-inputs`, or no chat template.",
    401: "No API key, or a wrong one (with `WWW-Authenticate: Bearer`); nothing was computed.",
    404: "No model of that name: neither an adapter loaded nor the base model.",
    413: "The body is over `--max-body-bytes` (answered before it is all read).",
    429: "The generation queue holds `--max-queue-rows` rows: nothing was queued; retry after `Retry-After`.",
    500: "Internal error: the message names a request id; the server log has the traceback under it.",
    503: "The request waited in the queue past `--request-timeout-s` and was dropped.",
}


def openai_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of these statuses (500 always included), OpenAI's error shape."""
    from lorakit.serve.schemas import HEADERS

    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 500}):
        out[code] = {"model": OpenAIErrorBody, "description": OPENAI_ERRORS[code]}
        if code in HEADERS:
            out[code]["headers"] = HEADERS[code]
    return out
