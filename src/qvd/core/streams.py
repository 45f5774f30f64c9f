"""Copying one asyncio stream into another: the L7R tunnel and the client's splice.

Each read is written at once (NX is interactive).  Coalescing small reads headed
into TLS was tried and measured with ``bench/bandwidth.py``: it does not change
the number of TLS records, because the small NX messages of typing (a key press,
its release, the echo) are tens of milliseconds apart, not a burst; see
``docs/decisions.md`` (D16).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

#: Bytes read at a time.
CHUNK = 64 * 1024


async def copy_stream(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: Callable[[int], None]) -> bool:
    """Copy until EOF, waiting for ``dst`` to drain after each write (back-pressure: a slow
    reader slows the writer down instead of filling our memory).

    Returns whether the EOF could be passed on as a half-close (plain TCP can, TLS cannot).
    """
    while True:
        try:
            data = await src.read(CHUNK)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            break
        dst.write(data)
        count(len(data))
        await dst.drain()
    if dst.can_write_eof() and not dst.transport.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            dst.write_eof()
            return True
    return False
