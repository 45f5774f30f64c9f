"""Every database read and write of the node daemon, as short blocking functions.

The daemon runs them in a small thread pool of its own (never on the event loop, and
never in the default executor the backends use, so that a hung database cannot starve
desktop cleanup).  Each function is one short transaction: on SQLite every
transaction holds the write lock from ``BEGIN IMMEDIATE`` to commit, so nothing here
waits on the network, a backend or a lock of ours.

Every state write is a compare-and-swap on ``(vm_id, host_id = this node, vm_state =
expected)``; a False return means somebody else changed the row (a peer declared the
node lost, an administrator acted) and the caller must not overwrite it.

The one write about OTHER nodes is :meth:`HkdStore.declare_lost_peers` (the cluster
monitor): a peer whose heartbeat is too old becomes ``lost`` and its desktops and
connections are reset, all in one transaction guarded by a compare-and-swap on the
peer's state and heartbeat, so that of several monitors racing exactly one declares it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from qvd.backends.base import DesktopSpec
from qvd.core.config import Config, Paths
from qvd.core.errors import Blocked, Conflict, IllegalTransition, NotFound
from qvd.core.states import (
    HostCmd,
    HostState,
    UserCmd,
    UserState,
    VmCmd,
    VmState,
    check_host_transition,
    check_user_transition,
    check_vm_transition,
)
from qvd.db.engine import transaction
from qvd.db.models import Di, DiTag, Host, HostRuntime, Osf, Vm, VmRuntime, utcnow
from qvd.db.queries import cas_host_state, cas_update, load_db_config
from qvd.hkd.sysinfo import Capacity
from qvd.services.base import Actor, Change, notify, write_audit
from qvd.services.hosts import register_host
from qvd.services.vms import mac_for

# Desktops whose memory the heartbeat subtracts from MemAvailable (see sysinfo).
_COUNTED = (VmState.RUNNING, VmState.DEBUGGING)
# Fields that only mean something while a desktop exists on a node.
_RUNTIME_CLEARED: dict[str, Any] = {
    "host_id": None, "vm_address": None, "vm_vma_port": None, "vm_x_port": None, "current_di_id": None,
    "expiration_soft": None, "expiration_hard": None, "vma_ok_ts": None, "vm_step": "", "vm_cmd": None,
}
# Peers the cluster monitor watches: a daemon that is starting writes no heartbeat yet,
# a stopped one has nothing to lose, a lost one was already declared.
_WATCHED = (HostState.RUNNING, HostState.STOPPING)
# Columns of a connection that no L7R holds.
_CONNECTION_CLEARED: dict[str, Any] = {
    "user_state": UserState.DISCONNECTED, "user_cmd": None, "l7r_host_id": None, "l7r_pid": None, "l7r_conn": None,
}


@dataclass(frozen=True)
class HostRecord:
    id: int
    name: str
    address: str
    state: HostState
    pid: int | None
    ok_ts: dt.datetime | None
    backend: bool


@dataclass(frozen=True)
class VmRecord:
    vm_id: int
    name: str
    state: VmState
    step: str
    cmd: VmCmd | None


@dataclass(frozen=True)
class LostHost:
    """A peer this node declared ``lost``, and what that reset."""

    id: int
    name: str
    silence: float | None  # seconds since its last heartbeat; None = it never wrote one
    vms: dict[int, str]  # desktops written stopped: vm_id -> name
    disconnected: list[int]  # VMs whose connection ran through the lost node's L7R (reset)
    aborted: dict[int, list[int]]  # L7R host id -> VMs whose connection it must close


@dataclass(frozen=True)
class Expired:
    vm_id: int
    soft: dt.datetime | None
    hard: dt.datetime | None
    hard_due: bool


def network_of(cfg: Config) -> tuple[int, str]:
    """(prefix length, gateway) of the desktop network from the ``vm.network.*`` keys."""
    start = cfg.get_str("vm.network.ip.start")
    net = ipaddress.IPv4Network(f"{start}/{cfg.get_str('vm.network.netmask')}", strict=False)
    gw = cfg.get_str("vm.network.gateway") or str(net.network_address + 1)
    return net.prefixlen, gw


def desktop_spec(cfg: Config, paths: Paths, vm: Vm, di: Di | None, *, address: str | None = None,
                 vma_port: int | None = None, nx_port: int | None = None) -> DesktopSpec:
    """What the backend needs for one desktop, from the database rows and the config."""
    prefix_len, gateway = network_of(cfg)
    ip = address or vm.ip
    per_user = cfg.get_bool("vm.lxc.home.per.user")
    home_key = f"user-{vm.user.tenant_id}-{vm.user.login}" if per_user else f"vm-{vm.id}"
    return DesktopSpec(
        vm_id=vm.id,
        name=vm.name,
        di_id=di.id if di else 0,
        image=paths.images / di.path if di else Path(),
        memory_mb=vm.osf.memory,
        address=ip,
        prefix_len=prefix_len,
        gateway=gateway,
        mac=mac_for(ip, cfg.get_str("vm.network.mac.prefix")),
        home_key=home_key,
        persistent_overlay=cfg.get_bool("vm.overlay.persistent"),
        user_storage_mb=vm.osf.user_storage,
        vma_port=vma_port or cfg.get_int("internal.vm.port.vma"),
        nx_port=nx_port or 4000 + cfg.get_int("internal.nxagent.display"),
    )


class HkdStore:
    """The node daemon's view of the database, for one node (``host_id`` once known)."""

    def __init__(self, factory: sessionmaker[Session], node_cfg: Config, paths: Paths, node_name: str) -> None:
        self.factory = factory
        self.node_cfg = node_cfg
        self.paths = paths
        self.node_name = node_name
        self.host_id = 0
        self.actor = Actor(admin_id=None, name=f"hkd:{node_name}"[:64], tenant_id=None, source="hkd")

    # --- configuration and the host row ---------------------------------------------------------

    def effective_config(self) -> Config:
        """Node file + global database rows (read again at every start, so changes apply)."""
        with transaction(self.factory) as s:
            return load_db_config(s, self.node_cfg)

    def _host_record(self, s: Session, h: Host) -> HostRecord:
        rt = h.runtime
        return HostRecord(h.id, h.name, h.address, rt.state, rt.pid, rt.ok_ts, h.backend)

    def ensure_host(self, address: str) -> tuple[HostRecord, bool]:
        """Find this node's ``hosts`` row by name or register it; (record, newly registered).

        Raises Conflict when the name is registered with another address (two machines
        claiming one name) and AlreadyExists when another host has the address.
        """
        with transaction(self.factory) as s:
            h = s.scalars(select(Host).where(Host.name == self.node_name)).one_or_none()
            created = False
            if h is None:
                h = register_host(s, self.node_name, address, description="registered by its node daemon")
                write_audit(s, self.actor, "host.create", Change("host", h.id, h.name, after={"address": address}),
                            message="node daemon registered its host")
                created = True
            elif h.address != address:
                raise Conflict(f"host '{self.node_name}' is registered with the address {h.address}, not "
                               f"{address}: give --address {h.address} (or node.address), or pick another "
                               "--name if this is another machine")
            self.host_id = h.id
            return self._host_record(s, h), created

    def host(self) -> HostRecord:
        with transaction(self.factory) as s:
            h = s.get(Host, self.host_id)
            if h is None:
                raise NotFound(f"host {self.host_id} ('{self.node_name}') was deleted")
            return self._host_record(s, h)

    def set_host_state(self, expected: HostState, new: HostState, **values: Any) -> bool:
        with transaction(self.factory) as s:
            return cas_host_state(s, self.host_id, expected, new, **values)

    def move_host(self, new: HostState, **values: Any) -> bool:
        """Move the host to ``new`` from its current state if the table allows it (e.g. a
        daemon stopping after a peer declared it lost stays ``lost``)."""
        with transaction(self.factory) as s:
            rt = s.get(HostRuntime, self.host_id)
            if rt is None or rt.state == new:
                return rt is not None
            try:
                check_host_transition(rt.state, new)
            except IllegalTransition:
                return False
            return cas_host_state(s, self.host_id, rt.state, new, **values)

    def host_to_starting(self, pid: int) -> HostState:
        """Move the host to ``starting`` from whatever the last run left; returns that state.

        ``starting`` itself (a daemon that died while starting) goes through ``stopped``
        because the table has no starting -> starting: the dead run did end.
        """
        with transaction(self.factory) as s:
            rt = s.get(HostRuntime, self.host_id)
            if rt is None:
                raise NotFound(f"host {self.host_id} has no runtime row")
            was = rt.state
            if was == HostState.STARTING:
                if not cas_host_state(s, self.host_id, HostState.STARTING, HostState.STOPPED):
                    raise Conflict("the host's state changed while this node daemon was starting")
                cur = HostState.STOPPED
            else:
                cur = was
            check_host_transition(cur, HostState.STARTING)
            if not cas_host_state(s, self.host_id, cur, HostState.STARTING, pid=pid, cmd=None):
                raise Conflict("the host's state changed while this node daemon was starting")
            return was

    def heartbeat(self, pid: int, capacity: Capacity) -> bool:
        """Write ``ok_ts``/``pid``/capacity; False when the host row is ``lost`` (declared by a peer)."""
        with transaction(self.factory) as s:
            stmt = (
                update(HostRuntime)
                .where(HostRuntime.host_id == self.host_id, HostRuntime.state != HostState.LOST)
                .values(ok_ts=utcnow(), pid=pid, usable_ram=capacity.usable_ram, usable_cpu=capacity.usable_cpu,
                        load=capacity.load)
            )
            return cas_update(s, stmt)

    def declare_lost_peers(self, timeout: float) -> list[LostHost]:
        """Declare ``lost`` every other node that is running or stopping and whose heartbeat
        (``ok_ts``) is older than ``timeout`` seconds; one transaction.

        For each, a compare-and-swap on (state running/stopping, ``ok_ts`` still old): when
        several monitors race, the first commits and the others match nothing (on SQLite
        the write lock orders them, on PostgreSQL the row lock does and the condition is
        evaluated again).  With it, in the same transaction: the node's desktops are
        written ``stopped`` with their runtime fields and pending command cleared and the
        reason in ``last_error`` (the next connection starts them elsewhere), connections
        through the node's L7R are reset to ``disconnected``, connections held by another
        node's L7R to one of those desktops get ``user_cmd='abort'`` with a NOTIFY to that
        L7R, and one audit row is written.

        ``ok_ts`` is written with each node's clock and compared with this node's: the
        nodes need synchronised clocks (NTP).  ``timeout``
        (``internal.hkd.cluster.node.timeout``) must be comfortably above the self-fencing
        timeout (``internal.hkd.agent.ticker.timeout``), so that a node cut off from the
        database has stopped its desktops before a peer lets them start elsewhere.
        """
        check_host_transition(HostState.RUNNING, HostState.LOST)
        check_host_transition(HostState.STOPPING, HostState.LOST)
        now = utcnow()
        cutoff = now - dt.timedelta(seconds=timeout)
        stale = or_(HostRuntime.ok_ts.is_(None), HostRuntime.ok_ts < cutoff)
        out: list[LostHost] = []
        with transaction(self.factory) as s:
            if s.get_bind().dialect.name == "postgresql":
                # A peer cut off inside a transaction may still hold its rows: give up this round
                # (the next one retries) rather than hang until its session ends.
                s.execute(text("SET LOCAL lock_timeout = '2s'"))
            peers = s.execute(
                select(Host.id, Host.name, HostRuntime.state, HostRuntime.ok_ts)
                .join(HostRuntime, HostRuntime.host_id == Host.id)
                .where(Host.id != self.host_id, HostRuntime.state.in_(_WATCHED), stale)
                .order_by(Host.id)
            ).all()
            for hid, name, state, ok_ts in peers:
                won = cas_update(s, update(HostRuntime).where(
                    HostRuntime.host_id == hid, HostRuntime.state.in_(_WATCHED), stale,
                ).values(state=HostState.LOST, state_ts=now))
                if won:
                    silence = (now - ok_ts).total_seconds() if ok_ts is not None else None
                    out.append(self._reset_lost(s, int(hid), str(name), HostState(state), ok_ts, silence, now))
        return out

    def _reset_lost(self, s: Session, hid: int, name: str, was: HostState, ok_ts: dt.datetime | None,
                    silence: float | None, now: dt.datetime) -> LostHost:
        """The desktops and connections of a node just declared lost (the caller's transaction)."""
        since = f"no heartbeat for {silence:.0f} s" if silence is not None else "it never wrote a heartbeat"
        reason = (f"node '{name}' was lost ({since}; declared by node '{self.node_name}'); the desktop was "
                  "stopped there and starts on another node at the next connection")
        for st in VmState:
            if st != VmState.STOPPED:
                check_vm_transition(st, VmState.STOPPED)
        vm_ids = [int(v) for v in s.scalars(
            update(VmRuntime).where(VmRuntime.host_id == hid)
            .values(vm_state=VmState.STOPPED, vm_state_ts=now, **_RUNTIME_CLEARED, last_error=reason[:4000],
                    last_error_ts=now)
            .returning(VmRuntime.vm_id)
            .execution_options(synchronize_session=False)
        ).all()]
        vms: dict[int, str] = {}
        if vm_ids:
            vms = {int(v): str(n) for v, n in s.execute(select(Vm.id, Vm.name).where(Vm.id.in_(vm_ids))).all()}
        # Tunnels of surviving L7Rs to these desktops: close them now (they lead nowhere).
        aborted: dict[int, list[int]] = {}
        if vm_ids:
            for vid, l7r_host in s.execute(
                update(VmRuntime)
                .where(VmRuntime.vm_id.in_(vm_ids), VmRuntime.l7r_host_id.is_not(None), VmRuntime.l7r_host_id != hid,
                       VmRuntime.user_state.in_([UserState.CONNECTING, UserState.CONNECTED]))
                .values(user_cmd=UserCmd.ABORT)
                .returning(VmRuntime.vm_id, VmRuntime.l7r_host_id)
                .execution_options(synchronize_session=False)
            ).all():
                aborted.setdefault(int(l7r_host), []).append(int(vid))
        for l7r_host in aborted:
            notify(s, f"qvd_cmd_for_user_on_host{l7r_host}")
        # Connections through the lost node's own L7R: nobody can close them any more.
        check_user_transition(UserState.CONNECTING, UserState.DISCONNECTED)
        check_user_transition(UserState.CONNECTED, UserState.DISCONNECTED)
        disconnected = sorted(int(v) for v in s.scalars(
            update(VmRuntime).where(VmRuntime.l7r_host_id == hid)
            .values(user_state_ts=now, **_CONNECTION_CLEARED)
            .returning(VmRuntime.vm_id)
            .execution_options(synchronize_session=False)
        ).all())
        lost = LostHost(hid, name, silence, dict(sorted(vms.items())), disconnected,
                        {h: sorted(v) for h, v in sorted(aborted.items())})
        message = (f"node '{self.node_name}' declared host '{name}' lost ({since}); "
                   f"{len(vms)} desktop(s) stopped" + (f": {', '.join(vms.values())}" if vms else ""))
        write_audit(s, self.actor, "host.lost",
                    Change("host", hid, name, before={"state": was, "ok_ts": ok_ts},
                           after={"state": HostState.LOST, "declared_by": self.node_name,
                                  "stopped_vms": sorted(vms), "disconnected_vms": disconnected,
                                  "aborted_vms": sorted(v for vs in aborted.values() for v in vs)}),
                    message=message[:4000])
        return lost

    def promised_memory(self) -> int:
        with transaction(self.factory) as s:
            total = s.scalar(
                select(func.coalesce(func.sum(Osf.memory), 0))
                .select_from(VmRuntime)
                .join(Vm, Vm.id == VmRuntime.vm_id)
                .join(Osf, Osf.id == Vm.osf_id)
                .where(VmRuntime.host_id == self.host_id, VmRuntime.vm_state.in_(_COUNTED))
            )
            return int(total or 0)

    # --- commands ----------------------------------------------------------------------------

    def claim_host_stop(self) -> bool:
        with transaction(self.factory) as s:
            stmt = (
                update(HostRuntime)
                .where(HostRuntime.host_id == self.host_id, HostRuntime.cmd == HostCmd.STOP)
                .values(cmd=None)
            )
            return cas_update(s, stmt)

    def claim_stop_commands(self) -> list[tuple[int, VmState]]:
        """Take every stop command for this node: [(vm_id, state)]."""
        with transaction(self.factory) as s:
            stmt = (
                update(VmRuntime)
                .where(VmRuntime.host_id == self.host_id, VmRuntime.vm_cmd == VmCmd.STOP)
                .values(vm_cmd=None)
                .returning(VmRuntime.vm_id, VmRuntime.vm_state)
                .execution_options(synchronize_session=False)
            )
            return [(int(r[0]), VmState(r[1])) for r in s.execute(stmt).all()]

    def claim_start_commands(self) -> list[int]:
        """Take every start command for this node, moving those VMs stopped -> starting (step ``db``).

        One statement: a second claimer (another daemon, a retry) finds the rows no longer
        ``stopped`` with a command and gets nothing.
        """
        check_vm_transition(VmState.STOPPED, VmState.STARTING)
        with transaction(self.factory) as s:
            stmt = (
                update(VmRuntime)
                .where(VmRuntime.host_id == self.host_id, VmRuntime.vm_cmd == VmCmd.START,
                       VmRuntime.vm_state == VmState.STOPPED)
                .values(vm_cmd=None, vm_state=VmState.STARTING, vm_state_ts=utcnow(), vm_step="db",
                        last_error="", last_error_ts=None)
                .returning(VmRuntime.vm_id)
                .execution_options(synchronize_session=False)
            )
            return [int(v) for v in s.scalars(stmt).all()]

    def withdraw_pending_starts(self, reason: str) -> list[int]:
        """Give back start commands not yet claimed (the node is going away)."""
        with transaction(self.factory) as s:
            stmt = (
                update(VmRuntime)
                .where(VmRuntime.host_id == self.host_id, VmRuntime.vm_cmd == VmCmd.START,
                       VmRuntime.vm_state == VmState.STOPPED)
                .values(vm_cmd=None, host_id=None, last_error=reason, last_error_ts=utcnow())
                .returning(VmRuntime.vm_id)
                .execution_options(synchronize_session=False)
            )
            return [int(v) for v in s.scalars(stmt).all()]

    # --- desktops of this node ---------------------------------------------------------------

    def active_vms(self) -> list[VmRecord]:
        """VMs assigned to this node that are not stopped."""
        with transaction(self.factory) as s:
            rows = s.execute(
                select(VmRuntime.vm_id, Vm.name, VmRuntime.vm_state, VmRuntime.vm_step, VmRuntime.vm_cmd)
                .join(Vm, Vm.id == VmRuntime.vm_id)
                .where(VmRuntime.host_id == self.host_id, VmRuntime.vm_state != VmState.STOPPED)
                .order_by(VmRuntime.vm_id)
            ).all()
            return [VmRecord(int(r[0]), r[1], VmState(r[2]), r[3], VmCmd(r[4]) if r[4] else None) for r in rows]

    def begin_start(self, vm_id: int) -> tuple[DesktopSpec, Config] | None:
        """The ``db`` step: load the VM, its OSF and user, resolve the DI by tag, and write
        the runtime fields (address, ports, DI, run_attempts + 1).

        Raises NotFound/Conflict/Blocked with an operator-readable reason when the
        desktop cannot start; returns None when the row is no longer this node's
        ``starting`` desktop (somebody else owns it now).
        """
        with transaction(self.factory) as s:
            cfg = load_db_config(s, self.node_cfg)
            vm = s.get(Vm, vm_id)
            if vm is None:
                raise NotFound(f"VM {vm_id} was deleted")
            dis = list(s.scalars(
                select(Di).join(DiTag, DiTag.di_id == Di.id)
                .where(DiTag.osf_id == vm.osf_id, DiTag.tag == vm.di_tag)
            ))
            if not dis:
                raise Conflict(f"OSF '{vm.osf.name}' has no disk image tagged '{vm.di_tag}'")
            if len(dis) > 1:  # the unique (osf, tag) constraint makes this impossible; say so if not
                raise Conflict(f"OSF '{vm.osf.name}' has {len(dis)} disk images tagged '{vm.di_tag}'")
            di = dis[0]
            if di.blocked:
                raise Blocked(f"disk image {di.id} ({vm.osf.name}/{di.version}, tag '{vm.di_tag}') is blocked")
            spec = desktop_spec(cfg, self.paths, vm, di)
            ok = cas_update(s, update(VmRuntime).where(
                VmRuntime.vm_id == vm_id, VmRuntime.host_id == self.host_id,
                VmRuntime.vm_state == VmState.STARTING,
            ).values(vm_address=spec.address, vm_vma_port=spec.vma_port, vm_x_port=spec.nx_port,
                     current_di_id=di.id, run_attempts=VmRuntime.run_attempts + 1))
            return (spec, cfg) if ok else None

    def running_spec(self, vm_id: int) -> DesktopSpec | None:
        """The spec of a desktop the database says runs here (for adoption), or None."""
        with transaction(self.factory) as s:
            vm = s.get(Vm, vm_id)
            if vm is None or vm.runtime.host_id != self.host_id or not vm.runtime.vm_address:
                return None
            cfg = load_db_config(s, self.node_cfg)
            di = s.get(Di, vm.runtime.current_di_id) if vm.runtime.current_di_id else None
            return desktop_spec(cfg, self.paths, vm, di, address=vm.runtime.vm_address,
                                vma_port=vm.runtime.vm_vma_port, nx_port=vm.runtime.vm_x_port)

    def _cas_vm(self, s: Session, vm_id: int, expected: VmState, new: VmState | None, **values: Any) -> bool:
        """CAS on (vm, this node, expected state); ``new`` None keeps the state (a step write)."""
        if new is not None:
            check_vm_transition(expected, new)
            values = {"vm_state": new, "vm_state_ts": utcnow(), **values}
        stmt = update(VmRuntime).where(
            VmRuntime.vm_id == vm_id, VmRuntime.host_id == self.host_id, VmRuntime.vm_state == expected
        ).values(**values)
        return cas_update(s, stmt)

    def _audit_failed_start(self, s: Session, vm_id: int, reason: str) -> None:
        vm = s.get(Vm, vm_id)
        name, tenant = (vm.name, vm.user.tenant_id) if vm is not None else ("", None)
        write_audit(s, self.actor, "vm.start", Change("vm", vm_id, name, tenant_id=tenant),
                    status="start-failed", message=reason)

    def _error_values(self, error: str | None) -> dict[str, Any]:
        return {"last_error": error[:4000], "last_error_ts": utcnow()} if error else {}

    def set_step(self, vm_id: int, state: VmState, step: str, *, error: str | None = None) -> bool:
        with transaction(self.factory) as s:
            return self._cas_vm(s, vm_id, state, None, vm_step=step, **self._error_values(error))

    def to_running(self, vm_id: int, expected: VmState) -> bool:
        """starting -> running (counts run_ok) or debugging -> running (the agent is back)."""
        extra: dict[str, Any] = {"run_ok": VmRuntime.run_ok + 1} if expected == VmState.STARTING else {}
        with transaction(self.factory) as s:
            return self._cas_vm(s, vm_id, expected, VmState.RUNNING, vm_step="monitor", vma_ok_ts=utcnow(), **extra)

    def to_debugging(self, vm_id: int, expected: VmState, error: str) -> bool:
        with transaction(self.factory) as s:
            return self._cas_vm(s, vm_id, expected, VmState.DEBUGGING, vm_step="monitor",
                                **self._error_values(error))

    def to_stopping(self, vm_id: int, expected: VmState, step: str, *, error: str | None = None,
                    failed_start: bool = False) -> bool:
        with transaction(self.factory) as s:
            ok = self._cas_vm(s, vm_id, expected, VmState.STOPPING, vm_step=step, vm_cmd=None,
                              **self._error_values(error))
            if ok and failed_start and error:
                self._audit_failed_start(s, vm_id, error)
            return ok

    def to_zombie(self, vm_id: int, expected: VmState, error: str) -> bool:
        with transaction(self.factory) as s:
            return self._cas_vm(s, vm_id, expected, VmState.ZOMBIE, vm_step="reap", **self._error_values(error))

    def to_stopped(self, vm_id: int, expected: VmState, *, error: str | None = None,
                   failed_start: bool = False) -> bool:
        """Clear the runtime row: the desktop exists nowhere any more."""
        with transaction(self.factory) as s:
            ok = self._cas_vm(s, vm_id, expected, VmState.STOPPED, **_RUNTIME_CLEARED, **self._error_values(error))
            if ok and failed_start and error:
                self._audit_failed_start(s, vm_id, error)
            return ok

    def vma_ok(self, vm_id: int, state: VmState) -> bool:
        """Record a live agent; False when the row is no longer this node's desktop in ``state``."""
        with transaction(self.factory) as s:
            return self._cas_vm(s, vm_id, state, None, vma_ok_ts=utcnow())

    def still_mine(self, vm_id: int, state: VmState) -> bool:
        with transaction(self.factory) as s:
            n = s.scalar(select(func.count(VmRuntime.vm_id)).where(
                VmRuntime.vm_id == vm_id, VmRuntime.host_id == self.host_id, VmRuntime.vm_state == state))
            return bool(n)

    def expired(self, now: dt.datetime | None = None) -> list[Expired]:
        """Running desktops of this node past their soft or hard expiration."""
        now = now or utcnow()
        with transaction(self.factory) as s:
            rows = s.execute(
                select(VmRuntime.vm_id, VmRuntime.expiration_soft, VmRuntime.expiration_hard)
                .where(VmRuntime.host_id == self.host_id, VmRuntime.vm_state == VmState.RUNNING,
                       (VmRuntime.expiration_soft <= now) | (VmRuntime.expiration_hard <= now))
            ).all()
            return [Expired(int(r[0]), r[1], r[2], r[2] is not None and r[2] <= now) for r in rows]
