"""SQL shared by the daemons: configuration layers and compare-and-swap state writes.

Every state write here is a compare-and-swap: ``UPDATE ... WHERE <key> AND
<state column> = <expected>``.  The functions return whether the row matched; a
False means someone else changed the row first, and the caller must re-read
instead of overwriting.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from qvd.core.config import Config
from qvd.core.states import (
    HostState,
    UserState,
    VmState,
    check_host_transition,
    check_user_transition,
    check_vm_transition,
)
from qvd.db.models import ConfigRow, HostRuntime, VmRuntime, utcnow


def load_db_config(session: Session, base: Config, tenant_id: int | None = None) -> Config:
    """``base`` overlaid with the global rows, then (if given) the tenant's rows."""
    rows = session.execute(select(ConfigRow.tenant_id, ConfigRow.key, ConfigRow.value)).all()
    glob = {r.key: r.value for r in rows if r.tenant_id is None}
    cfg = base.overlay(glob, source="database (global)")
    if tenant_id is not None:
        ten = {r.key: r.value for r in rows if r.tenant_id == tenant_id}
        cfg = cfg.overlay(ten, source=f"database (tenant {tenant_id})", tenant=True)
    return cfg


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def cas_vm_state(
    session: Session,
    vm_id: int,
    expected: VmState,
    new: VmState,
    *,
    host_id: int | None = None,
    **values: Any,
) -> bool:
    """Move a VM from ``expected`` to ``new`` (checked against the transition table).

    ``host_id`` given: the row must also be assigned to that host (a node only
    writes the state of its own desktops).  Extra column values are set too.
    """
    check_vm_transition(expected, new)
    stmt = (
        update(VmRuntime)
        .where(VmRuntime.vm_id == vm_id, VmRuntime.vm_state == expected)
        .values(vm_state=new, vm_state_ts=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if host_id is not None:
        stmt = stmt.where(VmRuntime.host_id == host_id)
    return _rowcount(session.execute(stmt)) == 1


def cas_user_state(
    session: Session, vm_id: int, expected: UserState, new: UserState, **values: Any
) -> bool:
    check_user_transition(expected, new)
    stmt = (
        update(VmRuntime)
        .where(VmRuntime.vm_id == vm_id, VmRuntime.user_state == expected)
        .values(user_state=new, user_state_ts=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(session.execute(stmt)) == 1


def cas_host_state(session: Session, host_id: int, expected: HostState, new: HostState, **values: Any) -> bool:
    check_host_transition(expected, new)
    stmt = (
        update(HostRuntime)
        .where(HostRuntime.host_id == host_id, HostRuntime.state == expected)
        .values(state=new, state_ts=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(session.execute(stmt)) == 1


def cas_update(session: Session, stmt: Any) -> bool:
    """Run a prepared conditional UPDATE; True when exactly one row matched."""
    return _rowcount(session.execute(stmt.execution_options(synchronize_session=False))) == 1
