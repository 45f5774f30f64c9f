"""The SimpleRPC protocol over a real loopback HTTP server, then the agent's methods through it."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from qvd.core.config import Config
from qvd.core.errors import InvalidState
from qvd.vma.hooks import Hooks
from qvd.vma.main import Agent
from qvd.vma.rpc import CONTENT_TYPE, RpcServer, decode_body, encode_error, encode_result
from tests.unit.vma.vma_fakes import make_rig


def test_encoding_matches_the_reference_bytes() -> None:
    assert encode_result("listening") == b'"listening"\r\n'
    assert encode_result({"a": 1}) == b'{"a": 1}\r\n'
    assert encode_error("Can't connect") == b'"","Can\'t connect"\r\n'
    assert decode_body(encode_result("x")) == (True, "x")
    assert decode_body(encode_error("boom")) == (False, "boom")
    assert decode_body(encode_result(["a", "b"])) == (True, ["a", "b"])  # a list result is not an error


def get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


@pytest.fixture
def server() -> Iterator[RpcServer]:
    calls: list[dict[str, str]] = []

    def echo(params: dict[str, str]) -> object:
        calls.append(params)
        return params

    def refuse(params: dict[str, str]) -> object:
        raise InvalidState("Unable to start/resume X session in state stopping, try again in a few minutes")

    def crash(params: dict[str, str]) -> object:
        raise RuntimeError("secret detail")

    srv = RpcServer("127.0.0.1", 0, {"echo": echo, "refuse": refuse, "crash": crash})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_success(server: RpcServer) -> None:
    status, ctype, body = get(server.port, "/vma/echo?" + urlencode({"a": "1", "b": "x y", "empty": ""}))
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert body.endswith(b"\r\n")
    assert decode_body(body) == (True, {"a": "1", "b": "x y", "empty": ""})


def test_error_is_a_two_element_body(server: RpcServer) -> None:
    status, ctype, body = get(server.port, "/vma/refuse")
    assert (status, ctype) == (200, CONTENT_TYPE)
    ok, msg = decode_body(body)
    assert not ok and msg == "Unable to start/resume X session in state stopping, try again in a few minutes"


def test_unexpected_exception_is_an_error_answer_without_details(server: RpcServer) -> None:
    status, _, body = get(server.port, "/vma/crash")
    assert status == 200
    ok, msg = decode_body(body)
    assert not ok and "secret detail" not in str(msg)


@pytest.mark.parametrize("path", ["/vma/nope", "/vma/", "/other/echo", "/vma/echo/extra", "/"])
def test_unknown_paths_are_404(server: RpcServer, path: str) -> None:
    assert get(server.port, path)[0] == 404


def test_keep_alive_serves_several_requests(server: RpcServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for i in range(3):
            conn.request("GET", f"/vma/echo?i={i}")
            assert json.loads(conn.getresponse().read()) == {"i": str(i)}
    finally:
        conn.close()


def test_agent_over_http(tmp_path: Path) -> None:
    """HKD/L7R <-> VMA loopback: the real Agent methods and SessionManager with a fake nxagent."""
    rig = make_rig(tmp_path)
    exits: list[int] = []
    agent = Agent(Config(), rig.manager, Hooks(Config(), tmp_path / "hooks.log"), on_exit=exits.append)
    srv = RpcServer("127.0.0.1", 0, agent.methods())
    srv.start()
    try:
        def call(method: str, **params: str) -> tuple[bool, object]:
            status, _, body = get(srv.port, f"/vma/{method}?" + urlencode(params))
            assert status == 200
            return decode_body(body)

        assert call("ping")[0]
        assert call("x_state") == (True, "stopped")
        assert call("x_start", **{"qvd.vm.user.name": "bob", "qvd.client.link": "wan"}) == (True, "starting")
        rig.emit("Session: Starting session at 'x'.")
        assert call("x_state") == (True, "starting")  # announced, not yet listening
        rig.emit("Info: Waiting for connection from any host on socket 'tcp:*:4100'.")
        assert call("x_state") == (True, "listening")
        ok, msg = call("x_start", **{"qvd.client.geometry": "1x1"})
        assert not ok and "qvd.client.geometry" in str(msg)
        ok, info = call("info")
        assert ok and isinstance(info, dict)
        assert info["user"] == "bob" and info["x_state"] == "listening" and "version" in info
        assert call("expire", **{"vm.expiration.soft": "a", "vm.expiration.hard": "b"}) == (True, "ok")
        assert call("x_stop") == (True, "ok")
        assert call("x_state") == (True, "stopping")
        rig.emit("Session: Aborting session at 'x'.", "Session: Session aborted at 'x'.")
        rig.agent.running = False
        assert call("x_state") == (True, "stopped")
        assert call("poweroff") == (True, "ok")
        for _ in range(100):
            if exits:
                break
            time.sleep(0.02)
        assert exits == [0]
    finally:
        srv.stop()
