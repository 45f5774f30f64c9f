"""HTTP/1.1 for the QVD/1.0 protocol: h11 for parsing, exact response bytes.

QVD clients in the field bend HTTP/1.1 in two ways a strict parser refuses
(reference §2.1, §10.3): they send no ``Host`` header, and the Qt client ends
lines with a bare LF.  h11 (0.16) already accepts bare LF but rejects an
HTTP/1.1 request without ``Host``.  So before h11 sees a request head we cut it
out of the byte stream (up to the first empty line) and, when it has no
``Host`` line, insert one.  That is the only thing done to the bytes: h11 still
parses the request line and every header.

Responses are produced by h11 too (so its keep-alive bookkeeping stays right),
with exactly the headers given: ``Content-Type`` + ``Content-Length`` on every
body, never chunked, no ``Date``/``Server``.  Interim ``102 Processing`` lines
and the final ``101 Switching Protocols`` are h11 ``InformationalResponse``s;
after a 101 the connection carries raw bytes and :meth:`HttpConnection.trailing_data`
returns whatever the peer already sent past the request.

This module knows nothing about QVD endpoints; see :mod:`qvd.l7r.server`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11

#: Largest request head accepted (request line + headers), like h11's own default.
MAX_HEAD = 16 * 1024
#: Largest request body we swallow (QVD requests have none).
MAX_BODY = 64 * 1024

#: Reason phrases, fixed here rather than taken from ``http.HTTPStatus`` because its
#: wording changes between Python versions (422 became "Unprocessable Content").
REASONS: Mapping[int, str] = {
    101: "Switching Protocols",
    102: "Processing",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    422: "Unprocessable Entity",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HAS_HOST = re.compile(rb"^host[ \t]*:", re.IGNORECASE | re.MULTILINE)
_LEADING_EOL = re.compile(rb"^(?:\r?\n)+")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.0-9A-Za-z^`|~]+$")
#: Inserted when a client sends none; never used for routing.
DEFAULT_HOST = b"qvd"


class HttpError(Exception):
    """A request we answer with ``status`` and then close (malformed, too large...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    """One parsed request.  Header names are lower-cased; repeated headers are joined with ``, ``."""

    method: str
    target: str
    http_version: str
    headers: Mapping[str, str]
    path: str = ""
    query: tuple[tuple[str, str], ...] = ()
    raw_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def parse_target(target: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Path and query pairs of a request target (``+`` decodes to a space, blanks kept)."""
    parts = urlsplit(target)
    return parts.path, tuple(parse_qsl(parts.query, keep_blank_values=True))


def _with_host(head: bytes) -> bytes:
    """``head`` (request line + header lines, no final empty line) with a Host line if it had none."""
    first, nl, rest = head.partition(b"\n")
    if nl and _HAS_HOST.search(rest):
        return head
    out = first.rstrip(b"\r") + b"\r\nHost: " + DEFAULT_HOST
    if nl:
        out += b"\r\n" + rest
    return out


def _check_headers(headers: Iterable[tuple[str, str]]) -> None:
    for name, value in headers:
        if not _HEADER_NAME.match(name) or "_" in name:
            # QVD clients reject a response header with '_'; we never write one.
            raise ValueError(f"invalid response header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"response header {name} contains a line break")


class HttpConnection:
    """The server side of one HTTP/1.1 connection, fed with bytes, producing bytes.

    Use: :meth:`receive` what the socket gave (``b""`` at EOF), then call
    :meth:`next_request` until it returns None (needs more data).  Answer every
    request with one :meth:`response` (optionally preceded by :meth:`processing`
    lines) or with :meth:`switching` to turn the connection into a raw stream.
    """

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._pending = bytearray()
        self._eof = False
        self._current: Request | None = None

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes) -> None:
        if data:
            self._pending += data
        else:
            self._eof = True

    @property
    def eof(self) -> bool:
        """The peer closed its sending side (what is buffered may still hold requests)."""
        return self._eof

    def next_request(self) -> Request | None:
        """The next complete request, or None when more bytes are needed.

        Raises :class:`HttpError` for anything we cannot parse (the caller answers
        and closes).  Must not be called again before the current request is answered.
        """
        if self._current is not None:
            raise RuntimeError("previous request not answered")
        if self._h11.their_state is h11.IDLE and not self._feed_head():
            return None
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as e:
            raise HttpError(e.error_status_hint or 400, f"malformed request: {e}") from None
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            raise HttpError(400, "malformed request: expected a request line")
        self._drain_body(event)
        req = self._convert(event)
        self._finish_message()
        self._current = req
        return req

    def _feed_head(self) -> bool:
        """Move one request head from our buffer into h11 (with a Host line if missing)."""
        lead = _LEADING_EOL.match(self._pending)
        if lead:
            del self._pending[: lead.end()]
        m = _HEAD_END.search(self._pending)
        if m is None:
            if len(self._pending) > MAX_HEAD:
                raise HttpError(431, "request head too large")
            if self._eof and self._pending:
                raise HttpError(400, "connection closed in the middle of a request")
            return False
        if m.start() > MAX_HEAD:
            raise HttpError(431, "request head too large")
        head = bytes(self._pending[: m.start()])
        terminator = bytes(self._pending[m.start() : m.end()])
        del self._pending[: m.end()]
        self._h11.receive_data(_with_host(head) + terminator)
        return True

    def _drain_body(self, event: h11.Request) -> None:
        """Swallow a (never used) request body so the next request parses; refuse chunked ones."""
        names = {bytes(n).lower(): bytes(v) for n, v in event.headers}
        if b"transfer-encoding" in names:
            raise HttpError(400, "request bodies are not supported")
        length = int(names.get(b"content-length", b"0") or b"0")
        if length == 0:
            return
        if length > MAX_BODY:
            raise HttpError(413, "request body too large")
        if len(self._pending) < length:
            # QVD requests never carry bodies; refusing a partial one keeps this simple.
            raise HttpError(400, "request bodies are not supported")
        self._h11.receive_data(bytes(self._pending[:length]))
        del self._pending[:length]

    def _finish_message(self) -> None:
        """Consume h11's body events up to EndOfMessage (the body was fed in full already)."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                raise HttpError(e.error_status_hint or 400, f"malformed request: {e}") from None
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Data):
                raise HttpError(400, "malformed request: incomplete body")

    def _convert(self, event: h11.Request) -> Request:
        try:
            target = bytes(event.target).decode("ascii")
            raw = tuple((bytes(n).decode("latin-1"), bytes(v).decode("latin-1")) for n, v in event.headers.raw_items())
        except UnicodeDecodeError:
            raise HttpError(400, "malformed request: non-ASCII request target") from None
        joined: dict[str, str] = {}
        for name, value in raw:
            low = name.lower()
            joined[low] = f"{joined[low]}, {value}" if low in joined else value
        path, query = parse_target(target)
        return Request(
            method=bytes(event.method).decode("ascii"),
            target=target,
            http_version=bytes(event.http_version).decode("ascii"),
            headers=joined,
            path=path,
            query=query,
            raw_headers=raw,
        )

    # ------------------------------------------------------------------ output

    def processing(self, info: str) -> bytes:
        """``HTTP/1.1 102 Processing`` with ``X-QVD-VM-Info: <info>`` (no body)."""
        info = info.replace("\r", " ").replace("\n", " ")
        return self._h11.send(
            h11.InformationalResponse(
                status_code=102, reason=REASONS[102].encode(), headers=[("X-QVD-VM-Info", info)]
            )
        ) or b""

    def response(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
        headers: Iterable[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> bytes:
        """A final response with an exact ``Content-Length`` (always sent, even for an empty body)."""
        extra = list(headers)
        if close:
            extra.append(("Connection", "close"))
        all_headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]
        _check_headers(all_headers)
        out = self._h11.send(
            h11.Response(status_code=status, reason=REASONS.get(status, "Unknown").encode(), headers=all_headers)
        ) or b""
        if body:
            out += self._h11.send(h11.Data(data=body)) or b""
        out += self._h11.send(h11.EndOfMessage()) or b""
        self._current = None
        return out

    def switching(self, headers: Iterable[tuple[str, str]]) -> bytes:
        """``HTTP/1.1 101 Switching Protocols`` with ``headers``; afterwards the stream is raw."""
        hdrs = list(headers)
        _check_headers(hdrs)
        out = self._h11.send(
            h11.InformationalResponse(status_code=101, reason=REASONS[101].encode(), headers=hdrs)
        ) or b""
        self._current = None
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the request that was switched (to forward into the tunnel)."""
        data, _closed = self._h11.trailing_data
        return bytes(data) + bytes(self._pending)

    def next_cycle(self) -> bool:
        """After a response: True when the connection can carry another request."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False
