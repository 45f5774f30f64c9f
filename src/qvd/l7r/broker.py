"""What the L7R does for each endpoint, against the database and the desktops.

No HTTP here: the server (:mod:`qvd.l7r.server`) parses requests, keeps the
per-connection login cache and writes bytes; the broker receives typed input
(an :class:`~qvd.l7r.auth.base.Identity`, query pairs, a ``progress`` callback
that sends one ``102 Processing`` line) and answers a :class:`Reply`, or for
``connect_to_vm`` a :class:`TunnelReady` the server turns into ``101`` + splice.

``connect_to_vm`` (reference §3.3, with its bugs fixed):

1. checks that answer plain statuses: 422 (``id``), 403 (unknown parameter
   names), 422 (bad client option values), 404 (missing VM, or a VM of
   another user: we do not reveal that it exists), 403 (VM blocked);
2. take-over: compare-and-swap ``user_state`` disconnected -> connecting; if
   another connection holds the VM it is told to abort (``user_cmd``) and we
   wait for it to let go, up to ``internal.l7r.timeout.takeover``;
3. start the VM if stopped (host assignment and start command in ONE
   transaction) and wait for ``running``; a VM that falls back to stopped fails
   with the node daemon's ``last_error``;
4. ``x_start`` on the agent (retried while it answers "retry later"), then
   ``x_state`` until ``listening``;
5. TCP connect to nxagent, compare-and-swap connecting -> connected.

From step 2 on, every failure answers ``503 The requested virtual machine is
not available: <reason>, retry later.`` (the reference often just closed the
connection) and gives the VM back (``disconnected``).

A desktop whose node died: while the VM is assigned to a node that is ``lost``, or
whose heartbeat is older than ``internal.hkd.cluster.node.timeout`` (about to be
declared lost by a peer's cluster monitor), ``connect_to_vm`` answers 503 at once with
"retry in a few seconds" instead of waiting for the start timeout; once declared lost
the VM is ``stopped`` and the next connection starts it on another node.  A tunnel to
a desktop of a node declared lost is told to abort (``user_cmd`` + NOTIFY) by the
monitor and closed with that reason; when this L7R's own node is declared lost its
connections were reset by the monitor, and it closes their tunnels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AuthenticationFailed, InputError, InvalidState, QvdError
from qvd.core.states import UserCmd, UserState, VmCmd, VmState
from qvd.db.models import utcnow
from qvd.l7r import store
from qvd.l7r.auth.base import Identity, VmInfo
from qvd.l7r.auth.chain import AuthChain, ConfigCache
from qvd.l7r.auth.credentials import BearerCredentials, parse_authorization
from qvd.l7r.metrics import L7rMetrics, NodeCounters
from qvd.l7r.params import log_dropped, parse_vm_id, split_query, validate_client, validate_custom
from qvd.l7r.tunnel import SpliceResult, close_writer, splice, tune_socket
from qvd.l7r.vma_client import VmaClient, VmaError

log = logging.getLogger(__name__)

T = TypeVar("T")

Progress = Callable[[str], Awaitable[None]]

SLAVE_KEY_ALPHABET = string.ascii_letters + string.digits
#: Seconds between repeated "Waiting for ..." lines (the reference's cadence).
PROGRESS_EVERY = 2.0

MSG_NO_VM = "The requested virtual machine does not exist"
MSG_VM_BLOCKED = "The requested virtual machine is offline for maintenance"
MSG_ABORTED = "Aborted by contending session"
RETRY_LATER = "retry later"
RETRY_SOON = "retry in a few seconds"


def node_lost(name: str) -> str:
    """Why a session ends when its desktop's node was declared lost."""
    return f"the desktop's node '{name}' was lost; it starts again on another node at the next connection"


def new_slave_key() -> str:
    """64 random alphanumerics (what QVD clients expect in ``X-QVD-Slave-Key``)."""
    return "".join(secrets.choice(SLAVE_KEY_ALPHABET) for _ in range(64))


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SessionFailed(QvdError):
    """A connect_to_vm that cannot go on; ``message`` is the reason shown to the user."""

    code = "session-failed"
    http_status = 503

    def __init__(self, message: str, *, retry: str = RETRY_LATER) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
        # Never an empty body on errors: the Qt client hangs on an empty 401 (reference §10.3).
        return cls(status, (message.rstrip("\r\n") + "\r\n").encode("utf-8"), "text/plain", headers)

    @classmethod
    def json(cls, value: object) -> Reply:
        return cls(200, (json.dumps(value, indent=2, ensure_ascii=True) + "\n").encode(), "application/json")


def unavailable(reason: str, retry: str = RETRY_LATER) -> Reply:
    return Reply.text(503, f"The requested virtual machine is not available: {reason}, {retry}.")


@dataclass(eq=False)
class LiveSession:
    """One connection holding a VM (``connecting`` then ``connected``)."""

    conn_id: str
    vm_id: int
    identity: Identity
    client_ip: str = ""
    started: float = field(default_factory=time.monotonic)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    why_aborted: str = ""
    retry: str = RETRY_LATER
    #: the node the desktop was last seen assigned to (to tell a lost node from a take-over)
    vm_host_id: int | None = None
    vm_host_name: str = ""

    def stop(self, why: str, retry: str = RETRY_LATER) -> None:
        if not self.abort.is_set():
            self.why_aborted = why
            self.retry = retry
            self.abort.set()


@dataclass(eq=False)
class TunnelReady:
    """connect_to_vm succeeded: send 101 with the slave key, then splice to ``desktop``."""

    session: LiveSession
    desktop: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    slave_key: str
    t0: float


class Db:
    """Runs the (synchronous) store functions in a bounded pool of worker threads."""

    def __init__(self, factory: sessionmaker[Session], workers: int = 10) -> None:
        self.factory = factory
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="l7r-db")

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(factory, *args, **kw)`` in a worker thread."""
        return await self.call(fn, self.factory, *args, **kw)

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kw))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Broker:
    """The business side of one L7R process."""

    def __init__(
        self,
        *,
        factory: sessionmaker[Session],
        node_cfg: Config,
        host_id: int,
        chain: AuthChain,
        configs: ConfigCache,
        metrics: L7rMetrics | None = None,
        pid: int | None = None,
        db_workers: int = 10,
        auth_workers: int = 4,
    ) -> None:
        self.node_cfg = node_cfg
        self.host_id = host_id
        self.pid = pid if pid is not None else os.getpid()
        self.chain = chain
        self.configs = configs
        self.metrics = metrics or L7rMetrics()
        self.counters = NodeCounters()
        self.db = Db(factory, db_workers)
        # argon2 takes ~64 MiB and tens of ms per check: few at a time.
        self._auth_pool = ThreadPoolExecutor(max_workers=auth_workers, thread_name_prefix="l7r-auth")
        self.status = store.HostStatus(host_id, "stopped")
        self.sessions: dict[str, LiveSession] = {}
        self.wake_watcher = asyncio.Event()
        #: seconds between two looks for aborted sessions (a NOTIFY wakes the watcher earlier)
        self.abort_poll = 0.5
        self._seq = 0

    # ------------------------------------------------------------------ background work

    async def refresh(self) -> store.HostStatus:
        """Write the pending node counters and re-read this node's status."""
        deltas = self.counters.take()
        try:
            self.status = await self.db.run(store.host_status, self.host_id, deltas)
        except Exception:
            self.counters.restore(deltas)
            raise
        if self.status.state == "lost" and self.sessions:
            # A peer's cluster monitor reset our connections: the database no longer says we hold
            # these VMs, so nobody could tell us to let go of them.
            for s in list(self.sessions.values()):
                if not s.abort.is_set():
                    log.warning("vm %s: closing the session of %s: this node was declared lost by the cluster",
                                s.vm_id, s.identity.display)
                    s.stop("this node was declared lost by the cluster", RETRY_SOON)
        return self.status

    async def refresh_loop(self, period: float = 1.0) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a database hiccup must not stop the loop; the next round retries
                log.exception("cannot refresh the node status")
            await asyncio.sleep(period)

    async def check_aborts(self) -> int:
        """Stop the local sessions whose row says ``user_cmd='abort'``; returns how many."""
        if not self.sessions:
            return 0
        n = 0
        for vm_id, conn_id in await self.db.run(store.aborted_connections, self.host_id, self.pid):
            s = self.sessions.get(conn_id)
            if s is not None and not s.abort.is_set():
                lost = await self._lost_node(s)
                if lost is not None:
                    log.warning("vm %s: closing the session of %s: %s", vm_id, s.identity.display, node_lost(lost))
                    s.stop(node_lost(lost), RETRY_SOON)
                else:
                    log.info("vm %s: closing the session of %s on request (take-over or admin disconnect)",
                             vm_id, s.identity.display)
                    s.stop(MSG_ABORTED)
                n += 1
        return n

    async def _lost_node(self, session: LiveSession) -> str | None:
        """The name of the desktop's node if it was declared lost (a reason to abort), else None."""
        if session.vm_host_id is None:
            return None
        state, _backend = await self.db.run(store.host_state_of, session.vm_host_id)
        if state != "lost":
            return None
        return session.vm_host_name or f"#{session.vm_host_id}"

    def _node_down(self, rt: store.Runtime, cfg: Config) -> str | None:
        """Why the node the VM is assigned to cannot serve it now (lost, or silent too long), or None."""
        if rt.host_id is None or rt.host_state is None:
            return None
        if rt.host_state == "lost":
            return node_lost(rt.host_name)
        if rt.host_state in ("running", "stopping") and rt.host_ok_ts is not None:
            silence = (utcnow() - rt.host_ok_ts).total_seconds()
            if silence > cfg.get_float("internal.hkd.cluster.node.timeout"):
                return (f"the desktop's node '{rt.host_name}' has not answered for {silence:.0f} s and is about to "
                        "be declared lost; the desktop then starts on another node")
        return None

    async def abort_watch_loop(self) -> None:
        """Poll for aborts every :attr:`abort_poll` s, or at once when a NOTIFY sets :attr:`wake_watcher`."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake_watcher.wait(), self.abort_poll)
            self.wake_watcher.clear()
            try:
                await self.check_aborts()
            except SQLAlchemyError as e:  # database unreachable: one line, not a traceback per poll
                log.warning("cannot check for aborted sessions: %s", str(e).splitlines()[0][:200])
            except Exception:
                log.exception("cannot check for aborted sessions")

    async def config(self, tenant_id: int | None) -> Config:
        """Effective configuration of a tenant (None = global); the database is read off the event loop."""
        cfg = self.configs.fresh(tenant_id)
        if cfg is not None:
            return cfg
        return await self.db.call(self.configs.get, tenant_id)

    def node_unavailable(self) -> str | None:
        return self.status.unavailable_reason()

    def close(self) -> None:
        self.db.close()
        self._auth_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ authentication

    async def authenticate(self, header: str | None, extras: Mapping[str, str], client_ip: str) -> Identity:
        """Raises :class:`AuthenticationFailed` (already logged and counted)."""
        creds = parse_authorization(header)
        method = "bearer" if isinstance(creds, BearerCredentials) else "basic"
        self.counters.add("auth_attempts")
        self.metrics.auth_attempts.labels(method).inc()
        try:
            ident = await asyncio.get_running_loop().run_in_executor(
                self._auth_pool, partial(self.chain.authenticate, creds, extras=extras, client_ip=client_ip)
            )
        except AuthenticationFailed as e:
            self.metrics.auth_failures.labels(method).inc()
            log.info("login refused from %s: %s", client_ip, e.message)
            raise
        self.counters.add("auth_ok")
        log.info("%s logged in from %s (%s)", ident.display, client_ip, method)
        return ident

    # ------------------------------------------------------------------ simple endpoints

    async def _accessible_vm(self, ident: Identity, vm_id: int) -> VmInfo | None:
        vm = await self.db.run(store.vm_info, vm_id)
        if vm is None:
            return None
        allowed = await asyncio.get_running_loop().run_in_executor(
            self._auth_pool, self.chain.allow_access_to_vm, ident, vm
        )
        return vm if allowed else None

    async def list_of_vm(self, ident: Identity, query: Mapping[str, str], *, applications: bool) -> Reply:
        found = await asyncio.get_running_loop().run_in_executor(
            self._auth_pool, self.chain.list_of_vm, ident, applications, dict(query)
        )
        if found is None:
            found = await self.db.run(store.list_user_vms, ident.user_id, applications)
        if ident.vm_id is not None:
            found = [v for v in found if v.id == ident.vm_id]
        return Reply.json([
            {"id": v.id, "name": v.name, "state": v.state, "blocked": int(v.blocked),
             "is_application": int(v.is_application)}
            for v in found
        ])

    async def authenticate_user(self, ident: Identity) -> Reply:
        # Plugin parameters travel inside tokens here, so there is no separate id to store them under.
        return Reply.json({})

    async def create_auth_token(self, ident: Identity, query: Mapping[str, str]) -> Reply:
        if ident.method != "basic":
            return Reply.text(403, "A bearer token cannot be used to create another token; log in with a password")
        multi = query.get("multi_use", "") in ("1", "true", "yes")
        ttl = (await self.config(ident.tenant_id)).get_int("l7r.auth.token.ttl")
        token, _ = await self.db.run(store.create_token, ident.user_id, ttl, multi_use=multi, params=ident.params)
        # The trailing newline inside the string is what the reference sends (Perl's encode_base64).
        return Reply.json({"auth_params_id": 0, "auth_token": base64.b64encode(token.encode()).decode() + "\n"})

    # ------------------------------------------------------------------ stop_vm

    async def stop_vm(self, ident: Identity, pairs: tuple[tuple[str, str], ...], progress: Progress,
                      client_ip: str) -> Reply:
        q = split_query(pairs, allow_custom=False)
        try:
            vm_id = parse_vm_id(q.vm_id)
        except InputError as e:
            return Reply.text(422, e.message)
        vm = await self._accessible_vm(ident, vm_id)
        if vm is None:
            return Reply.text(404, MSG_NO_VM)
        cfg = await self.config(ident.tenant_id)
        deadline = time.monotonic() + cfg.get_int("internal.l7r.timeout.vm_stop")
        poll = cfg.get_float("internal.l7r.poll_time.vm")
        commanded = False
        last = 0.0
        while True:
            rt = await self.db.run(store.read_runtime, vm_id)
            if rt is None:
                return Reply.text(404, MSG_NO_VM)
            if rt.vm_state is VmState.STOPPED and rt.vm_cmd is None:
                log.info("vm %s: stopped for %s", vm_id, ident.display)
                return Reply.text(200, "Machine stopped")
            if not commanded and rt.vm_cmd != VmCmd.STOP.value:
                if rt.vm_state in (VmState.STARTING, VmState.RUNNING, VmState.DEBUGGING) or (
                    rt.vm_state is VmState.STOPPED and rt.vm_cmd == VmCmd.START.value
                ):
                    try:
                        await self.db.run(store.stop_vm, vm_id, who=ident.display, tenant_id=ident.tenant_id,
                                          ip=client_ip)
                    except InvalidState:
                        continue  # changed meanwhile: look again
                    except QvdError as e:
                        return Reply.text(503, f"The requested virtual machine cannot be stopped: {e.message}")
                    commanded = True
                    await progress("Stopping virtual machine")
                    continue
                if rt.vm_state is not VmState.STOPPING:
                    return Reply.text(
                        503, f"The requested virtual machine is in an unstoppable state ({rt.vm_state.value})"
                    )
            now = time.monotonic()
            if now > deadline:
                return Reply.text(408, "VM didn't reach state 'stopped'. Timeout")
            if now - last >= PROGRESS_EVERY:
                await progress("Waiting for VM to reach state 'stopped'")
                last = now
            await asyncio.sleep(poll)

    # ------------------------------------------------------------------ connect_to_vm

    async def connect_to_vm(self, ident: Identity, pairs: tuple[tuple[str, str], ...], progress: Progress,
                            client_ip: str) -> Reply | TunnelReady:
        t0 = time.monotonic()
        q = split_query(pairs)
        try:
            vm_id = parse_vm_id(q.vm_id)
        except InputError as e:
            return Reply.text(422, e.message)
        if q.invalid_names:
            return Reply.text(403, "Invalid parameters " + " ".join(q.invalid_names))
        try:
            client = validate_client(q.client)
            custom = validate_custom(q.custom)
        except InputError as e:
            return Reply.text(422, e.message)
        vm = await self._accessible_vm(ident, vm_id)
        if vm is None:
            return Reply.text(404, MSG_NO_VM)
        if vm.blocked:
            return Reply.text(403, MSG_VM_BLOCKED)
        log_dropped(q.dropped, vm_id)
        self._seq += 1
        session = LiveSession(conn_id=f"{self.pid}-{self._seq}-{uuid.uuid4().hex[:8]}", vm_id=vm_id,
                              identity=ident, client_ip=client_ip)
        cfg = await self.config(ident.tenant_id)
        # Registered before the take-over: whatever happens from here, give_back frees the VM if
        # we got it (it matches on our connection id, so it is harmless if we did not).
        self.sessions[session.conn_id] = session
        try:
            await self._take_over(session, progress, cfg)
            ready = await self._bring_up(session, vm, {**client, **custom}, progress, cfg, t0)
        except (SessionFailed, VmaError) as e:
            await self.give_back(session)
            self.metrics.session_failures.inc()
            log.info("vm %s: connection of %s failed: %s", vm_id, ident.display, e.message)
            return unavailable(e.message, e.retry if isinstance(e, SessionFailed) else RETRY_LATER)
        except QvdError as e:
            await self.give_back(session)
            self.metrics.session_failures.inc()
            log.warning("vm %s: connection of %s failed: %s", vm_id, ident.display, e.message)
            return unavailable(e.message)
        except BaseException:
            # Client gone (a 102 could not be written), cancelled at shutdown, or a bug: the VM is freed.
            await self.give_back(session)
            raise
        return ready

    async def give_back(self, session: LiveSession) -> None:
        self.sessions.pop(session.conn_id, None)
        try:
            await asyncio.shield(self.db.run(store.release, session.vm_id, session.conn_id))
        except Exception:
            log.exception("vm %s: cannot give the VM back (it stays taken until the next take-over)",
                          session.vm_id)

    def _check(self, session: LiveSession) -> None:
        if session.abort.is_set():
            raise SessionFailed(session.why_aborted or MSG_ABORTED, retry=session.retry)

    async def _pause(self, session: LiveSession, seconds: float) -> None:
        """Sleep, but wake up (and fail) at once when the session is aborted."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.abort.wait(), seconds)
        self._check(session)

    def _holder_gone(self, rt: store.Runtime, holder_state: str | None, holder_backend: bool) -> bool:
        """Whether the connection holding the VM can no longer let go by itself."""
        if rt.l7r_host_id is None or rt.l7r_conn is None:
            return True
        if rt.l7r_host_id == self.host_id:
            if rt.l7r_pid == self.pid:
                return rt.l7r_conn not in self.sessions
            return not pid_alive(rt.l7r_pid)
        # Another node: trust it unless its node daemon is known to be gone.
        return holder_backend and holder_state in ("lost", "stopped")

    async def _take_over(self, session: LiveSession, progress: Progress, cfg: Config) -> None:
        vm_id = session.vm_id
        deadline = time.monotonic() + cfg.get_int("internal.l7r.timeout.takeover")
        poll = cfg.get_float("internal.l7r.poll_time.vm")
        last = 0.0
        contended = False
        while True:
            if await self.db.run(store.try_acquire, vm_id, host_id=self.host_id, pid=self.pid,
                                 conn_id=session.conn_id, user_id=session.identity.user_id):
                if contended:
                    self.metrics.takeovers.inc()
                await progress(f"Session acquired for VM_ID: {vm_id}")
                return
            rt = await self.db.run(store.read_runtime, vm_id)
            if rt is None:
                raise SessionFailed("the virtual machine was deleted")
            if rt.user_state is UserState.DISCONNECTED:
                continue
            contended = True
            holder_state, holder_backend = await self.db.run(store.host_state_of, rt.l7r_host_id)
            if self._holder_gone(rt, holder_state, holder_backend):
                log.warning("vm %s: the connection holding it (%s on host %s, pid %s) is gone; taking the VM",
                            vm_id, rt.l7r_conn, rt.l7r_host_id, rt.l7r_pid)
                await self.db.run(store.force_release, vm_id, rt.l7r_conn)
                continue
            if rt.user_cmd != UserCmd.ABORT.value:
                await self.db.run(store.request_abort, vm_id, rt.l7r_conn)
                if rt.l7r_host_id == self.host_id:
                    self.wake_watcher.set()
            now = time.monotonic()
            if now > deadline:
                raise SessionFailed("Unable to acquire VM, close other clients")
            if now - last >= PROGRESS_EVERY:
                await progress(f"Aborting contending session for VM_ID: {vm_id}")
                last = now
            await asyncio.sleep(min(poll, 0.25))

    async def _ensure_running(self, session: LiveSession, vm: VmInfo, progress: Progress, cfg: Config) -> store.Runtime:
        vm_id = vm.id
        ident = session.identity
        deadline = time.monotonic() + cfg.get_int("internal.l7r.timeout.vm_start")
        poll = cfg.get_float("internal.l7r.poll_time.vm")
        started = False
        stopped_seen = 0
        last = 0.0
        while True:
            self._check(session)
            rt = await self.db.run(store.read_runtime, vm_id)
            if rt is None:
                raise SessionFailed("the virtual machine was deleted")
            if rt.l7r_conn != session.conn_id or rt.user_cmd == UserCmd.ABORT.value:
                self._check(session)
                lost = await self._lost_node(session)
                if lost is not None:
                    raise SessionFailed(node_lost(lost), retry=RETRY_SOON)
                raise SessionFailed(MSG_ABORTED)
            if rt.blocked:
                raise SessionFailed("the virtual machine was blocked for maintenance")
            if rt.host_id is not None:
                session.vm_host_id, session.vm_host_name = rt.host_id, rt.host_name
                down = self._node_down(rt, cfg)
                if down is not None:
                    raise SessionFailed(down, retry=RETRY_SOON)
            if rt.vm_state is VmState.RUNNING and rt.vm_cmd is None and rt.vm_address and rt.vm_x_port:
                return rt
            if rt.vm_state is VmState.STOPPED and rt.vm_cmd is None:
                if started:
                    # The node daemon's claim might clear the command a moment before it moves the
                    # state, so without an error message we look twice more before giving up.
                    stopped_seen += 1
                    if rt.last_error or stopped_seen >= 3:
                        why = rt.last_error or "the node gave no reason"
                        raise SessionFailed(f"Failed to start virtual machine {vm_id}: {why}")
                else:
                    await progress(f"Assigning VM {vm_id} to host")
                    try:
                        host = await self.db.run(store.start_vm, vm_id, await self.config(None),
                                                 who=ident.display, tenant_id=ident.tenant_id,
                                                 ip=session.client_ip)
                    except InvalidState:
                        await self._pause(session, poll)
                        continue
                    except QvdError as e:
                        raise SessionFailed(f"Unable to assign vm to host: {e.message}") from None
                    started = True
                    self.metrics.vm_starts.inc()
                    log.info("vm %s: started on host %s for %s", vm_id, host, ident.display)
                    await progress("Starting virtual machine")
                    continue
            else:
                stopped_seen = 0
            now = time.monotonic()
            if now > deadline:
                raise SessionFailed("VM didn't reach state 'running'. Timeout")
            if now - last >= PROGRESS_EVERY:
                await progress("Waiting for VM to reach state 'running'")
                last = now
            await self._pause(session, poll)

    async def _bring_up(self, session: LiveSession, vm: VmInfo, client_params: dict[str, str], progress: Progress,
                        cfg: Config, t0: float) -> TunnelReady:
        vm_id = vm.id
        ident = session.identity
        rt = await self._ensure_running(session, vm, progress, cfg)
        assert rt.vm_address is not None and rt.vm_x_port is not None  # checked by _ensure_running

        params = dict(client_params)
        params.update(await self.db.run(store.session_properties, vm_id))
        params.update(ident.params)
        await asyncio.get_running_loop().run_in_executor(
            self._auth_pool, self.chain.before_connect_to_vm, ident, vm, params
        )
        slave_key = new_slave_key()
        params["qvd.slave.key"] = slave_key

        vma = VmaClient(rt.vm_address, rt.vm_vma_port or cfg.get_int("internal.vm.port.vma"),
                        timeout=float(cfg.get_int("internal.l7r.timeout.vma")))
        poll_x = cfg.get_float("internal.l7r.poll_time.x")
        await progress(f"Starting X session at VM {vm_id}")
        retries = cfg.get_int("internal.l7r.retry.x_start")
        for attempt in range(retries + 1):
            self._check(session)
            try:
                await vma.x_start(params)
                break
            except VmaError as e:
                if not e.retryable or attempt == retries:
                    raise SessionFailed(f"the desktop could not start the X session: {e.message}") from None
                log.debug("vm %s: x_start: %s (retrying)", vm_id, e.message)
                await self._pause(session, max(poll_x, 0.5))

        await progress(f"Waiting for X session to come up on VM {vm_id}")
        start = time.monotonic()
        x_deadline = start + cfg.get_int("internal.l7r.timeout.x_start")
        hard_deadline = start + cfg.get_int("internal.l7r.timeout.vm_start")
        state: str | None = None
        while True:
            self._check(session)
            try:
                state = await vma.x_state()
            except VmaError as e:
                log.debug("vm %s: x_state: %s", vm_id, e.message)
                state = None
            if state == "listening":
                break
            now = time.monotonic()
            # Provisioning a user (first login: home, account) may take long: wait without the X timeout.
            if now > (hard_deadline if state == "provisioning" else x_deadline):
                raise SessionFailed(f"the X session did not come up (state {state or 'unknown'})")
            await self._pause(session, poll_x)

        await progress(f"Connecting X session for VM_ID: {vm_id}")
        self.counters.add("nx_attempts")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(rt.vm_address, rt.vm_x_port), cfg.get_int("internal.l7r.timeout.vma")
            )
        except (OSError, TimeoutError) as e:
            raise SessionFailed(f"cannot connect to the X session at {rt.vm_address}:{rt.vm_x_port}: "
                                f"{getattr(e, 'strerror', None) or e or 'timeout'}") from None
        self.counters.add("nx_ok")
        tune_socket(writer)
        try:
            self._check(session)
            if not await self.db.run(store.mark_connected, vm_id, session.conn_id):
                raise SessionFailed(MSG_ABORTED)
            await progress("Connection established")
        except BaseException:
            await close_writer(writer)
            raise
        return TunnelReady(session, (reader, writer), slave_key, t0)

    # ------------------------------------------------------------------ the tunnel

    async def run_tunnel(self, ready: TunnelReady, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                         initial: bytes) -> SpliceResult:
        """Splice until the session ends, then give the VM back."""
        s = ready.session
        self.metrics.session_starts.inc()
        self.metrics.connect_seconds.observe(time.monotonic() - ready.t0)
        self.metrics.tunnels_open.inc()
        log.info("vm %s: tunnel open for %s (%s)", s.vm_id, s.identity.display, s.conn_id)
        result = SpliceResult()
        short = (await self.config(s.identity.tenant_id)).get_int("internal.l7r.short_session")
        try:
            result = await splice(client, ready.desktop, initial=initial, stop=s.abort,
                                  on_in=self.metrics.bytes_in.inc, on_out=self.metrics.bytes_out.inc)
        finally:
            self.metrics.tunnels_open.dec()
            duration = time.monotonic() - s.started
            if duration < short:
                self.counters.add("short_sessions")
            await self.give_back(s)
            if result.ended_by and result.ended_by != "stop":
                ended = f"ended by {result.ended_by}"
            else:
                ended = f"closed by the broker: {s.why_aborted or 'shutdown'}"
            log.info("vm %s: tunnel of %s closed after %.1f s (%s; %d bytes in, %d out)",
                     s.vm_id, s.identity.display, duration, ended, result.bytes_in, result.bytes_out)
        return result

    async def shutdown(self, grace: float) -> None:
        """Let live tunnels run for ``grace`` seconds, then close them (their VMs are given back)."""
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for s in list(self.sessions.values()):
            s.stop("the broker is stopping")
        deadline = time.monotonic() + 5
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

