"""Dynamic batching across tasks: rows of concurrent requests, whatever their adapters, gathered into one
mixed-task forward pass, run on one worker thread so that the event loop keeps accepting requests.

A batch starts with the oldest waiting request and takes every request queued behind it, in order, up to
``max_batch_size`` rows; it waits for more only until the oldest request has waited ``max_wait_ms``. While
the model computes, new requests queue up, and the next batch takes them at once. A request larger than
``max_batch_size`` runs alone (in chunks of that size). Changes to the adapter set (``call``) queue with
the requests: everything queued before one runs first, nothing queued after it runs before it is done.

The queue is bounded in rows (``max_queue_rows``): ``submit`` refuses a request that would pass the bound
(``QueueFull``) rather than queue it, and ``drop`` takes a request that has not started out of the queue
(a request timed out): the rows held waiting never exceed the bound, whatever the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from lorakit.predict import Output, Row
from lorakit.serve.metrics import Metrics

log = logging.getLogger("lorakit.serve")


class RowPredictor(Protocol):
    """What the batcher drives: ``Predictor`` or ``MergedPredictor``."""

    def predict(self, rows: Sequence[Row], batch_size: int = 64) -> list[Output]: ...


class QueueFull(Exception):
    """The queue holds too many rows to take a request now."""


@dataclass(eq=False)  # compared by identity: deque.remove finds this very request
class _Request:
    rows: Sequence[Row]
    future: asyncio.Future[list[Output]]
    queued: float  # loop time
    started: bool = False  # in a batch on the worker thread: no longer droppable
    released: bool = False  # its rows no longer count as queued


@dataclass
class _Call:
    action: Callable[[], Any]
    future: asyncio.Future[Any]


@dataclass
class Summary:
    """What was served since the last summary line."""

    rows: int = 0
    batches: int = 0
    largest: int = 0
    waits_ms: list[float] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One log line: rows/s, batch sizes and queue wait."""
        seconds = max(time.monotonic() - self.since, 1e-9)
        waits = sorted(self.waits_ms) or [0.0]
        p50, p99 = waits[len(waits) // 2], waits[min(len(waits) - 1, int(0.99 * len(waits)))]
        mean = self.rows / self.batches if self.batches else 0.0
        return (
            f"{self.rows} rows in {self.batches} batches over {seconds:.0f} s "
            f"({self.rows / seconds:.1f} rows/s); "
            f"batch size mean {mean:.1f}, max {self.largest}; queue wait p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )


class Batcher:
    """Gathers the rows of concurrent requests into shared batches for one predictor."""

    def __init__(
        self,
        predictor: RowPredictor,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        summary_every_s: float = 60.0,
        max_queue_rows: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be at least 1 and max_wait_ms at least 0")
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.summary_every_s = summary_every_s
        self.summary = Summary()
        self.max_queue_rows = max_queue_rows
        self.metrics = metrics
        self.queued_rows = 0  # rows of requests queued and not started (nor dropped)
        # One thread: the model is never run by two threads at once, and adapter changes never race a batch.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-model")
        self._items: deque[_Request | _Call] = deque()
        self._ready: asyncio.Event | None = None  # set when an item is queued
        self._held: _Request | _Call | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start gathering batches (in the running event loop)."""
        self._ready = asyncio.Event()
        self._tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._summaries())]

    async def stop(self) -> None:
        """Finish what is queued, then stop the loop tasks and the worker thread."""
        if self._ready is not None:
            await self.call(lambda: None)  # queued behind every request still waiting
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._worker.shutdown(wait=True)
        if self.summary.rows:
            log.info("served %s", self.summary.line())

    def submit(self, rows: Sequence[Row]) -> _Request:
        """Queue ``rows`` now (in call order); the request's future gives one output per row, in order.
        QueueFull, with nothing queued, when they would take the queue past ``max_queue_rows``."""
        assert self._ready is not None, "start() the batcher first"
        if self.max_queue_rows is not None and self.queued_rows + len(rows) > self.max_queue_rows:
            raise QueueFull(f"{self.queued_rows} rows queued, the limit is {self.max_queue_rows}")
        loop = asyncio.get_running_loop()
        request = _Request(rows, loop.create_future(), loop.time())
        self.queued_rows += len(rows)
        self._gauge()
        self._put(request)
        return request

    def predict(self, rows: Sequence[Row]) -> asyncio.Future[list[Output]]:
        """``submit``'s future alone."""
        return self.submit(rows).future

    def drop(self, request: _Request) -> bool:
        """Take a request out of the queue unless it has started (then False: it will be answered)."""
        if request.started:
            return False
        with contextlib.suppress(ValueError):
            self._items.remove(request)
        if self._held is request:
            self._held = None
        self._release(request)
        request.future.cancel()
        return True

    def call(self, action: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``action`` on the worker thread after everything queued so far; the future gives its result."""
        assert self._ready is not None, "start() the batcher first"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put(_Call(action, future))
        return future

    def _put(self, item: _Request | _Call) -> None:
        assert self._ready is not None
        self._items.append(item)
        self._ready.set()

    def _release(self, request: _Request) -> None:
        if not request.released:
            request.released = True
            self.queued_rows -= len(request.rows)
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_rows.set(self.queued_rows)

    async def _next(self, timeout: float | None) -> _Request | _Call | None:
        """The next item (None when ``timeout`` seconds pass first); dropped requests are skipped."""
        assert self._ready is not None
        if self._held is not None:
            item, self._held = self._held, None
            return item
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            while self._items:
                item = self._items.popleft()
                if isinstance(item, _Call) or not item.future.done():
                    return item
                self._release(item)  # answered already (its client went away)
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), left)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                return None

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if isinstance(first, _Call):
                await self._run_call(first)
                continue
            assert first is not None
            batch, rows = [first], len(first.rows)
            while rows < self.max_batch_size:
                item = await self._next(first.queued + self.max_wait - loop.time())
                if item is None:
                    break
                if isinstance(item, _Call) or rows + len(item.rows) > self.max_batch_size:
                    self._held = item  # the next batch's first, or a change that waits for this batch
                    break
                batch.append(item)
                rows += len(item.rows)
            await self._run_batch(batch)

    async def _run_call(self, call: _Call) -> None:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._worker, call.action)
        except Exception as exc:  # the caller reports it; the loop goes on
            _settle(call.future, error=exc)
        else:
            _settle(call.future, result)

    async def _run_batch(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        for request in batch:
            self._release(request)
        live = [r for r in batch if not r.future.done()]  # dropped, or its client went away
        if not live:
            return
        for request in live:
            request.started = True
        rows = [row for request in live for row in request.rows]
        started = loop.time()
        waits = [(started - r.queued) * 1000 for r in live]
        try:
            outputs = await loop.run_in_executor(
                self._worker, lambda: self.predictor.predict(rows, self.max_batch_size)
            )
        except Exception as exc:
            log.exception("a batch of %d rows failed", len(rows))
            for request in live:
                _settle(request.future, error=exc)
            return
        seconds = loop.time() - started
        offset = 0
        for request in live:
            _settle(request.future, outputs[offset : offset + len(request.rows)])
            offset += len(request.rows)
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(rows))
            for name, n in Counter(r.adapter for r in rows).items():
                self.metrics.rows.labels(name).inc(n)
        self.summary.rows += len(rows)
        self.summary.batches += 1
        self.summary.largest = max(self.summary.largest, len(rows))
        self.summary.waits_ms += waits
        if log.isEnabledFor(logging.DEBUG):
            tasks = ", ".join(f"{name} {n}" for name, n in Counter(r.adapter for r in rows).items())
            log.debug(
                "batch: %d rows from %d requests (%s); queue wait max %.1f ms; compute %.1f ms",
                len(rows), len(live), tasks, max(waits), seconds * 1000,
            )  # fmt: skip

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.summary_every_s)
            if self.summary.rows:
                log.info("served %s", self.summary.line())
            self.summary = Summary()


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
