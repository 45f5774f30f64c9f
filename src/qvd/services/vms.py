"""Virtual desktops (VMs): creation with address allocation, tag resolution, and the
commands an administrator can give (start, stop, disconnect), which are only
written to the database for the node daemons to carry out."""

from __future__ import annotations

import ipaddress
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AlreadyExists, Blocked, Conflict, InputError, InvalidState, Unavailable
from qvd.core.states import UserCmd, UserState, VmCmd, VmState, check_user_cmd, check_vm_cmd
from qvd.db.models import Di, DiTag, Host, ObjectType, Vm, VmRuntime
from qvd.db.queries import cas_update
from qvd.services.base import Actor, Change, audited, notify, reading
from qvd.services.common import (
    NAME_RE,
    TAG_RE,
    Args,
    delete_all_properties,
    properties_of,
    set_properties,
    view_row,
)
from qvd.services.lookup import effective_config, get_vm, osf_by_ref, user_by_ref
from qvd.services.placement import choose_host
from qvd.services.query import Page, list_rows
from qvd.services.views import VM


def mac_for(ip: str, prefix: str) -> str:
    octets = ip.split(".")[1:]
    return prefix + "".join(f":{int(o):02x}" for o in octets)


def vm_network(cfg: Config) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    start = ipaddress.IPv4Address(cfg.get_str("vm.network.ip.start"))
    try:
        net = ipaddress.IPv4Network(f"{start}/{cfg.get_str('vm.network.netmask')}", strict=False)
    except ValueError as e:
        raise InputError(f"vm.network.netmask is not a valid netmask: {e}") from None
    return net, start


def allocate_ip(s: Session, cfg: Config, wanted: str | None) -> str:
    """The lowest free address from ``vm.network.ip.start`` up to the broadcast address."""
    net, start = vm_network(cfg)
    used = set(s.scalars(select(Vm.ip)))
    if wanted:
        try:
            ip = ipaddress.IPv4Address(wanted)
        except ValueError:
            raise InputError(f"invalid IP address {wanted!r}") from None
        if ip not in net or ip < start or ip >= net.broadcast_address:
            raise InputError(f"IP {ip} is outside the desktop range {start} - {net.broadcast_address - 1}")
        if str(ip) in used:
            raise AlreadyExists(f"IP {ip} is already used by another VM")
        return str(ip)
    ip = start
    while ip < net.broadcast_address:
        if str(ip) not in used:
            return str(ip)
        ip += 1
    raise Unavailable(f"no free address left in the desktop network {net}")


def _with_extras(s: Session, cfg: Config, items: list[dict[str, Any]]) -> None:
    props = properties_of(s, ObjectType.VM, [i["id"] for i in items])
    prefix = cfg.get_str("vm.network.mac.prefix")
    for i in items:
        i["properties"] = props[i["id"]]
        if "ip" in i:
            i["mac"] = mac_for(i["ip"], prefix)


def list_vms(factory: sessionmaker[Session], actor: Actor, node: Config, **q: Any) -> Page:
    actor.require("vm.see")
    with reading(factory) as s:
        page = list_rows(s, VM, actor, **q)
        _with_extras(s, effective_config(s, node), page.items)
        return page


def _vm_row(s: Session, actor: Actor, node: Config, vm_id: int) -> dict[str, Any]:
    row = view_row(s, VM, actor, vm_id)
    _with_extras(s, effective_config(s, node), [row])
    return row


def get_vm_row(factory: sessionmaker[Session], actor: Actor, node: Config, vm_id: int) -> dict[str, Any]:
    actor.require("vm.see")
    with reading(factory) as s:
        return _vm_row(s, actor, node, vm_id)


def create_vm(factory: sessionmaker[Session], actor: Actor, node: Config, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("vm.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        a = Args("VM", data, {"name", "user", "user_id", "user_name", "osf", "osf_id", "osf_name", "di_tag",
                              "ip", "description", "blocked", "properties"})
        name = a.req_text("name", pattern=NAME_RE)
        ch.object_name = name
        uref = data.get("user_id") if a.has("user_id") else (data.get("user") or data.get("user_name"))
        if uref is None:
            raise InputError("VM needs the field 'user' (name) or 'user_id'")
        if isinstance(uref, str) and uref.isdigit() and a.has("user_id"):
            uref = int(uref)
        user = user_by_ref(s, actor, uref, None)
        ch.tenant_id = user.tenant_id
        oref = data.get("osf_id") if a.has("osf_id") else (data.get("osf") or data.get("osf_name"))
        if oref is None:
            raise InputError("VM needs the field 'osf' (name) or 'osf_id'")
        if isinstance(oref, str) and oref.isdigit() and a.has("osf_id"):
            oref = int(oref)
        osf = osf_by_ref(s, actor, oref, user.tenant_id)
        if osf.tenant_id != user.tenant_id:
            raise Conflict(f"user '{user.login}' and OSF '{osf.name}' belong to different tenants")
        tag = a.text("di_tag", pattern=TAG_RE) or "default"
        if tag not in ("default", "head") and not s.scalars(
            select(DiTag).where(DiTag.osf_id == osf.id, DiTag.tag == tag)
        ).one_or_none():
            raise InputError(f"OSF '{osf.name}' has no disk image tagged '{tag}'")
        if s.scalars(select(Vm).where(Vm.user_id == user.id, Vm.name == name)).one_or_none():
            raise AlreadyExists(f"user '{user.login}' already has a VM named '{name}'")
        cfg = effective_config(s, node)
        ip = allocate_ip(s, cfg, a.text("ip"))
        props = a.props()
        vm = Vm(name=name, user_id=user.id, osf_id=osf.id, di_tag=tag, ip=ip, description=a.text("description") or "")
        vm.runtime = VmRuntime(blocked=bool(a.flag("blocked")))
        s.add(vm)
        s.flush()
        ch.object_id = vm.id
        set_properties(s, ObjectType.VM, vm.id, props)
        ch.after = _vm_row(s, actor, node, vm.id)
        return ch.after

    return audited(factory, actor, "vm.create", "vm", work, arguments=data)


def update_vm(factory: sessionmaker[Session], actor: Actor, node: Config, vm_id: int, data: dict[str, Any],
              action: str = "vm.update") -> dict[str, Any]:
    actor.require("vm.block" if action in ("vm.block", "vm.unblock") else "vm.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        vm = get_vm(s, actor, vm_id)
        ch.object_id, ch.object_name, ch.tenant_id = vm.id, vm.name, vm.user.tenant_id
        ch.before = _vm_row(s, actor, node, vm.id)
        a = Args("VM", data, {"name", "di_tag", "blocked", "description", "expiration_soft", "expiration_hard",
                              "properties"})
        if a.has("name"):
            name = a.req_text("name", pattern=NAME_RE)
            if name != vm.name and s.scalars(
                select(Vm).where(Vm.user_id == vm.user_id, Vm.name == name)
            ).one_or_none():
                raise AlreadyExists(f"user already has a VM named '{name}'")
            vm.name = name
        if a.has("di_tag"):
            tag = a.req_text("di_tag", pattern=TAG_RE)
            if tag not in ("default", "head") and not s.scalars(
                select(DiTag).where(DiTag.osf_id == vm.osf_id, DiTag.tag == tag)
            ).one_or_none():
                raise InputError(f"OSF '{vm.osf.name}' has no disk image tagged '{tag}'")
            vm.di_tag = tag
        if a.has("blocked"):
            vm.runtime.blocked = bool(a.flag("blocked"))
        if a.has("description"):
            vm.description = a.text("description") or ""
        for k in ("expiration_soft", "expiration_hard"):
            given, when = a.datetime(k)
            if given:
                setattr(vm.runtime, k, when)
        set_properties(s, ObjectType.VM, vm.id, a.props())
        s.flush()
        ch.after = _vm_row(s, actor, node, vm.id)
        return ch.after

    return audited(factory, actor, action, "vm", work, arguments=data)


def delete_vm(factory: sessionmaker[Session], actor: Actor, node: Config, vm_id: int) -> None:
    actor.require("vm.delete")

    def work(s: Session, ch: Change) -> None:
        vm = get_vm(s, actor, vm_id)
        ch.object_id, ch.object_name, ch.tenant_id = vm.id, vm.name, vm.user.tenant_id
        ch.before = _vm_row(s, actor, node, vm.id)
        if vm.runtime.vm_state != VmState.STOPPED or vm.runtime.vm_cmd is not None:
            raise InvalidState(f"VM '{vm.name}' is {vm.runtime.vm_state.value}; stop it before deleting it")
        delete_all_properties(s, ObjectType.VM, vm.id)
        s.delete(vm)

    audited(factory, actor, "vm.delete", "vm", work)


def resolve_di(s: Session, vm: Vm) -> Di | None:
    """The DI the VM's tag points to now (None if the tag is on no DI)."""
    return s.scalars(
        select(Di).join(DiTag, DiTag.di_id == Di.id).where(DiTag.osf_id == vm.osf_id, DiTag.tag == vm.di_tag)
    ).one_or_none()


def start_vm_in_session(s: Session, vm: Vm, cfg: Config) -> Host:
    """Assign a host (if none) and write the start command, in the caller's transaction.

    Host assignment and the command are one transaction (QVD does them apart): either
    the node sees a VM assigned to it with a start command, or nothing changed.
    """
    rt = vm.runtime
    check_vm_cmd(VmCmd.START, rt.vm_state)
    if rt.vm_cmd is not None:
        raise InvalidState(f"VM '{vm.name}' already has a pending '{rt.vm_cmd.value}' command")
    di = resolve_di(s, vm)
    if di is None:
        raise Conflict(f"OSF '{vm.osf.name}' has no disk image tagged '{vm.di_tag}'")
    if di.blocked:
        raise Blocked(f"disk image {di.id} ({vm.osf.name}/{di.version}) is blocked")
    host = choose_host(s, cfg, vm.osf.memory, vm.id)
    if host is None:
        raise Unavailable("no host available to run the VM (no running, unblocked node with enough free memory)")
    ok = cas_update(
        s,
        update(VmRuntime)
        .where(VmRuntime.vm_id == vm.id, VmRuntime.vm_state == VmState.STOPPED, VmRuntime.vm_cmd.is_(None))
        .values(host_id=host.id, vm_cmd=VmCmd.START, last_error=""),
    )
    if not ok:
        raise InvalidState(f"VM '{vm.name}' changed state meanwhile; try again")
    notify(s, f"qvd_cmd_for_vm_on_host{host.id}")
    return host


def start_vm(factory: sessionmaker[Session], actor: Actor, node: Config, vm_id: int) -> dict[str, Any]:
    actor.require("vm.start")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        vm = get_vm(s, actor, vm_id)
        ch.object_id, ch.object_name, ch.tenant_id = vm.id, vm.name, vm.user.tenant_id
        ch.before = _vm_row(s, actor, node, vm.id)
        start_vm_in_session(s, vm, effective_config(s, node))
        s.expire_all()
        ch.after = _vm_row(s, actor, node, vm.id)
        return ch.after

    return audited(factory, actor, "vm.start", "vm", work)


def stop_vm_in_session(s: Session, vm: Vm) -> bool:
    """Write the stop command; False if the VM is already stopped or stopping."""
    rt = vm.runtime
    if rt.vm_state in (VmState.STOPPED, VmState.STOPPING) and rt.vm_cmd is None:
        return False
    if rt.vm_state == VmState.STOPPED and rt.vm_cmd == VmCmd.START:
        # Not picked up yet: withdrawing the start is the stop.
        ok = cas_update(s, update(VmRuntime).where(
            VmRuntime.vm_id == vm.id, VmRuntime.vm_state == VmState.STOPPED, VmRuntime.vm_cmd == VmCmd.START
        ).values(vm_cmd=None, host_id=None))
        if not ok:
            raise InvalidState(f"VM '{vm.name}' changed state meanwhile; try again")
        return True
    check_vm_cmd(VmCmd.STOP, rt.vm_state)
    ok = cas_update(s, update(VmRuntime).where(
        VmRuntime.vm_id == vm.id, VmRuntime.vm_state == rt.vm_state
    ).values(vm_cmd=VmCmd.STOP))
    if not ok:
        raise InvalidState(f"VM '{vm.name}' changed state meanwhile; try again")
    if rt.host_id is not None:
        notify(s, f"qvd_cmd_for_vm_on_host{rt.host_id}")
    return True


def stop_vm(factory: sessionmaker[Session], actor: Actor, node: Config, vm_id: int) -> dict[str, Any]:
    actor.require("vm.stop")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        vm = get_vm(s, actor, vm_id)
        ch.object_id, ch.object_name, ch.tenant_id = vm.id, vm.name, vm.user.tenant_id
        ch.before = _vm_row(s, actor, node, vm.id)
        if not stop_vm_in_session(s, vm):
            raise InvalidState(f"VM '{vm.name}' is already {vm.runtime.vm_state.value}")
        s.expire_all()
        ch.after = _vm_row(s, actor, node, vm.id)
        return ch.after

    return audited(factory, actor, "vm.stop", "vm", work)


def disconnect_vm(factory: sessionmaker[Session], actor: Actor, node: Config, vm_id: int) -> dict[str, Any]:
    actor.require("vm.disconnect")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        vm = get_vm(s, actor, vm_id)
        ch.object_id, ch.object_name, ch.tenant_id = vm.id, vm.name, vm.user.tenant_id
        ch.before = _vm_row(s, actor, node, vm.id)
        rt = vm.runtime
        check_user_cmd(UserCmd.ABORT, rt.user_state)
        ok = cas_update(s, update(VmRuntime).where(
            VmRuntime.vm_id == vm.id, VmRuntime.user_state.in_([UserState.CONNECTING, UserState.CONNECTED])
        ).values(user_cmd=UserCmd.ABORT))
        if not ok:
            raise InvalidState(f"the user of VM '{vm.name}' disconnected meanwhile")
        if rt.l7r_host_id is not None:
            notify(s, f"qvd_cmd_for_user_on_host{rt.l7r_host_id}")
        s.expire_all()
        ch.after = _vm_row(s, actor, node, vm.id)
        return ch.after

    return audited(factory, actor, "vm.disconnect", "vm", work)
