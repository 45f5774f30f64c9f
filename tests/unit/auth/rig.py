"""The L7R test rig (tests/unit/l7r/harness.py) with authentication settings written before it starts.

The L7R checks every tenant's chain at start, so configuration rows (global and
per tenant) go into the database first; ``setup`` may add users, OSFs, LDAP
settings... between populating the database and starting the broker.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sqlalchemy import select

from qvd.db.models import AuditEntry, ConfigRow, Tenant, User
from tests.conftest import NodeFx
from tests.unit.l7r.harness import EchoAgent, FakeHkd, FakeVma, L7rThread, RawClient, Rig, World, host_id_of, populate


def set_config(node: NodeFx, values: Mapping[str, object], tenant: str | None = None) -> None:
    """Database configuration rows (global, or of the tenant named)."""
    with node.factory() as s, s.begin():
        tid = None
        if tenant is not None:
            tid = s.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
        for key, value in values.items():
            owner = ConfigRow.tenant_id.is_(None) if tid is None else ConfigRow.tenant_id == tid
            row = s.scalars(select(ConfigRow).where(owner, ConfigRow.key == key)).first()
            text = value if isinstance(value, str) else json.dumps(value)
            if row is None:
                s.add(ConfigRow(tenant_id=tid, key=key, value=text))
            else:
                row.value = text


def start_rig(
    node: NodeFx,
    *,
    config: Mapping[str, object] | None = None,
    tenants: Mapping[str, Mapping[str, object]] | None = None,
    setup: Callable[[World], None] | None = None,
    **overrides: Any,
) -> Iterator[Rig]:
    world = populate(node)
    if config:
        set_config(node, config)
    for tenant, values in (tenants or {}).items():
        set_config(node, values, tenant)
    if setup is not None:
        setup(world)
    vma = FakeVma().start()
    agent = EchoAgent().start()
    l7r = L7rThread(node, **overrides)
    try:
        l7r.start()
    except BaseException:
        vma.stop()
        agent.stop()
        l7r.loop.call_soon_threadsafe(l7r.loop.stop)
        raise
    world.host_id = host_id_of(node)
    hkd = FakeHkd(node, world.host_id, vma_port=vma.port, x_port=agent.port).start()
    l7r.call(l7r.broker.refresh())
    try:
        yield Rig(node, world, l7r, hkd, vma, agent)
    finally:
        l7r.stop()
        hkd.stop()
        vma.stop()
        agent.stop()


def basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def get(c: RawClient, target: str, auth: str | None) -> tuple[int, bytes]:
    """One request on the connection: (status, body)."""
    c.request(target, auth)
    _, status, _, body = c.read_response()
    return status, body


def login_status(rig: Rig, login: str, password: str) -> tuple[int, str]:
    """``list_of_vm`` on a fresh connection (no per-connection login cache): (status, body text)."""
    c = rig.client()
    try:
        status, body = get(c, "/qvd/list_of_vm", basic(login, password))
    finally:
        c.close()
    return status, body.decode().strip()


def audit_actions(node: NodeFx, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(action, admin_name, object_name, status) of the audit rows whose action starts with ``prefix``."""
    with node.factory() as s:
        rows = s.execute(select(AuditEntry.action, AuditEntry.admin_name, AuditEntry.object_name,
                                AuditEntry.status).where(AuditEntry.action.startswith(prefix))
                         .order_by(AuditEntry.id)).all()
    return [(r.action, r.admin_name, r.object_name, r.status) for r in rows]


def user_id(node: NodeFx, login: str, tenant: str = "default") -> int | None:
    with node.factory() as s:
        return s.scalar(select(User.id).join(Tenant, Tenant.id == User.tenant_id)
                        .where(User.login == login, Tenant.name == tenant))


def connect_vm(c: RawClient, vm_id: int, auth: str) -> tuple[int, bytes]:
    """``connect_to_vm`` as QVD clients send it: (final status, body); 101 leaves a tunnel open on ``c``."""
    c.request(f"/qvd/connect_to_vm?id={vm_id}&qvd.client.os=linux&qvd.client.link=adsl", auth, upgrade=True)
    _infos, _head, status, _headers, body = c.read_until_final()
    return status, body
