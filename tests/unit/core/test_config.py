from __future__ import annotations

from pathlib import Path

import pytest

from qvd.core.config import KEYS, Config, Paths, load_node_config, parse_value, resolve_root
from qvd.core.errors import ConfigError


def test_defaults_are_valid_for_their_keys() -> None:
    for name, k in KEYS.items():
        assert parse_value(name, k.default) == k.default or k.kind in ("list", "ipv4"), name


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("l7r.port", "8443", 8443),
        ("l7r.port", 9000, 9000),
        ("l7r.use_ssl", "off", False),
        ("l7r.use_ssl", 1, True),
        ("internal.hkd.agent.ticker.delay", "0.5", 0.5),
        ("vm.network.ip.start", " 10.1.0.10 ", "10.1.0.10"),
        ("vm.hypervisor", "lxc", "lxc"),
        ("l7r.auth.plugins", ["ldap", "totp"], "ldap,totp"),
    ],
)
def test_parse_good(key: str, raw: object, value: object) -> None:
    assert parse_value(key, raw) == value


@pytest.mark.parametrize(
    ("key", "raw", "expect"),
    [
        ("l7r.port", "abc", "an integer from 1 to 65535"),
        ("l7r.port", 70000, "an integer from 1 to 65535"),
        ("l7r.port", True, "an integer"),
        ("l7r.use_ssl", "maybe", "a boolean"),
        ("vm.network.ip.start", "10.0.0.300", "an IPv4 address"),
        ("vm.hypervisor", "xen", "one of lxc, kvm, fake"),
    ],
)
def test_parse_bad_names_key_value_and_allowed(key: str, raw: object, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_value(key, raw)
    msg = str(e.value)
    assert key in msg and repr(raw) in msg and expect in msg


def test_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown configuration key 'l7r.prot'.*'l7r.port'"):
        parse_value("l7r.prot", 1)


def test_node_file_dotted_and_tables(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "node.toml").write_text('l7r.port = 9443\n[vm.network]\nbridge = "br9"\n')
    cfg = load_node_config(tmp_path)
    assert cfg.get_int("l7r.port") == 9443
    assert cfg.get_str("vm.network.bridge") == "br9"
    assert cfg.get_int("api.port") == 8080


def test_node_file_errors(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    f = tmp_path / "etc" / "node.toml"
    f.write_text("l7r.port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config(tmp_path)
    f.write_text('l7r.port = "x"\n')
    with pytest.raises(ConfigError, match=r"node file: invalid value 'x' for configuration key 'l7r.port'"):
        load_node_config(tmp_path)


def test_layers_node_only_and_tenant() -> None:
    base = Config()
    with pytest.raises(ConfigError, match="only be set in the node file"):
        base.overlay({"database.url": "x"}, source="database (global)")
    with pytest.raises(ConfigError, match="cannot be set per tenant"):
        base.overlay({"l7r.loadbalancer.plugin": "x"}, source="database (tenant 1)", tenant=True)
    t = base.overlay({"auth.ldap.host": "ldap://127.0.0.1"}, source="database (tenant 1)", tenant=True)
    assert t.get_str("auth.ldap.host") == "ldap://127.0.0.1"
    assert base.get_str("auth.ldap.host") == ""


def test_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QVD_ROOT", raising=False)
    assert str(resolve_root(None)) == "/var/lib/qvd"
    monkeypatch.setenv("QVD_ROOT", str(tmp_path))
    assert resolve_root(None) == tmp_path
    assert resolve_root(str(tmp_path / "x")) == tmp_path / "x"


def test_shared_storage_paths_come_from_the_node_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    default = Paths.for_node(root, Config())
    assert default.images == root / "storage" / "images" and default.homes == root / "storage" / "homes"
    cfg = Config().overlay({"path.storage.images": "/srv/qvd/images", "path.storage.homes": "/srv/qvd/homes"},
                           source="node file")
    shared = Paths.for_node(root, cfg)
    assert shared.images == Path("/srv/qvd/images") and shared.homes == Path("/srv/qvd/homes")
    assert shared.etc == root / "etc"


def test_relative_shared_storage_path_is_refused(tmp_path: Path) -> None:
    cfg = Config().overlay({"path.storage.homes": "homes"}, source="node file")
    with pytest.raises(ConfigError, match=r"path\.storage\.homes"):
        Paths.for_node(tmp_path, cfg)
