"""Requests that break HTTP's rules, each measured against the router's connection limits.

- ``oversized_headers``: an 8 KB header (served), a 100 KB header, 5,000 headers,
  a 100 KB URL, and 16 MB header floods from two clients a user at once: each
  refused with a prompt 431, the floods cut long before they are sent, and the
  router's memory not growing with what was sent.
- ``cut_bodies``: a body short of its Content-Length and a chunked body cut
  inside a chunk (each left stalled, or closed), half a request's headers,
  headers a byte at a time (slowloris), and a herd of connections that send
  nothing (50 a user): each answered 408 or closed within the header or body
  time-out (1 s here), none held longer, none a 5xx.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtest.chaos import misbehave as raw
from loadtest.chaos.replicas import MODEL
from loadtest.chaos.scenario import Scenario
from loadtest.chaos.stack import CLIENT_LIMITS, Stack, under_attack

PROBE_TIMEOUT_S = 5.0  # an answer later than this is a hang
FLOOD_BYTES = 16 << 20


def _chat(headers: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    return raw.chat_request(MODEL, 4, stream=False, headers=b"Connection: close\r\n" + headers, path=path)


async def _oversized(stack: Stack) -> tuple[str, dict[str, Any]]:
    probes = {"header_8kb": _chat(b"X-Big: " + b"a" * 8_000 + b"\r\n"),
              "header_100kb": _chat(b"X-Big: " + b"a" * 100_000 + b"\r\n"),
              "headers_5000": _chat(b"".join(b"X-H%d: v\r\n" % i for i in range(5_000))),
              "url_100kb": _chat(path=b"/v1/chat/completions?q=" + b"a" * 100_000)}
    answers = {name: await raw.probe(stack.port, data, PROBE_TIMEOUT_S) for name, data in probes.items()}
    flood = raw.head(b"GET", b"/v1/models", b"X-Big: " + b"a" * FLOOD_BYTES + b"\r\n")
    floods = 2 * stack.load.users
    rss_before = raw.rss_mb()
    with raw.PeakSampler() as peak:
        flooded = await asyncio.gather(*(raw.probe(stack.port, flood, PROBE_TIMEOUT_S) for _ in range(floods)))
    refused = [answers[n] for n in ("header_100kb", "headers_5000", "url_100kb")] + list(flooded)
    growth = peak.rss_mb - rss_before
    return (f"an 8 KB header, a 100 KB header, 5,000 headers, a 100 KB URL, then {floods} clients at once each "
            f"sending a {FLOOD_BYTES >> 20} MB header"), {
        **{f"{name}_status": a.status for name, a in answers.items()},
        "normal_header_served": answers["header_8kb"].status == 200,
        "every_oversized_got_431": all(a.status == 431 for a in refused),
        "floods_cut_early": all(not a.sent_all for a in flooded),
        "slowest_431_ms": round(max(a.elapsed_s for a in refused) * 1000),
        "router_rss_growth_mb": round(growth, 1), "rss_bounded": growth < 16}


async def _cut_bodies(stack: Stack) -> tuple[str, dict[str, Any]]:
    request = _chat()
    chunked = raw.head(b"POST", b"/v1/chat/completions", b"Transfer-Encoding: chunked\r\n")
    chunked += b"5\r\n{\"mod\r\n9\r\nel"  # the second chunk promises 9 bytes and sends 2
    port, timeout = stack.port, PROBE_TIMEOUT_S
    kinds = {  # name: (how, the answer expected: 408, or None when the router just closes)
        "short_body_stalled": (lambda: raw.probe(port, request[:-10], timeout), 408),
        "short_body_closed": (lambda: raw.probe(port, request[:-10], timeout, stall=False), None),
        "chunked_cut_stalled": (lambda: raw.probe(port, chunked, timeout), 408),
        "chunked_cut_closed": (lambda: raw.probe(port, chunked, timeout, stall=False), None),
        "half_headers_stalled": (lambda: raw.probe(port, request[:40], timeout), 408),
        "headers_dripped": (lambda: raw.trickle(port, request, 0.05, timeout), 408),
        "idle": (lambda: raw.probe(port, b"", timeout), None),
    }
    herd = 50 * stack.load.users
    names = [name for name in kinds for _ in range(2)] + ["idle"] * herd
    started = time.monotonic()
    answers = await asyncio.gather(*(kinds[name][0]() for name in names))
    longest = {name: max(a.elapsed_s for n, a in zip(names, answers, strict=True) if n == name) for name in kinds}
    wrong = sorted({n for n, a in zip(names, answers, strict=True) if a.status != kinds[n][1] or a.hung})
    limit_s = max(CLIENT_LIMITS.header_timeout_s, CLIENT_LIMITS.body_timeout_s)
    return (f"{len(names) - herd} stalled, dripped or cut requests, 2 of each kind, and {herd} connections "
            f"that send nothing, all at once ({time.monotonic() - started:.1f}s)"), {
        "answered_as_expected": not wrong, "unexpected": ", ".join(wrong) or "none",
        "longest_hold_s": round(max(longest.values()), 2),
        "held_within_timeouts": max(longest.values()) < limit_s + 1.0,
        "hung": sum(a.hung for a in answers)}


def scenarios() -> list[Scenario]:
    return [
        Scenario("oversized_headers", "headers of 100 KB to 16 MB, and 5,000 of them", under_attack(_oversized)),
        Scenario("cut_bodies", "stalled, dripped and cut requests, and idle connections", under_attack(_cut_bodies)),
    ]
