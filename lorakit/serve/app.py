"""The HTTP API of ``lorakit serve``: a FastAPI app over one predictor and its batcher.

    POST   /v1/predict          {"adapter": NAME, "inputs": [{"text": ..., "text_pair": ...}]}
    GET    /v1/adapters         the adapters loaded (paths relative to --adapter-root, never absolute)
    POST   /v1/adapters         {"name": NAME, "path": DIR under --adapter-root}: load one more (admin)
    DELETE /v1/adapters/NAME    unload one, after the requests queued for it (admin)
    GET    /metrics             Prometheus text format
    POST   /v1/completions      OpenAI-compatible generation (a server of generation adapters only;
    POST   /v1/chat/completions   ``openai_routes``), decoded in one mixed-adapter batch
    GET    /v1/models
    GET    /health              200 once the base and its adapters are loaded; never needs a key

Layers, outermost first: request ids, latency metrics and 500s (``asgi``); API keys (``auth``); the
queue's gate and the body limit (``limits``); the routes. Every error body is ``{"detail": "<one line>"}``;
``schemas.ERRORS`` says which status means what, and the OpenAPI schema lists them route by route with
the bearer scheme. The OpenAI-compatible routes answer errors in OpenAI's shape instead
(``openai_errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import UserError
from lorakit.lora import BrokenFileError
from lorakit.predict import Row, check_prompts
from lorakit.serve import admin
from lorakit.serve.asgi import RequestMiddleware
from lorakit.serve.auth import AuthMiddleware, Keys, Principal
from lorakit.serve.batcher import QueueFull
from lorakit.serve.limits import (
    RETRY_AFTER,
    BodyLimitMiddleware,
    QueueGate,
    Rejected,
    busy_detail,
    check_inputs,
)
from lorakit.serve.openai_errors import OPENAI_PATHS, OpenAIErrorShape, openai_answer
from lorakit.serve.schemas import (
    AdapterInfo,
    AdapterList,
    Health,
    LoadRequest,
    PredictRequest,
    PredictResponse,
    errors,
)
from lorakit.serve.service import Service

log = logging.getLogger("lorakit.serve")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _validation_detail(exc: RequestValidationError) -> str:
    found = exc.errors()
    first = found[0] if found else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return _one_line(f"{where}: {first.get('msg')}{more}")[:500]


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving ``service``; its lifespan starts and stops the batcher."""
    options, metrics = service.options, service.metrics
    keys = Keys(options.api_keys, options.admin_keys)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        if service.generation is not None:
            await service.generation.start()
        log.info("serving adapters: %s", ", ".join(service.adapters) or "none")
        yield
        if service.generation is not None:
            await service.generation.stop()
        await service.batcher.stop()

    app = FastAPI(
        title="lorakit serve",
        summary="Many LoRA task adapters on one base model, answered from shared mixed-task batches.",
        lifespan=lifespan,
    )
    # The middleware added last runs first: request ids and metrics, keys, the queue's gate, the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes, metrics=metrics)
    batcher, generation = service.batcher, service.generation
    app.add_middleware(
        QueueGate,
        queued=lambda: batcher.queued_rows,
        limit=options.max_queue_rows,
        max_bytes=options.max_body_bytes,
        metrics=metrics,
        # Generation requests wait in the decoding queue, bounded by the same --max-queue-rows.
        paths={p: (lambda: generation.queued_rows) for p in ("/v1/completions", "/v1/chat/completions")}
        if generation is not None
        else None,
    )
    public = {("GET", "/health")} | ({("GET", "/metrics")} if options.public_metrics else set())
    app.add_middleware(AuthMiddleware, keys=keys, public=public, metrics=metrics)
    app.add_middleware(RequestMiddleware, metrics=metrics)
    app.add_middleware(OpenAIErrorShape)  # outermost: it reshapes every layer's errors on its paths
    # The middleware enforces the keys; this dependency puts the bearer scheme into the OpenAPI schema.
    secured = [Depends(HTTPBearer(auto_error=False))] if keys.on else []
    secured_metrics = [] if options.public_metrics else secured

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject("invalid")
        if request.url.path in OPENAI_PATHS:  # OpenAI's convention: a body that does not fit is a 400
            found = exc.errors()
            loc = [str(p) for p in (found[0].get("loc", ()) if found else ()) if p != "body"]
            return openai_answer(400, _validation_detail(exc), param=".".join(loc) or None)
        return JSONResponse({"detail": _validation_detail(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, Rejected):
            metrics.reject(exc.reason)
        detail = admin.scrub(_one_line(exc.detail), options.adapter_root)[:500]
        if request.url.path in OPENAI_PATHS:
            param, code = getattr(exc, "param", None), getattr(exc, "code", None)
            return openai_answer(exc.status_code, detail, exc.headers, param, code)
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    def unknown(name: str) -> Rejected:
        served = ", ".join(service.adapters) or "none"
        return Rejected(404, "unknown_adapter", f"unknown adapter {name!r} (served: {served})")

    @app.get("/health", response_model=Health, responses=errors())
    async def health() -> dict[str, Any]:
        """200 once the base model and its adapters are loaded (the server listens only then)."""
        return {"status": "ok", "adapters": len(service.adapters)}

    @app.get(
        "/metrics",
        dependencies=secured_metrics,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics."},
            **errors(*([401] if secured_metrics else [])),
        },
        response_class=Response,
    )
    async def prometheus() -> Response:
        """Prometheus text format: queue rows, batch rows, latency by route and status, rows by adapter,
        rejected requests by reason, adapters loaded."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    auth_codes = [401] if keys.on else []

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=secured,
        responses=errors(*auth_codes, 404, 413, 422, 429, 503),
    )
    async def predict(body: PredictRequest) -> dict[str, Any]:
        """Predict every input with one adapter; rows of concurrent requests share batches."""
        check_inputs(body.inputs, options.max_inputs, options.max_input_chars)
        source = service.sources.get(body.adapter)
        if source is None:
            raise unknown(body.adapter)
        rows = [
            Row(body.adapter, row.text, row.text_pair, f"inputs[{i}]") for i, row in enumerate(body.inputs)
        ]
        try:
            check_prompts({body.adapter: source}, rows)  # generation prompts; nothing for classifiers
        except UserError as exc:
            raise Rejected(422, "invalid", str(exc)) from None
        try:
            # Queued before this handler yields: a DELETE that comes later finds it in the queue.
            queued = service.batcher.submit(rows)
        except QueueFull:
            detail = busy_detail(service.batcher.queued_rows, options.max_queue_rows)
            raise Rejected(429, "queue_full", detail, dict(RETRY_AFTER)) from None
        try:
            outputs = await asyncio.wait_for(asyncio.shield(queued.future), options.request_timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            if service.batcher.drop(queued):
                limit = f"{options.request_timeout_s:g} s (--request-timeout-s)"
                raise Rejected(503, "timeout", f"queued longer than {limit}; dropped") from None
            outputs = await queued.future  # started already: it is answered
        return {"adapter": body.adapter, "outputs": outputs}

    @app.get("/v1/adapters", response_model=AdapterList, dependencies=secured, responses=errors(*auth_codes))
    async def list_adapters() -> dict[str, Any]:
        """The adapters loaded, in loading order."""
        return {"adapters": [service.public_info(info) for info in service.adapters.values()]}

    def administrator(request: Request, action: str, name: str, path: str | None) -> Principal:
        principal: Principal = request.state.principal
        refusal = None
        if options.adapter_root is None:
            refusal = "adapter administration is off: start the server with --adapter-root DIR"
        elif not principal.admin:
            refusal = "this key may not load or unload adapters: use an --admin-key"
        if refusal is not None:
            admin.record(principal.key_id, action, name, path, f"refused (403: {refusal})")
            raise Rejected(403, "forbidden", refusal)
        return principal

    admin_codes = [*auth_codes, 403]

    @app.post(
        "/v1/adapters",
        response_model=AdapterInfo,
        status_code=201,
        dependencies=secured,
        responses=errors(*admin_codes, 409, 413, 422),
    )
    async def load_adapter(body: LoadRequest, request: Request) -> dict[str, Any]:
        """Load one more adapter from a directory under --adapter-root (it must share the base); requests
        may name it once this answers."""
        who = administrator(request, "load", body.name, body.path).key_id
        assert options.adapter_root is not None
        try:
            if body.name in service.adapters or body.name in service.loading:
                raise Rejected(409, "conflict", f"an adapter named {body.name!r} is loaded already")
            if len(service.adapters) + len(service.loading) >= options.max_adapters:
                limit = f"{options.max_adapters} adapters are loaded (--max-adapters); unload one first"
                raise Rejected(409, "conflict", limit)
            directory = admin.contained_adapter_dir(options.adapter_root, body.path)
            service.loading.add(body.name)
            try:
                source, info = await service.batcher.call(lambda: service.load(body.name, directory))
            except (UserError, BrokenFileError) as exc:
                raise Rejected(422, "invalid", str(exc)) from None
            finally:
                service.loading.discard(body.name)
        except Rejected as exc:
            admin.record(who, "load", body.name, body.path, f"refused ({exc.status_code})")
            raise
        service.sources[body.name] = source
        service.adapters[body.name] = info
        metrics.adapters.set(len(service.adapters))
        admin.record(who, "load", body.name, body.path, f"loaded ({info['bytes']} bytes)")
        return service.public_info(info)

    @app.delete(
        "/v1/adapters/{name}",
        response_model=AdapterInfo,
        dependencies=secured,
        responses=errors(*admin_codes, 404),
    )
    async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
        """Unload an adapter: requests already queued for it finish first, later ones get 404."""
        who = administrator(request, "unload", name, None).key_id
        if name not in service.adapters:
            admin.record(who, "unload", name, None, "refused (404)")
            raise unknown(name)
        info = service.adapters.pop(name)
        del service.sources[name]
        if service.generation is not None:  # rows decoding with it finish first (new ones get 404 now)
            await service.generation.drain(name)
        await service.batcher.call(lambda: service.predictor.remove(name))
        metrics.adapters.set(len(service.adapters))
        metrics.forget_adapter(name)
        admin.record(who, "unload", name, None, "unloaded")
        return service.public_info(info)

    if service.generation is not None:
        from lorakit.serve.openai_routes import add_openai_routes

        add_openai_routes(app, service, secured, auth_codes)
    return app
