"""The connect_to_vm query: accepted names, client option values."""

from __future__ import annotations

import pytest

from qvd.core.errors import InputError
from qvd.l7r.params import parse_vm_id, split_query, validate_client, validate_custom


def test_split_query() -> None:
    q = split_query([("id", "7"), ("qvd.client.os", "linux"), ("qvd.client.nxagent.extra_args", "listen=1"),
                     ("qvd.client.future.thing", "1"), ("custom.colour", "blue"), ("foo", "1"), ("bar", ""),
                     ("custom.", "x")])
    assert q.vm_id == "7"
    assert q.client == {"qvd.client.os": "linux"}
    assert q.custom == {"custom.colour": "blue"}
    assert q.invalid_names == ["foo", "bar", "custom."]
    assert q.dropped == ["qvd.client.nxagent.extra_args", "qvd.client.future.thing"]


@pytest.mark.parametrize("raw", [None, "", "x", "-1", "0", "1.5", "\u0661", "9" * 20])
def test_bad_vm_id(raw: str | None) -> None:
    with pytest.raises(InputError):
        parse_vm_id(raw)


def test_vm_id() -> None:
    assert parse_vm_id("42") == 42


def test_stock_client_values_pass() -> None:
    stock = {
        "qvd.client.keyboard": "pc105/es", "qvd.client.os": "linux", "qvd.client.link": "adsl",
        "qvd.client.geometry": "1024x768", "qvd.client.fullscreen": "", "qvd.client.printing.enabled": "1",
        "qvd.client.usb.enabled": "0", "qvd.client.usb.implementation": "USBIP",
        "qvd.client.audio.compression.enable": "1", "qvd.client.type": "Qt", "qvd.client.timezone": "Europe/Madrid",
        "qvd.client.audio.sound.enable": "1", "qvd.client.audio.microphone.enable": "0",
        "qvd.client.os.name": "Windows 10", "qvd.client.hostname": "pc-1", "qvd.client.printing.flavor": "slave4",
    }
    out = validate_client(stock)
    assert "qvd.client.fullscreen" not in out  # empty = not given
    assert out["qvd.client.keyboard"] == "pc105/es"
    assert validate_client({"qvd.client.keyboard": "pc105/de(nodeadkeys)"})


@pytest.mark.parametrize(("key", "value"), [
    ("qvd.client.geometry", "1024x768,listen=4000"),
    ("qvd.client.geometry", "10x10"),
    ("qvd.client.link", "lan,cookie=1"),
    ("qvd.client.keyboard", "pc105/us:1"),
    ("qvd.client.os", "plan9"),
    ("qvd.client.fullscreen", "maybe"),
    ("qvd.client.timezone", "../../etc/passwd"),
    ("qvd.client.hostname", "a b"),
])
def test_bad_client_values(key: str, value: str) -> None:
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        validate_client({key: value})


def test_custom_values() -> None:
    assert validate_custom({"custom.a": "any text, even = and :"}) == {"custom.a": "any text, even = and :"}
    with pytest.raises(InputError):
        validate_custom({"custom.a": "line\nbreak"})
    with pytest.raises(InputError):
        validate_custom({"custom.a": "x" * 5000})
