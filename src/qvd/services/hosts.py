"""Nodes: registration, blocking (drain) and "stop every VM of this node"."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.errors import AlreadyExists, InputError, InvalidState
from qvd.core.states import HostCmd, HostState, VmState
from qvd.db.models import Host, HostRuntime, ObjectType, Vm, VmRuntime
from qvd.services.base import Actor, Change, audited, notify, reading
from qvd.services.common import NAME_RE, Args, delete_all_properties, set_properties, view_row, with_properties
from qvd.services.lookup import get_host
from qvd.services.query import Page, list_rows
from qvd.services.views import HOST


def list_hosts(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("host.see")
    with reading(factory) as s:
        return with_properties(s, list_rows(s, HOST, actor, **q), ObjectType.HOST)


def get_host_row(factory: sessionmaker[Session], actor: Actor, hid: int) -> dict[str, Any]:
    actor.require("host.see")
    with reading(factory) as s:
        return view_row(s, HOST, actor, hid, ObjectType.HOST)


def _address(a: Args) -> str:
    addr = a.req_text("address", max_len=64)
    if any(c.isspace() for c in addr) or "/" in addr:
        raise InputError(f"invalid host address {addr!r}: expected an IP address or a host name")
    return addr


def register_host(s: Session, name: str, address: str, *, frontend: bool = True, backend: bool = True,
                  description: str = "") -> Host:
    """Create a host with its runtime row (used by the API and by a node registering itself)."""
    if s.scalars(select(Host).where(Host.name == name)).one_or_none():
        raise AlreadyExists(f"host '{name}' already exists")
    if s.scalars(select(Host).where(Host.address == address)).one_or_none():
        raise AlreadyExists(f"another host already has the address {address}")
    h = Host(name=name, address=address, frontend=frontend, backend=backend, description=description)
    h.runtime = HostRuntime()
    s.add(h)
    s.flush()
    return h


def create_host(factory: sessionmaker[Session], actor: Actor, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("host.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        actor.require_platform("create hosts")
        a = Args("host", data, {"name", "address", "frontend", "backend", "description", "blocked", "properties"})
        name = a.req_text("name", pattern=NAME_RE)
        ch.object_name = name
        h = register_host(s, name, _address(a), frontend=a.flag("frontend", default=True) is not False,
                          backend=a.flag("backend", default=True) is not False,
                          description=a.text("description") or "")
        h.runtime.blocked = bool(a.flag("blocked"))
        ch.object_id = h.id
        set_properties(s, ObjectType.HOST, h.id, a.props())
        s.flush()
        ch.after = view_row(s, HOST, actor, h.id, ObjectType.HOST)
        return ch.after

    return audited(factory, actor, "host.create", "host", work, arguments=data)


def update_host(factory: sessionmaker[Session], actor: Actor, hid: int, data: dict[str, Any],
                action: str = "host.update") -> dict[str, Any]:
    actor.require("host.block" if action in ("host.block", "host.unblock") else "host.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        actor.require_platform("change hosts")
        h = get_host(s, actor, hid)
        ch.object_id, ch.object_name = h.id, h.name
        ch.before = view_row(s, HOST, actor, h.id, ObjectType.HOST)
        a = Args("host", data, {"name", "address", "frontend", "backend", "description", "blocked", "properties"})
        if a.has("name"):
            name = a.req_text("name", pattern=NAME_RE)
            if name != h.name and s.scalars(select(Host).where(Host.name == name)).one_or_none():
                raise AlreadyExists(f"host '{name}' already exists")
            h.name = name
        if a.has("address"):
            addr = _address(a)
            if addr != h.address and s.scalars(select(Host).where(Host.address == addr)).one_or_none():
                raise AlreadyExists(f"another host already has the address {addr}")
            h.address = addr
        for k in ("frontend", "backend"):
            if a.has(k):
                setattr(h, k, bool(a.flag(k)))
        if a.has("description"):
            h.description = a.text("description") or ""
        if a.has("blocked"):
            h.runtime.blocked = bool(a.flag("blocked"))
        set_properties(s, ObjectType.HOST, h.id, a.props())
        s.flush()
        ch.after = view_row(s, HOST, actor, h.id, ObjectType.HOST)
        return ch.after

    return audited(factory, actor, action, "host", work, arguments=data)


def delete_host(factory: sessionmaker[Session], actor: Actor, hid: int) -> None:
    actor.require("host.delete")

    def work(s: Session, ch: Change) -> None:
        actor.require_platform("delete hosts")
        h = get_host(s, actor, hid)
        ch.object_id, ch.object_name = h.id, h.name
        ch.before = view_row(s, HOST, actor, h.id, ObjectType.HOST)
        if h.runtime.state in (HostState.STARTING, HostState.RUNNING, HostState.STOPPING):
            raise InvalidState(f"host '{h.name}' is {h.runtime.state.value}; stop its node daemon first")
        busy = s.scalars(select(VmRuntime).where(VmRuntime.host_id == h.id,
                                                 VmRuntime.vm_state != VmState.STOPPED)).first()
        if busy is not None:
            raise InvalidState(f"host '{h.name}' still has desktops assigned")
        delete_all_properties(s, ObjectType.HOST, h.id)
        s.delete(h)

    audited(factory, actor, "host.delete", "host", work)


def stop_host(factory: sessionmaker[Session], actor: Actor, hid: int) -> dict[str, Any]:
    """Ask the host's node daemon to stop (command ``stop`` + NOTIFY): it stops its desktops and exits."""
    actor.require("host.stop")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        actor.require_platform("stop node daemons")
        h = get_host(s, actor, hid)
        ch.object_id, ch.object_name = h.id, h.name
        if h.runtime.state not in (HostState.STARTING, HostState.RUNNING):
            raise InvalidState(f"host '{h.name}' is {h.runtime.state.value}: there is no node daemon to stop")
        ch.before = {"cmd": h.runtime.cmd.value if h.runtime.cmd else None}
        h.runtime.cmd = HostCmd.STOP
        s.flush()
        notify(s, f"qvd_cmd_for_host{h.id}")
        ch.after = {"cmd": HostCmd.STOP.value}
        return view_row(s, HOST, actor, h.id, ObjectType.HOST)

    return audited(factory, actor, "host.stop", "host", work)


def stop_vms_of_host(factory: sessionmaker[Session], actor: Actor, hid: int) -> dict[str, Any]:
    """Write the stop command for every desktop of the host (drain)."""
    actor.require("host.stop_vms")
    from qvd.services.vms import stop_vm_in_session

    def work(s: Session, ch: Change) -> dict[str, Any]:
        h = get_host(s, actor, hid)
        ch.object_id, ch.object_name = h.id, h.name
        vms = list(s.scalars(select(Vm).join(VmRuntime, VmRuntime.vm_id == Vm.id).where(VmRuntime.host_id == h.id)))
        stopped = []
        for vm in vms:
            in_scope = actor.is_platform or vm.user.tenant_id == actor.tenant_id
            if in_scope and stop_vm_in_session(s, vm):
                stopped.append(vm.id)
        ch.after = {"stopping": stopped}
        return {"host": view_row(s, HOST, actor, h.id, ObjectType.HOST), "stopping": stopped}

    return audited(factory, actor, "host.stop_vms", "host", work)
