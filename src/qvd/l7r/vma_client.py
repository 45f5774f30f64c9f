"""Asynchronous client of the desktop agent's SimpleRPC API (reference §4.1).

``GET http://<vm_address>:<vm_vma_port>/vma/<method>?k=v...``; the answer is
``200`` with ``Content-Type: application/json-simplerpc`` and a body that,
wrapped as ``[`` + body + ``]``, decodes to a one-element array (the result)
or a two-element array (``"", "<error message>"``).  We are lenient about
what we read (missing CRLF, other content types, one JSON value without the
wrapping) because agents of several versions may answer.

One TCP connection per call (``Connection: close``): calls are rare (a few per
session start) and this keeps no state between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from urllib.parse import quote, urlencode

import h11

from qvd.core.errors import QvdError

log = logging.getLogger(__name__)

MAX_ANSWER = 1024 * 1024
#: Words in the agent's error messages that mean "the session is changing state, call again".
RETRYABLE_HINTS = ("retry later", "try again")


class VmaError(QvdError):
    """The agent answered an error (``message`` is its text) or something unusable."""

    code = "vma-error"
    http_status = 503

    @property
    def retryable(self) -> bool:
        low = self.message.lower()
        return any(h in low for h in RETRYABLE_HINTS)


class VmaUnreachable(VmaError):
    """No answer: connection refused, reset or timed out.  Worth retrying while a desktop boots."""

    code = "vma-unreachable"

    @property
    def retryable(self) -> bool:
        return True


def decode_simplerpc(body: bytes) -> object:
    """The result carried by a SimpleRPC body.  Raises :class:`VmaError` for an error answer."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise VmaError("the agent answered non-UTF-8 data") from None
    if not text:
        raise VmaError("the agent answered an empty body")
    try:
        items = json.loads("[" + text + "]")
    except ValueError:
        raise VmaError(f"the agent answered something that is not SimpleRPC: {text[:80]!r}") from None
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        msg = items[1] if isinstance(items[1], str) else json.dumps(items[1])
        raise VmaError(msg or "the agent reported an error without a message")
    raise VmaError(f"the agent answered {len(items)} values instead of 1 or 2")


class VmaClient:
    """Calls to one desktop's agent."""

    def __init__(self, address: str, port: int, *, timeout: float = 4.0) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout

    async def call(self, method: str, params: Mapping[str, str] | None = None) -> object:
        """Call ``method``; raises :class:`VmaUnreachable` or :class:`VmaError`."""
        target = "/vma/" + quote(method, safe="")
        if params:
            target += "?" + urlencode(list(params.items()))
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await self._get(target)
        except TimeoutError:
            raise VmaUnreachable(f"the agent at {self.address}:{self.port} did not answer {method} "
                                 f"within {self.timeout:g} s") from None
        except OSError as e:
            raise VmaUnreachable(f"cannot reach the agent at {self.address}:{self.port}: "
                                 f"{e.strerror or e}") from None
        except h11.RemoteProtocolError as e:
            raise VmaError(f"the agent answered malformed HTTP: {e}") from None
        if status != 200:
            raise VmaError(f"the agent answered HTTP {status} to {method}")
        return decode_simplerpc(body)

    async def _get(self, target: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(self.address, self.port)
        try:
            conn = h11.Connection(h11.CLIENT)
            host = f"[{self.address}]" if ":" in self.address else self.address
            writer.write(conn.send(h11.Request(
                method="GET", target=target,
                headers=[("Host", f"{host}:{self.port}"), ("User-Agent", "qvd-l7r"), ("Connection", "close")],
            )) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            status = 0
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_ANSWER:
                        raise h11.RemoteProtocolError("answer too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            return status, bytes(body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def ping(self) -> object:
        return await self.call("ping")

    async def x_state(self) -> str:
        return str(await self.call("x_state"))

    async def x_start(self, params: Mapping[str, str]) -> object:
        return await self.call("x_start", params)

    async def x_suspend(self) -> object:
        return await self.call("x_suspend")

    async def x_stop(self) -> object:
        return await self.call("x_stop")
