"""Fuzzing the L7R's front door: malformed HTTP requests and Authorization headers.

Every answer must be a well-formed ``HTTP/1.1`` response with a 4xx status (505 for
another HTTP version, 200 for ping), or the connection is closed; no answer may
carry a stack trace, nothing may be logged as an unexpected exception, and the
server must still answer ``/qvd/ping`` (and let real users in) afterwards.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NodeFx
from tests.unit.auth.rig import start_rig
from tests.unit.l7r.harness import Rig

STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3}) [A-Za-z ]+\r\n")
LEAKS = (b"Traceback", b'File "', b".py\"", b"Error:", b"Exception")
PATHS = ["/qvd/list_of_vm", "/qvd/connect_to_vm?id=1", "/qvd/create_auth_token", "/qvd/stop_vm?id=1",
         "/qvd/authenticate_user", "/qvd/list_of_applications", "/qvd/ping", "/", "/qvd/../etc/passwd", "*",
         "/qvd/list_of_vm?" + "a=" * 50]

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
tokenish = st.from_regex(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}", fullmatch=True)


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


authorization = st.one_of(
    # Basic with every kind of login:password, including no colon, empty parts, separators, NULs, long.
    st.builds(lambda u, p, sep: b"Basic " + _b64(u.encode() + sep + p.encode()), text, text,
              st.sampled_from([b":", b"", b"::", b"\x00"])),
    st.builds(lambda raw: b"Basic " + _b64(raw), st.binary(max_size=200)),
    st.builds(lambda raw: b"Bearer " + _b64(raw), st.binary(max_size=200)),
    st.builds(lambda s: b"Basic " + s, st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    st.builds(lambda scheme, rest: scheme + b" " + rest, tokenish,
              st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    st.just(b"Basic"), st.just(b"Bearer "), st.just(b""), st.just(b"Basic " + b"A" * 3000),
    st.just(b"Basic " + _b64(b"alice@" + b"x" * 2000 + b":secret")),
)
header_line = st.one_of(
    st.builds(lambda v: b"Authorization: " + v, authorization),
    st.builds(lambda n, v: b"Auth-" + n + b": " + v, st.binary(max_size=20).filter(lambda b: b":" not in b and
                                                                                 b"\r" not in b and b"\n" not in b),
              st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    st.sampled_from([b"Connection: Upgrade", b"Upgrade: QVD/1.0", b"Content-Length: 5", b"Content-Length: -1",
                     b"Content-Length: abc", b"Transfer-Encoding: chunked", b"Host: a", b"Host: a\r\nHost: b",
                     b"X: \xff\xfe", b"no colon here", b": empty name", b"Bad Name: x", b" leading: space"]),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b),
)
request_line = st.one_of(
    st.builds(lambda m, p, v: m + b" " + p.encode() + b" " + v,
              st.sampled_from([b"GET", b"POST", b"HEAD", b"get", b"G\x00T", b"PUT", b"CONNECT"]),
              st.sampled_from(PATHS),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"http/1.1"])),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b),
)
# Anything: most of it dies in the HTTP parser.
garbage_request = st.builds(
    lambda line, headers, eol, body, end: line + eol + eol.join(headers) + (eol if headers else b"") + end + body,
    request_line,
    st.lists(header_line, max_size=6),
    st.sampled_from([b"\r\n", b"\n"]),
    st.one_of(st.just(b""), st.binary(max_size=30)),
    st.sampled_from([b"\r\n", b"\n", b""]),
)
# Well-formed HTTP whose credentials are fuzzed: these reach the authentication chain.
auth_extra = st.one_of(
    st.builds(lambda name, value: b"Auth-" + name.encode().hex().encode() + b": " + _b64(value.encode()), text, text),
    st.builds(lambda name, value: b"Auth-" + name + b": " + value, tokenish, tokenish),
    st.sampled_from([b"Connection: Upgrade", b"Upgrade: QVD/1.0", b"User-Agent: QVD::HTTPC/0.01 (linux)"]),
)
auth_request = st.builds(
    lambda path, auth, extras, eol: (b"GET " + path.encode() + b" HTTP/1.1" + eol + b"Authorization: " + auth + eol
                                     + b"".join(x + eol for x in extras) + eol),
    st.sampled_from(PATHS),
    authorization.filter(lambda v: not any(c < 0x20 or c == 0x7F for c in v)),
    st.lists(auth_extra, max_size=3),
    st.sampled_from([b"\r\n", b"\n"]),
)
request = st.one_of(auth_request, auth_request, auth_request, garbage_request)


@pytest.fixture
def fuzz_rig(node: NodeFx) -> Iterator[Rig]:
    # Per-address lockout off: every example comes from 127.0.0.1 and must reach the parser and the chain.
    yield from start_rig(node, config={"l7r.auth.lockout.address.max_failures": "0"},
                         tenants={"default": {"l7r.auth.lockout.delay": "0"}})


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, close our side, read until the server closes (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def check_answers(raw: bytes, seen: dict[int, int]) -> None:
    """Every response in ``raw``: well-formed ``HTTP/1.1``, no 5xx but 505, no stack trace."""
    for leak in LEAKS:
        assert leak not in raw, raw[:300]
    rest = raw
    while rest:
        m = STATUS_LINE.match(rest)
        assert m is not None, rest[:200]
        status = int(m.group(1))
        seen[status] = seen.get(status, 0) + 1
        # 505 is the protocol's own answer to HTTP/1.0 and HTTP/2 request lines (reference 2.1).
        assert status < 500 or status == 505, rest[:300]
        head_end = rest.index(b"\r\n\r\n") + 4
        head = rest[:head_end]
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        if status in (101, 102):
            rest = rest[head_end:]
            continue
        assert length is not None, head
        rest = rest[head_end + int(length.group(1)):]


@pytest.mark.slow
@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_malformed_requests_never_crash_the_l7r(fuzz_rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    port = fuzz_rig.l7r.port
    caplog.set_level(logging.INFO)

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(st.lists(request, min_size=1, max_size=3))
    def one_connection(requests: list[bytes]) -> None:
        check_answers(exchange(port, b"".join(requests)), seen)

    seen: dict[int, int] = {}
    one_connection()
    # The examples reach the parser's refusals and the authentication chain, not only one of them.
    assert seen.get(400, 0) >= 10 and seen.get(401, 0) >= 100, seen
    print("answers by status:", dict(sorted(seen.items())))
    # Nothing logged as an unexpected failure (log.exception = a bug path).
    bad = [r for r in caplog.records if r.name.startswith("qvd.l7r") and r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    assert exchange(port, b"GET /qvd/ping HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
    # And real users still get in.
    ok = exchange(port, b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic " + _b64(b"alice:secret") + b"\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
