"""A misconfigured or missing plugin stops the L7R at start, naming the tenant and the key,
never at a user's login; plugins are found by name (entry points ``qvd.auth``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from qvd.core.config import Config
from qvd.core.errors import ConfigError, Forbidden
from qvd.core.secretbox import key_path
from qvd.db.models import Tenant, User
from qvd.l7r.auth import chain as chain_mod
from qvd.l7r.auth.base import Attempt, AuthPlugin, Identity, VmInfo
from qvd.l7r.auth.chain import resolve_plugin_class
from qvd.services import totp
from qvd.services.base import SYSTEM
from tests.conftest import NodeFx
from tests.unit.auth.rig import login_status, start_rig
from tests.unit.l7r.harness import Rig


def start_error(node: NodeFx, **kw: Any) -> str:
    with pytest.raises(ConfigError) as e:
        for _ in start_rig(node, **kw):
            pytest.fail("the L7R started")
    return e.value.message


def test_builtin_plugins_are_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="qvd.auth")}
    assert {"default", "ldap", "auto", "totp"} <= names
    for n in ("default", "ldap", "auto", "totp"):
        assert resolve_plugin_class(n).name == n
    with pytest.raises(ConfigError, match=r"unknown authentication plugin 'nope'.*known: auto, default, ldap, totp"):
        resolve_plugin_class("nope")


def test_unknown_plugin_of_one_tenant_stops_the_start(node: NodeFx) -> None:
    msg = start_error(node, tenants={"acme": {"l7r.auth.plugins": "radius"}})
    assert "unknown authentication plugin 'radius'" in msg


def test_ldap_without_host_in_one_tenant_stops_the_start(node: NodeFx) -> None:
    msg = start_error(node, tenants={"acme": {"l7r.auth.plugins": "ldap"}})
    assert "'ldap' of tenant 'acme'" in msg and "auth.ldap.host is not set" in msg and "auth.ldap.base" in msg


def test_ldap_global_chain_checks_every_tenant(node: NodeFx) -> None:
    # Global chain with ldap; only acme has a directory: the default tenant is misconfigured.
    msg = start_error(node, config={"l7r.auth.plugins": "ldap"},
                      tenants={"acme": {"auth.ldap.host": "ldap://127.0.0.1:1", "auth.ldap.base": "dc=x"}})
    assert "tenant 'default'" in msg


@pytest.mark.parametrize(("values", "expected"), [
    ({"auth.ldap.host": "http://x", "auth.ldap.base": "dc=x"}, "not an ldap:// or ldaps:// URL"),
    ({"auth.ldap.host": "ldaps://x", "auth.ldap.base": "dc=x", "auth.ldap.starttls": "1"}, "already ldaps://"),
    ({"auth.ldap.host": "ldap://x", "auth.ldap.userbindpattern": "uid=alice,dc=x"}, "must contain %u"),
    ({"auth.ldap.host": "ldap://x", "auth.ldap.base": "dc=x", "auth.ldap.filter": "(cn=bob)"}, "must contain %u"),
    ({"auth.ldap.host": "ldap://x", "auth.ldap.base": "dc=x", "auth.ldap.ca": "/nonexistent.pem"}, "not a file"),
    ({"auth.ldap.host": "ldap://x", "auth.ldap.base": "dc=x", "auth.ldap.scope": "deep"}, "auth.ldap.scope"),
])
def test_ldap_settings_are_checked(node: NodeFx, values: dict[str, str], expected: str) -> None:
    msg = start_error(node, tenants={"acme": {"l7r.auth.plugins": "ldap", **values}})
    assert expected in msg


def test_auto_needs_an_existing_osf_and_tag(node: NodeFx) -> None:
    assert "auth.auto.osf is not set" in start_error(node, tenants={"acme": {"l7r.auth.plugins": "auto"}})


@pytest.mark.parametrize(("values", "expected"), [
    ({"auth.auto.osf": "nosuch"}, "no OSF named 'nosuch'"),
    ({"auth.auto.osf": "desktop", "auth.auto.di_tag": "testing"}, "no disk image tagged 'testing'"),
])
def test_auto_settings_are_checked(node: NodeFx, values: dict[str, str], expected: str) -> None:
    assert expected in start_error(node, tenants={"acme": {"l7r.auth.plugins": "auto", **values}})


def test_auto_with_users_only_and_good_settings_start(node: NodeFx) -> None:
    tenants = {"acme": {"l7r.auth.plugins": "auto", "auth.auto.max_vms": "0"},
               "default": {"l7r.auth.plugins": "auto", "auth.auto.osf": "desktop"}}
    for rig in start_rig(node, tenants=tenants):
        assert login_status(rig, "alice", "secret")[0] == 200


def test_totp_with_another_key_file_stops_the_start(node: NodeFx, monkeypatch: pytest.MonkeyPatch) -> None:
    from qvd.core import secretbox

    def enrol(_w: Any) -> None:
        with node.factory() as s:
            uid = s.scalars(select(User.id).where(User.login == "alice")).one()
        totp.enable_totp(node.factory, SYSTEM, node.cfg, node.paths, uid)
        # This node got another cluster's key file.
        path = key_path(node.paths)
        path.write_text("11" * 32 + "\n")
        monkeypatch.setattr(secretbox, "_boxes", {})  # the L7R is another process: no key cached

    msg = start_error(node, tenants={"default": {"l7r.auth.plugins.head": "totp"}}, setup=enrol)
    assert "TOTP secrets cannot be opened on this node" in msg and "copy the secret key" in msg


def test_a_bad_tenant_value_stops_the_start(node: NodeFx) -> None:
    with node.factory() as s, s.begin():
        from qvd.db.models import ConfigRow

        acme = s.scalars(select(Tenant.id).where(Tenant.name == "default")).one()
        s.add(ConfigRow(tenant_id=acme, key="l7r.auth.lockout.max_failures", value="many"))
    msg = start_error(node)
    assert "l7r.auth.lockout.max_failures" in msg and "many" in msg


# --- a plugin of our own, as in docs/auth-plugins.md ------------------------------------------------


class OfficeHoursPlugin(AuthPlugin):
    """Refuses connections to desktops outside office hours; adds a VMA parameter."""

    name = "officehours"
    open_now = True

    def check_config(self, cfg: Config, tenant_id: int | None) -> None:
        if cfg.get_int("l7r.auth.lockout.max_failures") > 50:
            raise ConfigError("l7r.auth.lockout.max_failures is absurdly high")

    def authenticate_basic(self, attempt: Attempt, cfg: Config) -> bool | None:
        attempt.params["qvd.custom.office"] = "hq"
        return None  # no opinion: the next plugin checks the password

    def before_connect_to_vm(self, identity: Identity, vm: VmInfo, params: dict[str, str], cfg: Config) -> None:
        if not self.open_now:
            raise Forbidden("desktops are closed outside office hours")


@pytest.fixture
def officehours(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[OfficeHoursPlugin]]:
    monkeypatch.setattr(chain_mod, "BUILTIN_PLUGINS",
                        {**chain_mod.BUILTIN_PLUGINS, "officehours": f"{__name__}:OfficeHoursPlugin"})
    yield OfficeHoursPlugin


def test_a_third_party_plugin_by_name(node: NodeFx, officehours: type[OfficeHoursPlugin]) -> None:
    from tests.unit.l7r.test_broker import connect

    for rig in start_rig(node, tenants={"default": {"l7r.auth.plugins": "officehours"}}):
        rig_: Rig = rig
        c = rig_.client()
        status = connect(c, rig_.world.vms["alice-1"])[2]
        assert status == 101
        assert rig_.vma.x_starts()[-1]["qvd.custom.office"] == "hq"
        c.close()
        officehours.open_now = False
        try:
            c = rig_.client()
            _i, _head, status, _h, body = connect(c, rig_.world.vms["alice-2"])
            assert status == 503 and b"outside office hours" in body
            c.close()
        finally:
            officehours.open_now = True


def test_a_third_party_plugin_refusing_its_settings(node: NodeFx, officehours: type[OfficeHoursPlugin]) -> None:
    msg = start_error(node, tenants={"default": {"l7r.auth.plugins": "officehours",
                                                 "l7r.auth.lockout.max_failures": "99"}})
    assert "'officehours' of tenant 'default'" in msg and "absurdly high" in msg
