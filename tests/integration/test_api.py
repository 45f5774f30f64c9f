"""The admin API over real HTTP (uvicorn) against SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from qvd.core.states import HostState, VmCmd
from qvd.db.models import AuditEntry, Di, DiTag, HostRuntime, User, Vm, VmRuntime, utcnow
from tests.conftest import RunningApi, make_fake_di


def counts(api: RunningApi) -> dict[str, int]:
    with api.node.factory() as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m)) or 0
                for m in (User, Vm, Di, DiTag, VmRuntime)}


def audit_rows(api: RunningApi) -> list[AuditEntry]:
    with api.node.factory() as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


@pytest.fixture
def c(api: RunningApi) -> httpx.Client:
    return api.client()


def test_login_and_auth(api: RunningApi) -> None:
    anon = httpx.Client(base_url=api.url)
    problem(anon.get("/api/v1/users"), 401)
    problem(anon.get("/api/v1/users", headers={"Authorization": "Bearer nope"}), 401)
    before = len(audit_rows(api))
    body = problem(anon.post("/api/v1/login", json={"login": "admin", "password": "wrong"}), 401)
    assert "wrong administrator name or password" in body["detail"]
    rows = audit_rows(api)
    assert len(rows) == before + 1 and rows[-1].action == "login" and rows[-1].status == "unauthenticated"
    assert rows[-1].arguments is None or "wrong" not in json.dumps(rows[-1].arguments)
    problem(anon.post("/api/v1/login", content=b"{nope"), 400)
    spec = anon.get("/api/v1/openapi.json")
    assert spec.status_code == 200 and "/api/v1/vms/{obj_id}/start" in spec.json()["paths"]


def test_issue_flow(api: RunningApi, c: httpx.Client, tmp_path: Path) -> None:
    """Tenant, user, OSF, DI with tags, VM; list as JSON; move default; block the user."""
    t = c.post("/api/v1/tenants", json={"name": "acme"})
    assert t.status_code == 201, t.text
    u = c.post("/api/v1/users", json={"name": "Alice", "password": "secret", "tenant": "acme",
                                      "properties": {"location": "Madrid"}})
    assert u.status_code == 201, u.text
    assert u.json()["name"] == "alice" and u.json()["tenant"] == "acme"
    assert u.json()["properties"] == {"location": "Madrid"}
    o = c.post("/api/v1/osfs", json={"name": "desktop", "tenant": "acme", "memory": 512})
    assert o.status_code == 201 and o.json()["memory"] == 512
    img = make_fake_di(tmp_path / "desk.tar.gz")
    d1 = c.post("/api/v1/dis", json={"osf_id": o.json()["id"], "disk_image": str(img), "version": "1.0"})
    assert d1.status_code == 201, d1.text
    assert sorted(d1.json()["tags"]) == ["1.0", "default", "head"]
    assert d1.json()["sha256"] and d1.json()["size"] > 0
    assert (api.node.paths.images / d1.json()["disk_image"]).is_file()
    d2 = c.post("/api/v1/dis", json={"osf_id": o.json()["id"], "disk_image": str(img), "tags": ["testing"]})
    assert d2.status_code == 201, d2.text
    assert sorted(d2.json()["tags"]) == sorted([d2.json()["version"], "head", "testing"])
    d1b = c.get(f"/api/v1/dis/{d1.json()['id']}").json()
    assert sorted(d1b["tags"]) == ["1.0", "default"]  # head moved, default stayed
    vm = c.post("/api/v1/vms", json={"name": "desk1", "user": "alice@acme", "osf_id": o.json()["id"]})
    assert vm.status_code == 201, vm.text
    v = vm.json()
    assert v["state"] == "stopped" and v["user_state"] == "disconnected"
    assert v["di_version"] == "1.0" and v["ip"] == "10.231.0.100" and v["mac"] == "54:52:00:e7:00:64"
    listing = c.get("/api/v1/vms", params={"filters": json.dumps({"user_name": {"~": "%ali%"}})})
    assert listing.status_code == 200 and listing.json()["total"] == 1
    # move default to the newer DI: the VM now follows it
    mv = c.post(f"/api/v1/dis/{d2.json()['id']}/tags", json={"tags": ["default"]})
    assert mv.status_code == 200 and "default" in mv.json()["tags"]
    assert c.get(f"/api/v1/vms/{v['id']}").json()["di_version"] == d2.json()["version"]
    # fixed tags do not move, head/default/fixed tags cannot be removed
    problem(c.post(f"/api/v1/dis/{d2.json()['id']}/tags", json={"tags": ["1.0"]}), 409)
    problem(c.delete(f"/api/v1/dis/{d2.json()['id']}/tags/default"), 409)
    assert c.delete(f"/api/v1/dis/{d2.json()['id']}/tags/testing").status_code == 200
    # block the user
    b = c.post(f"/api/v1/users/{u.json()['id']}/block")
    assert b.status_code == 200 and b.json()["blocked"] is True
    assert c.get("/api/v1/users", params={"blocked": "true"}).json()["total"] == 1
    actions = [(a.action, a.status) for a in audit_rows(api)]
    assert ("user.block", "ok") in actions and ("di.tag", "ok") in actions
    blk = next(a for a in audit_rows(api) if a.action == "user.block")
    assert blk.before and blk.after and blk.before["blocked"] is False and blk.after["blocked"] is True


def test_refusals_change_nothing_and_are_audited(api: RunningApi, c: httpx.Client, tmp_path: Path) -> None:
    assert c.post("/api/v1/users", json={"name": "bob", "password": "x"}).status_code == 201
    assert c.post("/api/v1/osfs", json={"name": "desktop"}).status_code == 201
    snap = counts(api)
    n_audit = len(audit_rows(api))
    body = problem(c.post("/api/v1/users", json={"name": "bob", "password": "y"}), 409)
    assert "already exists" in body["detail"]
    body = problem(c.post("/api/v1/vms", json={"name": "d", "user": "bob", "osf": "missing"}), 404)
    assert "OSF 'missing' does not exist" in body["detail"]
    body = problem(c.get("/api/v1/vms", params={"filters": json.dumps({"nosuch": 1})}), 400)
    assert "unknown filter field 'nosuch'" in body["detail"]
    problem(c.get("/api/v1/vms", params={"filters": "{not json"}), 400)
    problem(c.get("/api/v1/users", params={"filters": json.dumps({"id": {"~": "x"}})}), 400)
    problem(c.get("/api/v1/users", params={"order_by": "password"}), 400)
    problem(c.post("/api/v1/users", json={"name": "has space"}), 422)
    problem(c.post("/api/v1/users", json={"name": "carol", "colour": "red"}), 422)
    problem(c.post("/api/v1/osfs", json={"name": "big", "memory": "lots"}), 422)
    # a broken image leaves nothing registered and no file behind
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    problem(c.post("/api/v1/dis", json={"osf": "desktop", "disk_image": str(bad)}), 422)
    assert not [p for p in api.node.paths.images.glob("*")] if api.node.paths.images.exists() else True
    problem(c.post("/api/v1/dis", json={"osf": "desktop", "disk_image": "/nonexistent.tar"}), 422)
    assert counts(api) == snap
    refused = audit_rows(api)[n_audit:]
    statuses = [(a.action, a.status) for a in refused]
    assert ("user.create", "already-exists") in statuses
    assert ("vm.create", "not-found") in statuses
    assert ("vm.list", "invalid-filter") in statuses
    assert ("di.create", "image-invalid") in statuses
    assert all(a.status != "ok" for a in refused)


def test_filters_order_pagination(c: httpx.Client) -> None:
    for i in range(7):
        assert c.post("/api/v1/users", json={"name": f"u{i}", "blocked": i % 2 == 0}).status_code == 201
    def names(**params: Any) -> list[str]:
        r = c.get("/api/v1/users", params=params)
        assert r.status_code == 200, r.text
        return [i["name"] for i in r.json()["items"]]
    assert names(order_by="-name", limit=3) == ["u6", "u5", "u4"]
    assert names(order_by="name", offset=5) == ["u5", "u6"]
    assert names(filters=json.dumps({"name": ["u1", "u3"]}), order_by="name") == ["u1", "u3"]
    assert names(filters=json.dumps({"id": {"between": [2, 4]}}), order_by="id") == ["u1", "u2", "u3"]
    assert names(filters=json.dumps({"-or": [{"name": "u1"}, {"name": {"~": "u6"}}]}), order_by="name") == ["u1", "u6"]
    assert names(filters=json.dumps({"-not": {"blocked": True}}), order_by="name") == ["u1", "u3", "u5"]
    assert names(filters=json.dumps({"id": {">=": 6}}), order_by="id") == ["u5", "u6"]
    assert names(filters=json.dumps({"name": {"!=": "u0"}, "blocked": True}), order_by="id") == ["u2", "u4", "u6"]
    r = c.get("/api/v1/users", params={"limit": 2}).json()
    assert r["total"] == 7 and len(r["items"]) == 2
    assert c.get("/api/v1/users", params={"limit": 0}).status_code == 400
    assert set(c.get("/api/v1/users", params={"fields": "name"}).json()["items"][0]) >= {"id", "name"}


def test_vm_commands(api: RunningApi, c: httpx.Client, tmp_path: Path) -> None:
    c.post("/api/v1/users", json={"name": "ana"})
    osf = c.post("/api/v1/osfs", json={"name": "desk", "memory": 256}).json()
    vm = c.post("/api/v1/vms", json={"name": "v1", "user": "ana", "osf": "desk"}).json()
    # no DI yet
    problem(c.post(f"/api/v1/vms/{vm['id']}/start"), 409)
    di = c.post("/api/v1/dis", json={"osf": "desk", "disk_image": str(make_fake_di(tmp_path / "i.tgz"))}).json()
    # no running host
    body = problem(c.post(f"/api/v1/vms/{vm['id']}/start"), 503)
    assert "no host available" in body["detail"]
    h = c.post("/api/v1/hosts", json={"name": "node1", "address": "10.231.0.1"}).json()
    with api.node.factory() as s, s.begin():
        s.execute(update(HostRuntime).values(state=HostState.RUNNING, ok_ts=utcnow(), usable_ram=4096,
                                             usable_cpu=2.0))
    # blocked DI is never started
    c.post(f"/api/v1/dis/{di['id']}/block")
    problem(c.post(f"/api/v1/vms/{vm['id']}/start"), 403)
    c.post(f"/api/v1/dis/{di['id']}/unblock")
    # a host too small for the OSF is not chosen
    c.patch(f"/api/v1/osfs/{osf['id']}", json={"memory": 8192})
    problem(c.post(f"/api/v1/vms/{vm['id']}/start"), 503)
    c.patch(f"/api/v1/osfs/{osf['id']}", json={"memory": 256})
    st = c.post(f"/api/v1/vms/{vm['id']}/start")
    assert st.status_code == 200, st.text
    assert st.json()["vm_cmd"] == "start" and st.json()["host_name"] == "node1"
    problem(c.post(f"/api/v1/vms/{vm['id']}/start"), 409)  # already pending
    problem(c.delete(f"/api/v1/vms/{vm['id']}"), 409)  # not stopped (pending start)
    # withdrawing a start that no node took yet
    sp = c.post(f"/api/v1/vms/{vm['id']}/stop")
    assert sp.status_code == 200 and sp.json()["vm_cmd"] is None and sp.json()["host_id"] is None
    problem(c.post(f"/api/v1/vms/{vm['id']}/stop"), 409)
    problem(c.post(f"/api/v1/vms/{vm['id']}/disconnect"), 409)
    # host blocked -> drained
    c.post(f"/api/v1/hosts/{h['id']}/block")
    problem(c.post(f"/api/v1/vms/{vm['id']}/start"), 503)
    with api.node.factory() as s:
        assert s.get(VmRuntime, vm["id"]).vm_cmd is None  # type: ignore[union-attr]
    assert c.delete(f"/api/v1/vms/{vm['id']}").status_code == 204
    _ = VmCmd


def test_permissions_and_tenant_scope(api: RunningApi, c: httpx.Client) -> None:
    c.post("/api/v1/tenants", json={"name": "t1"})
    c.post("/api/v1/tenants", json={"name": "t2"})
    c.post("/api/v1/users", json={"name": "x1", "tenant": "t1"})
    c.post("/api/v1/users", json={"name": "x2", "tenant": "t2"})
    r = c.post("/api/v1/administrators", json={"name": "op", "password": "pw", "tenant": "t1", "roles": ["reader"]})
    assert r.status_code == 201, r.text
    op = api.client("op", "pw", "t1")
    seen = [u["name"] for u in op.get("/api/v1/users").json()["items"]]
    assert seen == ["x1"]
    body = problem(op.post("/api/v1/users", json={"name": "new"}), 403)
    assert "user.create" in body["detail"]
    other = c.get("/api/v1/users", params={"name": "x2"}).json()["items"][0]
    problem(op.get(f"/api/v1/users/{other['id']}"), 404)
    assert op.get("/api/v1/tenants").json()["total"] == 1
    # login with user@tenant form
    assert api.client("op@t1", "pw").get("/api/v1/whoami").json()["name"] == "op"


def test_config_api(c: httpx.Client) -> None:
    r = c.put("/api/v1/configs/l7r.auth.plugin.totp.interval", json={"value": "60"})
    assert r.status_code == 200 and r.json()["value"] == 60
    body = problem(c.put("/api/v1/configs/l7r.auth.plugin.totp.interval", json={"value": "x"}), 400)
    assert "l7r.auth.plugin.totp.interval" in body["detail"] and "'x'" in body["detail"]
    problem(c.put("/api/v1/configs/no.such.key", json={"value": "1"}), 400)
    problem(c.put("/api/v1/configs/database.url", json={"value": "sqlite://"}), 400)
    items = c.get("/api/v1/configs", params={"key": "l7r.auth.plugin.totp.interval"}).json()["items"]
    assert items[0]["value"] == 60 and items[0]["is_default"] is False
    assert c.delete("/api/v1/configs/l7r.auth.plugin.totp.interval").status_code == 204
    problem(c.delete("/api/v1/configs/l7r.auth.plugin.totp.interval"), 404)


def test_properties_api(c: httpx.Client) -> None:
    u = c.post("/api/v1/users", json={"name": "pat"}).json()
    r = c.put(f"/api/v1/users/{u['id']}/properties/office", json={"value": "Madrid"})
    assert r.status_code == 200 and r.json()["properties"] == {"office": "Madrid"}
    assert c.delete(f"/api/v1/users/{u['id']}/properties/office").json()["properties"] == {}
    problem(c.delete(f"/api/v1/users/{u['id']}/properties/office"), 404)
    problem(c.put(f"/api/v1/users/{u['id']}/properties/bad%20key", json={"value": "x"}), 422)


def test_audit_log_is_append_only(api: RunningApi, c: httpx.Client) -> None:
    c.post("/api/v1/users", json={"name": "q"})
    with pytest.raises(Exception, match="append-only"), api.node.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
    with pytest.raises(Exception, match="append-only"), api.node.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET status = 'x'"))
    assert len(audit_rows(api)) >= 2


def test_host_stop_command(api: RunningApi, c: httpx.Client) -> None:
    h = c.post("/api/v1/hosts", json={"name": "node9", "address": "10.231.0.9"}).json()
    body = problem(c.post(f"/api/v1/hosts/{h['id']}/stop"), 409)  # no node daemon runs there
    assert "no node daemon to stop" in body["detail"]
    with api.node.factory() as s, s.begin():
        s.execute(update(HostRuntime).where(HostRuntime.host_id == h["id"]).values(state=HostState.RUNNING))
    r = c.post(f"/api/v1/hosts/{h['id']}/stop")
    assert r.status_code == 200, r.text
    with api.node.factory() as s:
        assert s.get(HostRuntime, h["id"]).cmd.value == "stop"  # type: ignore[union-attr]
    assert any(a.action == "host.stop" and a.object_id == h["id"] for a in audit_rows(api))
    problem(c.post("/api/v1/hosts/999999/stop"), 404)
