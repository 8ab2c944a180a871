"""How a chaos scenario counts what its clients saw, and the steady streamed load that produces it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from loadtest.runner import Record, Target, send
from loadtest.workload import RequestSpec

CLIENT_TIMEOUT_S = 30.0


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


async def streamed_load(urls: list[str], model: str, users: int, duration_s: float, tally: Tally,
                        max_tokens: int = 24) -> None:
    """``users`` closed-loop streaming chat clients for ``duration_s``, spread over ``urls`` (routers)."""
    stop = time.monotonic() + duration_s
    targets = [Target(f"router{i}", f"{url}/v1") for i, url in enumerate(urls)]

    async def user(index: int) -> None:
        target = targets[index % len(targets)]
        spec = RequestSpec(messages=[{"role": "user", "content": "Tell me about lighthouses."}], prompt=None,
                           max_tokens=max_tokens, user=f"user-{index}", priority=None)
        while time.monotonic() < stop:
            record = Record(index, target.name, 0.0, time.monotonic())
            await send(session, target, model, spec, record, time.monotonic)
            tally.add(record)

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(user(i) for i in range(users)))
