"""qa against a fake admin API (httpx.MockTransport): requests, output, exit codes, settings."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import qvd
from qvd.cli import qa
from qvd.cli.qa import (
    ApiClient,
    QaError,
    Settings,
    load_settings,
    local_image_path,
    main,
    parse_options,
    read_qa_toml,
    render_table,
)

PREFIX = "/api/v1"

Handler = Callable[[httpx.Request], httpx.Response]


def problem(status: int, detail: str, code: str = "conflict") -> httpx.Response:
    return httpx.Response(
        status,
        json={"type": f"urn:qvd:error:{code}", "title": "Error", "status": status, "detail": detail,
              "code": code},
        headers={"content-type": "application/problem+json"},
    )


def raw_path(request: httpx.Request) -> str:
    """The path as sent, percent-escapes kept (``url.path`` decodes them)."""
    return request.url.raw_path.decode("ascii").split("?", 1)[0]


class FakeApi:
    """Records every request; answers login/logout, lists from ``collections``, and ``routes``."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.collections: dict[str, list[dict[str, Any]]] = {}
        self.routes: dict[tuple[str, str], httpx.Response | Handler] = {}
        self.page_size = 100
        self.token = "tok-123"

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = raw_path(request)
        assert path.startswith(PREFIX), path
        rel = path[len(PREFIX):]
        if rel == "/login":
            body = json.loads(request.content)
            if body.get("password") != "secret":
                return problem(401, "wrong login or password", "unauthenticated")
            return httpx.Response(200, json={"token": self.token, "expires_at": "2030-01-01T00:00:00Z",
                                             "admin": {"name": body["login"]}})
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return problem(401, "missing token", "unauthenticated")
        if rel == "/logout":
            return httpx.Response(204)
        route = self.routes.get((request.method, rel))
        if route is not None:
            return route(request) if callable(route) else route
        if request.method == "GET" and rel in self.collections:
            items = self.collections[rel]
            offset = int(request.url.params.get("offset", "0"))
            page = items[offset: offset + self.page_size]
            return httpx.Response(200, json={"total": len(items), "offset": offset, "limit": self.page_size,
                                             "items": page})
        return problem(404, f"no route {request.method} {rel}", "not-found")

    @property
    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request except login/logout."""
        return [
            (r.method, raw_path(r)[len(PREFIX):]) for r in self.requests
            if r.url.path not in (f"{PREFIX}/login", f"{PREFIX}/logout")
        ]

    def last(self, method: str, rel: str) -> httpx.Request:
        return [r for r in self.requests if r.method == method and raw_path(r) == PREFIX + rel][-1]


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


def filters_of(request: httpx.Request) -> Any:
    raw = request.url.params.get("filters")
    return None if raw is None else json.loads(raw)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real qa.toml, HOME or credentials leak in; the password comes from the environment."""
    (tmp_path / "home").mkdir()
    (tmp_path / "root" / "etc").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QVD_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("QVD_API_URL", raising=False)
    monkeypatch.delenv("QVD_ADMIN_LOGIN", raising=False)
    monkeypatch.setenv("QVD_ADMIN_PASSWORD", "secret")


@pytest.fixture
def fake() -> FakeApi:
    return FakeApi()


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> Run:
    def _run(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv), transport=fake.transport())
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


VMS = [
    {"id": 1, "name": "desk1", "user_name": "alice", "state": "running", "host_name": "node1",
     "ip": "10.0.0.2", "di_tag": "default", "blocked": False, "user_state": "connected"},
    {"id": 12, "name": "desk2", "user_name": "bob", "state": "stopped", "host_name": None,
     "ip": "10.0.0.3", "di_tag": "default", "blocked": True, "user_state": "disconnected"},
]


# --- the request flow -----------------------------------------------------------------------------


def test_login_headers_and_logout(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = VMS
    rc, _, err = run("vm", "get")
    assert (rc, err) == (0, "")
    login, listing, logout = fake.requests
    assert login.url == httpx.URL("http://127.0.0.1:8080/api/v1/login")
    assert body_of(login) == {"login": "admin", "password": "secret", "tenant": None}
    assert "authorization" not in login.headers
    for request in fake.requests:
        assert request.headers["user-agent"] == f"qa/{qvd.__version__}"
        assert request.headers["x-qvd-source"] == "CLI"
    assert listing.headers["authorization"] == "Bearer tok-123"
    assert (logout.method, logout.url.path) == ("POST", "/api/v1/logout")


def test_get_table(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = VMS
    rc, out, _ = run("vm", "get")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["id", "name", "user_name", "state", "host_name", "ip", "di_tag", "blocked",
                                "user_state"]
    assert lines[2].split() == ["1", "desk1", "alice", "running", "node1", "10.0.0.2", "default", "false",
                                "connected"]
    assert lines[3].split() == [
        "12", "desk2", "bob", "stopped", "10.0.0.3", "default", "true", "disconnected",
    ]
    assert lines[-1] == "Total: 2"
    # Columns line up: every value starts where its header does (ids are right-aligned).
    assert lines[2].index("desk1") == lines[0].index("name") == lines[3].index("desk2")
    assert filters_of(fake.last("GET", "/vms")) is None


def test_get_json(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = VMS
    rc, out, _ = run("--format", "json", "vm", "get")
    assert rc == 0
    assert json.loads(out) == VMS


def test_get_by_name(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = VMS[:1]
    rc, _, _ = run("vm", "name=desk1", "get")
    assert rc == 0
    assert filters_of(fake.last("GET", "/vms")) == {"name": "desk1"}
    run("vm", "desk1", "get")
    assert filters_of(fake.last("GET", "/vms")) == {"name": "desk1"}


def test_get_fields(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = [{"id": 1, "name": "desk1", "state": "running"}]
    rc, out, _ = run("vm", "user_name~%ali%", "get", "name,", "state")
    assert rc == 0
    request = fake.last("GET", "/vms")
    assert filters_of(request) == {"user_name": {"~": "%ali%"}}
    assert request.url.params["fields"] == "name,state"
    assert out.splitlines()[0].split() == ["name", "state"]
    assert out.splitlines()[2].split() == ["desk1", "running"]


def test_get_or_filter(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = [{"id": 1}]
    rc, out, _ = run("vm", "(state=running;", "blocked=1)", "get", "id")
    assert rc == 0
    assert filters_of(fake.last("GET", "/vms")) == {"-or": [{"state": "running"}, {"blocked": 1}]}
    assert out.splitlines()[-1] == "Total: 1"


def test_get_order(fake: FakeApi, run: Run) -> None:
    fake.collections["/users"] = []
    rc, out, _ = run("user", "get", "order", "desc", "name")
    assert rc == 0
    assert fake.last("GET", "/users").url.params["order_by"] == "-name"
    assert out.splitlines()[-1] == "Total: 0"


def test_audit_newest_first_by_default(fake: FakeApi, run: Run) -> None:
    fake.collections["/audit"] = [{"id": 9, "at": "2030-01-01T10:00:00", "admin_name": "admin",
                                  "action": "user.create", "object_type": "user", "object_name": "alice",
                                  "status": "ok", "message": "line one\nline two"}]
    rc, out, _ = run("audit", "get")
    assert rc == 0
    assert fake.last("GET", "/audit").url.params["order_by"] == "-id"
    assert "line one line two" in out
    run("log", "get", "order", "at")
    assert fake.last("GET", "/audit").url.params["order_by"] == "at"


def test_get_follows_pages(fake: FakeApi, run: Run) -> None:
    fake.page_size = 100
    fake.collections["/users"] = [{"id": i, "name": f"u{i}"} for i in range(1, 251)]
    rc, out, _ = run("-f", "json", "user", "get")
    assert rc == 0
    assert [r.url.params.get("offset") for r in fake.requests if r.method == "GET"] == [None, "100", "200"]
    assert [u["id"] for u in json.loads(out)] == list(range(1, 251))


# --- new ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "path", "body"), [
    (["user", "new", "name=alice,", "password=secret"], "/users", {"name": "alice", "password": "secret"}),
    (["tenant", "new", "name=acme"], "/tenants", {"name": "acme"}),
    (["osf", "new", "name=desktop,", "memory=512"], "/osfs", {"name": "desktop", "memory": 512}),
    (["vm", "new", "name=desk1,", "user=alice,", "osf=desktop"], "/vms",
     {"name": "desk1", "user": "alice", "osf": "desktop"}),
    (["di", "new", "osf=desktop,", "disk_image=/path/to/file.tar.gz,", "version=1.0"], "/dis",
     {"osf": "desktop", "disk_image": "/path/to/file.tar.gz", "version": "1.0"}),
    (["host", "new", "name=node1,", "ip_address=10.0.0.5"], "/hosts",
     {"name": "node1", "address": "10.0.0.5"}),
    (["admin", "new", "name=bob,", "password=x,", "roles=[operator]"], "/administrators",
     {"name": "bob", "password": "x", "roles": ["operator"]}),
])
def test_new(fake: FakeApi, run: Run, argv: list[str], path: str, body: dict[str, Any]) -> None:
    fake.routes[("POST", path)] = httpx.Response(201, json={"id": 3, **body})
    rc, out, err = run(*argv)
    assert (rc, err) == (0, "")
    assert body_of(fake.last("POST", path)) == body
    assert out == f"created {argv[0]} 3\n"


def test_new_json_prints_the_object(fake: FakeApi, run: Run) -> None:
    created = {"id": 3, "name": "alice", "tenant": "default", "blocked": False}
    fake.routes[("POST", "/users")] = httpx.Response(201, json=created)
    rc, out, _ = run("--format=json", "user", "new", "name=alice")
    assert rc == 0
    assert json.loads(out) == created


def test_new_di_makes_local_paths_absolute(
    fake: FakeApi, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.tar.gz").write_bytes(b"x")
    fake.routes[("POST", "/dis")] = httpx.Response(201, json={"id": 5})
    run("di", "new", "osf=desktop,", "file=images/desk.tar.gz")
    assert body_of(fake.last("POST", "/dis"))["disk_image"] == str(tmp_path / "images" / "desk.tar.gz")
    run("di", "new", "osf=desktop,", "file=here.tar.gz")
    assert body_of(fake.last("POST", "/dis"))["disk_image"] == str(tmp_path / "here.tar.gz")
    # A bare name that is not a file here names a file in the API's storage/images.
    run("di", "new", "osf=desktop,", "disk_image=ubuntu.tgz")
    assert body_of(fake.last("POST", "/dis"))["disk_image"] == "ubuntu.tgz"


def test_local_image_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_image_path("/abs/x.tgz") == "/abs/x.tgz"
    assert local_image_path("./x.tgz") == str(tmp_path / "x.tgz")
    assert local_image_path("~/x.tgz") == os.path.join(os.environ["HOME"], "x.tgz")
    assert local_image_path("x.tgz") == "x.tgz"


# --- actions --------------------------------------------------------------------------------------


def test_block_by_name(fake: FakeApi, run: Run) -> None:
    fake.collections["/hosts"] = [{"id": 2}]
    node1 = {"id": 2, "name": "node1", "blocked": True}
    fake.routes[("POST", "/hosts/2/block")] = httpx.Response(200, json=node1)
    rc, out, err = run("host", "node1", "block")
    assert (rc, err) == (0, "")
    listing = fake.last("GET", "/hosts")
    assert filters_of(listing) == {"name": "node1"}
    assert listing.url.params["fields"] == "id"
    assert fake.calls == [("GET", "/hosts"), ("POST", "/hosts/2/block")]
    assert out == "blocked host 2 (node1)\nTotal: 1\n"


def test_delete(fake: FakeApi, run: Run) -> None:
    fake.collections["/users"] = [{"id": 7}]
    fake.routes[("DELETE", "/users/7")] = httpx.Response(204)
    rc, out, _ = run("user", "alice", "del")
    assert rc == 0
    assert fake.calls == [("GET", "/users"), ("DELETE", "/users/7")]
    assert out == "deleted user 7\nTotal: 1\n"


def test_delete_json(fake: FakeApi, run: Run) -> None:
    fake.collections["/users"] = [{"id": 7}]
    fake.routes[("DELETE", "/users/7")] = httpx.Response(204)
    rc, out, _ = run("-f", "json", "user", "alice", "del")
    assert rc == 0
    assert json.loads(out) == [{"id": 7}]


@pytest.mark.parametrize("verb", ["start", "stop", "disconnect", "block", "unblock"])
def test_vm_actions(fake: FakeApi, run: Run, verb: str) -> None:
    fake.collections["/vms"] = [{"id": 1}]
    fake.routes[("POST", f"/vms/1/{verb}")] = httpx.Response(200, json=VMS[0])
    rc, out, _ = run("vm", "desk1", verb)
    assert rc == 0
    assert fake.calls == [("GET", "/vms"), ("POST", f"/vms/1/{verb}")]
    assert "vm 1 (desk1)" in out


def test_action_on_a_range_json(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = [{"id": 1}, {"id": 12}]
    for vm in VMS:
        fake.routes[("POST", f"/vms/{vm['id']}/block")] = httpx.Response(200, json={**vm, "blocked": True})
    rc, out, _ = run("--format", "json", "vm", "id=[1:20]", "block")
    assert rc == 0
    assert filters_of(fake.last("GET", "/vms")) == {"id": {"between": [1, 20]}}
    assert fake.last("GET", "/vms").url.params["order_by"] == "id"
    assert [vm["blocked"] for vm in json.loads(out)] == [True, True]


def test_partial_failure_reports_each_object(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = [{"id": 1}, {"id": 12}]
    fake.routes[("POST", "/vms/1/start")] = problem(409, "vm 1 is blocked", "blocked")
    fake.routes[("POST", "/vms/12/start")] = httpx.Response(200, json=VMS[1])
    rc, out, err = run("vm", "id=[1,12]", "start")
    assert rc == 1
    assert err == "qa: error: vm 1: vm 1 is blocked (HTTP 409)\n"
    assert out == "start requested for vm 12 (desk2)\nTotal: 1\n"


def test_set(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = [{"id": 1}]
    fake.routes[("PATCH", "/vms/1")] = httpx.Response(200, json=VMS[0])
    rc, out, _ = run("vm", "desk1", "set", "tag=testing,", "expiration_hard='2030-01-01 10:00'")
    assert rc == 0
    assert body_of(fake.last("PATCH", "/vms/1")) == {
        "di_tag": "testing", "expiration_hard": "2030-01-01 10:00",
    }
    assert out.startswith("updated vm 1 (desk1)\n")


def test_host_stop_vms(fake: FakeApi, run: Run) -> None:
    fake.collections["/hosts"] = [{"id": 2}]
    fake.routes[("POST", "/hosts/2/stop_vms")] = httpx.Response(200, json={"id": 2, "name": "node1"})
    rc, out, _ = run("host", "node1", "stop_vms")
    assert rc == 0
    assert out.startswith("stop requested for every VM of host 2 (node1)")


def test_di_tag(fake: FakeApi, run: Run) -> None:
    fake.collections["/dis"] = [{"id": 5}]
    fake.routes[("POST", "/dis/5/tags")] = httpx.Response(
        200, json={"id": 5, "osf_name": "desktop", "version": "1.0", "tags": ["default", "head"]})
    rc, out, err = run("di", "osf_name=desktop", "tag", "default")
    assert (rc, err) == (0, "")
    assert filters_of(fake.last("GET", "/dis")) == {"osf_name": "desktop"}
    assert body_of(fake.last("POST", "/dis/5/tags")) == {"tags": ["default"]}
    assert out == "tagged di 5 (desktop 1.0) with default\nTotal: 1\n"


def test_di_tag_on_several_warns(fake: FakeApi, run: Run) -> None:
    fake.collections["/dis"] = [{"id": 5}, {"id": 6}]
    fake.routes[("POST", "/dis/5/tags")] = httpx.Response(200, json={"id": 5})
    fake.routes[("POST", "/dis/6/tags")] = httpx.Response(200, json={"id": 6})
    rc, _, err = run("di", "osf_name=desktop", "tag", "default")
    assert rc == 0
    assert "2 DIs match" in err
    assert "DI 6" in err
    assert fake.calls[-1] == ("POST", "/dis/6/tags")


def test_di_untag(fake: FakeApi, run: Run) -> None:
    fake.collections["/dis"] = [{"id": 7}]
    fake.routes[("DELETE", "/dis/7/tags/testing")] = httpx.Response(200, json={"id": 7, "tags": []})
    fake.routes[("DELETE", "/dis/7/tags/a%2Fb")] = httpx.Response(200, json={"id": 7, "tags": []})
    rc, _, _ = run("di", "7", "untag", "testing,", "'a/b'")
    assert rc == 0
    assert filters_of(fake.last("GET", "/dis")) == {"id": 7}
    assert fake.calls == [("GET", "/dis"), ("DELETE", "/dis/7/tags/testing"), ("DELETE", "/dis/7/tags/a%2Fb")]


def test_properties(fake: FakeApi, run: Run) -> None:
    fake.collections["/users"] = [{"id": 3}]
    alice = {"id": 3, "name": "alice"}
    fake.routes[("PUT", "/users/3/properties/location")] = httpx.Response(200, json=alice)
    fake.routes[("PUT", "/users/3/properties/floor")] = httpx.Response(200, json=alice)
    rc, out, _ = run("user", "alice", "prop", "location=Madrid,", "floor=3")
    assert rc == 0
    assert body_of(fake.last("PUT", "/users/3/properties/location")) == {"value": "Madrid"}
    assert body_of(fake.last("PUT", "/users/3/properties/floor")) == {"value": "3"}
    assert out == "set properties on user 3 (alice): location, floor\nTotal: 1\n"
    fake.routes[("DELETE", "/users/3/properties/location")] = httpx.Response(200, json={"id": 3})
    rc, out, _ = run("user", "alice", "unprop", "location")
    assert rc == 0
    assert fake.calls[-1] == ("DELETE", "/users/3/properties/location")
    assert out.startswith("removed properties from user 3: location")


def test_no_match_is_an_error(fake: FakeApi, run: Run) -> None:
    fake.collections["/users"] = []
    rc, out, err = run("user", "nobody", "del")
    assert (rc, out) == (1, "")
    assert err == "qa: error: no user matches the filter\n"
    assert fake.calls == [("GET", "/users")]


@pytest.mark.parametrize("argv", [
    ["user", "del"], ["user", "set", "blocked=1"], ["di", "tag", "default"], ["di", "untag", "x"],
    ["host", "stop_vms"], ["user", "prop", "a=b"], ["user", "unprop", "a"], ["config", "default"],
    ["config", "del"], ["vm", "disconnect"],
])
def test_every_action_without_filter_is_refused(fake: FakeApi, run: Run, argv: list[str]) -> None:
    rc, _, err = run(*argv)
    assert rc == 2
    assert "without a filter" in err
    assert fake.requests == []


def test_action_without_filter_needs_force(fake: FakeApi, run: Run) -> None:
    rc, _, err = run("vm", "block")
    assert rc == 2
    assert "refusing to block every vm without a filter" in err
    assert "--force" in err
    assert fake.requests == []
    fake.collections["/vms"] = [{"id": 1}]
    fake.routes[("POST", "/vms/1/block")] = httpx.Response(200, json=VMS[0])
    rc, _, _ = run("vm", "block", "--force")
    assert rc == 0
    assert filters_of(fake.last("GET", "/vms")) is None


# --- config ---------------------------------------------------------------------------------------


def test_config_get(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = [{"key": "l7r.port", "value": 8443, "default": 8443, "is_default": True}]
    rc, out, _ = run("config", "key=l7r.port", "get")
    assert rc == 0
    assert filters_of(fake.last("GET", "/configs")) == {"key": "l7r.port"}
    assert out.splitlines()[0].split() == ["key", "value", "default", "is_default"]
    assert out.splitlines()[2].split() == ["l7r.port", "8443", "8443", "true"]


def test_config_get_for_a_tenant(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = []
    run("config", "tenant=acme", "get")
    request = fake.last("GET", "/configs")
    assert request.url.params["tenant"] == "acme"
    assert filters_of(request) is None


def test_config_set(fake: FakeApi, run: Run) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        body = body_of(request)
        return httpx.Response(200, json={"key": request.url.path.rsplit("/", 1)[1], **body})

    fake.routes[("PUT", "/configs/l7r.auth.plugins")] = echo
    fake.routes[("PUT", "/configs/l7r.port")] = echo
    rc, out, _ = run("config", "set", "l7r.auth.plugins=ldap")
    assert rc == 0
    assert fake.calls == [("PUT", "/configs/l7r.auth.plugins")]
    assert body_of(fake.last("PUT", "/configs/l7r.auth.plugins")) == {"value": "ldap", "tenant": None}
    assert out == "config l7r.auth.plugins = ldap\nTotal: 1\n"
    rc, out, _ = run("-f", "json", "config", "set", "l7r.port=8443,", "tenant=acme")
    assert rc == 0
    assert body_of(fake.last("PUT", "/configs/l7r.port")) == {"value": "8443", "tenant": "acme"}
    assert json.loads(out) == [{"key": "l7r.port", "value": "8443", "tenant": "acme"}]


def test_config_set_reports_each_key(fake: FakeApi, run: Run) -> None:
    fake.routes[("PUT", "/configs/l7r.port")] = problem(
        400, "configuration key 'l7r.port' can only be set in the node file", "config-invalid")
    level = {"key": "log.level", "value": "DEBUG"}
    fake.routes[("PUT", "/configs/log.level")] = httpx.Response(200, json=level)
    rc, out, err = run("config", "set", "l7r.port=1,", "log.level=DEBUG")
    assert rc == 1
    assert err == (
        "qa: error: config l7r.port: configuration key 'l7r.port' can only be set in the node file "
        "(HTTP 400)\n"
    )
    assert out == "config log.level = DEBUG\nTotal: 1\n"


def test_config_set_after_a_filter(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = [{"key": "a.x"}, {"key": "a.y"}]
    fake.routes[("PUT", "/configs/a.x")] = httpx.Response(200, json={"key": "a.x", "value": "1"})
    fake.routes[("PUT", "/configs/a.y")] = httpx.Response(200, json={"key": "a.y", "value": "1"})
    rc, _, _ = run("config", "key~a.%", "set", "value=1")
    assert rc == 0
    assert fake.last("GET", "/configs").url.params["fields"] == "key"
    assert fake.calls[1:] == [("PUT", "/configs/a.x"), ("PUT", "/configs/a.y")]


def test_config_default(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = [{"key": "l7r.port"}]
    fake.routes[("DELETE", "/configs/l7r.port")] = httpx.Response(204)
    rc, out, _ = run("config", "l7r.port", "default")
    assert rc == 0
    assert filters_of(fake.last("GET", "/configs")) == {"key": "l7r.port"}
    assert fake.calls == [("GET", "/configs"), ("DELETE", "/configs/l7r.port")]
    assert "tenant" not in fake.last("DELETE", "/configs/l7r.port").url.params
    assert out == "config l7r.port reverted to its default\nTotal: 1\n"


def test_config_default_without_override_is_not_an_error(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = [{"key": "l7r.port"}]
    fake.routes[("DELETE", "/configs/l7r.port")] = problem(
        404, "configuration key 'l7r.port' has no override to remove; it is at its default", "not-found")
    rc, out, err = run("config", "l7r.port", "default")
    assert (rc, err) == (0, "")
    assert out == "config l7r.port is already at its default\nTotal: 1\n"
    rc, out, _ = run("-f", "json", "config", "l7r.port", "default")
    assert rc == 0
    assert json.loads(out) == [{"key": "l7r.port", "is_default": True, "changed": False}]


def test_config_default_other_errors_count(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = [{"key": "l7r.port"}]
    fake.routes[("DELETE", "/configs/l7r.port")] = problem(403, "only platform administrators", "forbidden")
    rc, _, err = run("config", "l7r.port", "default")
    assert rc == 1
    assert err == "qa: error: config l7r.port: only platform administrators (HTTP 403)\n"


def test_config_default_for_a_tenant(fake: FakeApi, run: Run) -> None:
    fake.collections["/configs"] = [{"key": "l7r.port"}]
    fake.routes[("DELETE", "/configs/l7r.port")] = httpx.Response(204)
    rc, _, _ = run("config", "l7r.port,", "tenant=acme", "default")
    assert rc == 0
    assert fake.last("GET", "/configs").url.params["tenant"] == "acme"
    assert fake.last("DELETE", "/configs/l7r.port").url.params["tenant"] == "acme"


# --- errors ---------------------------------------------------------------------------------------


def test_problem_json_error(fake: FakeApi, run: Run) -> None:
    fake.routes[("POST", "/users")] = problem(409, "user 'alice' already exists in tenant 'default'",
                                             "already-exists")
    rc, out, err = run("user", "new", "name=alice,", "password=secret")
    assert (rc, out) == (1, "")
    assert err == "qa: error: user 'alice' already exists in tenant 'default' (HTTP 409)\n"
    assert fake.requests[-1].url.path == "/api/v1/logout"


def test_fastapi_validation_error(fake: FakeApi, run: Run) -> None:
    fake.routes[("POST", "/users")] = httpx.Response(
        422, json={"detail": [{"loc": ["body", "name"], "msg": "field required", "type": "missing"}]})
    rc, _, err = run("user", "new", "password=x")
    assert rc == 1
    assert err == "qa: error: name: field required (HTTP 422)\n"


def test_non_json_error(fake: FakeApi, run: Run) -> None:
    fake.routes[("GET", "/users")] = httpx.Response(502, text="Bad Gateway from the proxy")
    rc, _, err = run("user", "get")
    assert rc == 1
    assert err == "qa: error: Bad Gateway from the proxy (HTTP 502)\n"


def test_wrong_password(fake: FakeApi, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVD_ADMIN_PASSWORD", "wrong")
    rc, _, err = run("user", "get")
    assert rc == 1
    assert err == "qa: error: wrong login or password (HTTP 401)\n"
    assert fake.calls == []


def test_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    rc = main(["--url", "http://10.9.9.9:8080", "vm", "get"], transport=httpx.MockTransport(refuse))
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("qa: error: cannot reach the QVD API at http://10.9.9.9:8080: ")
    assert "Connection refused" in err


def test_connection_refused_for_real(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    rc = main(["--url", f"http://127.0.0.1:{port}", "vm", "get"])
    assert rc == 1
    assert f"cannot reach the QVD API at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    rc = main(["vm", "get"], transport=httpx.MockTransport(slow))
    assert rc == 1
    assert "did not answer in time" in capsys.readouterr().err


def test_login_answer_without_token(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["vm", "get"], transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})))
    assert rc == 1
    assert "login answer has no token" in capsys.readouterr().err


def test_syntax_error_exits_2_without_a_request(fake: FakeApi, run: Run) -> None:
    rc, out, err = run("vm", "desk1", "foo")
    assert (rc, out) == (2, "")
    assert err == (
        "qa: syntax error at 'foo': expected a verb (get, new, set, del, block, unblock, start, stop, "
        "disconnect, prop, unprop)\n"
    )
    assert fake.requests == []


# --- options --------------------------------------------------------------------------------------


def test_version(run: Run) -> None:
    rc, out, _ = run("--version")
    assert (rc, out) == (0, f"qa {qvd.__version__}\n")


def test_help(run: Run) -> None:
    rc, out, _ = run("--help")
    assert rc == 0
    assert "qa [options] <object> [<filters>] <verb>" in out
    for obj in qa.RESOURCES:
        assert obj in out


def test_no_command(run: Run) -> None:
    rc, _, err = run()
    assert rc == 2
    assert "no command given" in err


def test_bad_option(run: Run) -> None:
    rc, _, err = run("--bogus", "vm", "get")
    assert rc == 2
    assert "unrecognized arguments: --bogus" in err
    rc, _, err = run("--format", "csv", "vm", "get")
    assert rc == 2
    assert "invalid choice" in err


def test_options_anywhere_and_double_dash() -> None:
    opts = parse_options(["vm", "desk1", "get", "--format", "json", "--force"])
    assert (opts.command, opts.format, opts.force) == (["vm", "desk1", "get"], "json", True)
    opts = parse_options(["-f", "json", "--", "user", "-bob", "get"])
    assert opts.command == ["user", "-bob", "get"]
    assert opts.format == "json"


def test_url_with_api_prefix(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = []
    rc, _, _ = run("--url", "https://qvd.example.com:8443/api/v1/", "vm", "get")
    assert rc == 0
    assert str(fake.requests[0].url) == "https://qvd.example.com:8443/api/v1/login"


def test_tenant_and_login_options(fake: FakeApi, run: Run) -> None:
    fake.collections["/vms"] = []
    run("-l", "bob", "-t", "acme", "vm", "get")
    assert body_of(fake.requests[0]) == {"login": "bob", "password": "secret", "tenant": "acme"}


# --- settings -------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def settings_for(*argv: str) -> Settings:
    return load_settings(parse_options([*argv, "vm", "get"]), warn=lambda m: None)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QVD_ADMIN_PASSWORD")
    assert settings_for() == Settings()
    assert Settings().url == "http://127.0.0.1:8080"
    assert Settings().login == "admin"


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QVD_ADMIN_PASSWORD")
    write(tmp_path / "root" / "etc" / "qa.toml",
          'url = "http://root:1"\nlogin = "root-admin"\npassword = "root-pw"\ntenant = "t-root"\n'
          'format = "json"\n')
    assert settings_for() == Settings(url="http://root:1", login="root-admin", password="root-pw",
                                      tenant="t-root", format="json")
    write(tmp_path / "home" / ".config" / "qvd" / "qa.toml", 'url = "http://home:2"\nlogin = "home-admin"\n')
    assert settings_for() == Settings(url="http://home:2", login="home-admin", password="root-pw",
                                      tenant="t-root", format="json")
    monkeypatch.setenv("QVD_API_URL", "http://env:3")
    monkeypatch.setenv("QVD_ADMIN_PASSWORD", "env-pw")
    assert settings_for() == Settings(url="http://env:3", login="home-admin", password="env-pw",
                                      tenant="t-root", format="json")
    monkeypatch.setenv("QVD_ADMIN_LOGIN", "env-admin")
    cli = ("--url", "http://cli:4", "-p", "cli-pw", "--format", "table", "--tenant", "t-cli")
    assert settings_for(*cli) == (
        Settings(url="http://cli:4", login="env-admin", password="cli-pw", tenant="t-cli", format="table")
    )


def test_root_option_beats_env(tmp_path: Path) -> None:
    write(tmp_path / "other" / "etc" / "qa.toml", 'url = "http://other:1"\n')
    assert settings_for("--root", str(tmp_path / "other")).url == "http://other:1"


def test_insecure_from_file_and_option(tmp_path: Path) -> None:
    assert settings_for().insecure is False
    assert settings_for("--insecure").insecure is True
    write(tmp_path / "home" / ".config" / "qvd" / "qa.toml", "insecure = true\n")
    assert settings_for().insecure is True


def test_settings_reach_the_requests(
    fake: FakeApi, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QVD_ADMIN_PASSWORD")
    write(tmp_path / "root" / "etc" / "qa.toml",
          'url = "http://qvd-api.test:9000"\nlogin = "ops"\npassword = "secret"\nformat = "json"\n')
    fake.collections["/users"] = []
    rc, out, _ = run("user", "get")
    assert rc == 0
    assert str(fake.requests[0].url) == "http://qvd-api.test:9000/api/v1/login"
    assert body_of(fake.requests[0])["login"] == "ops"
    assert json.loads(out) == []


def test_invalid_toml_names_the_file(run: Run, tmp_path: Path) -> None:
    bad = write(tmp_path / "home" / ".config" / "qvd" / "qa.toml", "url = http://no-quotes\n")
    rc, _, err = run("vm", "get")
    assert rc == 1
    assert err.startswith(f"qa: error: {bad} is not valid TOML")


def test_unreadable_file_names_it(run: Run, tmp_path: Path) -> None:
    # A directory where the file should be is unreadable for every user, root included.
    path = tmp_path / "root" / "etc" / "qa.toml"
    path.mkdir()
    rc, _, err = run("vm", "get")
    assert rc == 1
    assert err.startswith(f"qa: error: cannot read {path}")


def test_not_utf8_names_the_file(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "root" / "etc" / "qa.toml"
    path.write_bytes(b'url = "\xff"\n')
    rc, _, err = run("vm", "get")
    assert rc == 1
    assert str(path) in err


@pytest.mark.parametrize(("text", "message"), [
    ("url = 8080\n", "'url' must be a string, not 8080"),
    ('insecure = "yes"\n', "'insecure' must be true or false, not 'yes'"),
    ('format = "csv"\n', "'format' must be one of table, json, not 'csv'"),
])
def test_wrong_values_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "qa.toml", text)
    with pytest.raises(QaError) as info:
        read_qa_toml(path, warn=lambda m: None)
    assert str(info.value) == f"{path}: {message}"


def test_unknown_keys_warn(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.toml", 'url = "http://x"\nca = "/etc/ca.pem"\n')
    warnings: list[str] = []
    assert read_qa_toml(path, warn=warnings.append) == {"url": "http://x"}
    known = "url, login, password, tenant, format, insecure"
    assert warnings == [f"{path}: unknown key 'ca' ignored (known: {known})"]


def test_world_readable_password_warns(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.toml", 'password = "x"\n')
    path.chmod(0o644)
    warnings: list[str] = []
    read_qa_toml(path, warn=warnings.append)
    assert warnings and "every local user can read it" in warnings[0]


def test_missing_file_is_fine(tmp_path: Path) -> None:
    assert read_qa_toml(tmp_path / "nope.toml", warn=lambda m: None) == {}


# --- password prompt ------------------------------------------------------------------------------


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_prompts_on_a_terminal(fake: FakeApi, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QVD_ADMIN_PASSWORD")
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return "secret"

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    monkeypatch.setattr(sys, "stdin", _Tty(True))
    fake.collections["/vms"] = []
    rc, _, _ = run("vm", "get")
    assert rc == 0
    assert prompts == ["Password for admin at http://127.0.0.1:8080: "]
    assert body_of(fake.requests[0])["password"] == "secret"


def test_no_password_without_a_terminal(fake: FakeApi, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QVD_ADMIN_PASSWORD")
    monkeypatch.setattr(sys, "stdin", _Tty(False))
    rc, _, err = run("vm", "get")
    assert rc == 1
    assert "no password" in err
    assert fake.requests == []


# --- pieces ---------------------------------------------------------------------------------------


def test_render_table() -> None:
    text = render_table(
        ["id", "name", "tags", "properties", "blocked"],
        [{"id": 1, "name": "a", "tags": ["default", "head"], "properties": {"k": "v"}, "blocked": False},
         {"id": 100, "name": "long name", "blocked": None}],
    )
    assert text.splitlines() == [
        " id  name       tags           properties  blocked",
        "---  ---------  -------------  ----------  -------",
        "  1  a          default, head  k=v         false",
        "100  long name",
    ]


def test_render_empty_table() -> None:
    assert render_table(["id", "name"], []).splitlines() == ["id  name", "--  ----"]


def test_api_client_pages_stop_on_empty_page() -> None:
    # A server whose total is wrong must not make the client loop for ever.
    def handler(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params.get("offset", "0"))
        items = [{"id": 1}] if offset == 0 else []
        return httpx.Response(200, json={"total": 5, "items": items})

    with ApiClient("http://x", transport=httpx.MockTransport(handler)) as client:
        assert client.list_all("/vms", {}) == ([{"id": 1}], 5)


def test_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qvd.cli.qa", "--version"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, f"qa {qvd.__version__}\n")
