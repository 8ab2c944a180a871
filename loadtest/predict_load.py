"""Closed-loop load for the predict benchmark, and what the server spent on it per request.

``closed_loop`` keeps ``concurrency`` clients sending one request back to back; with a
``Target`` that names the server's process, it also reads that process's CPU time from
``/proc`` before and after (and, for an llmserve router, the model time from its
``/metrics``), so each figure says what a request cost the server, not only how fast
the answers came.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from llmserve.stats import percentile
from loadtest.rawhttp import Connection, encode_request

_COMPUTE_SUM = "llmserve_predict_compute_seconds_sum{"


@dataclass(frozen=True)
class Payload:
    path: str
    body: bytes
    headers: dict[str, str]
    rows: int


@dataclass(frozen=True)
class Target:
    """A server under load: its URL and, when known, its process (for CPU per request)."""

    url: str
    pid: int | None = None
    metrics: bool = False  # it serves llmserve's /metrics (model time per request)


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU time of process ``pid`` and its threads so far (``/proc``); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_seconds(target: Target) -> float | None:
    """The model time a router has spent so far, all versions (its compute histogram's sums)."""
    if not target.metrics:
        return None
    text = httpx.get(f"{target.url}/metrics", timeout=10).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(_COMPUTE_SUM))


async def closed_loop(target: Target | str, payload: Payload, concurrency: int, duration_s: float,
                      client: str = "raw") -> dict[str, Any]:
    """``concurrency`` clients sending ``payload`` back to back for ``duration_s``: rates, latencies, and
    the server's CPU (and model time) per request when the target says where to read them.

    ``client``: ``raw`` (``loadtest.rawhttp``: a connection a worker, the request encoded once) or
    ``aiohttp`` (what this benchmark used before; on this machine it was the bottleneck near 1,000 req/s)."""
    target = target if isinstance(target, Target) else Target(target)
    cpu_before, model_before = cpu_seconds(target.pid), model_seconds(target)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    request = encode_request("POST", target.url, payload.path, payload.body, payload.headers)

    async def raw_worker() -> None:
        nonlocal errors
        connection = Connection(target.url)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status, _ = await connection.send(request)
                if status != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
        finally:
            await connection.close()

    async def aiohttp_worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(payload.path, data=payload.body, headers=payload.headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    if client == "raw":
        await asyncio.gather(*(raw_worker() for _ in range(concurrency)))
    else:
        async with aiohttp.ClientSession(target.url, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            await asyncio.gather(*(aiohttp_worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu_after, model_after = cpu_seconds(target.pid), model_seconds(target)
    ms = [v * 1000 for v in latencies]
    result: dict[str, Any] = {"requests_per_s": round(len(latencies) / elapsed, 1),
                              "rows_per_s": round(len(latencies) * payload.rows / elapsed),
                              "p50_ms": round(percentile(ms, 50), 2) if ms else None,
                              "p99_ms": round(percentile(ms, 99), 2) if ms else None,
                              "requests": len(latencies), "errors": errors}
    answered = len(latencies) + errors
    if cpu_before is not None and cpu_after is not None and answered:
        result["router_cpu_ms"] = round((cpu_after - cpu_before) * 1000 / answered, 3)
        if model_before is not None and model_after is not None:
            result["model_ms"] = round((model_after - model_before) * 1000 / answered, 3)
            result["python_ms"] = round(result["router_cpu_ms"] - result["model_ms"], 3)
    return result
