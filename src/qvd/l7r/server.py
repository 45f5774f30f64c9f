"""The L7R's network side: TLS listener, one task per client connection, request loop.

A connection serves any number of sequential requests (QVD clients send
``list_of_vm`` and then ``connect_to_vm`` on the same TLS connection) and may
end as a raw tunnel after ``101``.  Per request, in this order:

1. HTTP version (505 unless HTTP/1.1), method (405 unless GET), path (404);
2. ``/qvd/ping`` answers at once (no authentication);
3. node registered, not blocked, running (503 with the reference's texts);
4. authentication (401 + ``WWW-Authenticate: Basic realm="QVD"``); the result
   is cached for the connection, keyed by the exact ``Authorization`` value;
5. ``connect_to_vm`` only: ``Connection: Upgrade`` + ``Upgrade: QVD/1.0`` (426);
6. the endpoint (:mod:`qvd.l7r.broker`).

Every answer is a complete HTTP response with a non-empty body; nothing ends
with a silently dropped connection except a client that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping

from qvd.core.errors import AuthenticationFailed, TooManyFailures
from qvd.l7r.auth.base import Identity
from qvd.l7r.auth.credentials import parse_auth_extras
from qvd.l7r.broker import Broker, Reply, TunnelReady, unavailable
from qvd.l7r.http import HttpConnection, HttpError, Request
from qvd.l7r.tunnel import close_writer, tune_socket

log = logging.getLogger(__name__)

#: Seconds a connection may stay silent between requests (or in the middle of one).
IDLE_TIMEOUT = 120.0
READ_CHUNK = 64 * 1024

ENDPOINTS = {
    "/qvd/ping": "ping",
    "/qvd/list_of_vm": "list_of_vm",
    "/qvd/list_of_applications": "list_of_applications",
    "/qvd/connect_to_vm": "connect_to_vm",
    "/qvd/stop_vm": "stop_vm",
    "/qvd/authenticate_user": "authenticate_user",
    "/qvd/create_auth_token": "create_auth_token",
}
AUTH_CHALLENGE = (("WWW-Authenticate", 'Basic realm="QVD"'),)
UPGRADE_HEADERS = (("Upgrade", "QVD/1.0"), ("Connection", "Upgrade"))


#: Per-connection TLS read buffer.  asyncio allocates (and zero-fills) 256 KiB per TLS
#: connection by default, which is most of an idle connection's memory; TLS records are at
#: most 16 KiB, so 64 KiB loses nothing and lets a node hold four times more clients.
TLS_READ_BUFFER = 64 * 1024


def tune_asyncio_tls() -> None:
    """Shrink asyncio's per-connection TLS buffer (a class attribute of its SSL protocol)."""
    try:
        from asyncio import sslproto
    except ImportError:  # pragma: no cover - part of the standard library
        return
    proto = getattr(sslproto, "SSLProtocol", None)
    if proto is not None and isinstance(getattr(proto, "max_size", None), int):
        proto.max_size = min(proto.max_size, TLS_READ_BUFFER)


def wants_qvd_upgrade(req: Request) -> bool:
    """``Connection`` lists ``Upgrade`` and ``Upgrade`` is ``QVD/1.0`` (compared case-insensitively)."""
    tokens = {t.strip().lower() for t in (req.header("connection") or "").split(",")}
    protocols = {t.strip().lower() for t in (req.header("upgrade") or "").split(",")}
    return "upgrade" in tokens and "qvd/1.0" in protocols


class ClientConnection:
    """One client TCP/TLS connection: the request loop, then maybe a tunnel."""

    def __init__(self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.http = HttpConnection()
        self._identities: dict[str, Identity] = {}

    async def _send(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.writer.write(data)
        await self.writer.drain()

    async def progress(self, info: str) -> None:
        """One ``102 Processing`` line; raises ConnectionError when the client is gone."""
        await self._send(self.http.processing(info))

    async def run(self) -> None:
        while True:
            try:
                req = self.http.next_request()
            except HttpError as e:
                log.info("bad request from %s: %s", self.ip, e.message)
                self.broker.metrics.requests.labels("bad", str(e.status)).inc()
                await self._send(self.http.response(e.status, (e.message + "\r\n").encode(), close=True))
                return
            if req is None:
                if self.http.eof:
                    return
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), IDLE_TIMEOUT)
                except TimeoutError:
                    log.debug("closing idle connection from %s", self.ip)
                    return
                self.http.receive(data)
                continue
            if not await self.handle(req):
                return

    async def handle(self, req: Request) -> bool:
        """Answer one request; False when the connection must end (closed, or it became a tunnel)."""
        self.broker.counters.add("http_requests")
        endpoint = ENDPOINTS.get(req.path, "other")
        close = False
        try:
            outcome = await self.dispatch(req, endpoint)
        except OSError:
            raise  # the client went away while we were answering
        except Exception:  # a bug or a database outage: answer it, never drop the client silently
            log.exception("%s %s from %s failed", req.method, req.path, self.ip)
            if endpoint == "connect_to_vm":
                outcome = unavailable("internal error of the broker (see its log)")
            else:
                outcome = Reply.text(500, "Internal error of the broker, see its log")
            close = True
        if isinstance(outcome, TunnelReady):
            self.broker.metrics.requests.labels(endpoint, "101").inc()
            try:
                await self._send(self.http.switching([("X-QVD-Slave-Key", outcome.slave_key)]))
            except BaseException:
                await close_writer(outcome.desktop[1])
                await self.broker.give_back(outcome.session)
                raise
            tune_socket(self.writer)
            await self.broker.run_tunnel(outcome, (self.reader, self.writer), self.http.trailing_data())
            return False
        if req.http_version != "1.1":
            close = True
        self.broker.metrics.requests.labels(endpoint, str(outcome.status)).inc()
        log.debug("%s %s from %s -> %s", req.method, req.path, self.ip, outcome.status)
        await self._send(self.http.response(outcome.status, outcome.body, outcome.content_type, outcome.headers,
                                            close=close))
        return not close and self.http.next_cycle()

    async def identity(self, req: Request) -> Identity:
        header = req.header("authorization")
        if header is not None and header in self._identities:
            return self._identities[header]
        ident = await self.broker.authenticate(header, parse_auth_extras(req.headers), self.ip)
        if header is not None:
            self._identities[header] = ident
        return ident

    async def dispatch(self, req: Request, endpoint: str) -> Reply | TunnelReady:
        if req.http_version != "1.1":
            return Reply.text(505, "HTTP Version Not Supported: QVD speaks HTTP/1.1 only")
        if endpoint == "other":
            return Reply.text(404, f"Not found: {req.path[:200]}")
        if req.method != "GET":
            return Reply.text(405, f"Method {req.method[:16]} not allowed here; use GET", (("Allow", "GET"),))
        reason = self.broker.node_unavailable()
        if endpoint == "ping":
            return Reply.text(503, reason) if reason else Reply.text(200, "I am alive!")
        if reason:
            return Reply.text(503, reason)
        try:
            ident = await self.identity(req)
        except TooManyFailures:
            # Same words whether the login exists or not; the log has the details.
            return Reply.text(401, TooManyFailures.public_message, AUTH_CHALLENGE)
        except AuthenticationFailed as e:
            text = "Authentication required" if e.message == "authentication required" else "Authentication failed"
            return Reply.text(401, f"{text}: wrong or missing user name, password or token", AUTH_CHALLENGE)
        query: Mapping[str, str] = dict(req.query)
        if endpoint == "list_of_vm":
            return await self.broker.list_of_vm(ident, query, applications=False)
        if endpoint == "list_of_applications":
            return await self.broker.list_of_vm(ident, query, applications=True)
        if endpoint == "authenticate_user":
            return await self.broker.authenticate_user(ident)
        if endpoint == "create_auth_token":
            return await self.broker.create_auth_token(ident, query)
        if endpoint == "stop_vm":
            return await self.broker.stop_vm(ident, req.query, self.progress, self.ip)
        if not wants_qvd_upgrade(req):
            return Reply.text(426, "Upgrade Required: connect_to_vm needs 'Connection: Upgrade' and "
                                   "'Upgrade: QVD/1.0'", UPGRADE_HEADERS)
        return await self.broker.connect_to_vm(ident, req.query, self.progress, self.ip)


class L7rServer:
    """The listener.  ``ssl_context`` None = plain HTTP (``l7r.use_ssl = false``, tests)."""

    def __init__(self, broker: Broker, address: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.broker = broker
        self.address = address
        self.port = port
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.ssl_context is not None:
            tune_asyncio_tls()
        self._server = await asyncio.start_server(
            self._on_client, self.address or None, self.port, ssl=self.ssl_context, backlog=1024,
            limit=READ_CHUNK, ssl_handshake_timeout=20.0 if self.ssl_context else None,
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("listening on %s:%s (%s)", self.address, self.port, "TLS" if self.ssl_context else "plain HTTP")

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        m = self.broker.metrics
        m.connections.inc()
        m.connections_open.inc()
        conn = ClientConnection(self.broker, reader, writer)
        try:
            await conn.run()
        except (ConnectionError, OSError, ssl.SSLError) as e:
            log.debug("connection from %s ended: %s", conn.ip, e)
        except asyncio.CancelledError:
            pass  # shutting down
        finally:
            m.connections_open.dec()
            await close_writer(writer)
            if task is not None:
                self._tasks.discard(task)

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def close_connections(self, timeout: float = 5.0) -> None:
        """Cancel the connections still open (tunnels were ended by the broker before)."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
