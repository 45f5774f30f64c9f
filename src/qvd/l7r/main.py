"""``qvd-l7r``: the broker users connect to (QVD/1.0 over TLS, one process per node).

Start, in order (each step fails with a clear message, nothing half-started
stays behind): configuration, database + schema check, this node's ``hosts``
row (registered if absent, as the node daemon does), sessions a previous run
left taken, TLS certificate, authentication plugins, listener, metrics.
SIGTERM/SIGINT: stop listening, let live tunnels run for
``internal.l7r.timeout.shutdown`` seconds, close them (their VMs are given
back), flush the counters, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qvd.cli.common import base_parser, fail, open_node, setup_logging
from qvd.core.config import Config, Paths
from qvd.core.errors import QvdError
from qvd.db.engine import DAEMON_IDLE_IN_TRANSACTION
from qvd.db.schema import require_current
from qvd.l7r import store
from qvd.l7r.auth.base import PluginContext
from qvd.l7r.auth.chain import AuthChain, ConfigCache
from qvd.l7r.broker import Broker
from qvd.l7r.metrics import L7rMetrics
from qvd.l7r.server import L7rServer
from qvd.l7r.tls import ensure_certificate, fingerprint, server_context
from qvd.services.placement import check_plugin

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """Every client is a socket (two once tunnelled): use the hard limit of open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %s to %s: %s", soft, hard, e)
    return soft


def node_name(cfg: Config) -> str:
    return cfg.get_str("nodename") or socket.gethostname()


async def listen_for_aborts(url: str, channel: str, wake: asyncio.Event) -> None:
    """PostgreSQL LISTEN on ``channel``; every NOTIFY wakes the abort watcher (which also polls)."""
    import psycopg
    from psycopg import sql

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                log.debug("listening for %s", channel)
                async for _note in conn.notifies():
                    wake.set()
        except psycopg.Error as e:
            log.warning("LISTEN %s failed (%s); polling only, retrying in 5 s", channel, e)
            await asyncio.sleep(5)


class L7rService:
    """The L7R of one node, startable and stoppable inside any event loop (``main`` and tests)."""

    def __init__(self, cfg: Config, paths: Paths, factory: sessionmaker[Session], url: str) -> None:
        self.cfg = cfg
        self.paths = paths
        self.factory = factory
        self.url = url
        self.broker: Broker | None = None
        self.server: L7rServer | None = None
        self.metrics_server: Any = None
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    async def start(self) -> None:
        cfg = self.cfg
        name, address = node_name(cfg), cfg.get_str("node.address")
        host_id = await asyncio.to_thread(
            store.ensure_host, self.factory, name, address,
            frontend=cfg.get_bool("node.frontend"), backend=cfg.get_bool("node.backend"),
        )
        if not cfg.get_bool("node.frontend"):
            log.warning("node.frontend is false for this node, but an L7R is starting on it")
        freed = await asyncio.to_thread(store.reset_own_sessions, self.factory, host_id, os.getpid())
        if freed:
            log.info("freed %d VM(s) a previous L7R of this node left connected", freed)

        ssl_ctx = None
        if cfg.get_bool("l7r.use_ssl"):
            cert, key = await asyncio.to_thread(ensure_certificate, cfg, self.paths, name, address)
            ssl_ctx = server_context(cert, key)
            log.info("TLS certificate %s, SHA-256 fingerprint %s", cert, fingerprint(cert))
        else:
            log.warning("l7r.use_ssl is false: passwords travel in clear (use only for tests)")

        configs = ConfigCache(self.factory, cfg)
        chain = AuthChain(PluginContext(self.factory, cfg, host_id, self.paths), configs)
        names = await asyncio.to_thread(chain.validate)
        log.info("authentication plugins: %s", ", ".join(names))
        await asyncio.to_thread(lambda: check_plugin(configs.get()))

        metrics = L7rMetrics()
        broker = Broker(factory=self.factory, node_cfg=cfg, host_id=host_id, chain=chain, configs=configs,
                        metrics=metrics)
        self.broker = broker
        await broker.refresh()
        server = L7rServer(broker, cfg.get_str("l7r.address"), cfg.get_int("l7r.port"), ssl_ctx)
        await server.start()
        self.server = server
        self._tasks.append(asyncio.create_task(broker.refresh_loop(), name="l7r-refresh"))
        self._tasks.append(asyncio.create_task(broker.abort_watch_loop(), name="l7r-aborts"))
        if make_url(self.url).get_backend_name() == "postgresql":
            self._tasks.append(asyncio.create_task(
                listen_for_aborts(self.url, f"qvd_cmd_for_user_on_host{host_id}", broker.wake_watcher),
                name="l7r-listen"))
        mport = cfg.get_int("l7r.metrics.port")
        if mport:
            try:
                self.metrics_server, _ = metrics.serve(cfg.get_str("l7r.metrics.address"), mport)
                self.metrics_port = int(self.metrics_server.server_address[1])
                log.info("metrics on http://%s:%s/metrics", cfg.get_str("l7r.metrics.address"), self.metrics_port)
            except OSError as e:
                log.error("cannot serve metrics on port %s: %s (continuing without)", mport, e.strerror)
        log.info("qvd-l7r ready on node %s (host %s), port %s", name, host_id, server.port)

    async def stop(self) -> None:
        """Reverse order of :meth:`start`; safe to call twice or after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        if self.server is not None:
            await self.server.stop_listening()
        if self.broker is not None:
            await self.broker.shutdown(self.cfg.get_float("internal.l7r.timeout.shutdown"))
        if self.server is not None:
            await self.server.close_connections()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.refresh()  # the last counters
            self.broker.close()


async def run(service: L7rService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        log.info("open files limit: %s", raise_fd_limit())
        await service.start()
        await stop.wait()
        log.info("stopping")
    finally:
        await service.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    p = base_parser("qvd-l7r", "QVD/1.0 broker (L7R): authenticates users, starts their desktops, tunnels NX.")
    p.add_argument("--port", type=int, help="listen on this port (default: l7r.port, 8443)")
    p.add_argument("--address", help="listen on this address (default: l7r.address, all)")
    args = p.parse_args(argv)
    extra: dict[str, object] = {}
    if args.port is not None:
        extra["l7r.port"] = args.port
    if args.address is not None:
        extra["l7r.address"] = args.address
    try:
        node = open_node(args.root, extra, idle_in_transaction_timeout=DAEMON_IDLE_IN_TRANSACTION)
    except QvdError as e:
        return fail("qvd-l7r", e)
    setup_logging(node.cfg.get_str("log.level"))
    try:
        require_current(node.engine)
        asyncio.run(run(L7rService(node.cfg, node.paths, node.factory, node.url)))
    except QvdError as e:
        return fail("qvd-l7r", e)
    except SQLAlchemyError as e:
        return fail("qvd-l7r", f"database error: {e}")
    except KeyboardInterrupt:
        return 130
    finally:
        node.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
