"""A minimal HTTP/1.1 keep-alive client for closed-loop load: pre-encoded requests, one connection a worker.

The benchmark's load generator shares a 2-core machine with the server it measures.
With aiohttp, 64 clients topped out at 1,028 requests/s against a server that answers
a constant (uvicorn, nothing else), that server's process at 18% of a core: single-row
figures measured the client.
This client writes the request's bytes as they were encoded once and reads the
answer by its ``Content-Length`` (every predict answer has one); a chunked answer
is read too. It speaks only what the benchmarks send: no redirects, no TLS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 that this client reads."""


def encode_request(method: str, url: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """The request's bytes, to be written as they are for every request of a loop."""
    host = urlsplit(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() not in ("host", "content-length")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One kept-alive connection to ``url``'s host; ``send`` is one request and its whole answer."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Status and body; reconnects when the server closed the connection since the last answer."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = _framing(head)
        if chunked:
            body = await self._chunks()
        elif length is not None:
            body = await self._reader.readexactly(length)
        else:
            raise ProtocolError("an answer without Content-Length or chunked framing")
        if close:
            await self.close()
        return status, body

    async def _chunks(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None


def _framing(head: bytes) -> tuple[int | None, bool, bool]:
    """Content-Length (None: absent), chunked, and whether the server closes the connection after it."""
    length, chunked, close = None, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return length, chunked, close
