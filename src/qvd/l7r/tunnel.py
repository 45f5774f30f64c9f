"""The byte pipe between a client (after ``101``) and the desktop's nxagent.

The NX protocol is opaque here.  Two pumps (:func:`qvd.core.streams.copy_stream`)
copy each way and wait for the destination to drain before reading more
(back-pressure: a slow client slows the desktop down instead of filling our
memory).  An EOF is passed on as a half-close where the transport can do it
(plain TCP); TLS has no half-close, so when the desktop side ends, the client
connection is closed.  Setting ``stop`` (abort by a newer connection or by an admin, or the
L7R stopping) ends both directions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from qvd.core.streams import copy_stream

log = logging.getLogger(__name__)


@dataclass
class SpliceResult:
    bytes_in: int = 0  # client -> desktop
    bytes_out: int = 0  # desktop -> client
    ended_by: str = ""  # "client", "desktop" or "stop"


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY (NX is interactive) and keep-alive (notice dead peers behind NAT)."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 2.0) -> None:
    """Close gracefully (TLS close_notify, flush), abort if that takes longer than ``timeout``."""
    if writer.transport.is_closing():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), timeout)
        return
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (TimeoutError, OSError, ConnectionError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # ssl.SSLError and friends at teardown are not worth more than a debug line
        log.debug("error while closing a connection", exc_info=True)
        writer.transport.abort()


async def splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    desktop: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    initial: bytes = b"",
    stop: asyncio.Event | None = None,
    on_in: Callable[[int], None] | None = None,
    on_out: Callable[[int], None] | None = None,
) -> SpliceResult:
    """Copy both ways until both directions ended (or one ended without half-close, or ``stop``).

    ``initial``: bytes the client sent past the request head, forwarded first.
    Both connections are closed on return.
    """
    (c_reader, c_writer), (d_reader, d_writer) = client, desktop
    result = SpliceResult()

    def count_in(n: int) -> None:
        result.bytes_in += n
        if on_in:
            on_in(n)

    def count_out(n: int) -> None:
        result.bytes_out += n
        if on_out:
            on_out(n)

    stop = stop or asyncio.Event()
    try:
        if initial:
            d_writer.write(initial)
            count_in(len(initial))
            await d_writer.drain()
        up = asyncio.create_task(copy_stream(c_reader, d_writer, count_in), name="tunnel-up")
        down = asyncio.create_task(copy_stream(d_reader, c_writer, count_out), name="tunnel-down")
        stopper = asyncio.create_task(stop.wait(), name="tunnel-stop")
        pending: set[asyncio.Task[object]] = {up, down, stopper}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    result.ended_by = result.ended_by or "stop"
                    break
                finished = [t for t in (up, down) if t in done]
                for t in finished:
                    if not result.ended_by:
                        result.ended_by = "client" if t is up else "desktop"
                    half_closed = t.exception() is None and t.result() is True
                    if not half_closed:
                        pending = set()  # the other side cannot be told: end everything
                        break
                if up.done() and down.done():
                    break
        finally:
            for t in (up, down, stopper):
                t.cancel()
            await asyncio.gather(up, down, stopper, return_exceptions=True)
    except (ConnectionError, OSError) as e:
        log.debug("tunnel ended by an error: %s", e)
        result.ended_by = result.ended_by or "error"
    finally:
        await asyncio.gather(close_writer(c_writer), close_writer(d_writer), return_exceptions=True)
    return result
