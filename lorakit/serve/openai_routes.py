"""OpenAI-compatible routes over the mixed-adapter decoding batch (``decode_queue``, ``decoding``):

    POST /v1/completions        each prompt continued as it is (no template)
    POST /v1/chat/completions   the messages rendered by the adapter's chat template, continued
    GET  /v1/models             the base model and every adapter, OpenAI's list shape

``model`` names an adapter, or the base model (``--base`` or the runs' ``model.name_or_path``) for the bare
base. Limits: ``max_tokens`` at most ``--max-new-tokens`` (default 16 for completions, as OpenAI's, and
``--max-new-tokens`` for chat); a prompt (each message) at most ``--max-input-chars`` characters, checked
before tokenizing, and at most as many tokens as the model's positions leave beside ``max_tokens``; at
most ``--max-inputs`` prompts (messages). Every refusal of a body is a 400 in OpenAI's error shape.

Tokenizing happens on the event loop with a copy of the tokenizer: the worker thread decodes with the
original at the same time, and a fast tokenizer is not to be shared between threads.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lorakit.serve.batcher import QueueFull
from lorakit.serve.decode_queue import DecodeScheduler, GenerationJob
from lorakit.serve.decoding import DecodeRow, Sampling
from lorakit.serve.limits import RETRY_AFTER, busy_detail
from lorakit.serve.openai_errors import OpenAIRejected
from lorakit.serve.openai_schemas import (
    MAX_STOPS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    error_body,
    openai_errors,
)
from lorakit.serve.text_stream import TextStream

if TYPE_CHECKING:
    from lorakit.serve.service import Service

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for completions


def _invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIRejected:
    return OpenAIRejected(400, "invalid", message, param, code)


def chat_template_of(directory: Path) -> str | None:
    """An adapter directory's own chat template (``chat_template.jinja``, or ``chat_template`` in its
    ``tokenizer_config.json``), else None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            found = json.loads(config.read_text()).get("chat_template")
        except (ValueError, AttributeError):  # not a JSON object: no template to read
            return None
        return found if isinstance(found, str) else None
    return None


class Generation:
    """What the OpenAI routes need of the service: the models they may name, the tokenizer, the limits."""

    def __init__(self, service: Service, scheduler: DecodeScheduler) -> None:
        self.service = service
        self.scheduler = scheduler
        self.options = service.options
        predictor: Any = service.predictor
        self.decode_tokenizer = predictor.tokenizer  # the worker thread's
        self.tokenizer = copy.deepcopy(predictor.tokenizer)  # the event loop's
        self.base: str = predictor.base
        config = predictor.model.config
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.positions = int(positions or 1024)  # as lorakit.models.prompt_room assumes without either
        self.created = int(time.time())
        self.templates: dict[str, str | None] = {}

    def adapter(self, model: str) -> str | None:
        """The adapter ``model`` names (None: the bare base); 404 for neither."""
        if model in self.service.sources:
            return model
        if model == self.base:
            return None
        served = ", ".join([self.base, *self.service.sources])
        raise OpenAIRejected(404, "unknown_adapter", f"unknown model {model!r} (served: {served})", "model")

    def max_tokens(self, given: int | None, default: int) -> int:
        """``max_tokens`` as asked, within ``--max-new-tokens``."""
        cap = self.options.max_new_tokens
        if given is not None and given > cap:
            raise _invalid(
                f"max_tokens {given} is more than the limit of {cap} (--max-new-tokens)", "max_tokens"
            )
        return given if given is not None else min(default, cap)

    def encode(self, prompts: list[str], max_tokens: int, param: str) -> list[list[int]]:
        """Token ids of each prompt; 400 for one that is empty or leaves no room for ``max_tokens``."""
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        room = self.positions - max_tokens
        for ids in encoded:
            if not ids:
                raise _invalid("the prompt is empty", param)
            if len(ids) > room:
                message = (
                    f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that is more than the "
                    f"model's {self.positions} positions"
                )
                raise _invalid(message, param, "context_length_exceeded")
        return encoded

    def chat_prompt(self, adapter: str | None, body: ChatCompletionRequest) -> str:
        """The messages rendered by the adapter's own chat template, else the tokenizer's."""
        if len(body.messages) > self.options.max_inputs:
            raise _invalid(f"{len(body.messages)} messages, more than --max-inputs {self.options.max_inputs}")
        for i, message in enumerate(body.messages):
            self.check_chars(message.text(), f"messages.{i}.content")
        template = None
        if adapter is not None:
            path = self.service.sources[adapter].path
            if str(path) not in self.templates:
                self.templates[str(path)] = chat_template_of(path)
            template = self.templates[str(path)]
        template = template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise _invalid(f"model {body.model!r} has no chat template: use /v1/completions", "model")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # the template's own refusal (a role order it does not take...)
            raise _invalid(
                f"the chat template refused the messages: {' '.join(str(exc).split())[:300]}", "messages"
            ) from None

    def check_chars(self, text: str, param: str) -> None:
        """400 for a text over ``--max-input-chars`` (before it is tokenized)."""
        limit = self.options.max_input_chars
        if len(text) > limit:
            raise OpenAIRejected(
                400,
                "input_too_long",
                f"{len(text)} characters, more than the limit of {limit} (--max-input-chars)",
                param,
            )

    async def start(
        self, adapter: str | None, encoded: list[list[int]], max_tokens: int, body: Any
    ) -> GenerationJob:
        """Queue the rows and wait until they join the batch: 429 when the queue is full, 503 when they
        wait past ``--request-timeout-s``."""
        stops = body.stops()
        if len(stops) > MAX_STOPS:
            raise _invalid(f"{len(stops)} stop strings, more than {MAX_STOPS}", "stop")
        sampling = Sampling(body.temperature, body.top_p, body.seed)
        rows = [
            DecodeRow(adapter, ids, max_tokens, sampling, TextStream(self.decode_tokenizer, stops))
            for ids in encoded
        ]
        try:
            job = self.scheduler.submit(rows)
        except QueueFull:
            detail = busy_detail(self.scheduler.queued_rows, self.options.max_queue_rows)
            raise OpenAIRejected(429, "queue_full", detail, headers=dict(RETRY_AFTER)) from None
        try:
            await asyncio.wait_for(asyncio.shield(job.admitted), self.options.request_timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            if self.scheduler.drop(job):
                limit = f"{self.options.request_timeout_s:g} s (--request-timeout-s)"
                raise OpenAIRejected(503, "timeout", f"queued longer than {limit}; dropped") from None
        return job


async def _pieces(
    job: GenerationJob, scheduler: DecodeScheduler
) -> AsyncIterator[tuple[int, str, str | None]]:
    """(row index, text, finish) as the rows produce them, until every row has finished; a request left
    unfinished (its client went away) is cancelled."""
    left = len(job.rows)
    try:
        while left:
            piece = await job.pieces.get()
            if isinstance(piece, BaseException):
                raise piece
            left -= piece.finish is not None
            yield piece.index, piece.text, piece.finish
    finally:
        if left:
            scheduler.cancel(job)


def _usage(job: GenerationJob) -> dict[str, int]:
    completion = sum(len(r.tokens) for r in job.rows)
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def add_openai_routes(
    app: FastAPI, service: Service, secured: list[Any], auth_codes: list[int]
) -> Generation:
    """Register the three routes on ``app`` (the service must decode: ``service.generation``)."""
    assert service.generation is not None
    gen = Generation(service, service.generation)
    scheduler = service.generation
    codes = [*auth_codes, 400, 404, 413, 429, 503]

    async def failed(job: GenerationJob, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """The events, then ``[DONE]``. A stream that fails after its first byte can only say so in an
        event of its own; one whose client goes away is cancelled at once (not when collected)."""
        try:
            async for event in events:
                yield event
        except Exception:
            yield _sse(error_body(500, "internal error while decoding; see the server log"))
        finally:
            scheduler.cancel(job)  # rows that finished are gone already: nothing changes for them
        yield "data: [DONE]\n\n"

    @app.get(
        "/v1/models", response_model=ModelList, dependencies=secured, responses=openai_errors(*auth_codes)
    )
    async def models() -> dict[str, Any]:
        """The base model, then every adapter (``parent``: the base), in OpenAI's list shape."""
        card = {"object": "model", "created": gen.created, "owned_by": "lorakit", "root": gen.base}
        data = [{**card, "id": gen.base, "parent": None}]
        data += [{**card, "id": name, "parent": gen.base} for name in service.adapters]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        dependencies=secured,
        responses={200: {"content": {"text/event-stream": {}}}, **openai_errors(*codes)},
    )
    async def completions(body: CompletionRequest) -> Any:
        """Continue each prompt with the adapter ``model`` names; ``stream: true`` answers with server-sent
        events, one ``text_completion`` chunk per piece of text, then ``data: [DONE]``."""
        adapter = gen.adapter(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > gen.options.max_inputs:
            raise _invalid(
                f"{len(prompts)} prompts: give 1 to {gen.options.max_inputs} (--max-inputs)", "prompt"
            )
        for i, prompt in enumerate(prompts):
            gen.check_chars(prompt, "prompt" if isinstance(body.prompt, str) else f"prompt.{i}")
        max_tokens = gen.max_tokens(body.max_tokens, COMPLETION_DEFAULT_TOKENS)
        job = await gen.start(adapter, gen.encode(prompts, max_tokens, "prompt"), max_tokens, body)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                async for index, text, finish in _pieces(job, scheduler):
                    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                    yield _sse({**head, "choices": [choice]})
                if usage:
                    yield _sse({**head, "choices": [], "usage": _usage(job)})

            return _stream(failed(job, events()))
        texts, finishes = [""] * len(prompts), [None] * len(prompts)
        async for index, text, finish in _pieces(job, scheduler):
            texts[index] += text
            finishes[index] = finish  # type: ignore[call-overload]
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finishes, strict=True))
        ]
        return {**head, "choices": choices, "usage": _usage(job)}

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        dependencies=secured,
        responses={200: {"content": {"text/event-stream": {}}}, **openai_errors(*codes)},
    )
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        """The assistant's next turn after ``messages``, with the adapter ``model`` names; ``stream: true``
        answers with ``chat.completion.chunk`` events (the role first, then content), then ``[DONE]``."""
        adapter = gen.adapter(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise _invalid("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = gen.max_tokens(asked, gen.options.max_new_tokens)
        prompt = gen.chat_prompt(adapter, body)
        job = await gen.start(adapter, gen.encode([prompt], max_tokens, "messages"), max_tokens, body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunk = {**head, "object": "chat.completion.chunk"}

            def delta(content: dict[str, str], finish: str | None = None) -> str:
                return _sse(
                    {
                        **chunk,
                        "choices": [
                            {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
                        ],
                    }
                )

            async def events() -> AsyncIterator[str]:
                yield delta({"role": "assistant", "content": ""})
                async for _, text, finish in _pieces(job, scheduler):
                    if text:
                        yield delta({"content": text})
                    if finish is not None:
                        yield delta({}, finish)
                if usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(job)})

            return _stream(failed(job, events()))
        content, reason = "", None
        async for _, text, finish in _pieces(job, scheduler):
            content += text
            reason = finish or reason
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(job)}

    return gen
