"""Adaptive dynamic batching for one model version.

Requests queue by priority (critical, standard, batch) and run together, up
to ``max_batch_size`` rows, on ``instances`` worker threads. While every
instance is busy, rows simply accumulate and the next free instance takes
them all: batches grow with load without anyone waiting on purpose. When an
instance is free, the batcher waits for more rows only while that pays off:
it learns a batch's latency as ``fixed + per_row * rows`` from the batches it
runs (as BentoML's dispatcher does), estimates the arrival rate, and waits
for the next row only if the rows already queued lose less time waiting for
it than the batch's fixed cost it saves (``queued / rate < fixed``), and never
past ``max_wait_ms``. A lone request at low load therefore runs at once.

Admission is immediate: a queue over ``max_queue_rows`` is a 429, and a
request whose deadline the queue cannot meet (from the measured drain rate)
a 503, both with Retry-After, before it waits. A request larger than
``max_batch_size`` rows is split and its parts answered together.

The autoscaler sizes ``instances`` with the load (``resize``): more threads
start at once; fewer take effect as running batches finish (a batch is never
cut). ``busy_s`` (model time summed over instances) gives its compute share.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from llmserve.settings import PRIORITIES, PredictSettings
from router.predict.errors import Overloaded
from router.predict.runtimes import Runtime

MAX_INSTANCES = 64


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True  # off: every request runs alone, as it came
    max_batch_size: int = 1024  # rows
    max_wait_ms: float = 2.0
    adaptive: bool = True  # off: always wait up to max_wait_ms for a full batch
    instances: int = 1  # worker threads running batches at once
    max_queue_rows: int = 65536
    default_deadline_ms: float | None = None  # requests without their own deadline

    @classmethod
    def from_settings(cls, predict: PredictSettings) -> BatchingConfig:
        return cls(enabled=predict.batching, max_batch_size=predict.max_batch_size, max_wait_ms=predict.max_wait_ms,
                   adaptive=predict.adaptive, instances=predict.instances, max_queue_rows=predict.max_queue_rows,
                   default_deadline_ms=predict.default_deadline_ms)


class BatchObserver(Protocol):
    def batch_done(self, rows: int, queue_s: list[float], compute_s: float) -> None: ...


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    deadline: float | None


@dataclass
class LatencyModel:
    """Batch latency as ``fixed + per_row * rows``, least squares over recent batches."""

    window: int = 128
    samples: collections.deque[tuple[int, float]] = field(default_factory=lambda: collections.deque(maxlen=128))
    fixed_s: float = 0.0002
    per_row_s: float = 0.00001

    def observe(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, seconds))
        if len(self.samples) < 8:
            return
        xs = np.fromiter((r for r, _ in self.samples), float)
        ys = np.fromiter((s for _, s in self.samples), float)
        if xs.std() > 0:
            slope, intercept = np.polyfit(xs, ys, 1)
            self.per_row_s = max(float(slope), 1e-8)
            self.fixed_s = max(float(intercept), 0.0)
        else:
            self.fixed_s = max(float(ys.mean() - self.per_row_s * xs[0]), 0.0)

    def estimate(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows


class DynamicBatcher:
    def __init__(self, runtime: Runtime, config: BatchingConfig, observer: BatchObserver | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self.latency = LatencyModel()
        self._runtime = runtime
        self._observer = observer
        self._clock = clock
        self._queues: dict[str, collections.deque[_Item]] = {p: collections.deque() for p in PRIORITIES}
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._free = asyncio.Semaphore(config.instances)
        # threads start on demand, as many as batches run at once (the permits say how many may)
        self._executor = ThreadPoolExecutor(MAX_INSTANCES, thread_name_prefix="predict")
        self._running: set[asyncio.Task[None]] = set()
        self._rate_rows_per_s = 0.0
        self._last_arrival: float | None = None
        self._drain_rows_per_s = 0.0  # measured throughput, for Retry-After and deadlines
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self.busy_s = 0.0  # model time run, summed over the instances (the autoscaler's compute share)
        self._withheld: list[asyncio.Future[bool]] = []  # permits taken out of use by a resize down

    @property
    def instances(self) -> int:
        return self.config.instances

    def resize(self, instances: int) -> None:
        """Run batches on ``instances`` threads from now on (at least one)."""
        instances = max(1, instances)
        change = instances - self.config.instances
        if change == 0:
            return
        self.config = dataclasses.replace(self.config, instances=instances)
        if change > 0:
            for _ in range(change):
                if self._withheld:  # undo a resize down: its permit back, or its pending take stopped
                    withheld = self._withheld.pop()
                    withheld.cancel()
                    withheld.add_done_callback(lambda task: None if task.cancelled() else self._free.release())
                else:
                    self._free.release()
        else:
            for _ in range(-change):  # each takes one permit as a running batch frees it, and keeps it
                self._withheld.append(asyncio.ensure_future(self._free.acquire()))

    # -- submitting -----------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def submit(self, inputs: dict[str, np.ndarray], priority: str = "standard",
                     deadline_ms: float | None = None) -> dict[str, np.ndarray]:
        if self._closed:
            raise Overloaded(503, "this model version is being retired", 1)
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="predict batcher")
        rows = len(next(iter(inputs.values())))
        self._admit(rows, deadline_ms if deadline_ms is not None else self.config.default_deadline_ms)
        limit = self.config.max_batch_size if self.config.enabled else max(rows, 1)
        if rows <= limit:
            return await self._enqueue(inputs, rows, priority, deadline_ms)
        parts = [{k: v[i:i + limit] for k, v in inputs.items()} for i in range(0, rows, limit)]
        results = await asyncio.gather(*(self._enqueue(p, len(next(iter(p.values()))), priority, deadline_ms)
                                         for p in parts))
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    def _admit(self, rows: int, deadline_ms: float | None) -> None:
        drain = self._drain_rows_per_s or 1 / self.latency.per_row_s
        if self._queued_rows + rows > self.config.max_queue_rows:
            raise Overloaded(429, f"the queue holds {self._queued_rows} rows (bound {self.config.max_queue_rows})",
                             (self._queued_rows + rows) / drain)
        if deadline_ms is not None:
            expected_s = self._queued_rows / drain + self.latency.estimate(min(rows, self.config.max_batch_size))
            if expected_s * 1000 > deadline_ms:
                raise Overloaded(503, f"the queue needs about {expected_s * 1000:.0f} ms, past the "
                                      f"{deadline_ms:.0f} ms deadline", expected_s)

    def _enqueue(self, inputs: dict[str, np.ndarray], rows: int, priority: str,
                 deadline_ms: float | None) -> asyncio.Future[dict[str, np.ndarray]]:
        now = self._clock()
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        deadline = now + deadline_ms / 1000 if deadline_ms is not None else None
        self._queues[priority if priority in self._queues else "standard"].append(
            _Item(inputs, rows, future, now, deadline))
        self._queued_rows += rows
        if self._last_arrival is not None:
            gap = max(now - self._last_arrival, 1e-6)
            self._rate_rows_per_s = 0.9 * self._rate_rows_per_s + 0.1 * (rows / gap)
        self._last_arrival = now
        self._arrived.set()
        return future

    # -- dispatching ----------------------------------------------------------

    def _oldest(self) -> _Item | None:
        heads = [q[0] for q in self._queues.values() if q]
        return min(heads, key=lambda item: item.enqueued) if heads else None

    def _worth_waiting(self) -> float:
        """Seconds to wait for more rows before dispatching; 0: dispatch now."""
        cfg = self.config
        oldest = self._oldest()
        if oldest is None or not cfg.enabled or self._queued_rows >= cfg.max_batch_size:
            return 0.0
        left = cfg.max_wait_ms / 1000 - (self._clock() - oldest.enqueued)
        if left <= 0:
            return 0.0
        if not cfg.adaptive:
            return left
        rate = self._rate_rows_per_s
        if rate <= 0 or self._queued_rows / rate >= self.latency.fixed_s:
            return 0.0
        return min(left, 1 / rate)

    async def _dispatch(self) -> None:
        while True:
            await self._free.acquire()
            while self._queued_rows == 0:
                self._arrived.clear()
                await self._arrived.wait()
            while (wait := self._worth_waiting()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            batch = self._take()
            if not batch:
                self._free.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Item]:
        limit = self.config.max_batch_size if self.config.enabled else None
        batch: list[_Item] = []
        rows = 0
        now = self._clock()
        for queue in self._queues.values():
            while queue:
                item = queue[0]
                if limit is not None and batch and rows + item.rows > limit:
                    return batch
                queue.popleft()
                self._queued_rows -= item.rows
                if item.future.done():  # the caller went away
                    continue
                if item.deadline is not None and now > item.deadline:
                    retry_s = self._queued_rows / max(self._drain_rows_per_s, 1)
                    item.future.set_exception(Overloaded(503, "the request waited past its deadline", retry_s))
                    continue
                batch.append(item)
                rows += item.rows
                if limit is None:
                    return batch
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        started = self._clock()
        try:
            loop = asyncio.get_running_loop()
            try:
                outputs, compute_s = await loop.run_in_executor(self._executor, self._compute, batch)
            except Exception as exc:  # the runtime failed on this batch: every caller hears why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            offset = 0
            for item in batch:
                part = {name: value[offset:offset + item.rows] for name, value in outputs.items()}
                offset += item.rows
                if not item.future.done():
                    item.future.set_result(part)
            rows = offset
            self.latency.observe(rows, compute_s)
            self.busy_s += compute_s
            elapsed = max(self._clock() - started, 1e-6)
            self._drain_rows_per_s = 0.8 * self._drain_rows_per_s + 0.2 * (rows / elapsed * self.config.instances) \
                if self._drain_rows_per_s else rows / elapsed * self.config.instances
            if self._observer is not None:
                self._observer.batch_done(rows, [started - item.enqueued for item in batch], compute_s)
        finally:
            self._free.release()

    def _compute(self, batch: list[_Item]) -> tuple[dict[str, np.ndarray], float]:
        started = time.perf_counter()
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}
        outputs = self._runtime.predict(inputs)
        return outputs, time.perf_counter() - started

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests; finish what is queued and running (bounded); free the threads."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._queued_rows or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for withheld in self._withheld:
            withheld.cancel()
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(Overloaded(503, "this model version was retired", 1))
        self._executor.shutdown(wait=False)
