"""What every domain service shares: the acting administrator, permissions, tenant
scope, and the audited transaction.

Every change runs through :func:`audited`: the work and its audit row commit
together; when the work fails, its transaction is rolled back (nothing changes)
and the refused attempt is written to the audit log in a transaction of its own.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.errors import AlreadyExists, Conflict, Forbidden, QvdError
from qvd.db.models import AuditEntry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Permissions are "<object>.<verb>".  "*" grants everything.
OBJECTS = ("tenant", "admin", "role", "user", "osf", "di", "vm", "host", "config", "audit", "property")
VERBS = ("see", "create", "update", "delete", "block")
EXTRA_PERMISSIONS = ("vm.start", "vm.stop", "vm.disconnect", "di.tag", "host.stop_vms", "host.stop")
ALL_PERMISSIONS = tuple(f"{o}.{v}" for o in OBJECTS for v in VERBS) + EXTRA_PERMISSIONS


@dataclass(frozen=True)
class Actor:
    """Who is acting.  ``tenant_id`` None = platform administrator (every tenant)."""

    admin_id: int | None
    name: str
    tenant_id: int | None
    permissions: frozenset[str] = field(default_factory=frozenset)
    source: str = ""
    ip: str = ""

    @property
    def is_platform(self) -> bool:
        return self.tenant_id is None

    def can(self, permission: str) -> bool:
        return "*" in self.permissions or permission in self.permissions

    def require(self, permission: str) -> None:
        if not self.can(permission):
            raise Forbidden(f"administrator '{self.name}' lacks the permission '{permission}'")

    def require_platform(self, what: str) -> None:
        if not self.is_platform:
            raise Forbidden(f"only platform administrators may {what}")

    def tenant_scope(self, column: ColumnElement[Any]) -> ColumnElement[bool] | None:
        return None if self.is_platform else column == self.tenant_id


SYSTEM = Actor(admin_id=None, name="system", tenant_id=None, permissions=frozenset({"*"}), source="system")


def jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _mask(arguments: dict[str, Any] | None) -> dict[str, Any] | None:
    if arguments is None:
        return None
    return {k: ("**********" if "password" in k or k == "token" else jsonable(v)) for k, v in arguments.items()}


@dataclass
class Change:
    """What an audited action tells the audit log about the object it touched."""

    object_type: str
    object_id: int | None = None
    object_name: str = ""
    tenant_id: int | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


def write_audit(
    session: Session,
    actor: Actor,
    action: str,
    change: Change,
    *,
    status: str = "ok",
    message: str = "",
    arguments: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEntry(
            admin_id=actor.admin_id,
            admin_name=actor.name,
            tenant_id=change.tenant_id if change.tenant_id is not None else actor.tenant_id,
            action=action,
            object_type=change.object_type,
            object_id=change.object_id,
            object_name=change.object_name[:256],
            status=status,
            message=message,
            source=actor.source[:32],
            ip=actor.ip[:64],
            arguments=_mask(arguments),
            before=_mask(change.before),
            after=_mask(change.after),
        )
    )


def translate_integrity(err: IntegrityError, what: str) -> QvdError:
    """Turn a constraint violation that slipped past our checks into a clean 409."""
    text_ = str(err.orig).lower()
    if "unique" in text_ or "duplicate" in text_:
        return AlreadyExists(f"{what} already exists")
    return Conflict(f"{what}: the change conflicts with existing data")


def audited(
    factory: sessionmaker[Session],
    actor: Actor,
    action: str,
    object_type: str,
    work: Callable[[Session, Change], T],
    *,
    arguments: dict[str, Any] | None = None,
) -> T:
    """Run ``work`` in one transaction with its audit row; audit refusals separately.

    ``work`` fills in the :class:`Change` (object id, name, before/after) as it goes,
    so that a refusal half-way is still logged with what was known.
    """
    change = Change(object_type=object_type)
    try:
        with factory() as session, session.begin():
            result = work(session, change)
            write_audit(session, actor, action, change, arguments=arguments)
            session.flush()
        return result
    except IntegrityError as e:
        err: QvdError = translate_integrity(e, f"{object_type} {change.object_name!r}".strip())
        _audit_refusal(factory, actor, action, change, err, arguments)
        raise err from None
    except QvdError as e:
        _audit_refusal(factory, actor, action, change, e, arguments)
        raise


def _audit_refusal(
    factory: sessionmaker[Session],
    actor: Actor,
    action: str,
    change: Change,
    err: QvdError,
    arguments: dict[str, Any] | None,
) -> None:
    change.after = None
    try:
        with factory() as session, session.begin():
            write_audit(session, actor, action, change, status=err.code, message=err.message, arguments=arguments)
    except Exception:  # the refusal itself must still reach the caller
        log.exception("could not write the audit row of a refused %s", action)


def audit_only(
    factory: sessionmaker[Session],
    actor: Actor,
    action: str,
    change: Change,
    err: QvdError,
    arguments: dict[str, Any] | None = None,
) -> None:
    """Log a refusal that happened before any work (e.g. a bad filter, a failed login)."""
    _audit_refusal(factory, actor, action, change, err, arguments)


@contextmanager
def reading(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session


def notify(session: Session, channel: str) -> None:
    """Wake the owner of a command (PostgreSQL NOTIFY; pollers cover SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:c, '')"), {"c": channel})
