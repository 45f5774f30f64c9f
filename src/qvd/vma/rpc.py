"""The VMA's HTTP control API: QVD's "SimpleRPC" over HTTP/1.1 (reference section 4.1).

Wire format, kept byte-compatible with the reference so existing callers work::

    GET /vma/<method>?k=v&k=v HTTP/1.1
    -> 200, Content-Type: application/json-simplerpc
       body: <JSON of the return value>\\r\\n             on success
             "",<JSON string of the error message>\\r\\n   on error

Callers decode ``"[" + body + "]"``: one element is the result, two elements an
error.  An unknown method is a plain 404.

This module knows nothing about sessions: it maps method names to callables
taking the query parameters (last value wins for repeated keys).  Request
logs name the method only; query strings carry bearer tokens and keys.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from qvd.core.errors import QvdError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json-simplerpc"
PREFIX = "/vma/"
MAX_QUERY = 64 * 1024

Method = Callable[[dict[str, str]], object]


def encode_result(value: object) -> bytes:
    return json.dumps(value).encode("utf-8") + b"\r\n"


def encode_error(message: str) -> bytes:
    return b'"",' + json.dumps(message).encode("utf-8") + b"\r\n"


def decode_body(body: bytes) -> tuple[bool, object]:
    """What a caller does with a body: ``(True, result)`` or ``(False, message)``.  Raises ValueError."""
    items = json.loads("[" + body.decode("utf-8") + "]")
    if not isinstance(items, list) or len(items) not in (1, 2):
        raise ValueError("not a SimpleRPC body")
    if len(items) == 2:
        return False, items[1]
    return True, items[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection must not hold a thread forever
    server: VmaHttpServer

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        name = parts.path[len(PREFIX):] if parts.path.startswith(PREFIX) else ""
        method = self.server.methods.get(name) if name and "/" not in name else None
        if method is None:
            self._send(404, b"not found\r\n", "text/plain")
            return
        if len(parts.query) > MAX_QUERY:
            self._send(200, encode_error("request too large"), CONTENT_TYPE)
            return
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        try:
            body = encode_result(method(params))
        except QvdError as e:
            log.info("vma/%s: %s", name, e.message)
            body = encode_error(e.message)
        except Exception:  # the caller must get an answer, not a dropped connection
            log.exception("vma/%s failed", name)
            body = encode_error("internal error in the VMA, see its log")
        self._send(200, body, CONTENT_TYPE)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Only the method name: query strings contain bearer tokens and slave keys.
        log.debug("%s %s", self.address_string(), urlsplit(self.path).path)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s -> %s", self.address_string(), urlsplit(self.path).path, code)


class VmaHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], methods: Mapping[str, Method]) -> None:
        self.methods = dict(methods)
        super().__init__(address, _Handler)


class RpcServer:
    """The server running in a background thread; ``port`` is the bound one (useful with port 0)."""

    def __init__(self, address: str, port: int, methods: Mapping[str, Method]) -> None:
        self._http = VmaHttpServer((address, port), methods)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="vma-rpc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
