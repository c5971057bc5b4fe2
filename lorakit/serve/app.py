"""The HTTP API of ``lorakit serve``: a FastAPI app over one predictor and its batcher.

    POST   /v1/predict          {"adapter": NAME, "inputs": [{"text": ..., "text_pair": ...}]}
    GET    /v1/adapters         the adapters loaded
    POST   /v1/adapters         {"name": NAME, "path": RUN_DIR}: load one more while serving
    DELETE /v1/adapters/NAME    unload one (requests queued for it before finish first)
    GET    /health              200 once the base and its adapters are loaded

Every error body is ``{"detail": "<one line>"}``: 404 an unknown adapter, 409 a name already loaded, 413 more
inputs than the limit, 422 a body that does not match the schema (or an adapter directory that does not fit
the base), 500 a failure while predicting; the server goes on serving after each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import UserError
from lorakit.lora import BrokenFileError
from lorakit.predict import AdapterSource, MergedPredictor, Predictor, Row, check_prompts, read_source
from lorakit.serve.batcher import Batcher

log = logging.getLogger("lorakit.serve")
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
    """A loaded adapter: its directory, task, head, LoRA shape and the bytes its own tensors take."""

    name: str
    path: str
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
    """An adapter to load: its name and its run (or PEFT adapter) directory on the server's disk."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    path: str = Field(min_length=1)


@dataclass
class Service:
    """What the app serves: the predictor (touched on the batcher's worker thread only) and, on the event
    loop's side, the adapters requests may name."""

    predictor: Predictor | MergedPredictor
    batcher: Batcher
    base: str | None = None  # --base as given, for PEFT directories loaded later
    max_inputs: int = 1024
    sources: dict[str, AdapterSource] = field(default_factory=dict)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.sources = dict(self.predictor.sources)
        self.adapters = {name: dict(info) for name, info in self.predictor.info.items()}

    def load(self, name: str, path: str) -> tuple[AdapterSource, dict[str, Any]]:
        """Read and load one adapter (on the worker thread); UserError when it does not fit."""
        source = read_source(f"{name}={path}", self.base, None, where=f"adapter {name!r} ({path})")
        self.predictor.add(source)
        return source, dict(self.predictor.info[name])


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _validation_detail(exc: RequestValidationError) -> str:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _one_line(f"{where}: {first.get('msg')}{more}")


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving ``service``; its lifespan starts and stops the batcher."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        log.info("serving adapters: %s", ", ".join(service.adapters) or "none")
        yield
        await service.batcher.stop()

    app = FastAPI(
        title="lorakit serve",
        summary="Many LoRA task adapters on one base model, answered from shared mixed-task batches.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": _one_line(f"{type(exc).__name__}: {exc}")[:500]}, 500)

    def unknown(name: str) -> HTTPException:
        served = ", ".join(service.adapters) or "none"
        return HTTPException(404, f"unknown adapter {name!r} (served: {served})")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """200 once the base model and its adapters are loaded (the server listens only then)."""
        return {"status": "ok", "adapters": len(service.adapters)}

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest) -> dict[str, Any]:
        """Predict every input with one adapter; rows of concurrent requests share batches."""
        if len(body.inputs) > service.max_inputs:
            raise HTTPException(
                413,
                f"{len(body.inputs)} inputs, more than the limit of {service.max_inputs} (--max-inputs)",
            )
        source = service.sources.get(body.adapter)
        if source is None:
            raise unknown(body.adapter)
        rows = [
            Row(body.adapter, row.text, row.text_pair, f"inputs[{i}]") for i, row in enumerate(body.inputs)
        ]
        try:
            check_prompts({body.adapter: source}, rows)  # generation prompts; nothing for classifiers
        except UserError as exc:
            raise HTTPException(422, str(exc)) from None
        # Queued before this handler yields: a DELETE that comes later finds it in the queue.
        outputs = await service.batcher.predict(rows)
        return {"adapter": body.adapter, "outputs": outputs}

    @app.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters() -> dict[str, Any]:
        """The adapters loaded, in loading order."""
        return {"adapters": list(service.adapters.values())}

    @app.post("/v1/adapters", response_model=AdapterInfo, status_code=201)
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        """Load one more adapter beside the others (it must share their base); requests may name it once
        this answers."""
        if body.name in service.adapters or body.name in service.loading:
            raise HTTPException(409, f"an adapter named {body.name!r} is loaded already")
        service.loading.add(body.name)
        try:
            source, info = await service.batcher.call(lambda: service.load(body.name, body.path))
        except (UserError, BrokenFileError) as exc:
            raise HTTPException(422, str(exc)) from None
        finally:
            service.loading.discard(body.name)
        service.sources[body.name] = source
        service.adapters[body.name] = info
        log.info("loaded adapter %s from %s (%d bytes)", body.name, body.path, info["bytes"])
        return info

    @app.delete("/v1/adapters/{name}", response_model=AdapterInfo)
    async def unload_adapter(name: str) -> dict[str, Any]:
        """Unload an adapter: requests already queued for it finish first, later ones get 404."""
        if name not in service.adapters:
            raise unknown(name)
        info = service.adapters.pop(name)
        del service.sources[name]
        await service.batcher.call(lambda: service.predictor.remove(name))
        log.info("unloaded adapter %s", name)
        return info

    return app
