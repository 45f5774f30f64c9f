"""The L7R's client of the desktop agent (SimpleRPC over HTTP)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from qvd.l7r.vma_client import VmaClient, VmaError, VmaUnreachable, decode_simplerpc
from tests.unit.l7r.harness import FakeVma


@pytest.fixture
def vma() -> Iterator[FakeVma]:
    v = FakeVma().start()
    yield v
    v.stop()


def test_decode() -> None:
    assert decode_simplerpc(b'"listening"\r\n') == "listening"
    assert decode_simplerpc(b'"listening"') == "listening"
    assert decode_simplerpc(b"[1, 2]\r\n") == [1, 2]
    assert decode_simplerpc(b"null\r\n") is None
    with pytest.raises(VmaError, match="suspending it, retry later") as ei:
        decode_simplerpc(b'"","Can\'t connect to X session in state connected, suspending it, retry later"\r\n')
    assert ei.value.retryable
    with pytest.raises(VmaError) as ei:
        decode_simplerpc(b'"","invalid value for qvd.client.link"\r\n')
    assert not ei.value.retryable
    for bad in (b"", b"<html>", b"1,2,3", b"\xff"):
        with pytest.raises(VmaError):
            decode_simplerpc(bad)


def test_calls(vma: FakeVma) -> None:
    async def go() -> None:
        c = VmaClient("127.0.0.1", vma.port, timeout=2)
        assert await c.x_state() == "stopped"
        assert await c.x_start({"qvd.vm.user.name": "alice", "qvd.client.keyboard": "pc105/es", "a b": "c&d=e"}) \
            == "starting"
        assert await c.x_state() == "listening"
        vma.refuse = "Unable to start/resume X session in state stopping, try again in a few minutes"
        with pytest.raises(VmaError) as ei:
            await c.x_start({})
        assert ei.value.retryable
        with pytest.raises(VmaError, match="HTTP 404"):
            await c.call("nope")

    asyncio.run(go())
    assert vma.x_starts()[0] == {"qvd.vm.user.name": "alice", "qvd.client.keyboard": "pc105/es", "a b": "c&d=e"}


def test_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go() -> None:
        with pytest.raises(VmaUnreachable) as ei:
            await VmaClient("127.0.0.1", port, timeout=1).ping()
        assert ei.value.retryable

    asyncio.run(go())


def test_silent_agent_times_out() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        async def go() -> None:
            with pytest.raises(VmaUnreachable, match="did not answer"):
                await VmaClient("127.0.0.1", srv.getsockname()[1], timeout=0.3).x_state()

        asyncio.run(go())
