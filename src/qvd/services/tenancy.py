"""Tenants, administrators, roles and ACLs; admin login and API tokens; first-run seed."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.errors import (
    AlreadyExists,
    AuthenticationFailed,
    Blocked,
    Conflict,
    Forbidden,
    HasDependents,
    InputError,
    NotFound,
)
from qvd.core.security import hash_password, new_token, random_password, token_hash, verify_password
from qvd.db.models import (
    Acl,
    Administrator,
    AdminRole,
    AdminToken,
    ConfigRow,
    Osf,
    Role,
    RoleAcl,
    RoleInheritance,
    Tenant,
    User,
    utcnow,
)
from qvd.services.base import ALL_PERMISSIONS, Actor, Change, audit_only, audited, reading, write_audit
from qvd.services.common import NAME_RE, Args, view_row
from qvd.services.lookup import get_tenant, tenant_by_name
from qvd.services.query import Page, list_rows
from qvd.services.views import ADMIN, TENANT

BUILTIN_ROLES: dict[str, tuple[str, list[str]]] = {
    "root": ("every permission", ["*"]),
    "operator": (
        "sees everything; starts, stops, disconnects and blocks",
        [p for p in ALL_PERMISSIONS if p.endswith(".see")]
        + ["vm.start", "vm.stop", "vm.disconnect", "vm.block", "user.block", "host.block", "host.stop_vms",
           "host.stop"],
    ),
    "reader": ("sees everything, changes nothing", [p for p in ALL_PERMISSIONS if p.endswith(".see")]),
}


# --- seed -----------------------------------------------------------------------------------------


def seed(session: Session) -> str | None:
    """Create what a fresh database needs; returns the first admin's password if one was made."""
    if session.scalars(select(Tenant).where(Tenant.name == "default")).one_or_none() is None:
        session.add(Tenant(name="default", description="default tenant"))
    have = set(session.scalars(select(Acl.name)))
    for name in ("*", *ALL_PERMISSIONS):
        if name not in have:
            session.add(Acl(name=name))
    session.flush()
    acl_ids = {a.name: a.id for a in session.scalars(select(Acl))}
    for rname, (desc, perms) in BUILTIN_ROLES.items():
        role = session.scalars(select(Role).where(Role.name == rname, Role.tenant_id.is_(None))).one_or_none()
        if role is None:
            role = Role(name=rname, description=desc, fixed=True)
            session.add(role)
            session.flush()
        present = set(session.scalars(select(RoleAcl.acl_id).where(RoleAcl.role_id == role.id)))
        for p in perms:
            if acl_ids[p] not in present:
                session.add(RoleAcl(role_id=role.id, acl_id=acl_ids[p], positive=True))
    session.flush()
    if session.scalar(select(func.count(Administrator.id))) == 0:
        password = random_password()
        admin = Administrator(name="admin", tenant_id=None, password_hash=hash_password(password),
                              description="first administrator")
        session.add(admin)
        session.flush()
        root = session.scalars(select(Role).where(Role.name == "root", Role.tenant_id.is_(None))).one()
        session.add(AdminRole(admin_id=admin.id, role_id=root.id))
        return password
    return None


# --- permissions and login ------------------------------------------------------------------------


def permissions_of(session: Session, admin: Administrator) -> frozenset[str]:
    """Positive ACLs of the admin's roles and of every role they inherit, minus the
    negative ACLs of those roles."""
    seen: set[int] = set()
    todo = [r.id for r in admin.roles]
    while todo:
        rid = todo.pop()
        if rid in seen:
            continue
        seen.add(rid)
        todo.extend(session.scalars(select(RoleInheritance.inherited_id).where(RoleInheritance.inheritor_id == rid)))
    if not seen:
        return frozenset()
    rows = session.execute(
        select(Acl.name, RoleAcl.positive).join(RoleAcl, RoleAcl.acl_id == Acl.id).where(RoleAcl.role_id.in_(seen))
    ).all()
    pos = {n for n, p in rows if p}
    neg = {n for n, p in rows if not p}
    return frozenset(pos - neg)


def _find_admin(session: Session, login: str, tenant: str | None) -> Administrator | None:
    if tenant:
        t = session.scalars(select(Tenant).where(Tenant.name == tenant)).one_or_none()
        if t is None:
            return None
        return session.scalars(
            select(Administrator).where(Administrator.name == login, Administrator.tenant_id == t.id)
        ).one_or_none()
    return session.scalars(
        select(Administrator).where(Administrator.name == login, Administrator.tenant_id.is_(None))
    ).one_or_none()


def login(
    factory: sessionmaker[Session], login_: str, password: str, tenant: str | None, *, ttl: int,
    source: str = "", ip: str = "",
) -> dict[str, Any]:
    """Check an administrator's credentials and issue an API token."""
    name, sep, suffix = login_.partition("@")
    if sep and not tenant:
        tenant = suffix
    anon = Actor(admin_id=None, name=name[:64], tenant_id=None, source=source, ip=ip)
    with factory() as session, session.begin():
        admin = _find_admin(session, name, tenant)
        ok = admin is not None and verify_password(admin.password_hash, password)
        err: AuthenticationFailed | Blocked | None = None
        if not ok or admin is None:
            err = AuthenticationFailed("wrong administrator name or password")
        elif admin.blocked:
            err = Blocked(f"administrator '{name}' is blocked")
        elif admin.tenant_id is not None and get_tenant(session, anon, admin.tenant_id).blocked:
            err = Blocked(f"tenant of administrator '{name}' is blocked")
        if err is None and admin is not None:
            token = new_token()
            expires = utcnow() + dt.timedelta(seconds=ttl)
            session.add(AdminToken(token_hash=token_hash(token), admin_id=admin.id, expires_at=expires,
                                   source=source[:64]))
            actor = Actor(admin_id=admin.id, name=admin.name, tenant_id=admin.tenant_id, source=source, ip=ip)
            write_audit(session, actor, "login", Change("administrator", admin.id, admin.name, admin.tenant_id))
            return {"token": token, "expires_at": expires.isoformat(),
                    "admin": {"id": admin.id, "name": admin.name, "tenant_id": admin.tenant_id,
                              "permissions": sorted(permissions_of(session, admin))}}
    assert err is not None
    audit_only(factory, anon, "login", Change("administrator", None, name), err)
    raise err


def actor_for_token(factory: sessionmaker[Session], token: str, *, source: str = "", ip: str = "") -> Actor:
    with factory() as session, session.begin():
        row = session.get(AdminToken, token_hash(token))
        if row is None or row.expires_at < utcnow():
            raise AuthenticationFailed("invalid or expired token: log in again")
        admin = session.get(Administrator, row.admin_id)
        if admin is None or admin.blocked:
            raise AuthenticationFailed("administrator is gone or blocked")
        if admin.tenant_id is not None:
            t = session.get(Tenant, admin.tenant_id)
            if t is None or t.blocked:
                raise AuthenticationFailed("tenant of this administrator is blocked")
        return Actor(admin_id=admin.id, name=admin.name, tenant_id=admin.tenant_id,
                     permissions=permissions_of(session, admin), source=source, ip=ip)


def logout(factory: sessionmaker[Session], token: str) -> None:
    with factory() as session, session.begin():
        session.execute(delete(AdminToken).where(AdminToken.token_hash == token_hash(token)))


# --- tenants --------------------------------------------------------------------------------------


def list_tenants(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("tenant.see")
    with reading(factory) as s:
        return list_rows(s, TENANT, actor, **q)


def get_tenant_row(factory: sessionmaker[Session], actor: Actor, tid: int) -> dict[str, Any]:
    actor.require("tenant.see")
    with reading(factory) as s:
        return view_row(s, TENANT, actor, tid)


def create_tenant(factory: sessionmaker[Session], actor: Actor, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("tenant.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        actor.require_platform("create tenants")
        a = Args("tenant", data, {"name", "description", "blocked"})
        name = a.req_text("name", pattern=NAME_RE, max_len=80)
        ch.object_name = name
        if s.scalars(select(Tenant).where(Tenant.name == name)).one_or_none():
            raise AlreadyExists(f"tenant '{name}' already exists")
        t = Tenant(name=name, description=a.text("description") or "", blocked=bool(a.flag("blocked")))
        s.add(t)
        s.flush()
        ch.object_id = ch.tenant_id = t.id
        ch.after = view_row(s, TENANT, actor, t.id)
        return ch.after

    return audited(factory, actor, "tenant.create", "tenant", work, arguments=data)


def update_tenant(factory: sessionmaker[Session], actor: Actor, tid: int, data: dict[str, Any],
                  action: str = "tenant.update") -> dict[str, Any]:
    actor.require("tenant.block" if action in ("tenant.block", "tenant.unblock") else "tenant.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        t = get_tenant(s, actor, tid)
        ch.object_id, ch.object_name, ch.tenant_id = t.id, t.name, t.id
        ch.before = view_row(s, TENANT, actor, t.id)
        a = Args("tenant", data, {"name", "description", "blocked"})
        if a.has("name"):
            name = a.req_text("name", pattern=NAME_RE, max_len=80)
            if name != t.name and s.scalars(select(Tenant).where(Tenant.name == name)).one_or_none():
                raise AlreadyExists(f"tenant '{name}' already exists")
            t.name = name
        if a.has("description"):
            t.description = a.text("description") or ""
        if a.has("blocked"):
            actor.require_platform("block tenants")
            t.blocked = bool(a.flag("blocked"))
        s.flush()
        ch.after = view_row(s, TENANT, actor, t.id)
        return ch.after

    return audited(factory, actor, action, "tenant", work, arguments=data)


def delete_tenant(factory: sessionmaker[Session], actor: Actor, tid: int) -> None:
    actor.require("tenant.delete")

    def work(s: Session, ch: Change) -> None:
        actor.require_platform("delete tenants")
        t = get_tenant(s, actor, tid)
        ch.object_id, ch.object_name, ch.tenant_id = t.id, t.name, t.id
        ch.before = view_row(s, TENANT, actor, t.id)
        for model, what in ((User, "users"), (Osf, "OSFs"), (Administrator, "administrators")):
            if s.scalar(select(exists().where(model.tenant_id == t.id))):
                raise HasDependents(f"tenant '{t.name}' still has {what}; delete them first")
        s.execute(delete(ConfigRow).where(ConfigRow.tenant_id == t.id))
        s.delete(t)

    audited(factory, actor, "tenant.delete", "tenant", work)


# --- roles and ACLs -------------------------------------------------------------------------------

ROLE_VIEW_FIELDS = ("id", "name", "tenant", "description", "fixed", "acls", "inherits")


def _role_row(s: Session, r: Role) -> dict[str, Any]:
    acls = s.execute(
        select(Acl.name, RoleAcl.positive).join(RoleAcl, RoleAcl.acl_id == Acl.id).where(RoleAcl.role_id == r.id)
    ).all()
    inherits = s.scalars(
        select(Role.name).join(RoleInheritance, RoleInheritance.inherited_id == Role.id)
        .where(RoleInheritance.inheritor_id == r.id)
    ).all()
    tname = s.get(Tenant, r.tenant_id).name if r.tenant_id is not None else None  # type: ignore[union-attr]
    return {"id": r.id, "name": r.name, "tenant": tname, "description": r.description, "fixed": r.fixed,
            "acls": sorted(n for n, p in acls if p), "denied_acls": sorted(n for n, p in acls if not p),
            "inherits": sorted(inherits)}


def _visible_roles(s: Session, actor: Actor) -> list[Role]:
    q = select(Role).order_by(Role.id)
    if not actor.is_platform:
        q = q.where((Role.tenant_id.is_(None)) | (Role.tenant_id == actor.tenant_id))
    return list(s.scalars(q))


def list_roles(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("role.see")
    with reading(factory) as s:
        rows = [_role_row(s, r) for r in _visible_roles(s, actor)]
    return _page_in_memory(rows, **q)


def _page_in_memory(rows: list[dict[str, Any]], *, filters: Any = None, offset: int = 0, limit: int = 100,
                    **_: Any) -> Page:
    if isinstance(filters, dict):
        for k, v in filters.items():
            if isinstance(v, dict | list):
                raise InputError("roles can only be filtered by equality")
            rows = [r for r in rows if str(r.get(k)) == str(v)]
    return Page(total=len(rows), offset=offset, limit=limit, items=rows[offset: offset + limit])


def _role(s: Session, actor: Actor, rid: int) -> Role:
    r = s.get(Role, rid)
    if r is None or (not actor.is_platform and r.tenant_id not in (None, actor.tenant_id)):
        raise NotFound(f"role {rid} does not exist")
    return r


def _role_by_name(s: Session, actor: Actor, name: str) -> Role:
    for r in _visible_roles(s, actor):
        if r.name == name:
            return r
    raise NotFound(f"role '{name}' does not exist")


def _set_role_acls(s: Session, role: Role, names: list[str], positive: bool) -> None:
    s.execute(delete(RoleAcl).where(RoleAcl.role_id == role.id, RoleAcl.positive == positive))
    for n in names:
        acl = s.scalars(select(Acl).where(Acl.name == n)).one_or_none()
        if acl is None:
            raise InputError(f"unknown permission '{n}'; see GET /api/v1/acls")
        s.add(RoleAcl(role_id=role.id, acl_id=acl.id, positive=positive))


def _set_inherits(s: Session, actor: Actor, role: Role, names: list[str]) -> None:
    s.execute(delete(RoleInheritance).where(RoleInheritance.inheritor_id == role.id))
    s.flush()
    for n in names:
        parent = _role_by_name(s, actor, n)
        # Refuse cycles: the parent must not (transitively) inherit this role.
        todo, seen = [parent.id], set()
        while todo:
            rid = todo.pop()
            if rid == role.id:
                raise Conflict(f"role '{role.name}' cannot inherit '{n}': that would make a cycle")
            if rid not in seen:
                seen.add(rid)
                todo.extend(s.scalars(select(RoleInheritance.inherited_id)
                                      .where(RoleInheritance.inheritor_id == rid)))
        s.add(RoleInheritance(inheritor_id=role.id, inherited_id=parent.id))


def create_role(factory: sessionmaker[Session], actor: Actor, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("role.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        a = Args("role", data, {"name", "tenant", "description", "acls", "denied_acls", "inherits"})
        name = a.req_text("name", pattern=NAME_RE)
        ch.object_name = name
        tname = a.text("tenant")
        tenant_id = tenant_by_name(s, actor, tname).id if tname else actor.tenant_id
        if not actor.is_platform and tenant_id != actor.tenant_id:
            raise Forbidden("tenant administrators can only create roles in their own tenant")
        dup = select(Role).where(Role.name == name,
                                 Role.tenant_id.is_(None) if tenant_id is None else Role.tenant_id == tenant_id)
        if s.scalars(dup).one_or_none():
            raise AlreadyExists(f"role '{name}' already exists")
        r = Role(name=name, tenant_id=tenant_id, description=a.text("description") or "")
        s.add(r)
        s.flush()
        ch.object_id, ch.tenant_id = r.id, tenant_id
        _set_role_acls(s, r, a.str_list("acls") or [], True)
        _set_role_acls(s, r, a.str_list("denied_acls") or [], False)
        _set_inherits(s, actor, r, a.str_list("inherits") or [])
        s.flush()
        ch.after = _role_row(s, r)
        return ch.after

    return audited(factory, actor, "role.create", "role", work, arguments=data)


def update_role(factory: sessionmaker[Session], actor: Actor, rid: int, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("role.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        r = _role(s, actor, rid)
        ch.object_id, ch.object_name, ch.tenant_id = r.id, r.name, r.tenant_id
        if r.fixed:
            raise Conflict(f"role '{r.name}' is built in and cannot change")
        if r.tenant_id is None:
            actor.require_platform("change global roles")
        ch.before = _role_row(s, r)
        a = Args("role", data, {"description", "acls", "denied_acls", "inherits"})
        if a.has("description"):
            r.description = a.text("description") or ""
        if a.has("acls"):
            _set_role_acls(s, r, a.str_list("acls") or [], True)
        if a.has("denied_acls"):
            _set_role_acls(s, r, a.str_list("denied_acls") or [], False)
        if a.has("inherits"):
            _set_inherits(s, actor, r, a.str_list("inherits") or [])
        s.flush()
        ch.after = _role_row(s, r)
        return ch.after

    return audited(factory, actor, "role.update", "role", work, arguments=data)


def delete_role(factory: sessionmaker[Session], actor: Actor, rid: int) -> None:
    actor.require("role.delete")

    def work(s: Session, ch: Change) -> None:
        r = _role(s, actor, rid)
        ch.object_id, ch.object_name, ch.tenant_id = r.id, r.name, r.tenant_id
        if r.fixed:
            raise Conflict(f"role '{r.name}' is built in and cannot be deleted")
        if r.tenant_id is None:
            actor.require_platform("delete global roles")
        ch.before = _role_row(s, r)
        s.delete(r)

    audited(factory, actor, "role.delete", "role", work)


def list_acls(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("role.see")
    with reading(factory) as s:
        rows = [{"id": a.id, "name": a.name, "description": a.description}
                for a in s.scalars(select(Acl).order_by(Acl.name))]
    return _page_in_memory(rows, **q)


# --- administrators -------------------------------------------------------------------------------


def _admin_row(s: Session, actor: Actor, aid: int) -> dict[str, Any]:
    row = view_row(s, ADMIN, actor, aid)
    admin = s.get(Administrator, aid)
    assert admin is not None
    row["roles"] = sorted(r.name for r in admin.roles)
    return row


def list_admins(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("admin.see")
    with reading(factory) as s:
        page = list_rows(s, ADMIN, actor, **q)
        for item in page.items:
            admin = s.get(Administrator, item["id"])
            item["roles"] = sorted(r.name for r in admin.roles) if admin else []
        return page


def get_admin_row(factory: sessionmaker[Session], actor: Actor, aid: int) -> dict[str, Any]:
    actor.require("admin.see")
    with reading(factory) as s:
        return _admin_row(s, actor, aid)


def _admin(s: Session, actor: Actor, aid: int) -> Administrator:
    a = s.get(Administrator, aid)
    if a is None or (not actor.is_platform and a.tenant_id != actor.tenant_id):
        raise NotFound(f"administrator {aid} does not exist")
    return a


def _assign_roles(s: Session, actor: Actor, admin: Administrator, names: list[str]) -> None:
    roles = [_role_by_name(s, actor, n) for n in names]
    if not actor.is_platform and any(r.name == "root" for r in roles):
        raise Forbidden("only platform administrators may grant the root role")
    admin.roles = roles


def create_admin(factory: sessionmaker[Session], actor: Actor, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("admin.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        a = Args("administrator", data, {"name", "password", "tenant", "roles", "description", "blocked"})
        name = a.req_text("name", pattern=NAME_RE)
        password = a.req_text("password", max_len=1024)
        ch.object_name = name
        tname = a.text("tenant")
        tenant_id = tenant_by_name(s, actor, tname).id if tname else actor.tenant_id
        if not actor.is_platform and tenant_id != actor.tenant_id:
            raise Forbidden("tenant administrators can only create administrators of their own tenant")
        ch.tenant_id = tenant_id
        dup = select(Administrator).where(
            Administrator.name == name,
            Administrator.tenant_id.is_(None) if tenant_id is None else Administrator.tenant_id == tenant_id,
        )
        if s.scalars(dup).one_or_none():
            raise AlreadyExists(f"administrator '{name}' already exists")
        admin = Administrator(name=name, tenant_id=tenant_id, password_hash=hash_password(password),
                              description=a.text("description") or "", blocked=bool(a.flag("blocked")))
        s.add(admin)
        s.flush()
        ch.object_id = admin.id
        _assign_roles(s, actor, admin, a.str_list("roles") or [])
        s.flush()
        ch.after = _admin_row(s, actor, admin.id)
        return ch.after

    return audited(factory, actor, "admin.create", "administrator", work, arguments=data)


def update_admin(factory: sessionmaker[Session], actor: Actor, aid: int, data: dict[str, Any],
                 action: str = "admin.update") -> dict[str, Any]:
    actor.require("admin.block" if action in ("admin.block", "admin.unblock") else "admin.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        admin = _admin(s, actor, aid)
        ch.object_id, ch.object_name, ch.tenant_id = admin.id, admin.name, admin.tenant_id
        ch.before = _admin_row(s, actor, admin.id)
        a = Args("administrator", data, {"password", "description", "blocked", "roles"})
        if a.has("password"):
            admin.password_hash = hash_password(a.req_text("password", max_len=1024))
            s.execute(delete(AdminToken).where(AdminToken.admin_id == admin.id))
        if a.has("description"):
            admin.description = a.text("description") or ""
        if a.has("blocked"):
            if admin.id == actor.admin_id:
                raise Conflict("you cannot block yourself")
            admin.blocked = bool(a.flag("blocked"))
        if a.has("roles"):
            _assign_roles(s, actor, admin, a.str_list("roles") or [])
        s.flush()
        ch.after = _admin_row(s, actor, admin.id)
        return ch.after

    return audited(factory, actor, action, "administrator", work, arguments=data)


def delete_admin(factory: sessionmaker[Session], actor: Actor, aid: int) -> None:
    actor.require("admin.delete")

    def work(s: Session, ch: Change) -> None:
        admin = _admin(s, actor, aid)
        ch.object_id, ch.object_name, ch.tenant_id = admin.id, admin.name, admin.tenant_id
        if admin.id == actor.admin_id:
            raise Conflict("you cannot delete yourself")
        ch.before = _admin_row(s, actor, admin.id)
        s.delete(admin)

    audited(factory, actor, "admin.delete", "administrator", work)


