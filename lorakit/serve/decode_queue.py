"""The event loop's side of mixed-adapter decoding: requests queue here, join the decoding batch at the
next step boundary when it has room (continuous batching), and get their text piece by piece.

One loop task drives ``DecodeEngine.step`` through the batcher's worker thread (``Batcher.call``), step
after step while rows are decoding, so a step never runs beside a ``/v1/predict`` batch or an adapter
change: those queue between steps. Before each step, requests waiting in order join while the batch has
room for all their rows (at most ``max_rows`` rows decode at once; a request larger than that runs when
the batch is empty). The queue is bounded in rows (``max_queue_rows``, as the batcher's): ``submit``
refuses past it (``QueueFull``). A request still waiting after the route's timeout is ``drop``-ped; one
that joined runs to its end unless ``cancel``-led (its client went away).

Metrics: generated tokens by model, time to first token (from the request's arrival), the time between
one row's tokens, the rows decoding and the rows waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from lorakit.serve.batcher import Batcher, QueueFull
from lorakit.serve.decoding import DecodeEngine, DecodeRow, Emitted
from lorakit.serve.metrics import Metrics

log = logging.getLogger("lorakit.serve")
BASE_LABEL = "(base)"  # the metrics' name for rows through the bare base model


@dataclass(eq=False)
class Piece:
    """Text for one row of a request; ``finish`` on the row's last piece."""

    index: int
    text: str
    finish: str | None


@dataclass(eq=False)  # compared by identity: deque.remove finds this very request
class GenerationJob:
    """One request's rows, the pieces of text they produce, and whether they joined the batch yet."""

    rows: Sequence[DecodeRow]
    pieces: asyncio.Queue[Piece | BaseException]
    admitted: asyncio.Future[None]
    arrived: float  # time.perf_counter()
    last_token: dict[int, float] = field(default_factory=dict)  # row index: when its last piece came
    left: int = 0  # rows not finished

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every prompt of the request."""
        return sum(len(r.prompt) for r in self.rows)


class DecodeScheduler:
    """Queues generation requests and drives the shared decoding batch."""

    def __init__(
        self,
        engine: DecodeEngine,
        batcher: Batcher,
        max_rows: int = 64,
        max_queue_rows: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.max_rows = max_rows
        self.max_queue_rows = max_queue_rows
        self.metrics = metrics
        self.queued_rows = 0
        self._waiting: deque[GenerationJob] = deque()
        self._active: set[DecodeRow] = set()  # rows in the batch, as this side knows them
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    async def start(self) -> None:
        """Start the decoding loop (in the running event loop)."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop; requests still waiting or decoding get an error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stopped = RuntimeError("the server is stopping")
        for job in list(self._waiting):
            job.pieces.put_nowait(stopped)
        for row in self._active:
            row.owner.pieces.put_nowait(stopped)

    def submit(self, rows: Sequence[DecodeRow]) -> GenerationJob:
        """Queue one request's rows; QueueFull, with nothing queued, past ``max_queue_rows``."""
        assert self._wake is not None, "start() the scheduler first"
        if self.max_queue_rows is not None and self.queued_rows + len(rows) > self.max_queue_rows:
            raise QueueFull(f"{self.queued_rows} rows queued, the limit is {self.max_queue_rows}")
        loop = asyncio.get_running_loop()
        job = GenerationJob(rows, asyncio.Queue(), loop.create_future(), time.perf_counter(), left=len(rows))
        for i, row in enumerate(rows):
            row.owner, row.index = job, i
        self._waiting.append(job)
        self._count(len(rows))
        self._wake.set()
        return job

    def drop(self, job: GenerationJob) -> bool:
        """Take a waiting request out of the queue; False once it has joined the batch."""
        if job.admitted.done():
            return False
        with contextlib.suppress(ValueError):
            self._waiting.remove(job)
            self._count(-len(job.rows))
        job.admitted.cancel()
        return True

    def cancel(self, job: GenerationJob) -> None:
        """Stop a request wherever it is: out of the queue, or out of the batch at the next step."""
        if not self.drop(job):
            for row in job.rows:
                row.cancelled = True  # read by the worker at the next step
                self._active.discard(row)
        self._gauges()

    def busy_with(self, adapter: str) -> bool:
        """Whether rows of ``adapter`` wait or decode."""
        return any(r.adapter == adapter for r in self._active) or any(
            r.adapter == adapter for job in self._waiting for r in job.rows
        )

    async def drain(self, adapter: str, poll_s: float = 0.01) -> None:
        """Wait until no row of ``adapter`` waits or decodes (before the adapter is unloaded)."""
        while self.busy_with(adapter):
            await asyncio.sleep(poll_s)

    def _count(self, rows: int) -> None:
        self.queued_rows += rows
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.generation_queue_rows.set(self.queued_rows)
            self.metrics.decoding_rows.set(len(self._active))

    def _joining(self) -> list[DecodeRow]:
        """The waiting requests that fit in the batch now, in order (the first one always, when the batch
        is empty): their rows join at this step."""
        rows: list[DecodeRow] = []
        room = self.max_rows - len(self._active)
        while self._waiting:
            job = self._waiting[0]
            if len(job.rows) > room and (self._active or rows):
                break
            self._waiting.popleft()
            self._count(-len(job.rows))
            if not job.admitted.done():
                job.admitted.set_result(None)
            room -= len(job.rows)
            rows += job.rows
        return rows

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            joining = self._joining()
            self._active.update(joining)
            self._gauges()
            try:
                emitted = await self.batcher.call(lambda joining=joining: self.engine.step(joining))
            except Exception as exc:  # the rows in the batch are lost; the loop goes on with new ones
                log.exception("a decoding step over %d rows failed", len(self._active))
                await self.batcher.call(self.engine.reset)
                for row in self._active:
                    row.owner.pieces.put_nowait(exc)
                self._active.clear()
                self._gauges()
                continue
            self.steps += 1
            if self.metrics is not None:
                self.metrics.step_rows.observe(len(self._active))
            self._deliver(emitted)

    def _deliver(self, emitted: list[Emitted]) -> None:
        now = time.perf_counter()
        tokens: Counter[str] = Counter()
        for item in emitted:
            row, job = item.row, item.row.owner
            if row.cancelled:
                continue
            tokens[row.adapter or BASE_LABEL] += 1
            if self.metrics is not None:
                before = job.last_token.get(row.index)
                if before is None:
                    self.metrics.time_to_first_token.observe(now - job.arrived)
                else:
                    self.metrics.inter_token.observe(now - before)
            job.last_token[row.index] = now
            if item.text or item.finish is not None:
                job.pieces.put_nowait(Piece(row.index, item.text, item.finish))
            if item.finish is not None:
                self._active.discard(row)
        if self.metrics is not None:
            for name, n in tokens.items():
                self.metrics.generated_tokens.labels(name).inc(n)
        self._gauges()


def scheduler_for(
    predictor: object, batcher: Batcher, max_rows: int, max_queue_rows: int | None, metrics: Metrics | None
) -> DecodeScheduler | None:
    """The decoding scheduler of a ``Predictor`` of generation adapters; None for classifiers, or for a
    ``MergedPredictor`` (one merged model per adapter: nothing to mix in one batch)."""
    from lorakit.predict import Predictor

    if not isinstance(predictor, Predictor) or not predictor.generation:
        return None
    tokenizer = predictor.tokenizer
    engine = DecodeEngine(predictor.model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return DecodeScheduler(engine, batcher, max_rows, max_queue_rows, metrics)
