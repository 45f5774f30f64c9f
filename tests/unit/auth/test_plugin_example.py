"""docs/auth-plugins.md stays true: its example plugin runs in the real L7R, and its ``qa``
commands parse and set valid configuration through the real API."""

from __future__ import annotations

import base64
import json
import re
import shlex
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from qvd.cli import qa
from qvd.cli.qa_grammar import parse
from qvd.db.models import ObjectType, Property, User
from qvd.l7r.auth import chain as chain_mod
from tests.conftest import NodeFx, RunningApi
from tests.unit.auth.rig import basic, start_rig
from tests.unit.l7r.harness import Rig

DOC = Path(__file__).resolve().parents[3] / "docs" / "auth-plugins.md"


def doc_block(marker: str, lang: str) -> str:
    text = DOC.read_text()
    m = re.search(rf"{re.escape(marker)}\s*```{lang}\n(.*?)```", text, re.S)
    assert m, f"no {lang} block after {marker} in {DOC}"
    return m.group(1)


@pytest.fixture
def device_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    module = types.ModuleType("qvd_doc_example_device")
    exec(compile(doc_block("<!-- example:device -->", "python"), str(DOC), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(chain_mod, "BUILTIN_PLUGINS",
                        {**chain_mod.BUILTIN_PLUGINS, "device": f"{module.__name__}:DevicePlugin"})
    yield


def device_header(device: str) -> str:
    return f"Auth-{b'device'.hex()}: {base64.b64encode(device.encode()).decode()}"


def test_the_documented_example_plugin(node: NodeFx, device_plugin: None) -> None:
    def setup(_w: object) -> None:
        with node.factory() as s, s.begin():
            alice = s.scalars(select(User.id).where(User.login == "alice")).one()
            s.add(Property(object_type=ObjectType.USER, object_id=alice, key="auth.devices", value="laptop-1, pc-7"))

    for rig in start_rig(node, tenants={"default": {"l7r.auth.plugins": "device"}}, setup=setup):
        def status(login: str, device: str | None, rig: Rig = rig) -> int:
            c = rig.client()
            c.request("/qvd/list_of_vm", basic(login, "secret"), extra=[device_header(device)] if device else [])
            code = c.read_response()[1]
            c.close()
            return code

        assert status("alice", "pc-7") == 200
        assert status("alice", "phone") == 401
        assert status("alice", None) == 401
        assert status("bob", None) == 200  # no property: no restriction
        c = rig.client()
        c.request(f"/qvd/connect_to_vm?id={rig.world.vms['alice-1']}", basic("alice", "secret"), upgrade=True,
                  extra=[device_header("laptop-1")])
        assert c.read_until_final()[2] == 101
        assert rig.vma.x_starts()[-1]["qvd.custom.device"] == "laptop-1"
        c.close()


def test_the_documented_qa_commands(api: RunningApi, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVD_ROOT", str(tmp_path / "empty-root"))
    monkeypatch.setenv("HOME", str(tmp_path))
    lines = [ln.split("#")[0].strip() for ln in doc_block("## Example: LDAP, provisioning and TOTP for a tenant", "sh")
             .splitlines()]
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("qa ")]
    assert len(commands) >= 10
    for words in commands:
        parse([w for w in words if not w.startswith("--qr-png") and not w.endswith(".png")])
    assert api.client().post("/api/v1/tenants", json={"name": "acme"}).status_code == 201
    for words in commands:
        if words[:2] != ["config", "set"]:
            continue
        code = qa.main(["--url", api.url, "--login", "admin", f"--password={api.node.admin_password}", *words])
        _out, err = capsys.readouterr()
        assert code == 0, (words, err)
    code = qa.main(["--url", api.url, "--login", "admin", f"--password={api.node.admin_password}", "-f", "json",
                    "config", "tenant=acme", "get"])
    values = {r["key"]: r["value"] for r in json.loads(capsys.readouterr()[0])}
    assert values["l7r.auth.plugins"] == "totp,auto,ldap"
    assert values["auth.ldap.base"] == "ou=people,dc=acme,dc=example"
    assert values["auth.ldap.group"] == "cn=desktop-users,ou=groups,dc=acme,dc=example"
    assert values["l7r.auth.plugin.totp.optional"] in (False, "false", "0", 0)
