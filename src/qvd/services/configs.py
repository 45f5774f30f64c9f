"""Global and per-tenant configuration overrides stored in the database."""

from __future__ import annotations

import fnmatch
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import KEYS, Config, key, parse_value
from qvd.core.errors import ConfigError, NotFound
from qvd.db.models import ConfigRow
from qvd.db.queries import load_db_config
from qvd.services.base import Actor, Change, audited, reading
from qvd.services.lookup import tenant_by_name
from qvd.services.placement import check_plugin
from qvd.services.query import Page


def _tenant_id(s: Session, actor: Actor, tenant: str | None) -> int | None:
    if tenant:
        return tenant_by_name(s, actor, tenant).id
    return actor.tenant_id


def list_config(factory: sessionmaker[Session], actor: Actor, node: Config, *, tenant: str | None = None,
                filters: Any = None, offset: int = 0, limit: int = 1000, **_: Any) -> Page:
    actor.require("config.see")
    with reading(factory) as s:
        tid = _tenant_id(s, actor, tenant)
        eff = load_db_config(s, node, tid)
        rows = {(r.tenant_id, r.key): r.value for r in s.scalars(select(ConfigRow))}
    items = []
    for name, k in sorted(KEYS.items()):
        if k.node_only and not actor.is_platform:
            continue
        value = eff.get(name)
        items.append({
            "key": name, "value": value, "default": k.default, "is_default": value == k.default,
            "tenant": tenant, "tenant_override": (tid, name) in rows if tid is not None else False,
            "global_override": (None, name) in rows, "node_only": k.node_only, "per_tenant": k.tenant,
            "help": k.help,
        })
    if isinstance(filters, dict):
        for fk, fv in filters.items():
            if fk not in ("key", "is_default", "node_only", "per_tenant"):
                raise ConfigError(
                    f"configuration can be filtered by key, is_default, node_only, per_tenant, not {fk!r}"
                )
            if isinstance(fv, dict) and "~" in fv:
                pat = str(fv["~"]).replace("%", "*").replace("_", "?")
                items = [i for i in items if fnmatch.fnmatchcase(str(i[fk]), pat)]
            else:
                items = [i for i in items if str(i[fk]).lower() == str(fv).lower()]
    return Page(total=len(items), offset=offset, limit=limit, items=items[offset: offset + limit])


def set_config(factory: sessionmaker[Session], actor: Actor, node: Config, name: str, value: Any,
               tenant: str | None = None) -> dict[str, Any]:
    actor.require("config.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        ch.object_name = name
        k = key(name)
        if k.node_only:
            raise ConfigError(f"configuration key '{name}' can only be set in the node file "
                              "($QVD_ROOT/etc/node.toml) of each node")
        tid = _tenant_id(s, actor, tenant)
        if tid is not None and not k.tenant:
            if tenant:
                raise ConfigError(f"configuration key '{name}' cannot be set per tenant")
            actor.require_platform(f"change the global key '{name}'")
        ch.tenant_id = tid
        parsed = parse_value(name, value)
        text = ("1" if parsed else "0") if isinstance(parsed, bool) else str(parsed)
        row = s.scalars(select(ConfigRow).where(
            ConfigRow.key == name, ConfigRow.tenant_id.is_(None) if tid is None else ConfigRow.tenant_id == tid
        )).one_or_none()
        ch.before = {"value": row.value if row else None}
        if row is None:
            s.add(ConfigRow(tenant_id=tid, key=name, value=text))
        else:
            row.value = text
        s.flush()
        eff = load_db_config(s, node, tid)  # the whole layer must still load
        if name == "l7r.loadbalancer.plugin":
            check_plugin(eff)  # an unknown plugin would only fail at the next start of an L7R
        ch.after = {"value": text}
        return {"key": name, "value": parsed, "tenant": tenant}

    return audited(factory, actor, "config.set", "config", work, arguments={"key": name, "value": value,
                                                                            "tenant": tenant})


def delete_config(factory: sessionmaker[Session], actor: Actor, name: str, tenant: str | None = None) -> None:
    actor.require("config.update")

    def work(s: Session, ch: Change) -> None:
        ch.object_name = name
        key(name)
        tid = _tenant_id(s, actor, tenant)
        if tid is None:
            actor.require_platform(f"change the global key '{name}'")
        ch.tenant_id = tid
        row = s.scalars(select(ConfigRow).where(
            ConfigRow.key == name, ConfigRow.tenant_id.is_(None) if tid is None else ConfigRow.tenant_id == tid
        )).one_or_none()
        if row is None:
            raise NotFound(f"configuration key '{name}' has no override to remove; it is at its default")
        ch.before = {"value": row.value}
        s.delete(row)

    audited(factory, actor, "config.delete", "config", work, arguments={"key": name, "tenant": tenant})
