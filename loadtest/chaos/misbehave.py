"""Misbehaving HTTP clients on raw sockets (127.0.0.1 only), and what the router's process holds.

Every client here uses the event loop's ``sock_*`` calls on its own socket, not
a stream reader: nothing on the client side reads ahead, so a reader that stops
reading leaves the router's bytes in the kernel, where the router's
back-pressure (and its write time-out) has to deal with them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from dataclasses import dataclass

HOST = "127.0.0.1"


def chat_request(model: str, max_tokens: int, stream: bool = True, headers: bytes = b"",
                 path: bytes = b"/v1/chat/completions") -> bytes:
    """A whole HTTP/1.1 chat request; ``headers``: extra header lines, each ending in CRLF."""
    body = json.dumps({"model": model, "stream": stream, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Tell me about lighthouses."}]}).encode()
    return head(b"POST", path, b"Content-Type: application/json\r\n" + headers
                + b"Content-Length: %d\r\n" % len(body)) + body


def head(method: bytes, path: bytes, headers: bytes = b"") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n" + headers + b"\r\n"


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to the router; ``rcvbuf``: a small receive buffer, set
    before the connection so that the window the router sees is small from the start."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER with a zero time-out)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already reset by the other side
    sock.close()


async def send_all(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False when the router closed or reset the connection first."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except OSError:
        return False
    return True


@dataclass
class Answer:
    """What one probe saw: the status line's code (None: none came), how long until the router
    answered or closed, whether it closed, and whether the whole request went out first."""

    status: int | None
    elapsed_s: float
    closed: bool
    sent_all: bool = True

    @property
    def hung(self) -> bool:
        return self.status is None and not self.closed


async def answer(sock: socket.socket, started: float, timeout_s: float, sent_all: bool = True) -> Answer:
    """Read until the status line and the end of the connection, or ``timeout_s`` (a hang)."""
    loop = asyncio.get_running_loop()
    got = b""
    status: int | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                piece = await loop.sock_recv(sock, 65536)
                if not piece:
                    break
                got += piece
                if status is None and b"\r\n" in got:
                    status = int(got.split(b" ", 2)[1])
                    got = b""  # only the status line matters; the rest of the body is drained
    except TimeoutError:
        return Answer(status, time.monotonic() - started, closed=False, sent_all=sent_all)
    except OSError:
        pass  # reset: closed all the same
    return Answer(status, time.monotonic() - started, closed=True, sent_all=sent_all)


async def probe(port: int, data: bytes, timeout_s: float, stall: bool = True, piece: int = 1 << 16) -> Answer:
    """Send ``data`` (in pieces, stopping when the router cuts it), then wait for its answer
    (``stall``: the connection stays open, as a client that promised more and went quiet)."""
    sock = await connect(port)
    started = time.monotonic()
    try:
        sent = True
        for at in range(0, len(data), piece):
            if not await send_all(sock, data[at:at + piece]):
                sent = False
                break
        if not stall:
            sock.shutdown(socket.SHUT_WR)
        return await answer(sock, started, timeout_s, sent)
    finally:
        sock.close()


async def trickle(port: int, data: bytes, every_s: float, timeout_s: float) -> Answer:
    """Send ``data`` one byte every ``every_s`` (slowloris) until the router answers or cuts it."""
    sock = await connect(port)
    started = time.monotonic()
    reader = asyncio.create_task(answer(sock, started, timeout_s))
    try:
        for byte in data:
            if reader.done() or not await send_all(sock, bytes([byte])):
                break
            await asyncio.sleep(every_s)
        return await reader
    finally:
        reader.cancel()
        sock.close()


def rss_mb() -> float:
    """This process's resident memory (the router runs in it, under ``serve_router``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class PeakSampler:
    """Samples resident memory and open files every ``interval_s`` while it runs; keeps the peaks."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.rss_mb = rss_mb()
        self.fds = open_fds()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.rss_mb = max(self.rss_mb, rss_mb())
            self.fds = max(self.fds, open_fds())
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.rss_mb = max(self.rss_mb, rss_mb())
        self.fds = max(self.fds, open_fds())


async def get(port: int, path: str, timeout_s: float = 5.0) -> bytes:
    """A plain GET on a connection of its own, closed after the answer: the body (metrics pages)."""
    sock = await connect(port)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, head(b"GET", path.encode(), b"Connection: close\r\n"))
        got = b""
        async with asyncio.timeout(timeout_s):
            while piece := await loop.sock_recv(sock, 65536):
                got += piece
    finally:
        sock.close()
    return got.partition(b"\r\n\r\n")[2]


def metric_sum(page: bytes, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include ``labels`` (a value ending in
    ``*`` matches a prefix: ``status="5*"``)."""
    total = 0.0
    for line in page.decode(errors="replace").splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        found = dict(part.split("=", 1) for part in series[len(name):].strip("{}").split(",") if "=" in part)
        if all(_matches(found.get(k, "").strip('"'), v) for k, v in labels.items()):
            total += float(value)
    return total


def _matches(value: str, wanted: str) -> bool:
    return value.startswith(wanted[:-1]) if wanted.endswith("*") else value == wanted
