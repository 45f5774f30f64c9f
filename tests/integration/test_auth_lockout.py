"""Brute-force protection seen by an operator: failures through the real L7R, then ``qa`` against
the real admin API shows ``failed_logins``/``locked_until`` and the audit rows, and ``qa user
... unlock`` lets the user in again (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from qvd.core.errors import TooManyFailures
from tests.conftest import RunningApi
from tests.integration.conftest import QaRun
from tests.unit.auth.rig import login_status, start_rig


@pytest.fixture
def run(qa_run: QaRun) -> QaRun:
    return qa_run


def test_lockout_visible_in_qa_and_unlocked_by_qa(api: RunningApi, run: QaRun) -> None:
    tenants = {"default": {"l7r.auth.lockout.max_failures": "3", "l7r.auth.lockout.time": "600",
                           "l7r.auth.lockout.delay": "0"}}
    for rig in start_rig(api.node, tenants=tenants):
        for _ in range(3):
            assert login_status(rig, "bob", "guess")[0] == 401
        assert login_status(rig, "bob", "secret") == (401, TooManyFailures.public_message)

        code, out, _ = run("user", "bob", "get")
        bob = json.loads(out)[0]
        assert code == 0 and bob["failed_logins"] == 3 and bob["locked_until"]
        code, out, _ = run("user", "get", fmt="table")
        header = out.splitlines()[0].split()
        assert header[-3:] == ["totp_enabled", "failed_logins", "locked_until"]
        assert any(line.split()[1] == "bob" and " 3 " in line for line in out.splitlines()[2:])

        code, out, _ = run("audit", "object_name=bob", "get")
        rows = json.loads(out)
        assert [r["action"] for r in rows if r["action"].startswith("user.")][:2] == ["user.lockout",
                                                                                      "user.login_failed"]
        assert {r["admin_name"] for r in rows} == {"l7r:node1"} and {r["source"] for r in rows} == {"l7r"}

        code, out, err = run("user", "bob", "unlock", fmt="table")
        assert code == 0 and "unlocked user" in out and "(bob)" in out, err
        assert login_status(rig, "bob", "secret")[0] == 200
        code, out, _ = run("user", "bob", "get")
        assert json.loads(out)[0]["failed_logins"] == 0 and json.loads(out)[0]["locked_until"] is None
        code, out, _ = run("audit", "action=user.unlock", "get")
        assert [r["admin_name"] for r in json.loads(out)] == ["admin"]
        # An action on every user needs a filter (or --force), like the other verbs.
        code, _, err = run("user", "unlock")
        assert code == 2 and "--force" in err


def test_address_lockouts_through_the_api(api: RunningApi) -> None:
    config = {"l7r.auth.lockout.address.max_failures": "2"}
    for rig in start_rig(api.node, config=config, tenants={"default": {"l7r.auth.lockout.delay": "0"}}):
        assert login_status(rig, "x1", "x")[0] == 401
        assert login_status(rig, "x2", "x")[0] == 401
        assert login_status(rig, "alice", "secret") == (401, TooManyFailures.public_message)
        c = api.client()
        listed = c.get("/api/v1/lockouts/addresses").json()
        assert listed["total"] == 1 and listed["items"][0]["address"] == "127.0.0.1"
        assert listed["items"][0]["failures"] == 2 and listed["items"][0]["locked_until"]
        assert c.delete("/api/v1/lockouts/addresses/127.0.0.1").status_code == 204
        assert login_status(rig, "alice", "secret")[0] == 200
        assert c.delete("/api/v1/lockouts/addresses/127.0.0.1").status_code == 404
