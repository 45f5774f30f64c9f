"""The lockout counters in the database (qvd.services.lockout), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select

from qvd.core.errors import Forbidden, NotFound
from qvd.db.models import AddressFailure, AuditEntry, LoginFailure, Tenant, User, utcnow
from qvd.services import lockout
from qvd.services.base import SYSTEM, Actor
from qvd.services.users import get_user_row
from tests.conftest import NodeFx

L7R = Actor(admin_id=None, name="l7r:node1", tenant_id=None, source="l7r", ip="192.0.2.7")
POLICY = lockout.Policy(max_failures=3, lock_time=60, delay=1.0, address_max_failures=5, address_lock_time=60)


def test_pause_grows_exponentially_then_locks_out_longer_each_time() -> None:
    pauses = [POLICY.login_pause(n) for n in range(0, 7)]
    assert pauses == [0.0, 0.0, 1.0, 60.0, 120.0, 240.0, 480.0]  # one typo is free
    assert [lockout.Policy(6, 60, 1.0, 0, 60).login_pause(n) for n in range(1, 6)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert lockout.Policy(3, 60, 0.0, 0, 60).login_pause(2) == 0.0  # no delay configured
    assert lockout.Policy(10, 5, 1.0, 0, 5).login_pause(8) == 5.0  # the pause never exceeds the lockout
    assert lockout.Policy(3, 60, 1.0, 0, 60).login_pause(500) == lockout.MAX_LOCK


def _tenant(node: NodeFx) -> int:
    with node.factory() as s:
        return int(s.scalars(select(Tenant.id).where(Tenant.name == "default")).one())


def fail(node: NodeFx, login: str, now: dt.datetime, *, address: str = "", policy: lockout.Policy = POLICY,
         tenant_id: int | None = -1) -> lockout.FailureOutcome:
    tid = _tenant(node) if tenant_id == -1 else tenant_id
    return lockout.record_failure(node.factory, policy, L7R, tenant_id=tid, login=login, user_id=None,
                                  address=address, reason=f"wrong password for {login}@default", now=now)


def test_login_counter_locks_escalates_resets_and_audits(node: NodeFx) -> None:
    tid = _tenant(node)
    with node.factory() as s, s.begin():
        s.add(User(tenant_id=tid, login="alice"))
    t = utcnow()
    first = fail(node, "alice", t)
    assert first.login_failures == 1 and first.login_locked_until is None and not first.login_lockout_started
    st = lockout.check(node.factory, tid, "alice", "", now=t)
    assert not st.locked and st.login_counted
    second = fail(node, "alice", t + dt.timedelta(seconds=2))
    assert second.login_locked_until == t + dt.timedelta(seconds=3)
    assert lockout.check(node.factory, tid, "alice", "", now=t + dt.timedelta(seconds=2.5)).locked
    assert not lockout.check(node.factory, tid, "alice", "", now=t + dt.timedelta(seconds=3.5)).locked
    third = fail(node, "alice", t + dt.timedelta(seconds=5))
    assert third.login_lockout_started and third.login_locked_until == t + dt.timedelta(seconds=65)
    # Right after the lockout ends, one more failure doubles it.
    fourth = fail(node, "alice", t + dt.timedelta(seconds=66))
    assert fourth.login_failures == 4 and fourth.login_locked_until == t + dt.timedelta(seconds=66 + 120)
    # A quiet period of lock_time after the lockout ended forgets everything.
    quiet = fail(node, "alice", t + dt.timedelta(seconds=66 + 120 + 61))
    assert quiet.login_failures == 1 and not quiet.login_lockout_started

    with node.factory() as s:
        rows = s.execute(select(AuditEntry.action, AuditEntry.admin_name, AuditEntry.object_id,
                                AuditEntry.status, AuditEntry.ip, AuditEntry.tenant_id)
                         .order_by(AuditEntry.id)).all()
        alice_id = s.scalar(select(User.id).where(User.login == "alice"))
    actions = [r.action for r in rows]
    assert actions.count("user.login_failed") == 5 and actions.count("user.lockout") == 2
    assert {(r.admin_name, r.object_id, r.ip, r.tenant_id) for r in rows} == {("l7r:node1", alice_id, "192.0.2.7",
                                                                               tid)}
    assert {r.status for r in rows if r.action == "user.lockout"} == {"too-many-failures"}


def test_unknown_logins_are_counted_exactly_like_known_ones(node: NodeFx) -> None:
    tid = _tenant(node)
    t = utcnow()
    outs = [fail(node, "nobody", t + dt.timedelta(seconds=10 * i)) for i in range(3)]
    assert outs[-1].login_lockout_started
    assert lockout.check(node.factory, tid, "nobody", "", now=t + dt.timedelta(seconds=25)).locked
    with node.factory() as s:
        assert s.scalars(select(AuditEntry.object_id).where(AuditEntry.action == "user.lockout")).one() is None


def test_address_counter_uses_a_fixed_window(node: NodeFx) -> None:
    t = utcnow()
    tid = _tenant(node)
    # Different logins from one address (password spraying).
    for i in range(4):
        out = fail(node, f"user{i}", t + dt.timedelta(seconds=i), address="198.51.100.9")
        assert not out.address_lockout_started
    out = fail(node, "user9", t + dt.timedelta(seconds=5), address="198.51.100.9")
    assert out.address_lockout_started and out.address_failures == 5
    st = lockout.check(node.factory, tid, "someone-else", "198.51.100.9", now=t + dt.timedelta(seconds=30))
    assert st.address_locked_until == t + dt.timedelta(seconds=65) and st.login_locked_until is None
    assert not lockout.check(node.factory, tid, "x", "198.51.100.10", now=t + dt.timedelta(seconds=30)).locked
    # Failures trickling in slower than the window never lock (a busy office behind one address).
    slow = "203.0.113.1"
    for i in range(12):
        out = fail(node, f"u{i}", t + dt.timedelta(seconds=25 * i), address=slow, tenant_id=None)
        assert not out.address_lockout_started, i
    with node.factory() as s:
        assert s.scalar(select(AuditEntry.action).where(AuditEntry.action == "address.lockout")) == "address.lockout"
    off = lockout.Policy(3, 60, 0.0, 0, 60)
    assert fail(node, "q", t, address="192.0.2.200", policy=off).address_failures == 0  # 0 = no address counting


def test_concurrent_failures_are_all_counted(node: NodeFx) -> None:
    policy = lockout.Policy(max_failures=100, lock_time=60, delay=0.0, address_max_failures=100,
                            address_lock_time=60)
    now = utcnow()
    barrier = threading.Barrier(6)

    def work() -> None:
        barrier.wait()
        for _ in range(3):
            fail(node, "raced", now, address="192.0.2.50", policy=policy)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with node.factory() as s:
        assert s.scalar(select(LoginFailure.failures).where(LoginFailure.login == "raced")) == 18
        assert s.scalar(select(AddressFailure.failures).where(AddressFailure.address == "192.0.2.50")) == 18


def test_user_view_unlock_and_prune(node: NodeFx) -> None:
    tid = _tenant(node)
    with node.factory() as s, s.begin():
        u = User(tenant_id=tid, login="bob")
        s.add(u)
        s.flush()
        uid = u.id
    row = get_user_row(node.factory, SYSTEM, uid)
    assert (row["failed_logins"], row["locked_until"], row["totp_enabled"]) == (0, None, False)
    t = utcnow()
    for i in range(3):
        fail(node, "bob", t + dt.timedelta(seconds=i))
    row = get_user_row(node.factory, SYSTEM, uid)
    assert row["failed_logins"] == 3 and row["locked_until"] == t + dt.timedelta(seconds=62)

    with pytest.raises(Forbidden):
        lockout.unlock_user(node.factory, Actor(None, "ro", None, frozenset({"user.see"})), uid)
    out = lockout.unlock_user(node.factory, SYSTEM, uid)
    assert out["unlocked"] and out["failed_logins"] == 3
    assert get_user_row(node.factory, SYSTEM, uid)["failed_logins"] == 0
    assert not lockout.unlock_user(node.factory, SYSTEM, uid)["unlocked"]

    fail(node, "gone", t - dt.timedelta(days=8), address="192.0.2.99")
    fail(node, "recent", t, address="192.0.2.98")
    assert lockout.prune(node.factory, now=t) == 2
    with node.factory() as s:
        assert list(s.scalars(select(LoginFailure.login))) == ["recent"]
        assert list(s.scalars(select(AddressFailure.address))) == ["192.0.2.98"]
    assert [a["address"] for a in lockout.list_addresses(node.factory, SYSTEM)] == ["192.0.2.98"]
    lockout.unlock_address(node.factory, SYSTEM, "192.0.2.98")
    with pytest.raises(NotFound):
        lockout.unlock_address(node.factory, SYSTEM, "192.0.2.98")
    with pytest.raises(Forbidden):
        lockout.list_addresses(node.factory, Actor(None, "t", tid, frozenset({"*"})))
    with node.factory() as s:
        assert {a for a in s.scalars(select(AuditEntry.action))} >= {"user.unlock", "address.unlock"}
