"""What each resource shows: its fields as SQL expressions (output, filters and order)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import aliased

from qvd.core.states import UserState, VmState
from qvd.db.models import (
    Administrator,
    AuditEntry,
    Di,
    DiTag,
    Host,
    HostRuntime,
    LoginFailure,
    Osf,
    Tenant,
    User,
    Vm,
    VmRuntime,
)
from qvd.services.query import Field, ResourceView


def F(expr: Any, type_: str, **kw: Any) -> Field:
    return Field(expr, type_, **kw)


# --- tenants -------------------------------------------------------------------------------------

TENANT = ResourceView(
    name="tenant",
    base=lambda: select(Tenant.id).select_from(Tenant),
    fields={
        "id": F(Tenant.id, "int"),
        "name": F(Tenant.name, "str"),
        "description": F(Tenant.description, "str"),
        "blocked": F(Tenant.blocked, "bool"),
        "created_at": F(Tenant.created_at, "datetime"),
    },
    scope=lambda a: a.tenant_scope(Tenant.id),
)

# --- administrators ------------------------------------------------------------------------------

_admin_tenant = aliased(Tenant)
ADMIN = ResourceView(
    name="administrator",
    base=lambda: select(Administrator.id)
    .select_from(Administrator)
    .outerjoin(_admin_tenant, _admin_tenant.id == Administrator.tenant_id),
    extra_fields=("roles",),
    fields={
        "id": F(Administrator.id, "int"),
        "name": F(Administrator.name, "str"),
        "tenant_id": F(Administrator.tenant_id, "int"),
        "tenant": F(_admin_tenant.name, "str"),
        "description": F(Administrator.description, "str"),
        "blocked": F(Administrator.blocked, "bool"),
        "created_at": F(Administrator.created_at, "datetime"),
    },
    scope=lambda a: a.tenant_scope(Administrator.tenant_id),
)

# --- users ---------------------------------------------------------------------------------------

_user_vms = select(func.count(Vm.id)).where(Vm.user_id == User.id).correlate(User).scalar_subquery()
_user_vms_connected = (
    select(func.count(VmRuntime.vm_id))
    .join(Vm, Vm.id == VmRuntime.vm_id)
    .where(Vm.user_id == User.id, VmRuntime.user_state == UserState.CONNECTED)
    .correlate(User)
    .scalar_subquery()
)
# Brute-force lockout state of the user's login name (qvd.services.lockout); NULL = no recent failure.
_user_failures = (
    select(LoginFailure.failures)
    .where(LoginFailure.tenant_id == User.tenant_id, LoginFailure.login == User.login)
    .correlate(User)
    .scalar_subquery()
)
_user_locked_until = (
    select(LoginFailure.locked_until)
    .where(LoginFailure.tenant_id == User.tenant_id, LoginFailure.login == User.login)
    .correlate(User)
    .scalar_subquery()
)
USER = ResourceView(
    name="user",
    base=lambda: select(User.id).select_from(User).join(Tenant, Tenant.id == User.tenant_id),
    extra_fields=("properties",),
    fields={
        "id": F(User.id, "int"),
        "name": F(User.login, "str"),
        "tenant_id": F(User.tenant_id, "int"),
        "tenant": F(Tenant.name, "str"),
        "blocked": F(User.blocked, "bool"),
        "description": F(User.description, "str"),
        "number_of_vms": F(_user_vms, "int"),
        "number_of_vms_connected": F(_user_vms_connected, "int"),
        "created_at": F(User.created_at, "datetime"),
        "totp_enabled": F(User.totp_secret.is_not(None), "bool"),
        "failed_logins": F(func.coalesce(_user_failures, 0), "int"),
        "locked_until": F(_user_locked_until, "datetime"),
    },
    scope=lambda a: a.tenant_scope(User.tenant_id),
)

# --- OSFs ----------------------------------------------------------------------------------------

OSF = ResourceView(
    name="osf",
    base=lambda: select(Osf.id).select_from(Osf).join(Tenant, Tenant.id == Osf.tenant_id),
    extra_fields=("properties",),
    fields={
        "id": F(Osf.id, "int"),
        "name": F(Osf.name, "str"),
        "tenant_id": F(Osf.tenant_id, "int"),
        "tenant": F(Tenant.name, "str"),
        "memory": F(Osf.memory, "int"),
        "overlay": F(Osf.use_overlay, "bool"),
        "user_storage": F(Osf.user_storage, "int"),
        "is_application": F(Osf.is_application, "bool"),
        "description": F(Osf.description, "str"),
        "number_of_vms": F(
            select(func.count(Vm.id)).where(Vm.osf_id == Osf.id).correlate(Osf).scalar_subquery(), "int"
        ),
        "number_of_dis": F(
            select(func.count(Di.id)).where(Di.osf_id == Osf.id).correlate(Osf).scalar_subquery(), "int"
        ),
        "created_at": F(Osf.created_at, "datetime"),
    },
    scope=lambda a: a.tenant_scope(Osf.tenant_id),
)

# --- DIs -----------------------------------------------------------------------------------------

DI = ResourceView(
    name="di",
    base=lambda: select(Di.id)
    .select_from(Di)
    .join(Osf, Osf.id == Di.osf_id)
    .join(Tenant, Tenant.id == Osf.tenant_id),
    extra_fields=("properties", "tags"),
    fields={
        "id": F(Di.id, "int"),
        "osf_id": F(Di.osf_id, "int"),
        "osf_name": F(Osf.name, "str"),
        "tenant_id": F(Osf.tenant_id, "int"),
        "tenant": F(Tenant.name, "str"),
        "disk_image": F(Di.path, "str"),
        "version": F(Di.version, "str"),
        "blocked": F(Di.blocked, "bool"),
        "state": F(Di.state, "str"),
        "size": F(Di.size, "int"),
        "sha256": F(Di.sha256, "str"),
        "description": F(Di.description, "str"),
        "created_at": F(Di.created_at, "datetime"),
    },
    scope=lambda a: a.tenant_scope(Osf.tenant_id),
)

# --- VMs -----------------------------------------------------------------------------------------

_vm_host = aliased(Host)
_tag = aliased(DiTag)
_tag_di = aliased(Di)
_cur_di = aliased(Di)
VM = ResourceView(
    name="vm",
    base=lambda: select(Vm.id)
    .select_from(Vm)
    .join(VmRuntime, VmRuntime.vm_id == Vm.id)
    .join(User, User.id == Vm.user_id)
    .join(Tenant, Tenant.id == User.tenant_id)
    .join(Osf, Osf.id == Vm.osf_id)
    .outerjoin(_vm_host, _vm_host.id == VmRuntime.host_id)
    .outerjoin(_tag, and_(_tag.osf_id == Vm.osf_id, _tag.tag == Vm.di_tag))
    .outerjoin(_tag_di, _tag_di.id == _tag.di_id)
    .outerjoin(_cur_di, _cur_di.id == VmRuntime.current_di_id),
    extra_fields=("properties", "mac"),
    fields={
        "id": F(Vm.id, "int"),
        "name": F(Vm.name, "str"),
        "user_id": F(Vm.user_id, "int"),
        "user_name": F(User.login, "str"),
        "tenant_id": F(User.tenant_id, "int"),
        "tenant": F(Tenant.name, "str"),
        "osf_id": F(Vm.osf_id, "int"),
        "osf_name": F(Osf.name, "str"),
        "di_tag": F(Vm.di_tag, "str"),
        "di_id": F(_tag_di.id, "int"),
        "di_version": F(_tag_di.version, "str"),
        "di_id_in_use": F(_cur_di.id, "int"),
        "di_version_in_use": F(_cur_di.version, "str"),
        "ip": F(Vm.ip, "str"),
        "description": F(Vm.description, "str"),
        "state": F(VmRuntime.vm_state, "str"),
        "vm_cmd": F(VmRuntime.vm_cmd, "str"),
        "user_state": F(VmRuntime.user_state, "str"),
        "host_id": F(VmRuntime.host_id, "int"),
        "host_name": F(_vm_host.name, "str"),
        "address": F(VmRuntime.vm_address, "str"),
        "blocked": F(VmRuntime.blocked, "bool"),
        "expiration_soft": F(VmRuntime.expiration_soft, "datetime"),
        "expiration_hard": F(VmRuntime.expiration_hard, "datetime"),
        "last_error": F(VmRuntime.last_error, "str"),
        "run_attempts": F(VmRuntime.run_attempts, "int"),
        "run_ok": F(VmRuntime.run_ok, "int"),
        "created_at": F(Vm.created_at, "datetime"),
    },
    scope=lambda a: a.tenant_scope(User.tenant_id),
)

# --- hosts ---------------------------------------------------------------------------------------

HOST = ResourceView(
    name="host",
    base=lambda: select(Host.id).select_from(Host).join(HostRuntime, HostRuntime.host_id == Host.id),
    extra_fields=("properties",),
    fields={
        "id": F(Host.id, "int"),
        "name": F(Host.name, "str"),
        "address": F(Host.address, "str"),
        "frontend": F(Host.frontend, "bool"),
        "backend": F(Host.backend, "bool"),
        "description": F(Host.description, "str"),
        "state": F(HostRuntime.state, "str"),
        "blocked": F(HostRuntime.blocked, "bool"),
        "ok_ts": F(HostRuntime.ok_ts, "datetime"),
        "usable_ram": F(HostRuntime.usable_ram, "int"),
        "usable_cpu": F(HostRuntime.usable_cpu, "float"),
        "load": F(HostRuntime.load, "float"),
        "number_of_vms": F(
            select(func.count(VmRuntime.vm_id))
            .where(VmRuntime.host_id == Host.id, VmRuntime.vm_state != VmState.STOPPED)
            .correlate(Host)
            .scalar_subquery(),
            "int",
        ),
        "created_at": F(Host.created_at, "datetime"),
    },
)

# --- audit log -----------------------------------------------------------------------------------

AUDIT = ResourceView(
    name="audit",
    base=lambda: select(AuditEntry.id).select_from(AuditEntry),
    fields={
        "id": F(AuditEntry.id, "int"),
        "at": F(AuditEntry.at, "datetime"),
        "admin_id": F(AuditEntry.admin_id, "int"),
        "admin_name": F(AuditEntry.admin_name, "str"),
        "tenant_id": F(AuditEntry.tenant_id, "int"),
        "action": F(AuditEntry.action, "str"),
        "object_type": F(AuditEntry.object_type, "str"),
        "object_id": F(AuditEntry.object_id, "int"),
        "object_name": F(AuditEntry.object_name, "str"),
        "status": F(AuditEntry.status, "str"),
        "message": F(AuditEntry.message, "str"),
        "source": F(AuditEntry.source, "str"),
        "ip": F(AuditEntry.ip, "str"),
        "arguments": F(AuditEntry.arguments, "str", filterable=False, sortable=False),
        "before": F(AuditEntry.before, "str", filterable=False, sortable=False),
        "after": F(AuditEntry.after, "str", filterable=False, sortable=False),
    },
    default_order=("-id",),
    scope=lambda a: a.tenant_scope(AuditEntry.tenant_id),
)
