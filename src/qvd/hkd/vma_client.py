"""How the node daemon talks to the agent (VMA) inside a desktop.

The VMA speaks QVD's "SimpleRPC" over HTTP/1.1: ``GET /vma/<method>?k=v`` answered
with ``200`` and a body of one JSON value + CRLF (the result) or two comma-separated
JSON values ``"",<message>`` (an error).  A caller decodes ``"[" + body + "]"``.

:class:`VmaClient` is the interface the HKD depends on; :class:`HttpVmaClient` is the
real one, and unit tests hand the daemon a fake with the same two methods.

Errors:

* :class:`~qvd.core.errors.Unavailable` - the agent could not be reached or gave no
  SimpleRPC answer (connection refused, timeout, HTTP error, garbage);
* :class:`~qvd.core.errors.InvalidState` - the agent answered with an error (e.g.
  "the desktop is powering off").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Protocol

import httpx

from qvd.backends.base import Endpoint
from qvd.core.errors import InvalidState, Unavailable

log = logging.getLogger(__name__)


class VmaClient(Protocol):
    """What the HKD asks of a desktop's agent."""

    async def call(
        self, endpoint: Endpoint, method: str, params: Mapping[str, str] | None = None, *, timeout: float
    ) -> object:
        """Call ``method`` and return its result; raise Unavailable or InvalidState (see module doc)."""

    async def aclose(self) -> None:
        """Release connections."""


def decode_simplerpc(body: bytes) -> tuple[bool, object]:
    """``(True, result)`` or ``(False, error message)``; ValueError when it is not SimpleRPC."""
    items = json.loads("[" + body.decode("utf-8") + "]")
    if not isinstance(items, list) or len(items) not in (1, 2):
        raise ValueError("not a SimpleRPC body")
    if len(items) == 2:
        return False, items[1]
    return True, items[0]


class HttpVmaClient:
    """SimpleRPC over HTTP with httpx.

    Proxy variables of the environment are ignored (``trust_env=False``): the agent
    lives on the node's private desktop bridge, a proxy could never reach it and must
    not see its queries.  No keep-alive: the VMA serves one thread per connection and a
    parked connection per desktop would hold one for nothing.
    """

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"Connection": "close"},
        )

    async def call(
        self, endpoint: Endpoint, method: str, params: Mapping[str, str] | None = None, *, timeout: float
    ) -> object:
        url = f"http://{endpoint.host}:{endpoint.port}/vma/{method}"
        try:
            r = await self._client.get(url, params=dict(params or {}), timeout=timeout)
        except httpx.TimeoutException:
            raise Unavailable(f"the desktop agent at {endpoint.host}:{endpoint.port} did not answer "
                              f"'{method}' within {timeout:g} s") from None
        except httpx.HTTPError as e:
            raise Unavailable(f"cannot reach the desktop agent at {endpoint.host}:{endpoint.port}: "
                              f"{type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise Unavailable(f"the desktop agent answered '{method}' with HTTP {r.status_code}")
        try:
            ok, value = decode_simplerpc(r.content)
        except (ValueError, UnicodeDecodeError):
            raise Unavailable(f"the desktop agent gave a malformed answer to '{method}'") from None
        if not ok:
            raise InvalidState(f"the desktop agent refused '{method}': {value}")
        return value

    async def aclose(self) -> None:
        await self._client.aclose()
