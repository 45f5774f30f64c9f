"""The node daemon: ordered start, the loops, graceful stop.

Start (each step logged; a failure undoes the steps before it, in reverse)::

    1 lock        exclusive flock on $QVD_ROOT/run/hkd.lock (one HKD per root); make sure
                  the node's fence guard runs (:mod:`qvd.hkd.guard`)
    2 database    open it (node file: database.url), read the global config rows
    3 schema      refuse a database whose schema is not this code's
    4 host        find the hosts row by name (or register it); refuse another address,
                  and refuse while another live daemon heartbeats for this host
    5 backend     vm.hypervisor's backend, check() (tools, bridge, firewall)
    6 starting    host state -> starting (from whatever a previous run left)
    7 reconcile   adopt desktops that still run and answer; reap the rest; remove orphans
    8 running     host state -> running with a first heartbeat; start the loops

Loops: heartbeat (+ self-fencing; each good beat rewrites run/hkd.heartbeat for the fence
guard), command handler (+ PostgreSQL LISTEN), expiration monitor, cluster monitor, and one
task per desktop (:mod:`qvd.hkd.vm_handler`).

Cluster monitor (every ``internal.hkd.agent.cluster_monitor.delay`` s plus a little
jitter): a peer that is running or stopping and whose heartbeat is older than
``internal.hkd.cluster.node.timeout`` is declared ``lost``; its desktops are written
stopped (the next connection starts them on another node) and its connections reset or
aborted (:meth:`HkdStore.declare_lost_peers`).  Heartbeats carry each node's clock, so
the nodes need synchronised clocks (NTP), and the lost timeout must stay comfortably
above the self-fencing timeout ``internal.hkd.agent.ticker.timeout``: a node cut off
from the database stops its own desktops before a peer lets them start elsewhere.  A
lost node that comes back finds its heartbeat refused, fences, and rejoins through
``starting`` (its reconciliation removes the desktops the database moved away).

Stop (SIGTERM/SIGINT or host command ``stop``): stop claiming, host -> stopping, give
back unclaimed start commands, stop every desktop (graceful, then forced, within
``internal.hkd.stopping.vms.timeout``), host -> stopped, release everything in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from qvd.backends.base import Backend, DesktopSpec, backend_class
from qvd.core.config import Config, Paths
from qvd.core.errors import InvalidState, QvdError, Unavailable, short_message
from qvd.core.states import HostState, VmState
from qvd.db.engine import DAEMON_IDLE_IN_TRANSACTION, database_url, make_engine, make_sessionmaker
from qvd.db.models import utcnow
from qvd.db.schema import require_current
from qvd.hkd import notify, sysinfo
from qvd.hkd.context import ContextLog, DbRunner, HandlerContext
from qvd.hkd.guard import HeartbeatFile, ensure_guard
from qvd.hkd.store import HkdStore, LostHost
from qvd.hkd.vm_handler import VmHandler
from qvd.hkd.vma_client import HttpVmaClient, VmaClient

log = logging.getLogger(__name__)

# Bound of the final forced pass at shutdown, after internal.hkd.stopping.vms.timeout.
_FORCED_PASS_TIMEOUT = 30.0
# Desktops stopped at once when the node fences itself.
_TEARDOWN_PARALLEL = 16
# Bound of each database write while stopping (the SQLite busy timeout is 10 s).
_SHUTDOWN_DB_TIMEOUT = 15.0


class NodeDaemon:
    """One HKD.  ``backend``/``vma`` may be injected (unit tests); otherwise they come
    from ``vm.hypervisor`` and :class:`HttpVmaClient`.  ``guard=False``: start no fence
    guard (:mod:`qvd.hkd.guard`; never started for the in-process fake backend)."""

    def __init__(self, paths: Paths, node_cfg: Config, name: str, address: str, *,
                 backend: Backend | None = None, vma: VmaClient | None = None, guard: bool = True) -> None:
        self.paths = paths
        self.node_cfg = node_cfg
        self.cfg = node_cfg
        self.name = name
        self.address = address
        self.backend: Backend | None = backend
        self.vma: VmaClient = vma or HttpVmaClient()
        self.log = ContextLog(log, {"host": name})
        self.db = DbRunner()
        self.engine: Engine | None = None
        self.store: HkdStore | None = None
        self.ctx: HandlerContext | None = None
        self.handlers: dict[int, VmHandler] = {}
        self.accepting = False
        self.fenced = False
        self.stop_requested = asyncio.Event()
        self.wake = asyncio.Event()
        self._lock_fd: int | None = None
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._signals = 0
        self.guard = guard
        self._heartbeat_file = HeartbeatFile(paths.run, self.log)
        self._judging_since: float | None = None  # monotonic time from which the cluster monitor counts

    # --- public ------------------------------------------------------------------------------

    async def run(self, *, install_signals: bool = False) -> int:
        """Start, serve until asked to stop, stop.  Raises QvdError("<step>: <why>") if start fails."""
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown, sig.name)
        await self.startup()
        return await self.run_until_stopped()

    async def run_until_stopped(self) -> int:
        """After :meth:`startup`: serve until a signal or the host command ``stop``, then stop."""
        await self.stop_requested.wait()
        return await self.shutdown()

    def request_shutdown(self, why: str = "requested", *, force: bool = False) -> None:
        self._signals += 1
        if self.stop_requested.is_set():
            if force or self._signals > 1:
                self.log.warning("%s again: forcing the desktops down", why)
                for h in list(self.handlers.values()):
                    h.request_stop("the node daemon is stopping (forced)", graceful=False)
            return
        self.log.info("stop requested (%s)", why)
        self.stop_requested.set()

    # --- start -------------------------------------------------------------------------------

    async def startup(self) -> None:
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("lock", self._step_lock),
            ("database", self._step_database),
            ("schema", self._step_schema),
            ("host", self._step_host),
            ("backend", self._step_backend),
            ("starting", self._step_starting),
            ("reconcile", self._step_reconcile),
            ("running", self._step_running),
        ]
        for n, (step, fn) in enumerate(steps, 1):
            self.log.info("start %d/%d: %s", n, len(steps), step)
            try:
                await fn()
            except (QvdError, SQLAlchemyError, OSError) as e:
                msg = short_message(e)
                self.log.error("start step '%s' failed: %s", step, msg)
                await self._undo_all()
                raise QvdError(f"{step}: {msg}") from None
            except BaseException:
                await self._undo_all()
                raise
        kept = sum(1 for h in self.handlers.values() if h.state in (VmState.RUNNING, VmState.DEBUGGING))
        self.log.info("node daemon running (host id %d, %d desktop(s) adopted)", self._store().host_id, kept)

    async def _undo_all(self) -> None:
        while self._undo:
            what, fn = self._undo.pop()
            try:
                await fn()
            except Exception:  # keep undoing the rest; the failure itself is logged
                self.log.exception("undo of '%s' failed", what)

    async def _step_lock(self) -> None:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        path = self.paths.run / "hkd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InvalidState(f"another qvd-hkd holds {path}" + (f" (pid {holder})" if holder else "")) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._undo.append(("lock", self._release_lock))
        # The fence guard stops this node's desktops if this process dies and no HKD comes
        # back in time.  The fake backend's desktops live in this process: no guard sees them.
        # Only in a cluster (PostgreSQL): on a single node (SQLite) no peer can restart the desktops,
        # so stopping them would only end the users' sessions while the daemon restarts.
        if (self.guard and self.node_cfg.get_str("vm.hypervisor") != "fake"
                and database_url(self.node_cfg, self.paths).startswith("postgresql")):
            self.log.info("%s", await ensure_guard(self.paths))

    async def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    async def _step_database(self) -> None:
        url = database_url(self.node_cfg, self.paths)
        self.engine = make_engine(url, idle_in_transaction_timeout=DAEMON_IDLE_IN_TRANSACTION)
        self._undo.append(("database", self._close_database))
        self.store = HkdStore(make_sessionmaker(self.engine), self.node_cfg, self.paths, self.name)

    async def _close_database(self) -> None:
        self.db.close()
        if self.engine is not None:
            self.engine.dispose()

    async def _step_schema(self) -> None:
        assert self.engine is not None  # set by the previous step
        await self.db(require_current, self.engine)
        self.cfg = await self.db(self._store().effective_config)

    async def _step_host(self) -> None:
        rec, created = await self.db(self._store().ensure_host, self.address)
        self.log.info("host id %d (%s)%s", rec.id, rec.address, ", newly registered" if created else "")
        if not rec.backend:
            self.log.warning("host '%s' is not marked as a backend: the load balancer will not place desktops here",
                             rec.name)
        timeout = self.cfg.get_float("internal.hkd.agent.ticker.timeout")
        age = (utcnow() - rec.ok_ts).total_seconds() if rec.ok_ts else None
        if (rec.state in (HostState.STARTING, HostState.RUNNING, HostState.STOPPING) and rec.pid
                and rec.pid != os.getpid() and age is not None and age < timeout and _live_hkd(rec.pid)):
            raise InvalidState(f"host '{rec.name}' is served by a live node daemon (pid {rec.pid}, heartbeat "
                               f"{age:.0f} s ago); stop it first")

    async def _step_backend(self) -> None:
        if self.backend is None:
            cls = backend_class(self.cfg.get_str("vm.hypervisor"))
            self.backend = cls(self.paths.root, self.cfg)
        await self.backend.check()
        self.ctx = HandlerContext(
            store=self._store(), db=self.db, backend=self.backend, vma=self.vma, cfg=self.cfg,
            heavy=asyncio.Semaphore(self.cfg.get_int("internal.hkd.max_heavy")), node=self.name,
        )
        self._undo.append(("vma client", self.vma.aclose))

    async def _step_starting(self) -> None:
        was = await self.db(self._store().host_to_starting, os.getpid())
        if was != HostState.STOPPED:
            self.log.warning("the previous node daemon did not stop cleanly (host was %s)", was.value)
        self._undo.append(("host state", self._host_back_to_stopped))

    async def _host_back_to_stopped(self) -> None:
        await self.db(self._store().set_host_state, HostState.STARTING, HostState.STOPPED, pid=None)

    async def _step_reconcile(self) -> None:
        self._undo.append(("desktop handlers", self._cancel_handlers))
        await self._reconcile("the node daemon restarted")

    async def _step_running(self) -> None:
        cap = await self._capacity()
        ok = await self.db(self._store().set_host_state, HostState.STARTING, HostState.RUNNING, ok_ts=utcnow(),
                           pid=os.getpid(), usable_ram=cap.usable_ram, usable_cpu=cap.usable_cpu, load=cap.load)
        if not ok:
            raise InvalidState("the host's state changed while this node daemon was starting")
        self.accepting = True
        self._loops["heartbeat"] = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        self._loops["commands"] = asyncio.create_task(self._command_loop(), name="commands")
        self._loops["expiration"] = asyncio.create_task(self._expiration_loop(), name="expiration")
        self._loops["cluster"] = asyncio.create_task(self._cluster_loop(), name="cluster")
        assert self.engine is not None
        if self.engine.dialect.name == "postgresql":
            hid = self._store().host_id
            self._loops["listener"] = asyncio.create_task(
                notify.listen(self.engine.url, [f"qvd_cmd_for_vm_on_host{hid}", f"qvd_cmd_for_host{hid}"], self.wake),
                name="listener")
        self.wake.set()  # commands written while no daemon ran

    # --- reconciliation ----------------------------------------------------------------------

    async def _reconcile(self, why: str) -> None:
        """Make the node match the database: adopt healthy running desktops, reap the rest
        of this node's non-stopped VMs, and stop desktops the database does not place here."""
        store, backend = self._store(), self._backend()
        records = await self.db(store.active_vms)
        seen = {d.vm_id: d for d in await backend.list_desktops()}
        reaping: list[VmHandler] = []
        for rec in records:
            if rec.vm_id in self.handlers and not self.handlers[rec.vm_id].done:
                continue  # a live handler already owns it (rejoin after fencing)
            h = VmHandler(self._ctx(), rec.vm_id)
            info = seen.get(rec.vm_id)
            reason = f"{why} while the desktop was {rec.state.value}" + (f" (step '{rec.step}')" if rec.step else "")
            if rec.state == VmState.RUNNING:
                if info is None or not info.running:
                    reason = f"{why}; the desktop was no longer running"
                else:
                    spec = await self.db(store.running_spec, rec.vm_id)
                    if spec is not None and await self._vma_alive(spec):
                        self._launch(h, h.adopt(spec))
                        continue
                    reason = f"{why}; the desktop's agent did not answer"
            self._launch(h, h.reap(rec, reason))
            reaping.append(h)
        if reaping:
            self.log.info("reaping %d desktop(s) left by the previous run", len(reaping))
            await self._wait_settled(reaping, self.cfg.get_float("internal.hkd.stopping.vms.timeout"))
        await self._remove_orphans()

    async def _remove_orphans(self) -> None:
        backend = self._backend()
        for d in await backend.list_desktops():
            if d.vm_id in self.handlers and not self.handlers[d.vm_id].done:
                continue
            self.log.warning("vm_id=%d: desktop on this node that the database does not place here "
                             "(orphan, %s): removing it", d.vm_id, "running" if d.running else "leftovers")
            try:
                await backend.stop(d.vm_id)
                await backend.cleanup(d.vm_id)
            except (QvdError, OSError) as e:
                self.log.error("vm_id=%d: cannot remove the orphan desktop: %s", d.vm_id, short_message(e))

    async def _vma_alive(self, spec: DesktopSpec) -> bool:
        backend, cfg = self._backend(), self.cfg
        tries = cfg.get_int("internal.hkd.agent.rpc.retry.count") + 1
        for i in range(tries):
            try:
                await self.vma.call(backend.endpoint_vma(spec), "ping",
                                    timeout=cfg.get_float("internal.hkd.agent.rpc.timeout"))
                return True
            except InvalidState:
                return True
            except Unavailable as e:
                self.log.info("vm_id=%d: agent not answering (%d/%d): %s", spec.vm_id, i + 1, tries, e.message)
            if i + 1 < tries:
                await asyncio.sleep(cfg.get_float("internal.hkd.agent.rpc.retry.delay"))
        return False

    # --- handlers ----------------------------------------------------------------------------

    def _launch(self, h: VmHandler, body: Coroutine[Any, Any, None]) -> None:
        self.handlers[h.vm_id] = h
        task = h.spawn(body)
        task.add_done_callback(functools.partial(self._forget, h))

    def _spawn_start(self, vm_id: int) -> None:
        prev = self.handlers.get(vm_id)
        if prev is not None and not prev.done and prev.state != VmState.STOPPED:
            # Cannot happen while states are respected (start is claimed only from 'stopped').
            self.log.error("vm_id=%d: start claimed while a handler still drives it (%s); ignoring",
                           vm_id, prev.state.value)
            return
        h = VmHandler(self._ctx(), vm_id)
        self._launch(h, h.start(prev.task if prev is not None else None))

    def _forget(self, h: VmHandler, _task: asyncio.Task[None] | None = None) -> None:
        if self.handlers.get(h.vm_id) is h:
            del self.handlers[h.vm_id]

    async def _on_stop_command(self, vm_id: int, state: VmState) -> None:
        h = self.handlers.get(vm_id)
        if h is not None and not h.done:
            h.request_stop("stop command")
            return
        if state in (VmState.STOPPED, VmState.STOPPING):
            return
        # Nobody drives it (e.g. its handler died): reap it from the database state.
        recs = [r for r in await self.db(self._store().active_vms) if r.vm_id == vm_id]
        if recs:
            h = VmHandler(self._ctx(), vm_id)
            self._launch(h, h.reap(recs[0], "stop command"))

    async def _wait_settled(self, hs: list[VmHandler], timeout: float) -> None:
        waits = [asyncio.ensure_future(h.settled.wait()) for h in hs]
        _done, pending = await asyncio.wait(waits, timeout=timeout)
        for w in pending:
            w.cancel()
        if pending:
            self.log.warning("%d desktop(s) still being reaped after %g s; continuing", len(pending), timeout)

    async def _cancel_handlers(self) -> None:
        tasks = [h.task for h in self.handlers.values() if h.task is not None and not h.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.handlers.clear()

    # --- loops -------------------------------------------------------------------------------

    async def _capacity(self) -> sysinfo.Capacity:
        promised = await self.db(self._store().promised_memory)
        return sysinfo.capacity(promised)

    async def _heartbeat_loop(self) -> None:
        delay = self.cfg.get_float("internal.hkd.agent.ticker.delay")
        timeout = self.cfg.get_float("internal.hkd.agent.ticker.timeout")
        last_ok = time.monotonic()
        while True:
            # While the database does not answer, no wait (for an answer or for the next try)
            # may run past the fencing deadline: peers count on this node having stopped its
            # desktops by then.
            left = last_ok + timeout - time.monotonic()
            limit = max(delay, 1.0) if self.fenced else max(0.2, min(max(delay, 1.0), left))
            try:
                async with asyncio.timeout(limit):
                    ok = await self._beat()
            except (SQLAlchemyError, OSError, TimeoutError) as e:
                down = time.monotonic() - last_ok
                self.log.warning("heartbeat not written (%.0f s without): %s", down, short_message(e) or "timed out")
                if down >= timeout and not self.fenced:
                    await self._fence(f"the heartbeat could not be written for {down:.0f} s "
                                      f"(internal.hkd.agent.ticker.timeout = {timeout:g})")
                pause = delay if self.fenced else min(delay, max(0.0, last_ok + timeout - time.monotonic()))
            else:
                last_ok = time.monotonic()
                if not ok:
                    await self._fence("a peer declared this node lost")
                    await self._rejoin()
                elif self.fenced:
                    await self._unfence()
                pause = delay
            await asyncio.sleep(pause)

    async def _beat(self) -> bool:
        cap = await self._capacity()
        ok = bool(await self.db(self._store().heartbeat, os.getpid(), cap))
        if ok:
            self._heartbeat_file.touch(os.getpid(), self.cfg)  # what the fence guard watches
        return ok

    async def _fence(self, why: str) -> None:
        """Stop every local desktop without the database: peers may restart them elsewhere."""
        if self.fenced:
            return
        self.fenced = True
        self._judging_since = None
        self.log.error("self-fencing: %s; stopping every local desktop", why)
        await self._cancel_handlers()
        await self._teardown_all("stopped by self-fencing")

    async def _teardown_all(self, why: str) -> None:
        """Stop and clean every desktop of this node, without the database."""
        backend = self._backend()
        try:
            infos = await backend.list_desktops()
        except (QvdError, OSError) as e:
            self.log.error("cannot list desktops: %s", short_message(e))
            return
        room = asyncio.Semaphore(_TEARDOWN_PARALLEL)

        async def down(vm_id: int) -> None:
            async with room:
                try:
                    await backend.stop(vm_id)
                    await backend.cleanup(vm_id)
                    self.log.warning("vm_id=%d: %s", vm_id, why)
                except (QvdError, OSError) as e:
                    self.log.error("vm_id=%d: cannot stop the desktop (%s): %s", vm_id, why, short_message(e))

        # All at once (bounded): when fencing, every second counts before peers restart them.
        await asyncio.gather(*(down(d.vm_id) for d in infos))

    async def _unfence(self) -> None:
        self.log.warning("the database answers again: reconciling after self-fencing")
        try:
            await self._reconcile("stopped by self-fencing (the node could not write its heartbeat)")
        except (QvdError, SQLAlchemyError) as e:
            self.log.error("reconciliation after fencing failed, retrying: %s", short_message(e))
            return
        self.fenced = False

    async def _rejoin(self) -> None:
        store = self._store()
        try:
            if not await self.db(store.set_host_state, HostState.LOST, HostState.STARTING, pid=os.getpid()):
                return
            await self._reconcile("the node was declared lost by a peer")
            cap = await self._capacity()
            await self.db(store.set_host_state, HostState.STARTING, HostState.RUNNING, ok_ts=utcnow(),
                          usable_ram=cap.usable_ram, usable_cpu=cap.usable_cpu, load=cap.load)
        except (QvdError, SQLAlchemyError) as e:
            self.log.error("rejoining after being declared lost failed, retrying: %s", short_message(e))
            return
        self.fenced = False
        self.log.warning("rejoined the cluster after being declared lost")

    async def _command_loop(self) -> None:
        delay = self.cfg.get_float("internal.hkd.agent.command_handler.delay")
        store = self._store()
        while self.accepting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            self.wake.clear()
            if self.fenced or not self.accepting:
                continue
            try:
                if await self.db(store.claim_host_stop):
                    self.request_shutdown("host command 'stop'")
                    return
                for vm_id, state in await self.db(store.claim_stop_commands):
                    await self._on_stop_command(vm_id, state)
                if self.accepting:
                    for vm_id in await self.db(store.claim_start_commands):
                        self._spawn_start(vm_id)
            except (SQLAlchemyError, QvdError) as e:
                self.log.warning("command poll failed: %s", short_message(e))

    async def _expiration_loop(self) -> None:
        delay = self.cfg.get_float("internal.hkd.agent.expiration_monitor.delay")
        while True:
            await asyncio.sleep(delay)
            if self.fenced:
                continue
            try:
                await self.check_expirations()
            except (SQLAlchemyError, QvdError) as e:
                self.log.warning("expiration check failed: %s", short_message(e))

    async def check_expirations(self) -> None:
        for exp in await self.db(self._store().expired):
            h = self.handlers.get(exp.vm_id)
            if h is None or h.done:
                continue
            if exp.hard_due:
                h.request_stop(f"hard expiration reached ({_iso(exp.hard)})")
            else:
                await h.expire(_iso(exp.soft), _iso(exp.hard))

    async def _cluster_loop(self) -> None:
        delay = self.cfg.get_float("internal.hkd.agent.cluster_monitor.delay")
        lost_after = self.cfg.get_float("internal.hkd.cluster.node.timeout")
        fence_after = self.cfg.get_float("internal.hkd.agent.ticker.timeout")
        beat = self.cfg.get_float("internal.hkd.agent.ticker.delay")
        if lost_after <= fence_after + beat:
            self.log.warning("internal.hkd.cluster.node.timeout (%g s) should be well above "
                             "internal.hkd.agent.ticker.timeout + internal.hkd.agent.ticker.delay (%g s): a peer "
                             "may restart desktops of a node before that node has fenced itself",
                             lost_after, fence_after + beat)
        while True:
            # The jitter keeps the monitors of a cluster from always racing each other.
            await asyncio.sleep(delay + random.uniform(0, delay / 4))
            try:
                await self.check_cluster()
            except (SQLAlchemyError, QvdError) as e:
                self.log.warning("cluster check failed: %s", short_message(e))

    async def check_cluster(self) -> list[LostHost]:
        """One round of the cluster monitor: declare ``lost`` the peers whose heartbeat is older
        than ``internal.hkd.cluster.node.timeout``.

        Skipped while this node is fenced, and until it has been up (not fenced) for one
        whole timeout: after a database outage every heartbeat is old, and the first node
        back must leave the others the time to write theirs.
        """
        timeout = self.cfg.get_float("internal.hkd.cluster.node.timeout")
        now = time.monotonic()
        if self.fenced or not self.accepting:
            self._judging_since = None
            return []
        if self._judging_since is None:
            self._judging_since = now
        if now - self._judging_since < timeout:
            return []
        lost = await self.db(self._store().declare_lost_peers, timeout)
        for h in lost:
            since = f"no heartbeat for {h.silence:.0f} s" if h.silence is not None else "it never wrote a heartbeat"
            aborted = sum(len(v) for v in h.aborted.values())
            self.log.error(
                "declared host '%s' (id %d) lost: %s (internal.hkd.cluster.node.timeout = %g); %d desktop(s) "
                "written stopped%s; %d connection(s) through its L7R reset; %d connection(s) of other L7Rs "
                "told to close", h.name, h.id, since, timeout, len(h.vms),
                (" (" + ", ".join(f"vm_id={i} {n}" for i, n in h.vms.items()) + ")") if h.vms else "",
                len(h.disconnected), aborted)
        return lost

    # --- stop --------------------------------------------------------------------------------

    async def shutdown(self) -> int:
        """Stop every desktop and leave the host ``stopped``; 0 when nothing is left running."""
        self.accepting = False
        self.wake.set()
        for name in ("commands", "expiration", "cluster", "listener"):
            t = self._loops.pop(name, None)
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        store = self._store()
        # Bounded: a daemon asked to stop must stop even when the database hangs.
        try:
            async with asyncio.timeout(_SHUTDOWN_DB_TIMEOUT):
                await self.db(store.move_host, HostState.STOPPING)
                given_back = await self.db(store.withdraw_pending_starts,
                                           f"node '{self.name}' stopped before starting the desktop")
            if given_back:
                self.log.info("gave back %d unclaimed start command(s)", len(given_back))
        except (SQLAlchemyError, TimeoutError) as e:
            self.log.error("cannot record the stopping state: %s", short_message(e) or "timed out")
        left = await self._stop_all_desktops()
        hb = self._loops.pop("heartbeat", None)
        if hb is not None:
            hb.cancel()
            await asyncio.gather(hb, return_exceptions=True)
        if not left:
            self._heartbeat_file.remove()  # a clean stop: the fence guard has nothing left to watch
        try:
            async with asyncio.timeout(_SHUTDOWN_DB_TIMEOUT):
                await self.db(store.move_host, HostState.STOPPED, pid=None)
        except (SQLAlchemyError, TimeoutError) as e:
            self.log.error("cannot record the stopped state: %s", short_message(e) or "timed out")
        self._undo = [u for u in self._undo if u[0] not in ("host state", "desktop handlers")]
        await self._undo_all()
        if left:
            self.log.error("stopped, but %d desktop(s) could not be removed: %s", len(left),
                           ", ".join(str(i) for i in sorted(left)))
            return 1
        self.log.info("node daemon stopped")
        return 0

    async def _stop_all_desktops(self) -> set[int]:
        """Graceful stop of every handler, then forced; returns vm_ids still on the node."""
        timeout = self.cfg.get_float("internal.hkd.stopping.vms.timeout")
        hs = [h for h in self.handlers.values() if not h.done]
        for h in hs:
            h.request_stop("the node daemon is stopping")
        tasks = [h.task for h in hs if h.task is not None]
        if tasks:
            self.log.info("stopping %d desktop(s) (at most %g s)", len(tasks), timeout)
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                self.log.warning("%d desktop(s) not stopped after %g s: forcing", len(pending), timeout)
                await self._forced_pass()
        backend = self._backend()
        try:
            return {d.vm_id for d in await backend.list_desktops()}
        except (QvdError, OSError) as e:
            self.log.error("cannot list desktops: %s", short_message(e))
            return {-1}

    async def _forced_pass(self) -> None:
        await self._cancel_handlers()
        await self._teardown_all("forced stop: the node daemon was stopping")
        # Record what the teardown achieved; reap handlers do the state writes.
        try:
            async with asyncio.timeout(_SHUTDOWN_DB_TIMEOUT):
                records = await self.db(self._store().active_vms)
        except (SQLAlchemyError, TimeoutError) as e:
            self.log.error("cannot read the desktops' states: %s", short_message(e) or "timed out")
            return
        hs: list[VmHandler] = []
        for rec in records:
            h = VmHandler(self._ctx(), rec.vm_id)
            self._launch(h, h.reap(rec, "forced stop: the node daemon was stopping"))
            hs.append(h)
        if hs:
            tasks = [h.task for h in hs if h.task is not None]
            _done, pending = await asyncio.wait(tasks, timeout=_FORCED_PASS_TIMEOUT)
            if pending:
                await self._cancel_handlers()

    # --- accessors ---------------------------------------------------------------------------

    def _store(self) -> HkdStore:
        if self.store is None:
            raise InvalidState("the node daemon has no database yet")
        return self.store

    def _backend(self) -> Backend:
        if self.backend is None:
            raise InvalidState("the node daemon has no backend yet")
        return self.backend

    def _ctx(self) -> HandlerContext:
        if self.ctx is None:
            raise InvalidState("the node daemon is not started")
        return self.ctx


def _iso(ts: dt.datetime | None) -> str:
    return ts.isoformat() if ts else ""


def _live_hkd(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) qvd-hkd process on this machine."""
    proc = Path(f"/proc/{pid}")
    try:
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = (proc / "status").read_text()
    except OSError:
        return False
    state = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")), "")
    return state not in ("Z", "X") and "hkd" in cmd

