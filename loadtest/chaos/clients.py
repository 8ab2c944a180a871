"""Client misbehaviour, against one router over simulated engines, while well-behaved clients stream
(``loadtest.chaos.stack``), each measured against the router's connection limits (1 s time-outs here).

- ``dropped_connections``: connections by the thousand (100 a second of the load's
  duration) opened and dropped: closed or reset at once, after half a request's
  headers, after half its body, or with a stream under way (the router must abort
  the engine request). Afterwards the router's open files, its replicas'
  outstanding counts and the engine's running requests are back where they were.
- ``slow_readers``: streams of 60,000 tokens whose clients read nothing, or 64
  bytes every 0.25 s, through an 8 KiB receive window. The router must hold a
  bounded amount per stream (back-pressure, not buffering) and cut a reader that
  stops taking bytes, releasing the engine request and the replica's slot.
- ``oversized_headers`` and ``cut_bodies``: requests that break HTTP's rules (``malformed``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from loadtest.chaos import malformed
from loadtest.chaos import misbehave as raw
from loadtest.chaos.replicas import MODEL
from loadtest.chaos.scenario import Scenario
from loadtest.chaos.stack import READER_MODEL, READER_TOKENS, Stack, under_attack

# dropped_connections ------------------------------------------------------------------------------

DROPS_PER_S = 100


async def _close_at_once(stack: Stack) -> str | None:
    (await raw.connect(stack.port)).close()
    return None


async def _reset_at_once(stack: Stack) -> str | None:
    raw.reset(await raw.connect(stack.port))
    return None


async def _half_headers_reset(stack: Stack) -> str | None:
    sock = await raw.connect(stack.port)
    await raw.send_all(sock, raw.chat_request(MODEL, 8)[:40])
    raw.reset(sock)
    return None


async def _half_body_close(stack: Stack) -> str | None:
    sock = await raw.connect(stack.port)
    request = raw.chat_request(MODEL, 8)
    await raw.send_all(sock, request[:len(request) - 20])
    sock.close()
    return None


async def _stream_then_reset(stack: Stack) -> str:
    """A stream under way (its status line came: the router had its first event), then a reset: the
    engine must stop. Returns the status (a refusal under the attack's load is no stream)."""
    sock = await raw.connect(stack.port)
    try:
        await raw.send_all(sock, raw.chat_request(MODEL, 400))
        async with asyncio.timeout(5):
            got = await asyncio.get_running_loop().sock_recv(sock, 1024)
        return got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/") else "none"
    finally:
        raw.reset(sock)


DROPS = (_close_at_once, _reset_at_once, _half_headers_reset, _half_body_close, _stream_then_reset)


async def _drop(stack: Stack) -> tuple[str, dict[str, Any]]:
    count = int(DROPS_PER_S * stack.load.duration_s)
    seen: Counter[str] = Counter()
    gate = asyncio.Semaphore(64)
    aborted_before = await stack.engine_metric("sim_requests_aborted_total")

    async def one(index: int) -> None:
        kind = DROPS[index % len(DROPS)]
        async with gate:
            try:
                status = await kind(stack)
                seen[kind.__name__.strip("_") + (f" ({status})" if status and status != "200" else "")] += 1
            except (OSError, TimeoutError):
                seen["failed"] += 1

    started = time.monotonic()
    with raw.PeakSampler() as peak:
        await asyncio.gather(*(one(i) for i in range(count)))
    took_s = time.monotonic() - started
    streams = seen["stream_then_reset"]
    deadline = time.monotonic() + 3  # the router sees each reset, closes the upstream, the engine aborts
    while True:
        aborted = await stack.engine_metric("sim_requests_aborted_total") - aborted_before
        if aborted >= streams or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    what = (f"{count} connections in {took_s:.1f}s, 64 at a time: "
            + ", ".join(f"{n} {k}" for k, n in sorted(seen.items())))
    return what, {"connections": count, "connect_or_send_failed": seen["failed"], "all_accepted": not seen["failed"],
                  "router_fds_peak": peak.fds, "streams_reset": streams, "engine_aborted": int(aborted),
                  "engine_aborted_every_reset_stream": aborted >= streams}


# slow_readers -------------------------------------------------------------------------------------

RCVBUF = 4096  # the kernel doubles it: an 8 KiB window
EVENT_BYTES = 150  # about one streamed token's SSE event, as the router relays it


async def _slow_reader(stack: Stack, stop: asyncio.Event, read_bytes: int) -> bool:
    """One stream through a tiny window, read ``read_bytes`` every 0.25 s (0: never) until ``stop``;
    True when the router cut it (the connection ended with no ``[DONE]``)."""
    sock = await raw.connect(stack.port, rcvbuf=RCVBUF)
    loop = asyncio.get_running_loop()
    try:
        await raw.send_all(sock, raw.chat_request(READER_MODEL, READER_TOKENS))
        while not stop.is_set():
            if read_bytes:
                await loop.sock_recv(sock, read_bytes)
            await asyncio.sleep(0.25)
        tail = b""
        async with asyncio.timeout(2):  # now read what is left: a cut stream ends soon, and without [DONE]
            while piece := await loop.sock_recv(sock, 1 << 16):
                tail = (tail + piece)[-64:]
        return b"[DONE]" not in tail
    except TimeoutError:
        return False  # still streaming: never cut
    except OSError:
        return True  # reset by the router
    finally:
        raw.reset(sock)


async def _slow_readers(stack: Stack) -> tuple[str, dict[str, Any]]:
    count = 2 * stack.load.users
    # On loopback the kernel takes about 3 MB of a stream before the router's writes block (its send
    # buffer autotunes to tcp_wmem's maximum): relaying that much takes the router seconds first, 3.6 s
    # on an idle AVX-512 EPYC and over 10 s on a slower or busier CI machine. The wait ends as soon as
    # every stream is released, so the bound costs only a router that never releases them.
    hold_s = max(30.0, stack.load.duration_s / 2)
    stop = asyncio.Event()
    rss_before = raw.rss_mb()
    started = time.monotonic()
    released_s: float | None = None  # the router let go of every stuck stream: its replica's slots
    engine_released_s: float | None = None  # and the engine stopped generating for them
    with raw.PeakSampler() as peak:
        readers = [asyncio.create_task(_slow_reader(stack, stop, 0 if i % 2 else 64)) for i in range(count)]
        await asyncio.sleep(0.5)  # every stream started
        while engine_released_s is None and time.monotonic() - started < hold_s:
            if released_s is None and not sum(r.outstanding for r in stack.replicas(READER_MODEL)):
                released_s = time.monotonic() - started
            if released_s is not None and not await stack.engine_metric("vllm:num_requests_running", READER_MODEL):
                engine_released_s = time.monotonic() - started
            await asyncio.sleep(0.1)
        growth = peak.rss_mb - rss_before
    stop.set()
    cut = sum(await asyncio.gather(*readers))
    would_buffer_mb = count * READER_TOKENS * EVENT_BYTES / 2**20  # had the router buffered them whole
    return (f"{count} streams of {READER_TOKENS} tokens, half never read and half read 64 B every 0.25 s, "
            f"through an {2 * RCVBUF // 1024} KiB window, held up to {hold_s:g}s"), {
        "router_rss_growth_mb": round(growth, 1), "would_buffer_mb": round(would_buffer_mb),
        "rss_bounded": growth < max(24.0, would_buffer_mb / 4),
        "stuck_streams_released_s": None if released_s is None else round(released_s, 1),
        "engine_released_s": None if engine_released_s is None else round(engine_released_s, 1),
        "stuck_streams_released": released_s is not None, "readers_cut": f"{cut}/{count}",
        "every_reader_cut": cut == count}


def scenarios() -> list[Scenario]:
    return [
        Scenario("dropped_connections", "thousands of connections opened and dropped", under_attack(_drop)),
        Scenario("slow_readers", "streams whose clients stop reading", under_attack(_slow_readers, readers=True)),
        *malformed.scenarios(),
    ]
