"""PostgreSQL LISTEN for command channels: wakes the command loop early.

Only a speed-up: the command loop polls anyway, so a lost notification or a broken
listener connection costs at most one poll period.  SQLite has no NOTIFY; there the
listener is not started.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

RECONNECT_DELAY = 5.0


def libpq_conninfo(url: URL) -> str:
    """The SQLAlchemy URL as a libpq URI (``postgresql+psycopg://`` -> ``postgresql://``)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def listen(url: URL, channels: list[str], wake: asyncio.Event) -> None:
    """LISTEN on ``channels`` and set ``wake`` on every notification, reconnecting forever."""
    import psycopg
    from psycopg import sql

    conninfo = libpq_conninfo(url)
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10)
            async with conn:
                for ch in channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
                log.info("listening for commands on %s", ", ".join(channels))
                wake.set()  # anything written while nobody listened
                async for _note in conn.notifies():
                    wake.set()
        except psycopg.Error as e:
            log.warning("command listener: %s; polling only, reconnecting in %g s",
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, RECONNECT_DELAY)
        await asyncio.sleep(RECONNECT_DELAY)
