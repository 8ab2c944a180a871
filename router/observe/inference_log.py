"""Inference logs written in batches, off the request path.

``submit`` only appends to an in-memory buffer (never blocks, never awaits);
one background loop writes what has gathered every ``flush_interval_s`` or
every ``max_batch`` rows, whichever comes first, and once a day drops the
partitions older than the retention. If the store falls behind and the
buffer fills, the oldest rows are dropped and counted: serving requests
matters more than logging them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

from router.store import InferenceLog, Store

logger = logging.getLogger(__name__)


class InferenceLogWriter:
    def __init__(
        self,
        store: Store,
        max_batch: int = 500,
        flush_interval_s: float = 0.5,
        max_buffer: int = 100_000,
        retention_days: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._flush_interval_s = flush_interval_s
        self._retention_days = retention_days
        self._clock = clock
        self._buffer: collections.deque[InferenceLog] = collections.deque(maxlen=max_buffer)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_purge_day = ""
        self.dropped = 0
        self.written = 0

    def submit(self, log: InferenceLog) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1  # the deque drops the oldest row as this one goes in
        self._buffer.append(log)
        if len(self._buffer) >= self._max_batch:
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inference log writer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> None:
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self._max_batch, len(self._buffer)))]
            await self._store.write_inference_logs(batch)
            self.written += len(batch)

    async def _run(self) -> None:
        while True:
            # 1. wait for a full batch or the flush interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._flush_interval_s)
            self._wakeup.clear()
            # 2. write what has gathered; 3. apply the retention once a day
            try:
                await self.flush()
                await self._purge_if_new_day()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("writing inference logs failed; will retry (%d rows buffered)", len(self._buffer))

    async def _purge_if_new_day(self) -> None:
        today = time.strftime("%Y%m%d", time.gmtime(self._clock()))
        if today == self._last_purge_day:
            return
        cutoff = time.strftime("%Y%m%d", time.gmtime(self._clock() - self._retention_days * 86400))
        dropped = await self._store.drop_inference_logs_before(cutoff)
        if dropped:
            logger.info("inference logs: dropped day partitions %s (retention %d days)", dropped, self._retention_days)
        self._last_purge_day = today
