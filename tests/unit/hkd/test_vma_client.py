"""HKD <-> VMA loopback: the HKD's HTTP client against the agent's real SimpleRPC server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from qvd.backends.base import Endpoint
from qvd.core.errors import InvalidState, QvdError, Unavailable
from qvd.hkd.vma_client import HttpVmaClient, decode_simplerpc
from qvd.vma.rpc import RpcServer


def _slow(params: dict[str, str]) -> object:
    time.sleep(1.0)
    return "late"


def _refuse(params: dict[str, str]) -> object:
    raise QvdError("the desktop is powering off")


@pytest.fixture
def agent() -> Iterator[tuple[Endpoint, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    def expire(params: dict[str, str]) -> object:
        seen.append(params)
        return {"notified": True}

    server = RpcServer("127.0.0.1", 0, {"ping": lambda p: "pong", "expire": expire, "slow": _slow,
                                        "x_start": _refuse})
    server.start()
    try:
        yield Endpoint("127.0.0.1", server.port), seen
    finally:
        server.stop()


def test_results_errors_and_parameters(agent: tuple[Endpoint, list[dict[str, str]]]) -> None:
    ep, seen = agent

    async def scenario() -> None:
        c = HttpVmaClient()
        try:
            assert await c.call(ep, "ping", timeout=2) == "pong"
            got = await c.call(ep, "expire", {"vm.expiration.soft": "2026-01-01T00:00:00+00:00", "x": "a b&c"},
                               timeout=2)
            assert got == {"notified": True}
            assert seen == [{"vm.expiration.soft": "2026-01-01T00:00:00+00:00", "x": "a b&c"}]
            with pytest.raises(InvalidState, match="refused 'x_start': the desktop is powering off"):
                await c.call(ep, "x_start", timeout=2)
            with pytest.raises(Unavailable, match="HTTP 404"):
                await c.call(ep, "no_such_method", timeout=2)
            with pytest.raises(Unavailable, match=r"did not answer 'slow' within 0\.2 s"):
                await c.call(ep, "slow", timeout=0.2)
        finally:
            await c.aclose()

    asyncio.run(scenario())


def test_unreachable_agent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused

        async def scenario() -> None:
            c = HttpVmaClient()
            try:
                with pytest.raises(Unavailable, match=f"cannot reach the desktop agent at 127.0.0.1:{port}"):
                    await c.call(Endpoint("127.0.0.1", port), "ping", timeout=1)
            finally:
                await c.aclose()

        asyncio.run(scenario())


def test_proxy_variables_are_ignored(agent: tuple[Endpoint, list[dict[str, str]]],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    ep, _ = agent

    async def scenario() -> None:
        c = HttpVmaClient()
        try:
            assert await c.call(ep, "ping", timeout=2) == "pong"
        finally:
            await c.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(("body", "expected"), [
    (b'"pong"\r\n', (True, "pong")),
    (b'{"a": 1}\r\n', (True, {"a": 1})),
    (b'"","no session"\r\n', (False, "no session")),
])
def test_decode(body: bytes, expected: tuple[bool, object]) -> None:
    assert decode_simplerpc(body) == expected


@pytest.mark.parametrize("body", [b"", b"not json", b"1,2,3"])
def test_decode_garbage(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_simplerpc(body)
