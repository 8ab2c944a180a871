"""The router's HTTP/1.1 connections: uvicorn's httptools protocol, with the limits it lacks.

uvicorn (httptools) bounds none of what a client may hold; the chaos scenarios of
``loadtest/chaos/clients.py`` measured each (h11 bounds only the header size):

- a 50 MB header was read whole (httptools grows one header by concatenation, in
  about 6 s, and the process by 100 MB) and answered 200; 20,000 headers too;
- a connection that sent nothing, or half its headers, was held forever;
- a body that never reached its Content-Length held its request forever;
- a reader that stopped reading held its stream, and its engine request, forever.

``ConnectionSettings`` (``LLMSERVE_ROUTER__CONNECTIONS__*``) bounds them:

- headers (request line included) past ``max_header_bytes``, or more than
  ``max_headers`` of them: 431, and the connection closes. The parser is fed at
  most that many header bytes, so nothing grows past the limit;
- headers not complete ``header_timeout_s`` after the connection opened (a
  plain close when no byte came), or after the first byte of a later request on
  it: 408. An idle kept-alive connection is uvicorn's: ``timeout_keep_alive``;
- a body with no new byte for ``body_timeout_s``, or still arriving when the
  request's time budget (``request_timeout_s``) is spent: 408, connection closed;
  the handler sees its client leave (a 499 in its record);
- writes blocked for ``write_timeout_s`` (64 KiB waiting beyond the kernel's
  buffers): the connection is aborted, the handler sees its client leave, and a
  stream's engine request is closed.

When the server stops, a response being streamed is cut (its connection is
closed, its engine request with it) instead of holding the shutdown.

One read timer (headers, then body) and one write timer per connection; each is
checked lazily, so a body's pieces do not re-arm a timer apiece.

A response's status line and headers are written together with its first body
bytes when those follow within the same turn of the event loop (a relayed
stream's first event, a JSON body): one write and one TCP segment instead of
two, so the client wakes once (a loopback write that wakes its reader was the
dearest step of a stream's start in a profile on two shared cores).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from llmserve.settings import ConnectionSettings, RouterSettings

logger = logging.getLogger(__name__)


class _TooManyHeaders(Exception):
    """Raised inside the parser's header callback: httptools stops and uvicorn answers (see ``send_400_response``)."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol with header limits and read and write time-outs; ``http_protocol`` sets them."""

    limits: ConnectionSettings = ConnectionSettings()
    request_timeout_s: float = 600.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True  # the next bytes are a request's line and headers
        self._header_room = self.limits.max_header_bytes
        self._header_count = 0
        self._refusal: tuple[int, str, str] | None = None  # what the parser's failure stands for
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0
        self._body_seen_at = 0.0

    # the read side: headers ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        super().connection_made(transport)
        self._arm_read(self.limits.header_timeout_s, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._reading_headers and self._read_timer is None:  # a later request on a kept-alive connection
            self._arm_read(self.limits.header_timeout_s, self._headers_late)
        if not self._reading_headers or len(data) <= self._header_room:
            if self._reading_headers:
                self._header_room -= len(data)  # may count body bytes too: the room resets per request
            super().data_received(data)
            return
        room, self._header_room = self._header_room, 0
        super().data_received(data[:room])  # as much as the limit lets the parser see
        if self.transport.is_closing():
            return
        if self._reading_headers:
            self._refuse(431, "request_header_fields_too_large",
                         f"the request line and headers are over {self.limits.max_header_bytes} bytes "
                         "(LLMSERVE_ROUTER__CONNECTIONS__MAX_HEADER_BYTES)")
            return
        self.data_received(data[room:])  # the headers ended inside the limit: the rest is body

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, "request_header_fields_too_large",
                             f"the request has more than {self.limits.max_headers} headers "
                             "(LLMSERVE_ROUTER__CONNECTIONS__MAX_HEADERS)")
            raise _TooManyHeaders
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # the parser stopped because a callback here refused the request
            self._refuse(*self._refusal)
            return
        super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._header_count = 0
        self._body_seen_at = asyncio.get_running_loop().time()
        self._body_deadline = self._body_seen_at + self.request_timeout_s
        self._arm_read(self.limits.body_timeout_s, self._body_late)
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = _HeadFirstWrite(self.transport)  # type: ignore[assignment]  # its write only

    def _headers_late(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined request: answer this one first
            self._arm_read(self.limits.header_timeout_s, self._headers_late)
            return
        if self._header_room == self.limits.max_header_bytes:  # a new connection that sent nothing
            self.transport.close()
            return
        self._refuse(408, "request_timeout", f"the request's headers took over {self.limits.header_timeout_s:g}s "
                     "(LLMSERVE_ROUTER__CONNECTIONS__HEADER_TIMEOUT_S)")

    # the read side: the body -----------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self._body_seen_at = asyncio.get_running_loop().time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_read()
        self._reading_headers = True
        self._header_room = self.limits.max_header_bytes
        super().on_message_complete()

    def _body_late(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        now = asyncio.get_running_loop().time()
        if self.flow.read_paused:  # the handler has not taken what came (64 KiB): the client is not late
            self._body_seen_at = now
        quiet_until = self._body_seen_at + self.limits.body_timeout_s
        if now < quiet_until and now < self._body_deadline:  # bytes came since: wait out the rest
            self._arm_read(min(quiet_until, self._body_deadline) - now, self._body_late)
            return
        what = (f"no byte of the request's body came for {self.limits.body_timeout_s:g}s "
                "(LLMSERVE_ROUTER__CONNECTIONS__BODY_TIMEOUT_S)") if now < self._body_deadline else (
                f"the request's body was still arriving after its time budget of {self.request_timeout_s:g}s "
                "(LLMSERVE_ROUTER__REQUEST_TIMEOUT_S)")
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            self.transport.close()
            return
        self._refuse(408, "request_timeout", what)
        cycle.disconnected = True  # the handler's receive says the client left; its answer goes nowhere
        cycle.message_event.set()

    # the write side --------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(self.limits.write_timeout_s,
                                                                      self._client_stopped_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _client_stopped_reading(self) -> None:
        self._write_timer = None
        logger.info("%s: the client took no bytes for %gs (LLMSERVE_ROUTER__CONNECTIONS__WRITE_TIMEOUT_S); "
                    "connection aborted", _peer(self.client), self.limits.write_timeout_s)
        if self.cycle is not None:
            self.cycle.disconnected = True  # nothing more is written; connection_lost wakes the handler
        self.transport.abort()

    # both ------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is stopping: a response still being written (a stream, which may run for minutes)
        is cut, its connection closed, so its handler sees the client leave and closes its engine request;
        uvicorn's own shutdown would wait for it. A request not answered yet is still answered."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def _arm_read(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._cancel_read()
        self._read_timer = asyncio.get_running_loop().call_later(delay_s, callback)

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with an OpenAI-shaped error and close: the request is not read further."""
        logger.info("%s: %d %s", _peer(self.client), status, message)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class _HeadFirstWrite:
    """A response's transport that holds its first write (uvicorn writes the status line and headers alone)
    until the next write or the end of this loop turn, whichever comes first, then writes both at once."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            if data:
                self._held = data
                asyncio.get_running_loop().call_soon(self._flush)
            return
        if self._held:
            data, self._held = self._held + data, b""
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "a client"


def http_protocol(settings: RouterSettings) -> type[asyncio.Protocol]:
    """uvicorn's ``http=``: the protocol class with this router's limits."""
    return type("RouterHttpProtocol", (LimitedHttpToolsProtocol,),
                {"limits": settings.connections, "request_timeout_s": settings.request_timeout_s})
