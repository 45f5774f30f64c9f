"""TOTP from enrolment to login: ``qa user alice totp enable`` against the real admin API, then
the code typed after the password through the real L7R (SQLite and PostgreSQL).  The secret
must appear in the answer once, and nowhere else: not in logs, not in the audit log."""

from __future__ import annotations

import functools
import json
import logging
import re
import stat
from pathlib import Path

import httpx
import pyotp
import pytest
from sqlalchemy import select

from qvd.db.models import AuditEntry, User
from tests.conftest import RunningApi
from tests.integration.conftest import QaRun
from tests.unit.auth.rig import login_status, start_rig


@pytest.fixture
def run(qa_run: QaRun) -> QaRun:
    return functools.partial(qa_run, fmt="table")


def test_qa_totp_enable_login_replay_disable(api: RunningApi, run: QaRun, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = api.node
    tenants = {"default": {"l7r.auth.plugins.head": "totp", "l7r.auth.lockout.delay": "0"}}
    for rig in start_rig(node, tenants=tenants):
        assert login_status(rig, "alice", "secret")[0] == 401  # TOTP required, alice has no secret yet

        png = tmp_path / "alice.png"
        code, out, err = run("user", "alice", "totp", "enable", "--qr-png", str(png))
        assert code == 0, err
        secret = re.search(r"secret: ([A-Z2-7]{32})\n", out)
        uri = re.search(r"uri:    (otpauth://totp/\S+)\n", out)
        assert secret and uri, out
        assert f"secret={secret.group(1)}" in uri.group(1) and "issuer=QVD" in uri.group(1)
        assert "█" in out or "▀" in out  # the QR code drawn in the terminal
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and stat.S_IMODE(png.stat().st_mode) == 0o600
        assert "warning" not in err  # the chain of the tenant has totp: no warning

        totp = pyotp.TOTP(secret.group(1))
        now = totp.now()
        assert login_status(rig, "alice", "secret" + now)[0] == 200
        assert login_status(rig, "alice", "secret" + now)[0] == 401  # replayed
        assert login_status(rig, "alice", "secret")[0] == 401

        code, out, _ = run("user", "alice", "get", "name,", "totp_enabled", fmt="json")
        row = json.loads(out)[0]
        assert (row["name"], row["totp_enabled"]) == ("alice", True)

        code, out, err = run("user", "alice", "totp", "disable")
        assert code == 0 and "TOTP disabled for user" in out, err
        with node.factory() as s:
            assert s.scalar(select(User.totp_secret).where(User.login == "alice")) is None
        code, out, err = run("user", "alice", "totp", "disable")
        assert code == 1 and "has no TOTP secret" in err

        # The secret is nowhere but in the one answer: not in the audit log, not in any log line.
        with node.factory() as s:
            audit = s.scalars(select(AuditEntry).where(AuditEntry.action.like("user.totp_%"))).all()
        assert [(a.action, a.status) for a in audit] == [("user.totp_enable", "ok"), ("user.totp_disable", "ok"),
                                                         ("user.totp_disable", "invalid-state")]
        assert all(a.admin_name == "admin" for a in audit)
        dump = json.dumps([[a.arguments, a.before, a.after, a.message] for a in audit])
        assert secret.group(1) not in dump
        assert not [r for r in caplog.records if secret.group(1) in r.getMessage()]


def test_api_totp_answer_is_not_cached_and_warns_when_not_enforced(api: RunningApi, run: QaRun) -> None:
    c = api.client()
    uid = c.post("/api/v1/users", json={"name": "zoe", "password": "pw"}).json()["id"]
    r = c.post(f"/api/v1/users/{uid}/totp")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) >= {"secret", "uri", "digits", "interval", "enforced", "user"}
    assert body["enforced"] is False and body["user"]["totp_enabled"] is True
    # qa says when the tenant's chain does not ask for the code yet.
    code, _out, err = run("user", "zoe", "totp", "enable")
    assert code == 0 and "no 'totp' plugin" in err
    assert c.delete(f"/api/v1/users/{uid}/totp").json()["totp_enabled"] is False
    assert c.post("/api/v1/users/999999/totp").status_code == 404
    anon = httpx.post(f"{api.url}/api/v1/users/{uid}/totp")
    assert anon.status_code == 401
