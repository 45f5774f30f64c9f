"""LDAP users through the real L7R, against a real ``slapd`` started by the test (loopback only),
on SQLite and PostgreSQL.  The node daemon, the desktop agent and nxagent are played by the
test (tests/unit/l7r/harness.py): what the agent receives in ``x_start`` is checked.

* search then bind with a service account, StartTLS, a group restriction;
* direct bind over LDAPS;
* a new LDAP user auto-provisioned (user + VM, audited as ``l7r:node1``) and connected;
* the LDAP identity (uid, uidNumber, gidNumber, homeDirectory) reaches the desktop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from qvd.db.models import AuditEntry, LoginFailure, Tenant, User, Vm
from tests.conftest import NodeFx
from tests.unit.auth import slapd
from tests.unit.auth.rig import basic, connect_vm, get, login_status, start_rig
from tests.unit.l7r.harness import Rig, World


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slapd.Slapd]:
    why = slapd.available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    server = slapd.Slapd(Path(tmp_path_factory.mktemp("slapd"))).start()
    try:
        yield server
    finally:
        server.cleanup()


def add_users(node: NodeFx, tenant: str, *logins: str) -> None:
    """Users known to QVD but without a password: only the directory can let them in."""
    with node.factory() as s, s.begin():
        tid = s.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
        for login in logins:
            s.add(User(tenant_id=tid, login=login))


def give_vm(node: NodeFx, world: World, login: str, tenant: str = "default", name: str | None = None) -> int:
    from qvd.db.models import Osf, VmRuntime

    with node.factory() as s, s.begin():
        user = s.scalars(select(User).join(Tenant).where(User.login == login, Tenant.name == tenant)).one()
        osf = s.scalars(select(Osf).where(Osf.tenant_id == user.tenant_id, Osf.name == "desktop")).one()
        n = s.scalar(select(func.count(Vm.id))) or 0
        vm = Vm(name=name or f"{login}-desk", user_id=user.id, osf_id=osf.id, ip=f"10.231.1.{n + 10}")
        vm.runtime = VmRuntime()
        s.add(vm)
        s.flush()
        world.vms[vm.name] = vm.id
        return vm.id


@pytest.fixture
def ldap_rig(node: NodeFx, directory: slapd.Slapd) -> Iterator[Rig]:
    def setup(world: World) -> None:
        add_users(node, "default", "lara", "otto", "sam")
        give_vm(node, world, "lara")
        add_users(node, "acme", "otto")

    tenants = {
        # Search then bind, service account, StartTLS, only members of qvdusers.
        "default": {"l7r.auth.plugins": "ldap", "auth.ldap.host": directory.url, "auth.ldap.starttls": "1",
                    "auth.ldap.ca": str(directory.ca_file), "auth.ldap.base": slapd.SUFFIX,
                    "auth.ldap.binddn": slapd.SERVICE_DN, "auth.ldap.bindpass": slapd.SERVICE_PW,
                    "auth.ldap.group": slapd.GROUP, "l7r.auth.lockout.delay": "0"},
        # Direct bind over LDAPS.
        "acme": {"l7r.auth.plugins": "ldap", "auth.ldap.host": directory.ldaps_url,
                 "auth.ldap.ca": str(directory.ca_file), "auth.ldap.userbindpattern": f"uid=%u,{slapd.PEOPLE}",
                 "l7r.auth.lockout.delay": "0"},
    }
    yield from start_rig(node, tenants=tenants, setup=setup)


def test_ldap_users_log_in_and_get_their_identity_in_the_desktop(ldap_rig: Rig) -> None:
    rig = ldap_rig
    status, body = login_status(rig, "lara", "larapw")
    assert status == 200 and [v["name"] for v in json.loads(body)] == ["lara-desk"]
    c = rig.client()
    status, _ = connect_vm(c, rig.world.vms["lara-desk"], basic("lara", "larapw"))
    assert status == 101
    params = rig.vma.x_starts()[-1]
    assert {k: params.get(k) for k in ("qvd.vm.user.name", "qvd.vm.user.uid", "qvd.vm.user.gid",
                                       "qvd.vm.user.home")} == {
        "qvd.vm.user.name": "lara", "qvd.vm.user.uid": "20001", "qvd.vm.user.gid": "20001",
        "qvd.vm.user.home": "/home/lara"}
    c.close()


def test_ldap_refusals(ldap_rig: Rig) -> None:
    rig = ldap_rig
    assert login_status(rig, "lara", "wrong")[0] == 401
    assert login_status(rig, "lara", "")[0] == 401
    assert login_status(rig, "otto", "ottopw")[0] == 401  # right password, not in the group
    assert login_status(rig, "*", "larapw")[0] == 401  # no filter injection
    assert login_status(rig, "la*", "larapw")[0] == 401
    assert login_status(rig, "lara)(uid=*", "larapw")[0] == 401
    # sam lives in a branch only the service account can search.
    assert login_status(rig, "sam", "sampw")[0] == 200
    # Direct bind over LDAPS in acme: otto is fine there (no group restriction).
    assert login_status(rig, "otto@acme", "ottopw")[0] == 200
    assert login_status(rig, "otto@acme", "larapw")[0] == 401
    assert login_status(rig, "lara@acme", "larapw")[0] == 401  # in the directory, not a QVD user of acme


def test_a_token_minted_by_an_ldap_user_keeps_the_identity(ldap_rig: Rig) -> None:
    rig = ldap_rig
    c = rig.client()
    status, body = get(c, "/qvd/create_auth_token?multi_use=1", basic("lara", "larapw"))
    assert status == 200
    bearer = "Bearer " + json.loads(body)["auth_token"].strip()
    c.close()
    c = rig.client()
    assert connect_vm(c, rig.world.vms["lara-desk"], bearer)[0] == 101
    assert rig.vma.x_starts()[-1]["qvd.vm.user.uid"] == "20001"
    c.close()


def test_a_wrong_service_password_is_an_outage_not_a_user_failure(node: NodeFx, directory: slapd.Slapd) -> None:
    tenants = {"default": {"l7r.auth.plugins": "ldap", "auth.ldap.host": directory.url,
                           "auth.ldap.base": slapd.SUFFIX, "auth.ldap.binddn": slapd.SERVICE_DN,
                           "auth.ldap.bindpass": "not-the-password", "l7r.auth.lockout.max_failures": "1"}}
    for rig in start_rig(node, tenants=tenants, setup=lambda _w: add_users(node, "default", "lara")):
        for _ in range(3):
            assert login_status(rig, "lara", "larapw")[0] == 401
        assert login_status(rig, "alice", "secret")[0] == 200  # the default plugin still works
        with node.factory() as s:
            assert s.scalars(select(LoginFailure)).all() == []


def test_a_new_ldap_user_is_auto_provisioned_and_connects(node: NodeFx, directory: slapd.Slapd) -> None:
    tenants = {"default": {"l7r.auth.plugins": "auto,ldap", "auth.ldap.host": directory.ldaps_url,
                           "auth.ldap.ca": str(directory.ca_file), "auth.ldap.base": slapd.PEOPLE,
                           "auth.ldap.scope": "one", "auth.ldap.group": slapd.GROUP,
                           "auth.auto.osf": "desktop", "auth.auto.di_tag": "default", "auth.auto.max_vms": "1"}}
    for rig in start_rig(node, tenants=tenants):
        assert login_status(rig, "otto", "ottopw")[0] == 401  # not in the group: nothing provisioned
        with node.factory() as s:
            assert s.scalar(select(User.id).where(User.login == "otto")) is None
        status, body = login_status(rig, "nina", "ninapw")
        assert status == 200
        vms = json.loads(body)
        assert [v["name"] for v in vms] == ["nina-1"]
        with node.factory() as s:
            nina = s.scalars(select(User).where(User.login == "nina")).one()
            assert nina.password_hash is None and nina.tenant.name == "default"
            audit = s.execute(select(AuditEntry.action, AuditEntry.admin_name, AuditEntry.object_name,
                                     AuditEntry.status, AuditEntry.source)
                              .where(AuditEntry.action.in_(["user.create", "vm.create"]))).all()
        assert sorted(tuple(a) for a in audit) == [("user.create", "l7r:node1", "nina", "ok", "l7r"),
                                                   ("vm.create", "l7r:node1", "nina-1", "ok", "l7r")]
        # Second login: nothing new; the desktop starts with the directory's identity.
        c = rig.client()
        status, _ = connect_vm(c, vms[0]["id"], basic("nina", "ninapw"))
        assert status == 101
        params = rig.vma.x_starts()[-1]
        assert (params["qvd.vm.user.name"], params["qvd.vm.user.uid"], params["qvd.vm.user.home"]) == (
            "nina", "20003", "/home/users/nina")
        c.close()
        with node.factory() as s:
            assert s.scalar(select(func.count(Vm.id)).where(Vm.user_id == nina.id)) == 1
        # The default plugin never accepts the provisioned user (no password in QVD).
        assert login_status(rig, "nina", "")[0] == 401


def test_certificates_are_verified(directory: slapd.Slapd) -> None:
    from qvd.core.errors import Unavailable
    from qvd.l7r.auth.ldap import LdapDirectory, LdapSettings

    def try_login(url: str, *, ca: bool = True, starttls: bool = False) -> object:
        settings = LdapSettings(urls=(url,), base=slapd.SUFFIX, ca=str(directory.ca_file) if ca else "",
                                starttls=starttls, timeout=3)
        return LdapDirectory(settings).authenticate("lara", "larapw")

    assert try_login(directory.ldaps_url) is not None
    assert try_login(directory.url, starttls=True) is not None
    with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
        try_login(directory.ldaps_url, ca=False)  # self-signed CA unknown to the system
    # The certificate names 127.0.0.1 only: "localhost" must not be accepted, with LDAPS or StartTLS.
    with pytest.raises(Unavailable, match="doesn't match"):
        try_login(directory.ldaps_url.replace("127.0.0.1", "localhost"))
    with pytest.raises(Unavailable, match="doesn't match"):
        try_login(directory.url.replace("127.0.0.1", "localhost"), starttls=True)
