"""The benchmark's keep-alive client reads what the servers send: Content-Length and chunked answers, a
server that closes after answering, and requests encoded once with their headers."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.rawhttp import Connection, ProtocolError, encode_request

ANSWERS = [
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: application/json\r\n\r\n{\"a\":",
    b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"e\r\n2\r\n\":\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n\r\n",  # no framing: the client cannot tell where it ends
]


async def test_the_client_reads_each_framing_and_reconnects_after_a_close() -> None:
    seen: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"content-length"))
                             .split(b":")[1])
                seen.append(head + await reader.readexactly(length))
                answer = ANSWERS[len(seen) - 1]
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    request = encode_request("POST", url, "/v2/models/m/infer", b'{"x": 1}', {"content-type": "application/json",
                                                                              "Host": "ignored"})
    connection = Connection(url)
    try:
        assert await connection.send(request) == (200, b'{"a":')
        assert await connection.send(request) == (400, b'{"e":')
        assert await connection.send(request) == (200, b"ok")
        with pytest.raises(ProtocolError):
            await connection.send(request)  # on a new connection: the server closed the last one
    finally:
        await connection.close()
        server.close()
        await server.wait_closed()
    assert connections == 2
    assert seen[0] == (f"POST /v2/models/m/infer HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: 8\r\n"
                       'content-type: application/json\r\n\r\n{"x": 1}').encode()
