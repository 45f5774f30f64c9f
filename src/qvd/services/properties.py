"""Custom properties on users, VMs, hosts, OSFs and DIs (one entry point for all)."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from qvd.db.models import ObjectType
from qvd.services.base import Actor, Change, audited
from qvd.services.common import check_prop_key, delete_property, properties_of, set_properties
from qvd.services.lookup import get_di, get_host, get_osf, get_user, get_vm


def _describe(s: Session, actor: Actor, obj_type: ObjectType, obj_id: int) -> tuple[str, int | None]:
    """(name, tenant_id) of the object, checking it exists in the actor's scope."""
    if obj_type is ObjectType.USER:
        u = get_user(s, actor, obj_id)
        return u.login, u.tenant_id
    if obj_type is ObjectType.VM:
        v = get_vm(s, actor, obj_id)
        return v.name, v.user.tenant_id
    if obj_type is ObjectType.OSF:
        o = get_osf(s, actor, obj_id)
        return o.name, o.tenant_id
    if obj_type is ObjectType.DI:
        d = get_di(s, actor, obj_id)
        return f"{d.osf.name}/{d.version}", d.osf.tenant_id
    actor.require_platform("set host properties")
    return get_host(s, actor, obj_id).name, None


def set_property(factory: sessionmaker[Session], actor: Actor, obj_type: ObjectType, obj_id: int, key: str,
                 value: str | None) -> None:
    """Set (or with ``value`` None delete) one property of an object."""
    actor.require(f"{obj_type.value}.update")

    def work(s: Session, ch: Change) -> None:
        ch.object_id = obj_id
        ch.object_name, ch.tenant_id = _describe(s, actor, obj_type, obj_id)
        check_prop_key(key)
        ch.before = {"properties": properties_of(s, obj_type, [obj_id])[obj_id]}
        if value is None:
            delete_property(s, obj_type, obj_id, key)
        else:
            set_properties(s, obj_type, obj_id, {key: value})
        ch.after = {"properties": properties_of(s, obj_type, [obj_id])[obj_id]}

    action = f"{obj_type.value}.property." + ("delete" if value is None else "set")
    audited(factory, actor, action, obj_type.value, work, arguments={"key": key, "value": value})
