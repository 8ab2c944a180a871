"""Sends the requests of a run and records what happened to each.

Open loop: each request goes out at its intended time (``schedule``), as its
own task, whatever the earlier ones are doing; an optional concurrency cap
makes a request wait for a slot, and that wait is recorded, not hidden.
Closed loop: N users each send their next request when the previous one ends.
Interleaved (``rounds``): a closed loop against one target at a time, every
target sent the same requests in each round, in an order reversed every other
round (A B, B A, A B, ...), so that all see the same machine noise; this is
how ``loadtest bench`` compares a router with the engine behind it.
Every run is bounded in requests and in time, and stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from loadtest.workload import RequestSpec
from router.relay.sse import DONE, Decoder, has_text

LATE_SEND_MS = 10.0  # a send this late against its intended time counts as not on time


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # OpenAI: ending in /v1; generate: the router's root
    endpoint: str = "chat"  # chat | completions | generate
    # sent as a bearer token: the router's API key (an engine addressed directly ignores it)
    api_key: str | None = field(default_factory=lambda: os.environ.get("LLMSERVE_API_KEY"), repr=False)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class Record:
    index: int
    target: str
    intended_s: float  # seconds from the run's start
    sent_s: float
    ok: bool = False
    status: int = 0
    error: str = ""
    first_token_s: float | None = None
    end_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    version: str = ""
    served_by: str = ""
    user: str | None = None
    priority: str | None = None
    warmup: bool = False
    generator_lag_s: float = 0.0
    retry_after: str | None = None  # on a refusal: the server's Retry-After
    fallback: str | None = None  # X-Fallback: the model that answered instead
    done_s: float | None = None  # when the request ended, whatever the outcome (end_s: only a stream that ended)
    complete: bool = False  # the stream ended with [DONE] (a cut stream ends without it)
    error_event: bool = False  # the server ended the stream with an in-band error event: a clear answer
    round_index: int = 0  # interleaved runs: the round that sent it

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.sent_s) * 1000

    @property
    def e2el_ms(self) -> float | None:
        return None if self.end_s is None else (self.end_s - self.sent_s) * 1000

    @property
    def tpot_ms(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) * 1000 / (self.output_tokens - 1)

    @property
    def queue_wait_ms(self) -> float:
        """Time spent waiting for a concurrency-cap slot (the generator's own lateness excluded)."""
        return max(0.0, (self.sent_s - self.intended_s - self.generator_lag_s) * 1000)


class RequestSource(Protocol):
    """Where a run's requests come from (``loadtest.workload.Workload``, or a fixed list of prompts)."""

    def next(self) -> RequestSpec: ...


def _request_body(target: Target, model: str, spec: RequestSpec,
                  extra: Mapping[str, object] | None = None) -> tuple[str, dict[str, object]]:
    if target.endpoint == "generate":
        prompt = spec.prompt or " ".join(str(m.get("content", "")) for m in spec.messages or [])
        body: dict[str, object] = {"prompt": prompt, "max_tokens": spec.max_tokens, "stream": True, **(extra or {})}
        if spec.user:
            body["user"] = spec.user
        return f"{target.base_url}/api/v1/models/{model}/generate", body
    body = {"model": model, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra or {})}
    if spec.user:
        body["user"] = spec.user
    if target.endpoint == "completions":
        body["prompt"] = spec.prompt or " ".join(str(m.get("content", "")) for m in spec.messages or [])
        return f"{target.base_url}/completions", body
    body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt or ""}]
    return f"{target.base_url}/chat/completions", body


async def send(
    session: aiohttp.ClientSession, target: Target, model: str, spec: RequestSpec, record: Record,
    clock: Callable[[], float], extra: Mapping[str, object] | None = None,
) -> None:
    """Send one streamed request and fill in its record (never raises for a failed request).

    ``extra``: fields added to the request body (the bench's ``temperature``).
    """
    url, body = _request_body(target, model, spec, extra)
    headers = {**target.headers(), **({"x-priority": spec.priority} if spec.priority else {})}
    last = record.sent_s
    pieces = 0
    decoder = Decoder()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            record.status = response.status
            record.version = response.headers.get("x-model-version", "")
            record.served_by = response.headers.get("x-served-by", "")
            record.fallback = response.headers.get("x-fallback")
            if response.status != 200:
                record.retry_after = response.headers.get("retry-after")
                record.error = (await response.text())[:200]
                return
            async for raw in response.content.iter_any():
                for event in decoder.feed(raw):
                    data = event.data
                    if data == DONE:
                        record.complete = True
                        continue
                    now = clock()
                    if b'"error"' in data or b'"usage":{' in data or b'"usage": {' in data:
                        chunk = json.loads(data)
                        if "error" in chunk:
                            record.error = str(chunk["error"])[:200]
                            record.error_event = True
                            return
                        usage = chunk.get("usage")
                        if isinstance(usage, dict):
                            record.output_tokens = int(usage.get("completion_tokens") or 0)
                            record.input_tokens = int(usage.get("prompt_tokens") or 0)
                    if has_text(data):
                        pieces += 1
                        if record.first_token_s is None:
                            record.first_token_s = now
                        else:
                            record.itl_s.append(now - last)
                        last = now
        record.end_s = clock()
        record.output_tokens = record.output_tokens or pieces
        record.ok = record.first_token_s is not None
        if not record.ok:
            record.error = "the stream ended without output"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        record.done_s = clock()


@dataclass(frozen=True)
class RunPlan:
    targets: list[Target]
    model: str
    intended: list[float]  # open loop: seconds from the start; empty for closed loop
    users: int = 0  # closed loop and interleaved: concurrent users
    max_requests: int = 0  # closed loop bound; interleaved: requests per target, spread over the rounds
    duration_s: float = 60.0  # closed loop bound (an interleaved run is bounded by its requests)
    concurrency_cap: int | None = None
    warmup: int = 0
    request_timeout_s: float = 300.0
    rounds: int = 0  # > 0: interleaved, ``max_requests // rounds`` requests per target and round
    extra_body: Mapping[str, object] = field(default_factory=dict)  # added to every request's body


async def execute(plan: RunPlan, workload: RequestSource, on_progress: Callable[[Record], None] | None = None
                  ) -> tuple[list[Record], float]:
    """Run the plan; returns every record (warm-up ones flagged) and the measured duration.

    An interleaved run's duration is the whole run's; each target's own time
    under load is ``busy_s`` of its records.
    """
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=plan.request_timeout_s)
    loop = asyncio.get_running_loop()
    clock = loop.time
    records: list[Record] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        for i in range(plan.warmup):  # not counted; one at a time, round robin over targets
            target = plan.targets[i % len(plan.targets)]
            warm = Record(index=-1 - i, target=target.name, intended_s=0, sent_s=clock(), warmup=True)
            await send(session, target, plan.model, workload.next(), warm, clock, plan.extra_body)
            records.append(warm)
        start = clock()
        if plan.rounds:
            measured = await _interleaved(session, plan, workload, clock, on_progress)
        elif plan.intended:
            measured = await _open_loop(session, plan, workload, start, clock, on_progress)
        else:
            measured = await _closed_loop(session, plan, workload, start, clock, on_progress)
        duration = clock() - start
    for record in measured:  # times relative to the start of the measured part
        record.intended_s -= start
        record.sent_s -= start
        if record.first_token_s is not None:
            record.first_token_s -= start
        if record.end_s is not None:
            record.end_s -= start
        if record.done_s is not None:
            record.done_s -= start
    return records + measured, duration


async def _open_loop(session: aiohttp.ClientSession, plan: RunPlan, workload: RequestSource, start: float,
                     clock: Callable[[], float], on_progress: Callable[[Record], None] | None) -> list[Record]:
    cap = asyncio.Semaphore(plan.concurrency_cap) if plan.concurrency_cap else None
    records: list[Record] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(record: Record, target: Target, spec: RequestSpec) -> None:
        if cap is not None:
            async with cap:
                record.sent_s = clock()
                await send(session, target, plan.model, spec, record, clock, plan.extra_body)
        else:
            await send(session, target, plan.model, spec, record, clock, plan.extra_body)
        if on_progress:
            on_progress(record)

    for index, offset in enumerate(plan.intended):
        due = start + offset
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        now = clock()
        target = plan.targets[index % len(plan.targets)]
        spec = workload.next()
        record = Record(index=index, target=target.name, intended_s=due, sent_s=now, user=spec.user,
                        priority=spec.priority, generator_lag_s=max(0.0, now - due))
        records.append(record)
        tasks.append(asyncio.create_task(one(record, target, spec)))
    if tasks:
        await asyncio.wait(tasks, timeout=plan.request_timeout_s)
    for task in tasks:
        task.cancel()
    return records


async def _closed_loop(session: aiohttp.ClientSession, plan: RunPlan, workload: RequestSource, start: float,
                       clock: Callable[[], float], on_progress: Callable[[Record], None] | None) -> list[Record]:
    records: list[Record] = []
    deadline = start + plan.duration_s
    limit = plan.max_requests or 10**9

    async def user(number: int) -> None:
        while clock() < deadline and len(records) < limit:
            index = len(records)
            target = plan.targets[index % len(plan.targets)]
            spec = workload.next()
            now = clock()
            record = Record(index=index, target=target.name, intended_s=now, sent_s=now, user=spec.user,
                            priority=spec.priority)
            records.append(record)
            await send(session, target, plan.model, spec, record, clock, plan.extra_body)
            if on_progress:
                on_progress(record)

    await asyncio.wait_for(asyncio.gather(*(user(i) for i in range(plan.users))),
                           timeout=plan.duration_s + plan.request_timeout_s)
    return records


async def _interleaved(session: aiohttp.ClientSession, plan: RunPlan, workload: RequestSource,
                       clock: Callable[[], float], on_progress: Callable[[Record], None] | None) -> list[Record]:
    records: list[Record] = []
    per_round = max(1, plan.max_requests // plan.rounds)

    async def user(target: Target, pending: Iterator[RequestSpec], round_index: int) -> None:
        for spec in pending:  # shared by the round's users: each takes the next when its last one ends
            now = clock()
            record = Record(index=len(records), target=target.name, intended_s=now, sent_s=now, user=spec.user,
                            priority=spec.priority, round_index=round_index)
            records.append(record)
            await send(session, target, plan.model, spec, record, clock, plan.extra_body)
            if on_progress:
                on_progress(record)

    for round_index in range(plan.rounds):
        specs = [workload.next() for _ in range(per_round)]  # the same requests for every target
        order = plan.targets if round_index % 2 == 0 else plan.targets[::-1]
        for target in order:
            pending = iter(specs)
            await asyncio.gather(*(user(target, pending, round_index) for _ in range(max(1, plan.users))))
    return records


def busy_s(records: Iterable[Record]) -> float:
    """Seconds one target of an interleaved run was under load: per round, from its first send to its
    last end, summed over the rounds (so its throughput leaves out the other targets' turns)."""
    spans: dict[int, tuple[float, float]] = {}
    for r in records:
        if r.warmup:
            continue
        end = r.sent_s if r.done_s is None else r.done_s
        first, last = spans.get(r.round_index, (r.sent_s, end))
        spans[r.round_index] = (min(first, r.sent_s), max(last, end))
    return sum(last - first for first, last in spans.values())


def late_sends(records: list[Record]) -> int:
    return sum(1 for r in records if not r.warmup and r.generator_lag_s * 1000 > LATE_SEND_MS)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
