"""The client's side of QVD/1.0 against a scripted server (bytes as the L7R writes them)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from qvd.client.protocol import ClientError, L7rConnection, ServerRefused, Switched, basic_auth, parse_vm_list

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


def run(script: Script, body: Callable[[L7rConnection], Awaitable[object]]) -> object:
    async def go() -> object:
        srv = await asyncio.start_server(script, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conn = await L7rConnection.open("127.0.0.1", port, basic_auth("alice", "secret"), None)
        try:
            return await body(conn)
        finally:
            await conn.close()
            srv.close()

    return asyncio.run(go())


def test_list_then_connect_on_one_connection() -> None:
    heads: list[bytes] = []
    key = "K" * 64

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        heads.append(await read_head(r))
        body = b'[{"id": 7, "name": "desk", "state": "stopped", "blocked": 0, "is_application": 0}]\n'
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        heads.append(await read_head(r))
        for info in (b"Session acquired for VM_ID: 7", b"Connection established"):
            w.write(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: " + info + b"\r\n\r\n")
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: " + key.encode() + b"\r\n\r\nNXAGENT-HELLO")
        await w.drain()
        await asyncio.sleep(0.2)
        w.close()

    seen: list[str] = []

    async def body(conn: L7rConnection) -> object:
        vms = await conn.list_of_vm()
        assert [(v.id, v.name, v.blocked) for v in vms] == [(7, "desk", False)]
        return await conn.connect_to_vm(7, {"qvd.client.os": "linux", "qvd.client.keyboard": "pc105/us"},
                                        on_info=seen.append)

    sw = run(script, body)
    assert isinstance(sw, Switched)
    assert sw.slave_key == key and sw.trailing == b"NXAGENT-HELLO"
    assert seen == ["Session acquired for VM_ID: 7", "Connection established"]
    assert heads[0].startswith(b"GET /qvd/list_of_vm HTTP/1.1\r\n")
    assert b"Authorization: Basic YWxpY2U6c2VjcmV0\r\n" in heads[0]
    assert heads[1].startswith(b"GET /qvd/connect_to_vm?id=7&qvd.client.os=linux&qvd.client.keyboard=pc105%2Fus "
                               b"HTTP/1.1\r\n")
    assert b"Connection: Upgrade\r\n" in heads[1] and b"Upgrade: QVD/1.0\r\n" in heads[1]


@pytest.mark.parametrize(("status", "reason", "code", "words"), [
    (401, "Unauthorized", 3, "login refused"),
    (403, "Forbidden", 4, "maintenance"),
    (404, "Not Found", 5, "does not exist"),
    (426, "Upgrade Required", 6, "up-to-date client"),
    (503, "Service Unavailable", 7, "The requested virtual machine is not available: boom, retry later."),
    (500, "Internal Server Error", 1, "unexpected answer 500"),
])
def test_refusals(status: int, reason: str, code: int, words: str) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        body = b"The requested virtual machine is not available: boom, retry later.\r\n"
        w.write(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n")
        w.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode() + body)
        await w.drain()

    async def body(conn: L7rConnection) -> object:
        return await conn.connect_to_vm(1, {})

    with pytest.raises(ServerRefused) as ei:
        run(script, body)
    assert ei.value.exit_code == code and ei.value.status == status
    assert words in ei.value.message


def test_server_closing_without_answer() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: x\r\n\r\n")
        await w.drain()
        w.close()

    async def body(conn: L7rConnection) -> object:
        return await conn.connect_to_vm(1, {})

    with pytest.raises(ClientError, match="closed the connection"):
        run(script, body)


def test_bad_slave_key_is_refused() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: short\r\n\r\n")
        await w.drain()

    async def body(conn: L7rConnection) -> object:
        return await conn.connect_to_vm(1, {})

    with pytest.raises(ClientError, match="Slave-Key"):
        run(script, body)


def test_vm_list_tolerates_old_servers() -> None:
    vms = parse_vm_list(b'[{"id": "3", "name": "a", "state": "running", "blocked": "1"},'
                        b' {"id": 4, "name": "b", "blocked": false}, "junk"]')
    assert [(v.id, v.blocked) for v in vms] == [(3, True), (4, False)]
    with pytest.raises(ClientError):
        parse_vm_list(b"<html>")


def test_connection_refused() -> None:
    async def go() -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(ClientError, match="cannot connect"):
            await L7rConnection.open("127.0.0.1", port, "x", None)

    asyncio.run(go())
