"""HTTP/1.1 parsing and response bytes of the L7R (no network, no database)."""

from __future__ import annotations

import pytest

from qvd.l7r.http import MAX_HEAD, HttpConnection, HttpError, Request


def parse_all(data: bytes) -> tuple[HttpConnection, list[Request]]:
    conn = HttpConnection()
    conn.receive(data)
    out = []
    while True:
        req = conn.next_request()
        if req is None:
            return conn, out
        out.append(req)
        conn.response(200, b"ok")
        assert conn.next_cycle()


def test_request_without_host_is_accepted() -> None:
    _, [req] = parse_all(b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n")
    assert req.method == "GET"
    assert req.path == "/qvd/list_of_vm"
    assert req.http_version == "1.1"
    assert req.header("authorization") == "Basic eDp5"


def test_request_line_only_without_host() -> None:
    _, [req] = parse_all(b"GET /qvd/ping HTTP/1.1\r\n\r\n")
    assert req.path == "/qvd/ping"


def test_existing_host_is_kept_and_not_duplicated() -> None:
    _, [req] = parse_all(b"GET / HTTP/1.1\r\nhOsT: node.example:8443\r\n\r\n")
    assert req.header("host") == "node.example:8443"
    assert [n for n, _ in req.raw_headers if n.lower() == "host"] == ["hOsT"]


def test_bare_lf_line_endings() -> None:
    _, [req] = parse_all(b"GET /qvd/connect_to_vm?id=3 HTTP/1.1\nAuthorization: Basic eDp5\n"
                         b"Connection: Upgrade\nUpgrade: QVD/1.0\n\n")
    assert req.query == (("id", "3"),)
    assert req.header("upgrade") == "QVD/1.0"
    assert req.header("connection") == "Upgrade"


def test_mixed_line_endings_and_leading_empty_lines() -> None:
    _, [req] = parse_all(b"\r\n\nGET /x HTTP/1.1\nA: 1\r\nB: 2\n\r\n")
    assert req.header("a") == "1" and req.header("b") == "2"


def test_pipelined_requests_in_one_read() -> None:
    data = (b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n"
            b"GET /qvd/connect_to_vm?id=1 HTTP/1.1\nConnection: Upgrade\nUpgrade: QVD/1.0\n\n"
            b"GET /three HTTP/1.1\r\nHost: h\r\n\r\n")
    _, reqs = parse_all(data)
    assert [r.path for r in reqs] == ["/qvd/list_of_vm", "/qvd/connect_to_vm", "/three"]


def test_request_split_over_many_reads() -> None:
    conn = HttpConnection()
    data = b"GET /qvd/list_of_vm? HTTP/1.1\nAuthorization: Basic eDp5\n\n"
    for i in range(len(data) - 1):
        conn.receive(data[i : i + 1])
        assert conn.next_request() is None
    conn.receive(data[-1:])
    req = conn.next_request()
    assert req is not None and req.path == "/qvd/list_of_vm"


def test_query_decoding() -> None:
    _, [req] = parse_all(b"GET /qvd/connect_to_vm?id=7&qvd.client.keyboard=pc105%2Fes&custom.a=x+y&e= HTTP/1.1\r\n\r\n")
    assert req.query == (("id", "7"), ("qvd.client.keyboard", "pc105/es"), ("custom.a", "x y"), ("e", ""))


@pytest.mark.parametrize("data", [
    b"garbage\r\n\r\n",
    b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /x HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
])
def test_malformed_requests_are_400(data: bytes) -> None:
    conn = HttpConnection()
    conn.receive(data)
    with pytest.raises(HttpError) as ei:
        conn.next_request()
    assert ei.value.status == 400
    # We can still answer it.
    out = conn.response(400, b"bad\r\n", close=True)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_huge_head_is_refused() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /x HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10))
    with pytest.raises(HttpError) as ei:
        conn.next_request()
    assert ei.value.status == 431


def test_truncated_request_at_eof() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /x HTTP/1.1\r\nA: 1")
    assert conn.next_request() is None
    conn.receive(b"")
    with pytest.raises(HttpError):
        conn.next_request()


def test_clean_eof() -> None:
    conn = HttpConnection()
    conn.receive(b"")
    assert conn.next_request() is None
    assert conn.eof


def test_small_body_is_swallowed() -> None:
    _, reqs = parse_all(b"GET /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n")
    assert [r.path for r in reqs] == ["/a", "/b"]


def test_other_http_versions_are_parsed_for_a_505() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /qvd/ping HTTP/1.0\r\n\r\n")
    r10 = conn.next_request()
    assert r10 is not None and r10.http_version == "1.0"
    assert conn.response(505, b"x").startswith(b"HTTP/1.1 505 ")
    assert not conn.next_cycle()  # no keep-alive for HTTP/1.0
    conn = HttpConnection()
    conn.receive(b"GET /qvd/ping HTTP/2.0\r\n\r\n")
    req = conn.next_request()
    assert req is not None and req.http_version == "2.0"


def test_response_bytes_exact() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /qvd/ping HTTP/1.1\r\n\r\n")
    assert conn.next_request() is not None
    out = conn.response(200, b"I am alive!\r\n")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nI am alive!\r\n"
    assert conn.next_cycle()


def test_error_response_with_challenge_bytes_exact() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /qvd/list_of_vm HTTP/1.1\r\n\r\n")
    assert conn.next_request() is not None
    out = conn.response(401, b"no\r\n", headers=[("WWW-Authenticate", 'Basic realm="QVD"')])
    assert out == (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
                   b'WWW-Authenticate: Basic realm="QVD"\r\n\r\nno\r\n')


def test_reason_phrases() -> None:
    for status, line in ((422, b"HTTP/1.1 422 Unprocessable Entity\r\n"), (426, b"HTTP/1.1 426 Upgrade Required\r\n"),
                         (503, b"HTTP/1.1 503 Service Unavailable\r\n"), (408, b"HTTP/1.1 408 Request Timeout\r\n"),
                         (505, b"HTTP/1.1 505 HTTP Version Not Supported\r\n")):
        conn = HttpConnection()
        conn.receive(b"GET / HTTP/1.1\r\n\r\n")
        conn.next_request()
        assert conn.response(status, b"x").startswith(line)


def test_102_and_101_bytes_exact_and_trailing_data() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /qvd/connect_to_vm?id=1 HTTP/1.1\nConnection: Upgrade\nUpgrade: QVD/1.0\n\nNXPROXY-early")
    assert conn.next_request() is not None
    assert conn.processing("Starting virtual machine") == (
        b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n")
    key = "a" * 64
    assert conn.switching([("X-QVD-Slave-Key", key)]) == (
        b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: " + key.encode() + b"\r\n\r\n")
    assert conn.trailing_data() == b"NXPROXY-early"


def test_error_after_102_on_an_upgrade_request_keeps_the_connection() -> None:
    conn = HttpConnection()
    conn.receive(b"GET /qvd/connect_to_vm?id=1 HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n"
                 b"GET /qvd/ping HTTP/1.1\r\n\r\n")
    assert conn.next_request() is not None
    conn.processing("x")
    out = conn.response(503, b"The requested virtual machine is not available: x, retry later.")
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 63\r\n")
    assert conn.next_cycle()
    nxt = conn.next_request()
    assert nxt is not None and nxt.path == "/qvd/ping"


def test_connection_close_request_ends_the_cycle() -> None:
    conn = HttpConnection()
    conn.receive(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    conn.next_request()
    conn.response(200, b"x")
    assert not conn.next_cycle()


def test_underscore_header_names_are_never_written() -> None:
    conn = HttpConnection()
    conn.receive(b"GET / HTTP/1.1\r\n\r\n")
    conn.next_request()
    with pytest.raises(ValueError):
        conn.response(200, b"x", headers=[("X_Bad", "1")])
