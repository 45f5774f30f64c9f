"""The L7R's database work: every function is one short transaction.

These functions are synchronous and are called from the event loop through a
worker thread (:class:`qvd.l7r.broker.Db`); none keeps a session after it
returns, none waits on the network inside a transaction (on SQLite every
transaction holds the write lock from BEGIN).

Session bookkeeping on ``vm_runtimes`` (reference §3.4-3.5, made
compare-and-swap): a connection takes a VM with ``disconnected -> connecting``
writing ``l7r_host_id``/``l7r_pid``/``l7r_conn`` (its own id); every later write
of that connection matches on ``l7r_conn``, so a connection that lost the VM to
a newer one can never clear the newer one's row.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AlreadyExists, ConfigError, QvdError
from qvd.core.security import new_token, token_hash
from qvd.core.states import UserCmd, UserState, VmState, check_user_transition
from qvd.db.engine import transaction
from qvd.db.models import Host, HostRuntime, ObjectType, Osf, User, UserToken, Vm, VmRuntime, utcnow
from qvd.db.queries import cas_update
from qvd.l7r.auth.base import VmInfo
from qvd.services.base import Actor, Change, notify, write_audit
from qvd.services.common import properties_of
from qvd.services.hosts import register_host
from qvd.services.vms import resolve_di, start_vm_in_session, stop_vm_in_session

log = logging.getLogger(__name__)

Factory = sessionmaker[Session]

#: Counters of ``host_runtimes`` the L7R increments.
COUNTERS = ("http_requests", "auth_attempts", "auth_ok", "nx_attempts", "nx_ok", "short_sessions")


# --- the node ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostStatus:
    """This node as the database sees it; ``host_id`` None = not registered."""

    host_id: int | None
    state: str = ""
    blocked: bool = False
    backend: bool = True
    address: str = ""

    def unavailable_reason(self) -> str | None:
        """Why this node must not serve users (the reference's 503 texts), or None."""
        if self.host_id is None:
            return "Host is not registered in the database"
        if self.blocked:
            return "Server is blocked"
        # A frontend-only node has no node daemon to set it running.
        if self.backend and self.state != "running":
            return f"Server is {self.state}"
        return None


def ensure_host(factory: Factory, name: str, address: str, *, frontend: bool, backend: bool) -> int:
    """The id of this node's ``hosts`` row, created if absent (the node daemon may race us)."""
    for _ in range(3):
        with transaction(factory) as s:
            hid = s.scalars(select(Host.id).where(Host.name == name)).first()
        if hid is not None:
            return int(hid)
        try:
            with transaction(factory) as s:
                h = register_host(s, name, address, frontend=frontend, backend=backend,
                                  description="registered by qvd-l7r")
                log.info("registered this node as host %s (%s, %s)", h.id, name, address)
                return int(h.id)
        except IntegrityError:
            continue  # the node daemon registered it meanwhile: read it again
        except AlreadyExists as e:
            with transaction(factory) as s:
                if s.scalars(select(Host.id).where(Host.name == name)).first() is None:
                    raise ConfigError(f"cannot register this node as '{name}' ({address}): {e.message}; "
                                      "set nodename / node.address in the node file") from None
    raise ConfigError(f"cannot register this node as '{name}': the hosts table keeps changing")


def host_status(factory: Factory, host_id: int, deltas: Mapping[str, int] | None = None) -> HostStatus:
    """Add ``deltas`` to the node's counters (if any) and read its status, in one transaction."""
    with transaction(factory) as s:
        if deltas and any(deltas.values()):
            s.execute(
                update(HostRuntime)
                .where(HostRuntime.host_id == host_id)
                .values({getattr(HostRuntime, k): getattr(HostRuntime, k) + int(v) for k, v in deltas.items() if v})
                .execution_options(synchronize_session=False)
            )
        row = s.execute(
            select(HostRuntime.state, HostRuntime.blocked, Host.backend, Host.address)
            .join(Host, Host.id == HostRuntime.host_id)
            .where(HostRuntime.host_id == host_id)
        ).first()
    if row is None:
        return HostStatus(None)
    return HostStatus(host_id, str(row.state.value if hasattr(row.state, "value") else row.state),
                      bool(row.blocked), bool(row.backend), str(row.address))


def reset_own_sessions(factory: Factory, host_id: int, pid: int) -> int:
    """At start: free the VMs a previous L7R process of this node left taken (it died with them)."""
    with transaction(factory) as s:
        res: Any = s.execute(
            update(VmRuntime)
            .where(VmRuntime.l7r_host_id == host_id, VmRuntime.l7r_pid != pid)
            .values(user_state=UserState.DISCONNECTED, user_state_ts=utcnow(), user_cmd=None,
                    l7r_host_id=None, l7r_pid=None, l7r_conn=None)
            .execution_options(synchronize_session=False)
        )
        return int(res.rowcount or 0)


# --- VMs ----------------------------------------------------------------------------------------


def _vm_info_query() -> Any:
    return (
        select(Vm.id, Vm.name, Vm.user_id, User.tenant_id, VmRuntime.vm_state, VmRuntime.blocked,
               Osf.is_application, Vm.osf_id)
        .join(User, User.id == Vm.user_id)
        .join(Osf, Osf.id == Vm.osf_id)
        .join(VmRuntime, VmRuntime.vm_id == Vm.id)
    )


def _info(row: Any) -> VmInfo:
    state = row.vm_state.value if hasattr(row.vm_state, "value") else str(row.vm_state)
    return VmInfo(id=int(row.id), name=row.name, user_id=int(row.user_id), tenant_id=int(row.tenant_id),
                  state=state, blocked=bool(row.blocked), is_application=bool(row.is_application),
                  osf_id=int(row.osf_id))


def vm_info(factory: Factory, vm_id: int) -> VmInfo | None:
    with transaction(factory) as s:
        row = s.execute(_vm_info_query().where(Vm.id == vm_id)).first()
    return _info(row) if row is not None else None


def list_user_vms(factory: Factory, user_id: int, applications: bool) -> list[VmInfo]:
    with transaction(factory) as s:
        rows = s.execute(
            _vm_info_query().where(Vm.user_id == user_id, Osf.is_application.is_(applications)).order_by(Vm.id)
        ).all()
    return [_info(r) for r in rows]


@dataclass(frozen=True)
class Runtime:
    """The columns of ``vm_runtimes`` the broker follows."""

    vm_state: VmState
    vm_cmd: str | None
    host_id: int | None
    user_state: UserState
    user_cmd: str | None
    l7r_host_id: int | None
    l7r_pid: int | None
    l7r_conn: str | None
    vm_address: str | None
    vm_vma_port: int | None
    vm_x_port: int | None
    last_error: str
    blocked: bool
    #: the node the VM is assigned to (``host_id``): name, state and last heartbeat
    host_name: str = ""
    host_state: str | None = None
    host_ok_ts: dt.datetime | None = None


def read_runtime(factory: Factory, vm_id: int) -> Runtime | None:
    with transaction(factory) as s:
        rt = s.get(VmRuntime, vm_id)
        if rt is None:
            return None
        host = s.get(Host, rt.host_id) if rt.host_id is not None else None
        return Runtime(
            vm_state=rt.vm_state, vm_cmd=rt.vm_cmd.value if rt.vm_cmd else None, host_id=rt.host_id,
            user_state=rt.user_state, user_cmd=rt.user_cmd.value if rt.user_cmd else None,
            l7r_host_id=rt.l7r_host_id, l7r_pid=rt.l7r_pid, l7r_conn=rt.l7r_conn, vm_address=rt.vm_address,
            vm_vma_port=rt.vm_vma_port, vm_x_port=rt.vm_x_port, last_error=rt.last_error or "",
            blocked=rt.blocked,
            host_name=host.name if host is not None else "",
            host_state=host.runtime.state.value if host is not None else None,
            host_ok_ts=host.runtime.ok_ts if host is not None else None,
        )


# --- take-over ----------------------------------------------------------------------------------


def try_acquire(factory: Factory, vm_id: int, *, host_id: int, pid: int, conn_id: str, user_id: int) -> bool:
    """``disconnected -> connecting`` for this connection; False when another connection holds the VM."""
    check_user_transition(UserState.DISCONNECTED, UserState.CONNECTING)
    with transaction(factory) as s:
        return cas_update(
            s,
            update(VmRuntime)
            .where(VmRuntime.vm_id == vm_id, VmRuntime.user_state == UserState.DISCONNECTED)
            .values(user_state=UserState.CONNECTING, user_state_ts=utcnow(), user_cmd=None,
                    l7r_host_id=host_id, l7r_pid=pid, l7r_conn=conn_id, real_user_id=user_id),
        )


def request_abort(factory: Factory, vm_id: int, holder_conn: str | None) -> bool:
    """Ask the connection holding the VM to let go (``user_cmd='abort'`` + NOTIFY its node)."""
    with transaction(factory) as s:
        rt = s.get(VmRuntime, vm_id)
        if rt is None or rt.l7r_conn != holder_conn:
            return False
        ok = cas_update(
            s,
            update(VmRuntime)
            .where(VmRuntime.vm_id == vm_id, VmRuntime.l7r_conn == holder_conn,
                   VmRuntime.user_state.in_([UserState.CONNECTING, UserState.CONNECTED]))
            .values(user_cmd=UserCmd.ABORT),
        )
        if ok and rt.l7r_host_id is not None:
            notify(s, f"qvd_cmd_for_user_on_host{rt.l7r_host_id}")
        return ok


def host_state_of(factory: Factory, host_id: int | None) -> tuple[str | None, bool]:
    """(state, is a backend) of a host, to judge whether a connection held there can still let go."""
    if host_id is None:
        return None, False
    with transaction(factory) as s:
        h = s.get(Host, host_id)
        if h is None:
            return "deleted", True
        return h.runtime.state.value, bool(h.backend)


def force_release(factory: Factory, vm_id: int, holder_conn: str | None) -> bool:
    """Free a VM whose holder is gone, matching its connection id (a newer live holder is kept)."""
    with transaction(factory) as s:
        return cas_update(
            s,
            update(VmRuntime)
            .where(VmRuntime.vm_id == vm_id, VmRuntime.l7r_conn == holder_conn,
                   VmRuntime.user_state != UserState.DISCONNECTED)
            .values(user_state=UserState.DISCONNECTED, user_state_ts=utcnow(), user_cmd=None,
                    l7r_host_id=None, l7r_pid=None, l7r_conn=None),
        )


def mark_connected(factory: Factory, vm_id: int, conn_id: str) -> bool:
    """``connecting -> connected``, only if this connection still holds the VM and was not aborted."""
    check_user_transition(UserState.CONNECTING, UserState.CONNECTED)
    with transaction(factory) as s:
        return cas_update(
            s,
            update(VmRuntime)
            .where(VmRuntime.vm_id == vm_id, VmRuntime.l7r_conn == conn_id,
                   VmRuntime.user_state == UserState.CONNECTING, VmRuntime.user_cmd.is_(None))
            .values(user_state=UserState.CONNECTED, user_state_ts=utcnow()),
        )


def release(factory: Factory, vm_id: int, conn_id: str) -> bool:
    """Back to ``disconnected`` with the l7r columns cleared, if this connection still holds the VM."""
    with transaction(factory) as s:
        return cas_update(
            s,
            update(VmRuntime)
            .where(VmRuntime.vm_id == vm_id, VmRuntime.l7r_conn == conn_id,
                   VmRuntime.user_state.in_([UserState.CONNECTING, UserState.CONNECTED]))
            .values(user_state=UserState.DISCONNECTED, user_state_ts=utcnow(), user_cmd=None,
                    l7r_host_id=None, l7r_pid=None, l7r_conn=None),
        )


def aborted_connections(factory: Factory, host_id: int, pid: int) -> list[tuple[int, str]]:
    """(vm_id, conn_id) of this process's connections that were told to abort."""
    with transaction(factory) as s:
        rows = s.execute(
            select(VmRuntime.vm_id, VmRuntime.l7r_conn).where(
                VmRuntime.l7r_host_id == host_id, VmRuntime.l7r_pid == pid, VmRuntime.user_cmd == UserCmd.ABORT
            )
        ).all()
    return [(int(r.vm_id), str(r.l7r_conn)) for r in rows if r.l7r_conn]


# --- start, stop, parameters --------------------------------------------------------------------


def _actor(who: str, tenant_id: int, ip: str) -> Actor:
    return Actor(admin_id=None, name=who[:64], tenant_id=tenant_id, source="l7r", ip=ip)


def start_vm(factory: Factory, vm_id: int, cfg: Config, *, who: str, tenant_id: int, ip: str) -> str:
    """Assign a host and write the start command in one transaction (audited); returns the host name.

    Raises the services' errors (no host available, no DI, DI blocked, state changed).
    """
    with transaction(factory) as s:
        vm = s.get(Vm, vm_id)
        if vm is None:
            raise QvdError(f"VM {vm_id} was deleted")
        host = start_vm_in_session(s, vm, cfg)
        write_audit(s, _actor(who, tenant_id, ip), "vm.start",
                    Change("vm", vm.id, vm.name, tenant_id, after={"host": host.name}),
                    message="started by a user connection")
        return host.name


def stop_vm(factory: Factory, vm_id: int, *, who: str, tenant_id: int, ip: str) -> bool:
    """Write the stop command (audited); False when the VM is already stopped or stopping."""
    with transaction(factory) as s:
        vm = s.get(Vm, vm_id)
        if vm is None:
            return False
        if not stop_vm_in_session(s, vm):
            return False
        write_audit(s, _actor(who, tenant_id, ip), "vm.stop", Change("vm", vm.id, vm.name, tenant_id),
                    message="stopped by the user")
        return True


def session_properties(factory: Factory, vm_id: int) -> dict[str, str]:
    """Custom properties merged OSF < DI < user < VM (later overrides earlier)."""
    with transaction(factory) as s:
        vm = s.get(Vm, vm_id)
        if vm is None:
            return {}
        di_id = vm.runtime.current_di_id
        if di_id is None:
            di = resolve_di(s, vm)
            di_id = di.id if di is not None else None
        merged: dict[str, str] = {}
        merged.update(properties_of(s, ObjectType.OSF, [vm.osf_id])[vm.osf_id])
        if di_id is not None:
            merged.update(properties_of(s, ObjectType.DI, [di_id])[di_id])
        merged.update(properties_of(s, ObjectType.USER, [vm.user_id])[vm.user_id])
        merged.update(properties_of(s, ObjectType.VM, [vm.id])[vm.id])
        return merged


def create_token(factory: Factory, user_id: int, ttl: int, *, multi_use: bool,
                 params: Mapping[str, str] | None = None, vm_id: int | None = None) -> tuple[str, dt.datetime]:
    """A new bearer token (only its SHA-256 is stored); returns (token, expiry)."""
    token = new_token()
    expires = utcnow() + dt.timedelta(seconds=ttl)
    with transaction(factory) as s:
        s.add(UserToken(token_hash=token_hash(token), user_id=user_id, vm_id=vm_id, expires_at=expires,
                        multi_use=multi_use, auth_params=dict(params or {})))
    return token, expires
