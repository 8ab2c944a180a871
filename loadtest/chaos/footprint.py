"""What a router process holds, watched from outside it, and whether it stays flat.

A sample is the process's resident memory and thread count (``/proc/PID/status``),
its open file descriptors (``/proc/PID/fd``) and its asyncio tasks (the router's
``llmserve_router_asyncio_tasks`` gauge on ``/metrics``: tasks cannot be seen from
outside). ``trend`` fits a least-squares line to a series: its slope is what a
leak looks like under a steady load, and, unlike the last sample minus the first,
it is not thrown by the requests that happen to be in flight at either end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

logger = logging.getLogger(__name__)

TASKS_GAUGE = re.compile(rb"^llmserve_router_asyncio_tasks (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    t_s: float  # seconds since the watch began
    rss_mb: float
    fds: int
    threads: int
    tasks: int


SERIES = ("rss_mb", "fds", "threads", "tasks")


async def read_footprint(pid: int, url: str, session: aiohttp.ClientSession, t_s: float) -> Sample:
    """One sample of process ``pid``, whose router answers at ``url``."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    async with session.get(f"{url}/metrics") as response:
        found = TASKS_GAUGE.search(await response.read())
    if found is None:
        raise RuntimeError("the router's /metrics has no llmserve_router_asyncio_tasks")
    return Sample(round(t_s, 2), round(rss_kb / 1024, 2), fds, int(fields["Threads"]), int(float(found[1])))


async def watch(pid: int, url: str, interval_s: float, into: list[Sample], stop: asyncio.Event) -> int:
    """Sample every ``interval_s`` into ``into`` until ``stop`` is set; returns the samples that failed.

    A failed sample is counted rather than raised, so a hiccup late in a long soak keeps what came before.
    """
    start = time.monotonic()
    failures = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while not stop.is_set():
            try:
                into.append(await read_footprint(pid, url, session, time.monotonic() - start))
            except (OSError, aiohttp.ClientError, RuntimeError, KeyError, ValueError, TimeoutError):
                logger.exception("a footprint sample of pid %s failed", pid)
                failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    return failures


@dataclass(frozen=True)
class Trend:
    start: float
    end: float
    max: float
    mean: float
    slope_per_min: float
    growth: float  # what the fitted line gains over the span: slope times its length

    def brief(self) -> str:
        return f"{self.start:g}->{self.end:g} (max {self.max:g}, {self.slope_per_min:+.3g}/min)"


def trend(points: list[tuple[float, float]]) -> Trend:
    """The series' first, last, largest and mean values, and the least-squares slope through all of it."""
    if not points:
        raise ValueError("no samples to fit")
    ts = [t for t, _ in points]
    vs = [v for _, v in points]
    mean_t, mean_v = sum(ts) / len(ts), sum(vs) / len(vs)
    spread = sum((t - mean_t) ** 2 for t in ts)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0
    return Trend(start=vs[0], end=vs[-1], max=max(vs), mean=round(mean_v, 2), slope_per_min=round(slope * 60, 4),
                 growth=round(slope * (ts[-1] - ts[0]), 3))


def trends(samples: list[Sample], after_s: float) -> dict[str, Trend]:
    """Each series' trend over the samples taken at or after ``after_s`` (the warm-up left out)."""
    kept = [s for s in samples if s.t_s >= after_s]
    return {name: trend([(s.t_s, float(getattr(s, name))) for s in kept]) for name in SERIES}
