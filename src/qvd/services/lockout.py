"""Brute-force protection of user logins, in the database so that every L7R of a cluster shares it.

Two counters:

* per **login name of a tenant** (``login_failures``), whether a user has that
  name or not, so that the answer never tells which logins exist.  One typo
  costs nothing; after the n-th consecutive failure (n >= 2) the login is
  refused for ``l7r.auth.lockout.delay * 2^(n-2)`` seconds (an exponential
  pause, capped at ``l7r.auth.lockout.time``); from ``l7r.auth.lockout.max_failures`` failures on
  it is locked out for ``l7r.auth.lockout.time * 2^(n-max_failures)`` seconds
  (at most a day).  A successful login clears the counter; so does a quiet
  period of ``l7r.auth.lockout.time`` after the last pause or lockout ended.
* per **client address** (``address_failures``): more than
  ``l7r.auth.lockout.address.max_failures`` failures within
  ``l7r.auth.lockout.time`` lock the address out for ``l7r.auth.lockout.time``
  (a password-spraying client trying many logins).  A success does not clear it.

While locked, attempts are refused without looking at the credentials and are
not counted.  The L7R pays one short read transaction per login
(:func:`check`), one short write transaction per failure
(:func:`record_failure`, which also writes the audit rows ``user.login_failed``,
``user.lockout`` and ``address.lockout`` with the actor ``l7r:<node>``), and one
delete after a success only when a counter existed.

Administrators read the state in the user view (``failed_logins``,
``locked_until``) and clear it with :func:`unlock_user` / :func:`unlock_address`
(audited ``user.unlock`` / ``address.unlock``).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import InputError, NotFound
from qvd.db.engine import transaction
from qvd.db.models import AddressFailure, LoginFailure, User, utcnow
from qvd.services.base import Actor, Change, audited, write_audit
from qvd.services.lookup import get_user

log = logging.getLogger(__name__)

#: Longest lockout, whatever the number of failures.
MAX_LOCK = 24 * 3600
#: Counters idle this long are deleted (bounded table however many logins an attacker invents).
PRUNE_AFTER = 7 * 24 * 3600
#: Longest login name stored (longer ones share the row of their first characters).
LOGIN_KEY_LEN = 255


@dataclass(frozen=True)
class Policy:
    """The lockout settings of one tenant (login counter) and of the cluster (address counter)."""

    max_failures: int
    lock_time: int
    delay: float
    address_max_failures: int
    address_lock_time: int

    @classmethod
    def from_config(cls, tenant_cfg: Config, global_cfg: Config | None = None) -> Policy:
        g = global_cfg or tenant_cfg
        return cls(
            max_failures=tenant_cfg.get_int("l7r.auth.lockout.max_failures"),
            lock_time=tenant_cfg.get_int("l7r.auth.lockout.time"),
            delay=tenant_cfg.get_float("l7r.auth.lockout.delay"),
            address_max_failures=g.get_int("l7r.auth.lockout.address.max_failures"),
            address_lock_time=g.get_int("l7r.auth.lockout.time"),
        )

    def login_pause(self, failures: int) -> float:
        """Seconds a login is refused after its ``failures``-th consecutive failure (0 = none)."""
        if failures >= self.max_failures:
            # min() on the exponent first: 2**big would be a huge int for nothing.
            longest = max(MAX_LOCK, self.lock_time)
            return float(min(self.lock_time * 2 ** min(failures - self.max_failures, 20), longest))
        if self.delay <= 0 or failures <= 1:
            return 0.0  # a single typo is free: retyping at once must work
        return min(self.delay * float(2 ** min(failures - 2, 30)), float(self.lock_time))


@dataclass(frozen=True)
class LockState:
    """What :func:`check` found: lock ends (None = not locked) and whether a login counter exists."""

    login_locked_until: dt.datetime | None = None
    address_locked_until: dt.datetime | None = None
    login_counted: bool = False

    @property
    def locked(self) -> bool:
        return self.login_locked_until is not None or self.address_locked_until is not None


def login_key(login: str) -> str:
    return login[:LOGIN_KEY_LEN]


def address_key(address: str) -> str:
    return address[:64]


def check(factory: sessionmaker[Session], tenant_id: int | None, login: str, address: str,
          *, now: dt.datetime | None = None) -> LockState:
    """Whether the login (of the tenant) or the address is locked now.  One read transaction."""
    now = now or utcnow()
    login_until = address_until = None
    counted = False
    if not address and (tenant_id is None or not login):
        return LockState()
    with transaction(factory) as s:
        if tenant_id is not None and login:
            row = s.execute(select(LoginFailure.locked_until).where(
                LoginFailure.tenant_id == tenant_id, LoginFailure.login == login_key(login))).first()
            if row is not None:
                counted = True
                if row.locked_until is not None and row.locked_until > now:
                    login_until = row.locked_until
        if address:
            until = s.scalar(select(AddressFailure.locked_until).where(
                AddressFailure.address == address_key(address)))
            if until is not None and until > now:
                address_until = until
    return LockState(login_until, address_until, counted)


def _insert_ignore(s: Session, model: Any, values: dict[str, Any]) -> None:
    """INSERT the counter row unless it exists (portable upsert: the row is then locked FOR UPDATE)."""
    dialect = s.get_bind().dialect.name
    ins = (pg_insert if dialect == "postgresql" else sqlite_insert)(model).values(**values)
    s.execute(ins.on_conflict_do_nothing())


@dataclass(frozen=True)
class FailureOutcome:
    """What one failure changed: the counters and the lock ends (None = not locked)."""

    login_failures: int = 0
    login_locked_until: dt.datetime | None = None
    login_lockout_started: bool = False
    address_failures: int = 0
    address_locked_until: dt.datetime | None = None
    address_lockout_started: bool = False


def record_failure(
    factory: sessionmaker[Session],
    policy: Policy,
    actor: Actor,
    *,
    tenant_id: int | None,
    login: str,
    user_id: int | None,
    address: str,
    reason: str,
    now: dt.datetime | None = None,
) -> FailureOutcome:
    """Count one failed login and write its audit rows, in one transaction.

    The login counter needs the tenant (None: malformed login, unknown tenant,
    bearer token); the address counter needs the address.
    """
    now = now or utcnow()
    out: dict[str, Any] = {}
    name = login[:200] or "-"
    with transaction(factory) as s:
        if user_id is None and tenant_id is not None and login:
            # For the audit row only; the counters below are the same whether the user exists or not.
            user_id = s.scalar(select(User.id).where(User.tenant_id == tenant_id, User.login == login))
        write_audit(s, actor, "user.login_failed", Change("user", user_id, name, tenant_id),
                    status="unauthenticated", message=reason[:500])
        if tenant_id is not None and login:
            key = login_key(login)
            _insert_ignore(s, LoginFailure, {"tenant_id": tenant_id, "login": key, "failures": 0,
                                             "first_failure_at": now, "last_failure_at": now})
            row = s.execute(select(LoginFailure).where(LoginFailure.tenant_id == tenant_id,
                                                       LoginFailure.login == key).with_for_update()).scalar_one()
            ended = max(row.last_failure_at, row.locked_until or row.last_failure_at)
            if row.failures and (now - ended).total_seconds() > policy.lock_time:
                row.failures, row.first_failure_at = 0, now  # quiet long enough: start afresh
            row.failures += 1
            row.last_failure_at = now
            pause = policy.login_pause(row.failures)
            row.locked_until = now + dt.timedelta(seconds=pause) if pause > 0 else None
            # Every failure from max_failures on starts a new (longer) lockout.
            started = row.failures >= policy.max_failures
            out.update(login_failures=row.failures, login_locked_until=row.locked_until,
                       login_lockout_started=started)
            if started and row.locked_until is not None:
                write_audit(s, actor, "user.lockout", Change("user", user_id, name, tenant_id),
                            status="too-many-failures",
                            message=f"locked out until {row.locked_until:%Y-%m-%d %H:%M:%S} UTC after "
                                    f"{row.failures} failed logins")
        if address and policy.address_max_failures > 0:
            akey = address_key(address)
            _insert_ignore(s, AddressFailure, {"address": akey, "failures": 0, "first_failure_at": now,
                                               "last_failure_at": now})
            arow = s.execute(select(AddressFailure).where(AddressFailure.address == akey)
                             .with_for_update()).scalar_one()
            locked_now = arow.locked_until is not None and arow.locked_until > now
            # A fixed window, not a quiet period: a busy office behind one address must not pile up
            # the odd typo of each of its users until it is locked out.
            if arow.failures and not locked_now and (now - arow.first_failure_at).total_seconds() > \
                    policy.address_lock_time:
                arow.failures, arow.first_failure_at = 0, now
            arow.failures += 1
            arow.last_failure_at = now
            a_started = arow.failures >= policy.address_max_failures and not locked_now
            if a_started:
                arow.locked_until = now + dt.timedelta(seconds=policy.address_lock_time)
                write_audit(s, actor, "address.lockout", Change("address", None, akey, None),
                            status="too-many-failures",
                            message=f"locked out until {arow.locked_until:%Y-%m-%d %H:%M:%S} UTC after "
                                    f"{arow.failures} failed logins")
            out.update(address_failures=arow.failures, address_locked_until=arow.locked_until,
                       address_lockout_started=a_started)
    return FailureOutcome(**out)


def clear_login(factory: sessionmaker[Session], tenant_id: int, login: str) -> None:
    """A successful login forgets the failures of that login name."""
    with transaction(factory) as s:
        s.execute(delete(LoginFailure).where(LoginFailure.tenant_id == tenant_id,
                                             LoginFailure.login == login_key(login)))


def prune(factory: sessionmaker[Session], *, now: dt.datetime | None = None) -> int:
    """Delete counters idle for :data:`PRUNE_AFTER` and not locked; returns how many."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=PRUNE_AFTER)
    n = 0
    with transaction(factory) as s:
        for model in (LoginFailure, AddressFailure):
            res: Any = s.execute(delete(model).where(
                model.last_failure_at < cutoff, (model.locked_until.is_(None)) | (model.locked_until < now)))
            n += int(res.rowcount or 0)
    return n


# --- administration -----------------------------------------------------------------------------


def unlock_user(factory: sessionmaker[Session], actor: Actor, user_id: int) -> dict[str, Any]:
    """Forget the failed logins of a user (ends a lockout).  Audited ``user.unlock``."""
    actor.require("user.block")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        u = get_user(s, actor, user_id)
        ch.object_id, ch.object_name, ch.tenant_id = u.id, u.login, u.tenant_id
        row = s.get(LoginFailure, (u.tenant_id, login_key(u.login)))
        ch.before = {"failed_logins": row.failures if row else 0,
                     "locked_until": row.locked_until.isoformat() if row and row.locked_until else None}
        if row is not None:
            s.delete(row)
        ch.after = {"failed_logins": 0, "locked_until": None}
        return {"id": u.id, "name": u.login, "tenant_id": u.tenant_id, **ch.before, "unlocked": row is not None}

    return audited(factory, actor, "user.unlock", "user", work)


def list_addresses(factory: sessionmaker[Session], actor: Actor) -> list[dict[str, Any]]:
    """Client addresses with recent failures (platform administrators only: addresses span tenants)."""
    actor.require("user.see")
    actor.require_platform("see login failures by address")
    with transaction(factory) as s:
        rows = s.scalars(select(AddressFailure).order_by(AddressFailure.last_failure_at.desc()).limit(1000))
        return [{"address": r.address, "failures": r.failures, "first_failure_at": r.first_failure_at,
                 "last_failure_at": r.last_failure_at, "locked_until": r.locked_until} for r in rows]


def unlock_address(factory: sessionmaker[Session], actor: Actor, address: str) -> dict[str, Any]:
    """Forget the failures from a client address.  Audited ``address.unlock``."""
    actor.require("user.block")
    actor.require_platform("unlock client addresses")
    if not address or len(address) > 64:
        raise InputError(f"invalid address {address[:70]!r}")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        ch.object_name = address
        row = s.get(AddressFailure, address)
        if row is None:
            raise NotFound(f"no failed logins are recorded for address {address}")
        ch.before = {"failures": row.failures,
                     "locked_until": row.locked_until.isoformat() if row.locked_until else None}
        s.delete(row)
        return {"address": address, **ch.before, "unlocked": True}

    return audited(factory, actor, "address.unlock", "address", work)
