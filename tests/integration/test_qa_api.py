"""The issue's acceptance path: `qa` against the real API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from qvd.cli import qa
from qvd.db.models import AuditEntry, User, Vm
from tests.conftest import RunningApi, make_fake_di
from tests.integration.conftest import QaRun


@pytest.fixture
def run(qa_run: QaRun) -> QaRun:
    return qa_run


def test_qa_issue_flow(run, api: RunningApi, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = make_fake_di(tmp_path / "desktop.tar.gz")
    assert run("tenant", "new", "name=acme")[0] == 0
    assert run("user", "new", "name=alice,", "password=secret,", "tenant=acme")[0] == 0
    assert run("osf", "new", "name=desktop,", "memory=512,", "tenant=acme")[0] == 0
    code, out, err = run("di", "new", "osf=desktop,", f"disk_image={img},", "version=1.0")
    assert code == 0, err
    code, out, err = run("di", "new", "osf=desktop,", f"disk_image={img},", "version=2.0,", "tags=testing")
    assert code == 0, err
    assert run("vm", "new", "name=desk1,", "user=alice@acme,", "osf=desktop")[0] == 0

    code, out, _ = run("vm", "name=desk1", "get")
    vms = json.loads(out)
    assert code == 0 and vms[0]["name"] == "desk1" and vms[0]["di_version"] == "1.0"
    code, out, _ = run("vm", "user_name~'%ali%'", "get", "name,", "state")
    assert code == 0 and json.loads(out)[0]["state"] == "stopped"

    code, out, err = run("di", "version=2.0", "tag", "default")
    assert code == 0, err
    code, out, _ = run("vm", "desk1", "get")
    assert json.loads(out)[0]["di_version"] == "2.0"
    code, out, _ = run("di", "osf_name=desktop", "get")
    tags = {d["version"]: sorted(d["tags"]) for d in json.loads(out)}
    assert tags == {"1.0": ["1.0"], "2.0": ["2.0", "default", "head", "testing"]}

    assert run("user", "alice", "block")[0] == 0
    code, out, _ = run("user", "alice", "get")
    assert json.loads(out)[0]["blocked"] is True
    code, out, _ = run("user", "get", fmt="table")
    assert code == 0 and "alice" in out and "Total: 1" in out


def test_qa_refusals_leave_database_unchanged(run, api: RunningApi) -> None:  # type: ignore[no-untyped-def]
    assert run("user", "new", "name=alice,", "password=secret")[0] == 0
    assert run("osf", "new", "name=desktop")[0] == 0

    def snapshot() -> tuple[int, int]:
        with api.node.factory() as s:
            return s.scalar(select(func.count(User.id))) or 0, s.scalar(select(func.count(Vm.id))) or 0

    before = snapshot()
    code, _, err = run("user", "new", "name=alice,", "password=other")
    assert code == 1 and "already exists" in err
    code, _, err = run("vm", "new", "name=d1,", "user=alice,", "osf=nosuchosf")
    assert code == 1 and "OSF 'nosuchosf' does not exist" in err
    code, _, err = run("vm", "bogus=1", "get")
    assert code == 1 and "unknown filter field 'bogus'" in err
    code = qa.main(["--url", api.url, "--login", "admin", "--password", "wrong", "user", "get"])
    assert code == 1
    assert snapshot() == before
    with api.node.factory() as s:
        statuses = [(a.action, a.status) for a in s.scalars(select(AuditEntry))]
    assert ("user.create", "already-exists") in statuses
    assert ("vm.create", "not-found") in statuses
    assert ("vm.list", "invalid-filter") in statuses
    assert ("login", "unauthenticated") in statuses


def test_qa_user_del_and_host_block(run) -> None:  # type: ignore[no-untyped-def]
    assert run("user", "new", "name=bob")[0] == 0
    assert run("user", "bob", "del")[0] == 0
    assert json.loads(run("user", "get")[1]) == []
    assert run("host", "new", "name=node1,", "address=10.231.0.1")[0] == 0
    assert run("host", "node1", "block")[0] == 0
    assert json.loads(run("host", "node1", "get")[1])[0]["blocked"] is True
