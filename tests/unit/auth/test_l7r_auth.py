"""The authentication features end to end through the real L7R over loopback (SQLite and PostgreSQL):
TOTP codes right, wrong and replayed; lockout of logins and addresses shared across L7R
processes; bearer tokens single- and multi-use."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterator

import pyotp
import pytest
from sqlalchemy import select, update

from qvd.core.errors import TooManyFailures
from qvd.db.models import LoginFailure, User, UserToken, utcnow
from qvd.services import totp
from qvd.services.base import SYSTEM
from qvd.services.users import get_user_row, update_user
from tests.conftest import NodeFx
from tests.unit.auth.rig import audit_actions, basic, get, login_status, start_rig
from tests.unit.l7r.harness import L7rThread, RawClient, Rig, World

LOCKED = TooManyFailures.public_message
FAILED = "Authentication failed: wrong or missing user name, password or token"


def enrol(node: NodeFx, login: str) -> str:
    with node.factory() as s:
        uid = s.scalars(select(User.id).where(User.login == login)).one()
    return str(totp.enable_totp(node.factory, SYSTEM, node.cfg, node.paths, uid)["secret"])


# --- TOTP ---------------------------------------------------------------------------------------


@pytest.fixture
def totp_rig(node: NodeFx) -> Iterator[tuple[Rig, str]]:
    secrets: dict[str, str] = {}

    def setup(_w: World) -> None:
        secrets["alice"] = enrol(node, "alice")
        secrets["carol"] = enrol(node, "carol")

    tenants = {"default": {"l7r.auth.plugins.head": "totp", "l7r.auth.lockout.delay": "0"},
               "acme": {"l7r.auth.plugins": "totp", "l7r.auth.plugin.totp.optional": "1",
                        "l7r.auth.plugin.totp.token_size": "8", "l7r.auth.lockout.delay": "0"}}
    for rig in start_rig(node, tenants=tenants, setup=setup):
        yield rig, secrets["alice"]


def test_totp_right_wrong_and_replayed_codes(totp_rig: tuple[Rig, str]) -> None:
    rig, secret = totp_rig
    code = pyotp.TOTP(secret).now()
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert login_status(rig, "alice", "secret" + wrong) == (401, FAILED)
    assert login_status(rig, "alice", "secret")[0] == 401  # no code at all
    assert login_status(rig, "alice", "wrong" + code)[0] == 401  # right code, wrong password
    status, body = login_status(rig, "alice", "secret" + code)
    assert status == 200 and len(json.loads(body)) == 3
    assert login_status(rig, "alice", "secret" + code) == (401, FAILED), "a code works once"
    # On one connection the login is cached: the same header does not need a new code.
    c = rig.client()
    nxt = pyotp.TOTP(secret).at(time.time() + 30)  # next step: inside no window yet
    assert get(c, "/qvd/list_of_vm", basic("alice", "secret" + nxt))[0] == 401
    c.close()
    # A user of the tenant without a secret cannot log in at all (TOTP is required there).
    assert login_status(rig, "bob", "secret")[0] == 401
    assert login_status(rig, "bob", "secret123456")[0] == 401
    assert "user.login_failed" in {a for a, *_ in audit_actions(rig.node, "user.")}


def test_totp_optional_tenant_and_8_digit_codes(totp_rig: tuple[Rig, str], node: NodeFx) -> None:
    rig, _ = totp_rig
    with node.factory() as s:
        sealed = s.scalar(select(User.totp_secret).where(User.login == "carol"))
        carol = s.scalar(select(User.id).where(User.login == "carol"))
    assert sealed and carol
    from qvd.core.secretbox import box_for

    secret = box_for(node.paths).open(sealed, totp.purpose(carol)).decode()
    code = pyotp.TOTP(secret, digits=8).now()
    assert login_status(rig, "carol@acme", "secret")[0] == 401  # carol has a secret: needed
    assert login_status(rig, "carol@acme", "secret" + code)[0] == 200
    with node.factory() as s, s.begin():
        acme = s.scalar(select(User.tenant_id).where(User.id == carol))
        s.add(User(tenant_id=acme, login="dave", password_hash=s.get(User, carol).password_hash))  # type: ignore[union-attr]
    assert login_status(rig, "dave@acme", "secret")[0] == 200  # no secret, optional: password alone


def test_totp_code_must_not_unlock_a_password_shorter_than_the_code(totp_rig: tuple[Rig, str]) -> None:
    rig, secret = totp_rig
    # An empty password with a valid code must not pass: the password is checked too.
    assert login_status(rig, "alice", pyotp.TOTP(secret).now())[0] == 401


# --- lockout ------------------------------------------------------------------------------------


@pytest.fixture
def lock_rig(node: NodeFx) -> Iterator[Rig]:
    tenants = {"default": {"l7r.auth.lockout.max_failures": "3", "l7r.auth.lockout.delay": "0",
                           "l7r.auth.lockout.time": "60"},
               "acme": {"l7r.auth.lockout.delay": "30"}}
    yield from start_rig(node, config={"l7r.auth.lockout.address.max_failures": "0"}, tenants=tenants)


def test_lockout_after_n_failures_same_answer_for_unknown_logins(lock_rig: Rig, node: NodeFx) -> None:
    rig = lock_rig
    for _ in range(3):
        assert login_status(rig, "bob", "nope") == (401, FAILED)
        assert login_status(rig, "ghost", "nope") == (401, FAILED)
    # Locked: even the right password is refused, and the user is told why.
    assert login_status(rig, "bob", "secret") == (401, LOCKED)
    assert login_status(rig, "ghost", "whatever") == (401, LOCKED)  # the same for a login nobody has
    assert login_status(rig, "BOB", "secret") == (401, LOCKED)  # case-insensitive logins share the counter
    assert login_status(rig, "alice", "secret")[0] == 200  # others are not affected
    bob = get_user_row(node.factory, SYSTEM, rig.world.users["bob"])
    assert bob["failed_logins"] == 3 and bob["locked_until"] > utcnow()
    actions = audit_actions(node)
    assert ("user.lockout", "l7r:node1", "bob", "too-many-failures") in actions
    assert ("user.lockout", "l7r:node1", "ghost", "too-many-failures") in actions
    assert sum(1 for a in actions if a[0] == "user.login_failed" and a[2] == "bob") == 3

    # Once the lockout is over, a right password logs in and clears the counter.
    with node.factory() as s, s.begin():
        s.execute(update(LoginFailure).values(locked_until=utcnow() - dt.timedelta(seconds=1)))
    assert login_status(rig, "bob", "secret")[0] == 200
    assert get_user_row(node.factory, SYSTEM, rig.world.users["bob"])["failed_logins"] == 0


def test_exponential_delay_after_repeated_failures(lock_rig: Rig) -> None:
    # acme: delay 30 s.  One typo is free: retyping at once works.
    assert login_status(lock_rig, "carol@acme", "typo") == (401, FAILED)
    assert login_status(lock_rig, "carol@acme", "secret")[0] == 200
    # Two in a row: a 30 s pause, during which even the right password is refused unchecked.
    assert login_status(lock_rig, "carol@acme", "typo") == (401, FAILED)
    assert login_status(lock_rig, "carol@acme", "typo2") == (401, FAILED)
    assert login_status(lock_rig, "carol@acme", "secret") == (401, LOCKED)


def test_lockout_holds_across_l7r_processes(lock_rig: Rig, node: NodeFx) -> None:
    second = L7rThread(node, nodename="node2", **{"node.address": "127.0.0.2", "node.backend": False}).start()
    try:
        other = RawClient(second.port)
        assert get(other, "/qvd/list_of_vm", basic("bob", "x1"))[0] == 401
        other.close()
        assert login_status(lock_rig, "bob", "x2") == (401, FAILED)
        other = RawClient(second.port)
        assert get(other, "/qvd/list_of_vm", basic("bob", "x3"))[0] == 401
        other.close()
        # Three failures, split over two L7Rs: locked on both.
        assert login_status(lock_rig, "bob", "secret") == (401, LOCKED)
        other = RawClient(second.port)
        status, body = get(other, "/qvd/list_of_vm", basic("bob", "secret"))
        other.close()
        assert (status, body.decode().strip()) == (401, LOCKED)
        assert {a[1] for a in audit_actions(node, "user.login_failed")} == {"l7r:node1", "l7r:node2"}
    finally:
        second.stop()


def test_address_lockout_and_bearer_failures(node: NodeFx) -> None:
    config = {"l7r.auth.lockout.address.max_failures": "4"}
    for rig in start_rig(node, config=config, tenants={"default": {"l7r.auth.lockout.delay": "0"}}):
        # Spraying: one failure each for several logins, and guessed bearer tokens.
        assert login_status(rig, "u1", "x")[0] == 401
        assert login_status(rig, "u2", "x")[0] == 401
        c = rig.client()
        assert get(c, "/qvd/list_of_vm", "Bearer " + base64.b64encode(b"guess1").decode())[0] == 401
        c.close()
        assert login_status(rig, "u3", "x")[0] == 401
        assert login_status(rig, "alice", "secret") == (401, LOCKED)  # the address is locked now
        assert ("address.lockout", "l7r:node1", "127.0.0.1", "too-many-failures") in audit_actions(node)


def test_a_backend_outage_is_not_counted(node: NodeFx) -> None:
    tenants = {"acme": {"l7r.auth.plugins": "ldap", "auth.ldap.host": "ldap://127.0.0.1:1",
                        "auth.ldap.base": "dc=example,dc=test", "auth.ldap.timeout": "1",
                        "l7r.auth.lockout.max_failures": "2", "l7r.auth.lockout.delay": "0"}}
    for rig in start_rig(node, tenants=tenants):
        for _ in range(4):
            # carol's password is right (default plugin after ldap): the outage only costs time.
            assert login_status(rig, "carol@acme", "secret")[0] == 200
            assert login_status(rig, "nobody@acme", "secret") == (401, FAILED)
        with node.factory() as s:
            assert s.scalars(select(LoginFailure)).all() == []


# --- bearer tokens ------------------------------------------------------------------------------


def token(c: RawClient, auth: str, query: str = "") -> str:
    status, body = get(c, f"/qvd/create_auth_token{query}", auth)
    assert status == 200, body
    return "Bearer " + json.loads(body)["auth_token"].strip()


def test_tokens_single_and_multi_use_expiry_and_binding(node: NodeFx) -> None:
    for rig in start_rig(node, tenants={"default": {"l7r.auth.token.ttl": "120"}}):
        c = rig.client()
        single = token(c, basic("alice", "secret"))
        multi = token(c, basic("alice", "secret"), "?multi_use=1")
        with node.factory() as s:
            rows = {r.multi_use: r for r in s.scalars(select(UserToken))}
        assert set(rows) == {False, True}
        for r in rows.values():
            assert abs((r.expires_at - utcnow()).total_seconds() - 120) < 10
            assert r.user_id == rig.world.users["alice"]

        def use(auth: str, rig: Rig = rig) -> int:
            cx = rig.client()
            try:
                return get(cx, "/qvd/list_of_vm", auth)[0]
            finally:
                cx.close()

        assert use(single) == 200
        assert use(single) == 401  # single use: gone
        assert [use(multi) for _ in range(3)] == [200, 200, 200]
        # A token cannot mint tokens; a blocked user's token stops working; a new password ends them.
        assert get(rig.client(), "/qvd/create_auth_token", multi)[0] == 403
        with node.factory() as s, s.begin():
            s.execute(update(User).where(User.login == "alice").values(blocked=True))
        assert use(multi) == 401
        with node.factory() as s, s.begin():
            s.execute(update(User).where(User.login == "alice").values(blocked=False))
        assert use(multi) == 200
        update_user(node.factory, SYSTEM, rig.world.users["alice"], {"password": "newpass"})
        assert use(multi) == 401
        # Expired: refused and removed.
        late = token(c, basic("alice", "newpass"), "?multi_use=1")
        with node.factory() as s, s.begin():
            s.execute(update(UserToken).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
        assert use(late) == 401
        with node.factory() as s:
            assert s.scalars(select(UserToken)).all() == []
        c.close()


def test_a_token_minted_after_totp_carries_no_code(totp_rig: tuple[Rig, str]) -> None:
    rig, secret = totp_rig
    c = rig.client()
    bearer = token(c, basic("alice", "secret" + pyotp.TOTP(secret).now()), "?multi_use=1")
    c.close()
    for _ in range(2):
        cx = rig.client()
        assert get(cx, "/qvd/list_of_vm", bearer)[0] == 200
        cx.close()
