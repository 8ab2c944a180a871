"""Inference logs written in batches, off the request path.

``submit`` only appends to an in-memory buffer (never blocks, never awaits);
one background loop writes what has gathered every ``flush_interval_s`` or
every ``max_batch`` rows, whichever comes first, and once a day drops the
partitions older than the retention. If the store falls behind and the
buffer fills, the oldest rows are dropped and counted: serving requests
matters more than logging them.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from llmserve.loops import PeriodicLoop
from router.store import InferenceLog, Store, StoreError

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
        self._retention_days = retention_days
        self._clock = clock
        self._buffer: collections.deque[InferenceLog] = collections.deque(maxlen=max_buffer)
        self._loop = PeriodicLoop("inference log writer", flush_interval_s, self._tick, on_close=self.flush)
        self._last_purge_day = ""
        self.dropped = 0
        self.written = 0

    def submit(self, log: InferenceLog) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1  # the deque drops the oldest row as this one goes in
        self._buffer.append(log)
        if len(self._buffer) >= self._max_batch:
            self._loop.wake()

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        try:
            await self._loop.close()  # its last act is a flush
        except StoreError as exc:  # a shutdown must finish even when the store is gone
            self.dropped += len(self._buffer)
            logger.warning("%d inference logs not written at shutdown: %s", len(self._buffer), exc)
            self._buffer.clear()

    async def flush(self) -> None:
        """Write everything buffered; a batch whose write fails goes back to the front, in order."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self._max_batch, len(self._buffer)))]
            try:
                await self._store.write_inference_logs(batch)
            except BaseException:
                room = self._buffer.maxlen - len(self._buffer) if self._buffer.maxlen else len(batch)
                kept = batch[:room]  # when the buffer filled up meanwhile, the oldest rows are the ones lost
                self.dropped += len(batch) - len(kept)
                self._buffer.extendleft(reversed(kept))
                logger.debug("writing %d inference logs failed; kept for the next try (%d rows buffered)",
                               len(batch), len(self._buffer))
                raise
            self.written += len(batch)

    async def _tick(self) -> None:
        # each period (or at once when a batch fills): write what has gathered, then the daily retention
        await self.flush()
        await self._purge_if_new_day()

    async def _purge_if_new_day(self) -> None:
        today = time.strftime("%Y%m%d", time.gmtime(self._clock()))
        if today == self._last_purge_day:
            return
        cutoff = time.strftime("%Y%m%d", time.gmtime(self._clock() - self._retention_days * 86400))
        dropped = await self._store.drop_inference_logs_before(cutoff)
        if dropped:
            logger.info("inference logs: dropped day partitions %s (retention %d days)", dropped, self._retention_days)
        self._last_purge_day = today
