"""Finding objects by id or name within the actor's tenant scope (404 otherwise)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from qvd.core.config import Config
from qvd.core.errors import Forbidden, InputError, NotFound
from qvd.db.models import Di, Host, Osf, Tenant, User, Vm
from qvd.db.queries import load_db_config
from qvd.services.base import Actor

M = TypeVar("M")


def _scoped_tenant_id(actor: Actor, tenant_id: int) -> None:
    if not actor.is_platform and tenant_id != actor.tenant_id:
        # Objects of other tenants do not exist for a tenant administrator.
        raise NotFound("not found")


def tenant_by_name(session: Session, actor: Actor, name: str) -> Tenant:
    t = session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()
    if t is None or (not actor.is_platform and t.id != actor.tenant_id):
        raise NotFound(f"tenant '{name}' does not exist")
    return t


def tenant_for_create(session: Session, actor: Actor, name: Any) -> Tenant:
    """The tenant a new object goes to: the named one, or the actor's own, or 'default'."""
    if name in (None, ""):
        if actor.tenant_id is not None:
            t = session.get(Tenant, actor.tenant_id)
            if t is None:  # pragma: no cover - FK guarantees it
                raise NotFound("own tenant is gone")
            return t
        name = "default"
    if not isinstance(name, str):
        raise InputError(f"invalid tenant {name!r}: expected a tenant name")
    t = tenant_by_name(session, actor, name)
    if not actor.is_platform and t.id != actor.tenant_id:
        raise Forbidden("tenant administrators can only create objects in their own tenant")
    return t


def get_tenant(session: Session, actor: Actor, tenant_id: int) -> Tenant:
    t = session.get(Tenant, tenant_id)
    if t is None or (not actor.is_platform and t.id != actor.tenant_id):
        raise NotFound(f"tenant {tenant_id} does not exist")
    return t


def get_user(session: Session, actor: Actor, user_id: int) -> User:
    u = session.get(User, user_id)
    if u is None or (not actor.is_platform and u.tenant_id != actor.tenant_id):
        raise NotFound(f"user {user_id} does not exist")
    return u


def user_by_ref(session: Session, actor: Actor, ref: Any, tenant: Tenant | None) -> User:
    """A user given as an id or as a login (``alice`` or ``alice@tenant``)."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        return get_user(session, actor, ref)
    if not isinstance(ref, str) or not ref:
        raise InputError(f"invalid user {ref!r}: expected a user name or id")
    login, _, tname = ref.partition("@")
    t = tenant_by_name(session, actor, tname) if tname else tenant
    q = select(User).where(User.login == login)
    if t is not None:
        q = q.where(User.tenant_id == t.id)
    elif not actor.is_platform:
        q = q.where(User.tenant_id == actor.tenant_id)
    found = list(session.scalars(q))
    if not found:
        raise NotFound(f"user '{ref}' does not exist")
    if len(found) > 1:
        raise InputError(f"user '{ref}' exists in several tenants: write it as {login}@<tenant>")
    return found[0]


def get_osf(session: Session, actor: Actor, osf_id: int) -> Osf:
    o = session.get(Osf, osf_id)
    if o is None or (not actor.is_platform and o.tenant_id != actor.tenant_id):
        raise NotFound(f"OSF {osf_id} does not exist")
    return o


def osf_by_ref(session: Session, actor: Actor, ref: Any, tenant_id: int | None) -> Osf:
    if isinstance(ref, int) and not isinstance(ref, bool):
        return get_osf(session, actor, ref)
    if not isinstance(ref, str) or not ref:
        raise InputError(f"invalid OSF {ref!r}: expected an OSF name or id")
    q = select(Osf).where(Osf.name == ref)
    if tenant_id is not None:
        q = q.where(Osf.tenant_id == tenant_id)
    elif not actor.is_platform:
        q = q.where(Osf.tenant_id == actor.tenant_id)
    found = list(session.scalars(q))
    if not found:
        raise NotFound(f"OSF '{ref}' does not exist")
    if len(found) > 1:
        raise InputError(f"OSF '{ref}' exists in several tenants: give osf_id instead")
    return found[0]


def get_di(session: Session, actor: Actor, di_id: int) -> Di:
    d = session.get(Di, di_id)
    if d is None or (not actor.is_platform and d.osf.tenant_id != actor.tenant_id):
        raise NotFound(f"DI {di_id} does not exist")
    return d


def get_vm(session: Session, actor: Actor, vm_id: int) -> Vm:
    v = session.get(Vm, vm_id)
    if v is None or (not actor.is_platform and v.user.tenant_id != actor.tenant_id):
        raise NotFound(f"VM {vm_id} does not exist")
    return v


def get_host(session: Session, actor: Actor, host_id: int) -> Host:
    h = session.get(Host, host_id)
    if h is None:
        raise NotFound(f"host {host_id} does not exist")
    return h


def effective_config(session: Session, node: Config, tenant_id: int | None = None) -> Config:
    """Node config overlaid with the database's global (and tenant) rows."""
    return load_db_config(session, node, tenant_id)
