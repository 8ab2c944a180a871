"""The SSE codec (router.relay.sse): what it accepts, cut anywhere, and what the load generator makes of it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from loadtest.runner import Record, Target, send
from loadtest.workload import RequestSpec
from router.relay.sse import DONE, Decoder, Event, encode, has_text, iter_events

# What vLLM sends, plus what the spec allows and a careless parser drops: an event
# opened by an ``event:`` line, a ping, multi-line data, an id and a retry.
STREAM = (
    b'event: chunk\ndata: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b": ping - 2026-12-01 10:00:00\n\n"
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
    b"id: 7\nretry: 1500\ndata: first line\ndata: second line\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    Event(b'{"choices":[{"delta":{"content":"Hel"}}]}', "chunk", ""),
    Event(b'{"choices":[{"delta":{"content":"lo"}}]}', "message", ""),
    Event(b"first line\nsecond line", "message", "7"),
    Event(DONE, "message", "7"),
]


def decode(*chunks: bytes) -> list[Event]:
    return list(iter_events(chunks))


def test_a_whole_stream_decodes_into_its_events() -> None:
    assert decode(STREAM) == EXPECTED


def test_chunks_may_be_cut_anywhere() -> None:
    for cut in range(1, len(STREAM)):
        assert decode(STREAM[:cut], STREAM[cut:]) == EXPECTED, cut
    assert decode(*(STREAM[i:i + 1] for i in range(len(STREAM)))) == EXPECTED  # one byte at a time


def test_each_event_comes_out_of_the_feed_that_completes_it() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: tw") == [Event(b"one")]
    assert decoder.feed(b"o\n\n") == [Event(b"two")]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_line_ends_read_as_lf(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    assert decode(stream) == EXPECTED
    for cut in range(1, len(stream)):  # including between the CR and the LF of a CRLF
        assert decode(stream[:cut], stream[cut:]) == EXPECTED, cut


def test_mixed_line_ends_and_runs_of_blank_lines() -> None:
    assert decode(b"data: a\r\n\n\r\n\ndata: b\n\r\n") == [Event(b"a"), Event(b"b")]
    assert decode(b"\n\n\ndata: a\n\n") == [Event(b"a")]


def test_a_stream_beginning_with_an_event_line_is_not_dropped() -> None:
    # loadtest/bench.py skipped every event not starting with "data: " and so lost this one.
    assert decode(b'event: token\ndata: {"text":"hi"}\n\n') == [Event(b'{"text":"hi"}', "token")]


def test_the_event_type_is_per_event() -> None:
    events = decode(b"event: token\ndata: a\n\ndata: b\n\nevent:\ndata: c\n\n")
    assert [(e.event, e.data) for e in events] == [("token", b"a"), ("message", b"b"), ("message", b"c")]


def test_comments_pings_and_events_without_data_dispatch_nothing() -> None:
    assert decode(b": ping\n\n:\n\nevent: token\n\nid: 3\n\nretry: 10\n\n") == []
    assert decode(b": ping\ndata: x\n: another comment\n\n") == [Event(b"x", "message", "")]


def test_done_is_an_ordinary_event_and_decoding_goes_on_after_it() -> None:
    events = decode(b"data: [DONE]\n\ndata: late\n\n")
    assert [e.done for e in events] == [True, False]
    assert events[1].data == b"late"


def test_field_syntax() -> None:
    # No space, two spaces (one is kept), no colon (an empty value), an unknown field, a case mismatch.
    assert decode(b"data:x\n\n") == [Event(b"x")]
    assert decode(b"data:  x\n\n") == [Event(b" x")]
    assert decode(b"data\n\n") == [Event(b"")]
    assert decode(b"data\ndata\n\n") == [Event(b"\n")]
    assert decode(b"foo: bar\nData: no\ndata: yes\n\n") == [Event(b"yes")]


def test_id_persists_and_retry_is_read() -> None:
    decoder = Decoder()
    events = decoder.feed(b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: bad\0id\ndata: d\n\n")
    assert [e.id for e in events] == ["1", "1", "", ""]
    decoder.feed(b"retry: 2500\n\nretry: soon\n\n")
    assert decoder.retry_ms == 2500


def test_an_unfinished_last_event_is_discarded() -> None:
    assert decode(b"data: complete\n\ndata: cut off") == [Event(b"complete")]
    assert decode(b"data: cut off\n") == []


def test_a_leading_byte_order_mark_is_skipped_even_when_split() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    for cut in range(1, 4):
        assert decode(stream[:cut], stream[cut:]) == [Event(b"x")]
    assert decode(b"\xef\xbb", b"") == []
    assert decode(b"\xef\xbbdata: x\n\n") == []  # not a BOM: a line with an unknown field name


def test_encode_frames_as_vllm_and_round_trips() -> None:
    assert encode(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert encode("[DONE]") == b"data: [DONE]\n\n"
    assert encode('{"text":"x"}', event="token") == b'event: token\ndata: {"text":"x"}\n\n'
    assert encode(b"one\ntwo\r\nthree") == b"data: one\ndata: two\ndata: three\n\n"
    for data in (b"plain", b"one\ntwo", b"", b"\n", b"trailing\n"):
        assert decode(encode(data, event="e")) == [Event(data, "e")], data
    with pytest.raises(ValueError):
        encode(b"x", event="bad\nname")


def test_has_text_reads_the_chunk_bytes() -> None:
    assert has_text(b'{"choices":[{"delta":{"content":"hi"}}]}')
    assert has_text(b'{"choices": [{"text": "hi"}]}')
    assert not has_text(b'{"choices":[{"delta":{"content":""}}]}')
    assert not has_text(b'{"choices":[{"delta":{"role":"assistant"}}],"usage":null}')


def test_importing_the_codec_imports_only_the_standard_library() -> None:
    code = ("import sys; before = set(sys.modules); import router.relay.sse; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - {'router'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_the_load_generator_reads_a_stream_cut_anywhere_with_event_lines() -> None:
    chunk = {"choices": [{"delta": {"content": "tok"}}]}
    body = b"".join([
        b"event: chunk\r\n" + encode(json.dumps(chunk)).replace(b"\n", b"\r\n"),
        b": ping\r\n\r\n",
        encode(json.dumps(chunk), event="chunk"),
        encode(json.dumps(chunk)),
        encode(json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})),
        encode(DONE),
    ])

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for at in range(0, len(body), 7):  # cuts inside lines, CRLFs and the JSON
            await response.write(body[at:at + 7])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        loop = asyncio.get_running_loop()
        record = Record(index=0, target="t", intended_s=loop.time(), sent_s=loop.time())
        async with aiohttp.ClientSession() as session:
            await send(session, Target("t", f"http://127.0.0.1:{port}/v1"), "m",
                       RequestSpec(None, "hi", 3, None, None), record, loop.time)
    finally:
        await runner.cleanup()
    assert record.ok, record.error
    assert record.first_token_s is not None and len(record.itl_s) == 2  # three text chunks, the first one too
    assert (record.input_tokens, record.output_tokens) == (5, 3)
