"""TOTP (RFC 6238): codes, window, replay protection, enrolment; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import urllib.parse

import pyotp
import pytest
from sqlalchemy import select

from qvd.core.errors import InvalidState
from qvd.core.secretbox import box_for
from qvd.db.models import AuditEntry, Tenant, User
from qvd.services import totp
from qvd.services.base import SYSTEM, Actor
from tests.conftest import NodeFx

NOW = 1_900_000_000.0  # a fixed instant, step 63_333_333 with 30 s steps


def test_rfc6238_reference_values() -> None:
    # RFC 6238 appendix B, SHA-1, 8 digits, secret "12345678901234567890".
    import base64

    secret = base64.b32encode(b"12345678901234567890").decode()
    p = totp.TotpParams(digits=8)
    for t, code in ((59, "94287082"), (1111111109, "07081804"), (1234567890, "89005924"),
                    (2000000000, "69279037")):
        assert totp.code_at(secret, p.step(t), 8) == code
        assert totp.matching_step(secret, code, p, t) == p.step(t)


def test_window_leeway_and_t0() -> None:
    secret = totp.new_secret()
    p = totp.TotpParams(leeway=1, leeway_before=0)
    n = p.step(NOW)
    codes = {k: totp.code_at(secret, n + k, 6) for k in (-2, -1, 0, 1)}
    assert totp.matching_step(secret, codes[0], p, NOW) == n
    assert totp.matching_step(secret, codes[-1], p, NOW) == n - 1  # one step late: clock skew allowed
    assert totp.matching_step(secret, codes[-2], p, NOW) is None
    assert totp.matching_step(secret, codes[1], p, NOW) is None  # ahead: not with leeway_before 0
    wide = totp.TotpParams(leeway=0, leeway_before=1)
    assert totp.matching_step(secret, codes[1], wide, NOW) == n + 1
    assert totp.matching_step(secret, codes[-1], wide, NOW) is None
    shifted = totp.TotpParams(t0=30, leeway=0)
    assert totp.matching_step(secret, codes[-1], shifted, NOW) == n - 1
    for bad in ("", "12345", "1234567", "abcdef", " 12345"):
        assert totp.matching_step(secret, bad, p, NOW) is None


def test_provisioning_uri_is_what_authenticator_apps_read() -> None:
    secret = totp.new_secret()
    assert len(secret) == 32 and pyotp.TOTP(secret).now().isdigit()
    uri = totp.provisioning_uri(secret, "alice@default", "QVD", totp.TotpParams(digits=8, interval=60))
    parts = urllib.parse.urlsplit(uri)
    q = dict(urllib.parse.parse_qsl(parts.query))
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert urllib.parse.unquote(parts.path) == "/QVD:alice@default"
    assert q["secret"] == secret and q["issuer"] == "QVD" and q["digits"] == "8" and q["period"] == "60"


def _user(node: NodeFx, login: str = "alice") -> int:
    with node.factory() as s, s.begin():
        tid = s.scalars(select(Tenant.id).where(Tenant.name == "default")).one()
        u = User(tenant_id=tid, login=login)
        s.add(u)
        s.flush()
        return u.id


def test_enable_stores_only_ciphertext_audits_without_secret_and_verify_burns_codes(node: NodeFx) -> None:
    uid = _user(node)
    result = totp.enable_totp(node.factory, SYSTEM, node.cfg, node.paths, uid)
    secret = result["secret"]
    assert result["user"]["totp_enabled"] is True and result["enforced"] is False
    assert f"secret={secret}" in result["uri"]
    with node.factory() as s:
        stored = s.scalar(select(User.totp_secret).where(User.id == uid))
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == "user.totp_enable")).one()
    assert stored and secret not in stored
    assert secret not in repr((audit.arguments, audit.before, audit.after, audit.message))

    box = box_for(node.paths)
    p = totp.TotpParams()
    code = totp.code_at(secret, p.step(NOW), 6)
    assert not totp.verify(node.factory, box, uid, "000000" if code != "000000" else "111111", p, now=NOW)
    assert totp.verify(node.factory, box, uid, code, p, now=NOW)
    assert not totp.verify(node.factory, box, uid, code, p, now=NOW), "a replayed code must be refused"
    # The previous step is still inside the window, but older than the accepted one: refused too.
    older = totp.code_at(secret, p.step(NOW) - 1, 6)
    assert not totp.verify(node.factory, box, uid, older, p, now=NOW)
    nxt = totp.code_at(secret, p.step(NOW) + 1, 6)
    assert totp.verify(node.factory, box, uid, nxt, p, now=NOW + 30)

    # Re-enabling gives a new secret: the old one stops working; disabling removes it.
    again = totp.enable_totp(node.factory, SYSTEM, node.cfg, node.paths, uid)
    assert again["secret"] != secret
    later = NOW + 300
    assert not totp.verify(node.factory, box, uid, totp.code_at(secret, p.step(later), 6), p, now=later)
    assert totp.verify(node.factory, box, uid, totp.code_at(again["secret"], p.step(later), 6), p, now=later)
    row = totp.disable_totp(node.factory, SYSTEM, uid)
    assert row["totp_enabled"] is False
    with pytest.raises(InvalidState):
        totp.disable_totp(node.factory, SYSTEM, uid)
    assert not totp.verify(node.factory, box, uid, totp.code_at(again["secret"], p.step(later), 6), p,
                           now=later + 30)


def test_a_sealed_secret_copied_to_another_user_does_not_open(node: NodeFx) -> None:
    alice, bob = _user(node, "alice"), _user(node, "bob")
    result = totp.enable_totp(node.factory, SYSTEM, node.cfg, node.paths, alice)
    with node.factory() as s, s.begin():
        sealed = s.scalar(select(User.totp_secret).where(User.id == alice))
        s.get(User, bob).totp_secret = sealed  # type: ignore[union-attr]
    p = totp.TotpParams()
    code = totp.code_at(result["secret"], p.step(NOW), 6)
    with pytest.raises(Exception, match="another purpose"):
        totp.verify(node.factory, box_for(node.paths), bob, code, p, now=NOW)


def test_the_same_code_is_accepted_once_under_concurrency(node: NodeFx) -> None:
    uid = _user(node)
    secret = totp.enable_totp(node.factory, SYSTEM, node.cfg, node.paths, uid)["secret"]
    p = totp.TotpParams()
    code = totp.code_at(secret, p.step(NOW), 6)
    box = box_for(node.paths)
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def attempt() -> None:
        start.wait()
        ok = totp.verify(node.factory, box, uid, code, p, now=NOW)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]


def test_tenant_administrators_only_enrol_their_own_users(node: NodeFx) -> None:
    uid = _user(node)
    with node.factory() as s, s.begin():
        other = Tenant(name="other")
        s.add(other)
        s.flush()
        other_id = other.id
    foreign = Actor(admin_id=None, name="x", tenant_id=other_id, permissions=frozenset({"*"}))
    from qvd.core.errors import NotFound

    with pytest.raises(NotFound):
        totp.enable_totp(node.factory, foreign, node.cfg, node.paths, uid)
    reader = Actor(admin_id=None, name="r", tenant_id=None, permissions=frozenset({"user.see"}))
    from qvd.core.errors import Forbidden

    with pytest.raises(Forbidden):
        totp.enable_totp(node.factory, reader, node.cfg, node.paths, uid)
    with node.factory() as s:
        assert s.scalar(select(User.totp_secret).where(User.id == uid)) is None
