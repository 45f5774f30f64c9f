"""Engines and sessions for SQLite (single node) and PostgreSQL (clusters)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config, Paths
from qvd.core.errors import ConfigError

# Seconds to open a PostgreSQL connection; milliseconds a sent packet may stay unacknowledged.
_PG_CONNECT_TIMEOUT = 4
_PG_TCP_USER_TIMEOUT_MS = 4000
#: idle_in_transaction_timeout of the daemons (HKD, L7R): below the self-fencing timeout.
DAEMON_IDLE_IN_TRANSACTION = 5.0


def database_url(cfg: Config, paths: Paths) -> str:
    """``database.url`` or the embedded SQLite file under the node root."""
    url = cfg.get_str("database.url")
    if not url:
        return f"sqlite:///{paths.sqlite_db}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"invalid value {url!r} for configuration key 'database.url': "
                          "expected an SQLAlchemy URL such as postgresql+psycopg://user:pass@host/db") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"invalid value {url!r} for configuration key 'database.url': "
                          "expected a sqlite:/// or postgresql+psycopg:// URL")
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        raise ConfigError(f"invalid value {url!r} for configuration key 'database.url': "
                          "PostgreSQL URLs must use the psycopg 3 driver (postgresql+psycopg://)")
    return url


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (L7R, API) run while the HKD writes; foreign keys are off by default.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, *, idle_in_transaction_timeout: float | None = None, **kw: Any) -> Engine:
    """An engine for ``url``.

    ``idle_in_transaction_timeout`` (PostgreSQL, seconds): the server ends a session of ours
    that stays inside a transaction without a word this long.  The daemons, whose
    transactions last milliseconds, set it: a node cut off in the middle of a transaction
    must not keep its row locks (and so block the peers that declare it lost) until the
    server's TCP keep-alive notices, two hours later by default.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10}, **kw)
        event.listen(engine, "connect", _sqlite_pragmas)
        # Begin transactions ourselves so that SQLite takes its write lock at BEGIN IMMEDIATE
        # for writes, rather than failing on lock upgrade in the middle of a transaction.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))

        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn: sqlite3.Connection, _r: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    # A node cut off from the database must notice within seconds (self-fencing), not after the
    # kernel's TCP retransmission timeout (~15 min): bound connecting and unacknowledged writes.
    connect_args: dict[str, Any] = {
        "connect_timeout": _PG_CONNECT_TIMEOUT, "tcp_user_timeout": _PG_TCP_USER_TIMEOUT_MS,
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
    }
    if idle_in_transaction_timeout:
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout * 1000)}"
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=connect_args, **kw)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session
