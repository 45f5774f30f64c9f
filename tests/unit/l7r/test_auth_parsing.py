"""Credentials on the wire: Basic (with tenant separators), Bearer, Auth-* extras; plugin lookup."""

from __future__ import annotations

import base64

import pytest

from qvd.core.config import Config
from qvd.core.errors import AuthenticationFailed, ConfigError
from qvd.l7r.auth.base import AuthPlugin
from qvd.l7r.auth.chain import plugin_names, resolve_plugin_class
from qvd.l7r.auth.credentials import BasicCredentials, BearerCredentials, parse_auth_extras, parse_authorization
from qvd.l7r.auth.default import DefaultPlugin, split_login


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_basic() -> None:
    assert parse_authorization("Basic " + b64("alice:secret")) == BasicCredentials("alice", "secret")
    # scheme case-insensitive, password may contain ':'
    assert parse_authorization("basic " + b64("alice@acme:a:b")) == BasicCredentials("alice@acme", "a:b")


def test_basic_utf8_and_latin1() -> None:
    assert parse_authorization("Basic " + b64("jos\u00e9:contrase\u00f1a")).password == "contrase\u00f1a"
    raw = base64.b64encode("jos\u00e9:x".encode("latin-1")).decode()
    assert parse_authorization("Basic " + raw).login == "jos\u00e9"


@pytest.mark.parametrize("value", [
    None, "", "Basic", "Basic !!!notbase64", "Basic " + b64("nocolon"), "Basic " + b64(":nologin"),
    "Basic " + b64("alice:"), "Digest abc", "Bearer ", "Bearer " + b64("   "),
])
def test_bad_authorization(value: str | None) -> None:
    with pytest.raises(AuthenticationFailed):
        parse_authorization(value)


def test_bearer_is_base64_of_the_token_trailing_newline_tolerated() -> None:
    header_value = b64("tok-123") + "\n"
    assert parse_authorization("Bearer " + header_value.strip()) == BearerCredentials("tok-123")
    assert parse_authorization("Bearer " + b64("tok-123").rstrip("=")) == BearerCredentials("tok-123")


def test_auth_extras() -> None:
    name = b"client.user".hex()
    extras = parse_auth_extras({f"auth-{name}": b64("value 1"), "auth-zz": "x", "authorization": "Basic x",
                                f"auth-{b'k'.hex()}": "***"})
    assert extras == {"client.user": "value 1"}


@pytest.mark.parametrize(("raw", "expected"), [
    ("alice", ("alice", "default")),
    ("alice@acme", ("alice", "acme")),
    ("alice#acme", ("alice", "acme")),
    ("a.b@c@acme", ("a.b@c", "acme")),
    ("alice@", ("alice@", "default")),
    ("@acme", ("@acme", "default")),
])
def test_split_login(raw: str, expected: tuple[str, str]) -> None:
    assert split_login(raw, "@#", "default") == expected


def test_split_login_custom_separators() -> None:
    assert split_login("alice%acme", "%", "t0") == ("alice", "acme")
    assert split_login("alice@acme", "%", "t0") == ("alice@acme", "t0")


def test_plugin_lookup() -> None:
    assert resolve_plugin_class("default") is DefaultPlugin
    assert issubclass(resolve_plugin_class("default"), AuthPlugin)
    with pytest.raises(ConfigError, match="unknown authentication plugin 'ldapp'"):
        resolve_plugin_class("ldapp")


def test_plugin_names_order_and_dedup() -> None:
    cfg = Config().overlay(
        {"l7r.auth.plugins.head": "a,b", "l7r.auth.plugins": "b,c", "l7r.auth.plugins.tail": "default"},
        source="node file",
    )
    assert plugin_names(cfg) == ["a", "b", "c", "default"]
    assert plugin_names(Config()) == ["default"]
