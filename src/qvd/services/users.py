"""Users of the desktops (not administrators)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AlreadyExists, HasDependents
from qvd.core.security import hash_password
from qvd.db.models import ObjectType, User, UserToken, Vm
from qvd.services.base import Actor, Change, audited, reading
from qvd.services.common import (
    NAME_RE,
    Args,
    delete_all_properties,
    normalize_login,
    set_properties,
    view_row,
    with_properties,
)
from qvd.services.lookup import effective_config, get_user, tenant_for_create
from qvd.services.query import Page, list_rows
from qvd.services.views import USER


def list_users(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("user.see")
    with reading(factory) as s:
        return with_properties(s, list_rows(s, USER, actor, **q), ObjectType.USER)


def get_user_row(factory: sessionmaker[Session], actor: Actor, uid: int) -> dict[str, Any]:
    actor.require("user.see")
    with reading(factory) as s:
        return view_row(s, USER, actor, uid, ObjectType.USER)


def create_user(factory: sessionmaker[Session], actor: Actor, node: Config, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("user.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        a = Args("user", data, {"name", "password", "tenant", "blocked", "description", "properties"})
        tenant = tenant_for_create(s, actor, a.text("tenant"))
        cfg = effective_config(s, node, tenant.id)
        name = normalize_login(a.req_text("name", pattern=NAME_RE), cfg.get_bool("model.user.login.case-sensitive"))
        ch.object_name, ch.tenant_id = name, tenant.id
        if s.scalars(select(User).where(User.tenant_id == tenant.id, User.login == name)).one_or_none():
            raise AlreadyExists(f"user '{name}' already exists in tenant '{tenant.name}'")
        password = a.text("password", max_len=1024)
        props = a.props()
        u = User(tenant_id=tenant.id, login=name, password_hash=hash_password(password) if password else None,
                 blocked=bool(a.flag("blocked")), description=a.text("description") or "")
        s.add(u)
        s.flush()
        ch.object_id = u.id
        set_properties(s, ObjectType.USER, u.id, props)
        ch.after = view_row(s, USER, actor, u.id, ObjectType.USER)
        return ch.after

    return audited(factory, actor, "user.create", "user", work, arguments=data)


def update_user(factory: sessionmaker[Session], actor: Actor, uid: int, data: dict[str, Any],
                action: str = "user.update") -> dict[str, Any]:
    actor.require("user.block" if action in ("user.block", "user.unblock") else "user.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        u = get_user(s, actor, uid)
        ch.object_id, ch.object_name, ch.tenant_id = u.id, u.login, u.tenant_id
        ch.before = view_row(s, USER, actor, u.id, ObjectType.USER)
        a = Args("user", data, {"password", "blocked", "description", "properties"})
        if a.has("password"):
            pw = a.text("password", max_len=1024)
            u.password_hash = hash_password(pw) if pw else None
            # A new password ends every bearer token issued with the old one.
            s.query(UserToken).filter(UserToken.user_id == u.id).delete()
        if a.has("blocked"):
            u.blocked = bool(a.flag("blocked"))
        if a.has("description"):
            u.description = a.text("description") or ""
        set_properties(s, ObjectType.USER, u.id, a.props())
        s.flush()
        ch.after = view_row(s, USER, actor, u.id, ObjectType.USER)
        return ch.after

    return audited(factory, actor, action, "user", work, arguments=data)


def delete_user(factory: sessionmaker[Session], actor: Actor, uid: int) -> None:
    actor.require("user.delete")

    def work(s: Session, ch: Change) -> None:
        u = get_user(s, actor, uid)
        ch.object_id, ch.object_name, ch.tenant_id = u.id, u.login, u.tenant_id
        ch.before = view_row(s, USER, actor, u.id, ObjectType.USER)
        if s.scalar(select(exists().where(Vm.user_id == u.id))):
            raise HasDependents(f"user '{u.login}' still has VMs; delete them first")
        delete_all_properties(s, ObjectType.USER, u.id)
        s.delete(u)

    audited(factory, actor, "user.delete", "user", work)
