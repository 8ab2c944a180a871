"""Background work that must never halt: one periodic loop helper and one owner of spawned tasks.

Every long-running loop of the router (the engine-metrics scrape, the
inference-log writer, the control plane's store watch, the autoscaler) is a
``PeriodicLoop``: it runs ``tick`` once per period and, as Ray Serve's
controller does, logs any exception and goes on, because a background loop
that dies silently stops scaling, logging or reconciling with nobody told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class PeriodicLoop:
    """Run ``tick()`` every ``interval_s`` (or sooner on ``wake()``) until ``close()``.

    ``tick`` may block as long as it likes (a store's change feed does); the
    next period starts when it returns or raises. ``close`` cancels a running
    tick, then runs ``on_close`` (a final flush, say) once.
    """

    def __init__(self, name: str, interval_s: float, tick: Callable[[], Awaitable[None]],
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self._interval_s = interval_s
        self._tick = tick
        self._on_close = on_close
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Start the next tick now instead of at the end of the period."""
        self._wakeup.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._on_close is not None:
            await self._on_close()
            self._on_close = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._tick()
                if failures:
                    logger.warning("%s works again after %d failed attempts", self.name, failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                # The first failure with its traceback; then one line a minute, not one each period:
                # a store outage would otherwise fill the log five times a second with the same story.
                if failures == 1:
                    logger.exception("%s failed; trying again every %.1fs", self.name, self._interval_s)
                elif failures % max(1, round(60 / self._interval_s)) == 0:
                    logger.warning("%s still failing (%d attempts)", self.name, failures, exc_info=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval_s)
            self._wakeup.clear()


class Tasks:
    """Tasks started in the background and kept referenced until they end (asyncio keeps only weak ones)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %r failed", task.get_name(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
