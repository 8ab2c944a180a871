"""Server-sent events: the one codec for the engines' streams, the router's and the load generators'.

Reads the WHATWG event-stream format (HTML Living Standard, "Server-sent
events", parsing an event stream), the subset OpenAI and vLLM use and the
rest of its line grammar, so that a conforming stream is never misread:

- UTF-8 bytes in chunks split anywhere: inside a line, between the CR and LF
  of a CRLF, inside a leading byte order mark (which is skipped);
- lines ended by LF, CRLF or a lone CR;
- ``field: value`` lines (one space after the colon is dropped; a line without
  a colon is a field with an empty value); field names are case-sensitive;
- ``data``: appended to the event's data, several lines joined by LF;
- ``event``: the event's type (``message`` when absent or empty);
- ``id``: the last event id, kept for later events too (ignored if it holds NUL);
- ``retry``: the reconnection time in ms (ignored unless all ASCII digits);
- lines starting with ``:`` are comments (keep-alives such as ``: ping``) and
  are skipped, as are unknown fields;
- an empty line ends the event; an event without any ``data`` line is dropped
  (an ``event:`` line alone, a ping), as the spec says;
- an event the stream ends in the middle of is discarded.

``[DONE]``, OpenAI's end-of-stream sentinel, is an ordinary data event here
(``Event.done`` tells it); the decoder does not stop at it, the caller does.
Data stays bytes: ``json.loads`` takes bytes, and the router relays payloads
without decoding them.

This module imports only the standard library, so that loadtest and fallback
can use it without importing the router's web stack.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import NamedTuple

__all__ = ["DONE", "Decoder", "Event", "aiter_events", "encode", "has_text", "iter_events"]

DONE = b"[DONE]"
_BOM = b"\xef\xbb\xbf"
_DATA_LINE = b"data: "


class Event(NamedTuple):
    """One dispatched event (a tuple: cheap to make once per streamed token)."""

    data: bytes
    event: str = "message"
    id: str = ""  # the last event id when the event was dispatched

    @property
    def done(self) -> bool:
        """Whether this is OpenAI's ``data: [DONE]`` end-of-stream sentinel."""
        return self.data == DONE


class Decoder:
    """Incremental decoder: ``feed`` it chunks as they arrive, it returns the events they complete.

    Never waits for more than the end of the current event: every event whose
    blank line has arrived is returned by the ``feed`` call that brought it.
    """

    __slots__ = ("_buffer", "_cr", "_started", "last_event_id", "retry_ms")

    def __init__(self) -> None:
        self._buffer = b""  # the unfinished event, line ends already turned into LF
        self._cr = False  # the last chunk ended in CR: an LF first in the next one is the rest of a CRLF
        self._started = False  # past the byte order mark the stream may begin with
        self.last_event_id = ""
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        if not self._started:
            head = self._buffer + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._buffer = head  # maybe a BOM cut short: decide when more arrives
                return []
            self._started = True
            self._buffer = b""
            chunk = head[len(_BOM):] if head.startswith(_BOM) else head
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # its CR already ended the line
        if b"\r" in chunk:
            self._cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._cr = False
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[Event] = []
        start = 0
        # With LF line ends an event ends at the first "\n\n"; a block may still begin with
        # an extra LF (a run of blank lines), which _event reads as a blank line that dispatches nothing.
        while (end := buffer.find(b"\n\n", start)) >= 0:
            event = self._event(buffer[start:end])
            start = end + 2
            if event is not None:
                events.append(event)
        self._buffer = buffer[start:] if start else buffer
        return events

    def _event(self, block: bytes) -> Event | None:
        if block.startswith(_DATA_LINE) and b"\n" not in block:
            return Event(block[len(_DATA_LINE):], "message", self.last_event_id)  # vLLM's every event
        data: list[bytes] = []
        kind = ""
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue  # a blank line before any field (nothing to dispatch) or a comment
            name, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\0" not in value:
                    self.last_event_id = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():
                self.retry_ms = int(value)
        if not data:
            return None
        return Event(b"\n".join(data), kind or "message", self.last_event_id)


def iter_events(chunks: Iterable[bytes]) -> Iterator[Event]:
    """The events of a byte stream (an unfinished last event is discarded)."""
    decoder = Decoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """``iter_events`` for an async byte stream."""
    decoder = Decoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event


def encode(data: bytes | str, event: str | None = None) -> bytes:
    """One event, framed as vLLM frames them: ``[event: NAME\\n]data: DATA\\n\\n``.

    Data with line breaks becomes one ``data:`` line per line, which a decoder
    joins back with LF (so a CRLF or CR in the data comes back as LF).
    """
    payload = data.encode() if isinstance(data, str) else data
    head = b""
    if event:
        if "\n" in event or "\r" in event:
            raise ValueError(f"an SSE event type cannot contain a line break: {event!r}")
        head = b"event: " + event.encode() + b"\n"
    if b"\n" in payload or b"\r" in payload:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(_DATA_LINE + line + b"\n" for line in lines) + b"\n"
    return head + _DATA_LINE + payload + b"\n\n"


# OpenAI stream chunks. Their JSON is written without spaces by vLLM and with
# ", " / ": " by Python's json, so both spellings are looked for.
_TEXT_KEYS = (b'"content":"', b'"content": "', b'"text":"', b'"text": "')


def has_text(data: bytes) -> bool:
    """Whether an OpenAI stream chunk carries output text, read off the bytes (no JSON parse per chunk)."""
    for key in _TEXT_KEYS:
        at = data.find(key)
        if at >= 0 and data[at + len(key): at + len(key) + 1] != b'"':
            return True
    return False
