"""How a chaos scenario counts what its clients saw, and the steady streamed loads that produce it:
closed loop (``streamed_load``: N users, each sends when its last request ends) and open loop
(``open_loop_load``: Poisson arrivals at a fixed rate, whatever the earlier requests are doing)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from loadtest.runner import LATE_SEND_MS, Record, Target, send
from loadtest.schedule import Shape, intended_send_times
from loadtest.workload import RequestSpec

CLIENT_TIMEOUT_S = 30.0
# Below uvicorn's 5-s keep-alive: a client that keeps an idle connection longer races the server's close
# and may send on a socket being shut (a reset, counted as lost, of a request the router never served). aiohttp
# reuses the oldest idle connection first, so once its pool has grown (after a burst) every connection
# idles for about pool / rate seconds, near the server's limit: the likely cause of the 25 resets (of 76,097
# requests) in the first 30-minute soak, whose pool had grown to ~300 connections at 42 requests/s.
OPEN_LOOP_KEEPALIVE_S = 4.0


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused: int = 0
    failed_clean: int = 0
    lost: int = 0
    longest_stall_ms: float = 0.0
    examples: list[str] = field(default_factory=list)

    def add(self, record: Record) -> None:
        """Classify one request by what its client saw (``runner.send`` filled the record in)."""
        outcome = outcome_of(record)
        self.sent += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.longest_stall_ms = max(self.longest_stall_ms, stall_s(record) * 1000)
        if outcome == "lost" and len(self.examples) < 5:
            self.examples.append(record.error or f"status {record.status}, no [DONE]")


def outcome_of(record: Record) -> str:
    if record.status in (429, 503) and record.retry_after:
        return "refused"
    if record.status != 200:
        return "failed_clean" if record.status >= 500 else "lost"
    if record.error_event:
        return "failed_clean"
    return "ok" if record.ok and record.complete else "lost"


def stall_s(record: Record) -> float:
    """The longest silence the client saw: to the first token, between two, or after the last one."""
    end = record.done_s if record.done_s is not None else record.sent_s
    if record.first_token_s is None:
        return end - record.sent_s
    last_token = record.first_token_s + sum(record.itl_s)
    return max(record.first_token_s - record.sent_s, *record.itl_s, end - last_token)


def _chat(user: str, max_tokens: int) -> RequestSpec:
    return RequestSpec(messages=[{"role": "user", "content": "Tell me about lighthouses."}], prompt=None,
                       max_tokens=max_tokens, user=user, priority=None)


async def streamed_load(urls: list[str], model: str, users: int, duration_s: float, tally: Tally,
                        max_tokens: int = 24) -> None:
    """``users`` closed-loop streaming chat clients for ``duration_s``, spread over ``urls`` (routers)."""
    stop = time.monotonic() + duration_s
    targets = [Target(f"router{i}", f"{url}/v1") for i, url in enumerate(urls)]

    async def user(index: int) -> None:
        target = targets[index % len(targets)]
        spec = _chat(f"user-{index}", max_tokens)
        while time.monotonic() < stop:
            record = Record(index, target.name, 0.0, time.monotonic())
            await send(session, target, model, spec, record, time.monotonic)
            tally.add(record)

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(user(i) for i in range(users)))


async def open_loop_load(urls: list[str], model: str, rate: float, duration_s: float, tally: Tally,
                         max_tokens: int = 24, seed: int = 0) -> int:
    """Poisson arrivals at ``rate`` requests/s for ``duration_s``, spread over ``urls``; returns the sends
    more than ``LATE_SEND_MS`` behind their time (the generator, not the router, fell behind).

    Each request is its own task, so a slow router meets the same offered load instead of slowing
    the clients down; only the tasks in flight are kept (a soak sends hundreds of thousands), and
    every user name is new, so per-user state that is never dropped shows as growth.
    """
    targets = [Target(f"router{i}", f"{url}/v1") for i, url in enumerate(urls)]
    in_flight: set[asyncio.Task[None]] = set()
    late = 0

    async def one(index: int) -> None:
        target = targets[index % len(targets)]
        record = Record(index, target.name, 0.0, time.monotonic())
        await send(session, target, model, _chat(f"soak-{index}", max_tokens), record, time.monotonic)
        tally.add(record)

    # no cap on connections: aiohttp's default of 100 would queue requests in the client, hiding a slow router
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=OPEN_LOOP_KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
                                     ) as session:
        start = time.monotonic()
        for index, offset in enumerate(intended_send_times(Shape("constant", rate), duration_s, seed=seed)):
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay * 1000 > LATE_SEND_MS:
                late += 1
            task = asyncio.create_task(one(index))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(set(in_flight))  # each one ends within CLIENT_TIMEOUT_S
    return late
