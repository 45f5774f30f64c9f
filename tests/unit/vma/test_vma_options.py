"""Client option validation and the nxagent options line (reference bug 10.2.10)."""

from __future__ import annotations

import logging

import pytest

from qvd.core.errors import InputError
from qvd.vma.options import ClientOptions, nx_options_line, parse_client_options, valid_timezone


def opts(**kw: str) -> ClientOptions:
    return parse_client_options({f"qvd.client.{k}": v for k, v in kw.items()})


def test_defaults_when_nothing_is_given() -> None:
    o = parse_client_options({})
    assert o == ClientOptions(link="adsl", keyboard=None, geometry=None, fullscreen=None, os="linux", timezone=None)


@pytest.mark.parametrize(
    ("key", "value", "field", "expected"),
    [
        ("keyboard", "pc105/us", "keyboard", "pc105/us"),
        ("keyboard", "pc105/de(nodeadkeys)", "keyboard", "pc105/de(nodeadkeys)"),
        ("link", "modem", "link", "modem"),
        ("link", "lan", "link", "lan"),
        ("link", "local", "link", "local"),  # the stock client allows these (nxagent accepts them)
        ("link", "1m", "link", "1m"),
        ("link", "256k", "link", "256k"),
        ("geometry", "1024x768", "geometry", (1024, 768)),
        ("geometry", "3840x2160", "geometry", (3840, 2160)),
        ("fullscreen", "1", "fullscreen", True),
        ("fullscreen", "0", "fullscreen", False),
        ("fullscreen", "", "fullscreen", None),
        ("os", "windows", "os", "windows"),
        ("os", "darwin", "os", "darwin"),
        ("os", "android", "os", "android"),
        ("timezone", "Europe/Madrid", "timezone", "Europe/Madrid"),
        ("timezone", "UTC", "timezone", "UTC"),
        ("keyboard", "", "keyboard", None),
    ],
)
def test_good_values(key: str, value: str, field: str, expected: object) -> None:
    assert getattr(opts(**{key: value}), field) == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("keyboard", "pc105/us,listen=5000"),
        ("keyboard", "pc105/us:99"),
        ("keyboard", "us"),
        ("keyboard", "pc105/us=x"),
        ("link", "gigabit"),
        ("link", "adsl,cookie=0"),
        ("link", "0m"),
        ("link", "1M,x"),
        ("geometry", "1024x768,fullscreen=1"),
        ("geometry", "100x100"),
        ("geometry", "99999x768"),
        ("geometry", "1024*768"),
        ("geometry", "1024x768+10+10"),
        ("fullscreen", "yes"),
        ("fullscreen", "2"),
        ("os", "amiga"),
        ("os", "linux,media=1"),
        ("timezone", "../../etc/passwd"),
        ("timezone", "Europe/Madrid,x"),
        ("timezone", "Mars/Olympus_Mons"),
    ],
)
def test_bad_values_are_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(InputError) as e:
        opts(**{key: value})
    assert f"qvd.client.{key}" in e.value.message


def test_unknown_client_keys_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qvd.vma.options")
    o = parse_client_options({"qvd.client.colour": "blue", "qvd.client.link": "wan", "custom.x": "1"})
    assert o.link == "wan"
    assert "qvd.client.colour" in caplog.text
    assert "custom.x" not in caplog.text  # only the qvd.client. namespace is ours to police


def test_extra_args_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qvd.vma.options")
    o = parse_client_options({"qvd.client.nxagent.extra_args": "listen=1,loopback=0"})
    line = nx_options_line(o, 100)
    assert "loopback" not in line and "listen=1," not in line
    assert any(r.levelno == logging.WARNING and "extra_args" in r.getMessage() for r in caplog.records)


def test_options_line_full() -> None:
    o = opts(link="modem", keyboard="pc105/es", geometry="800x600", fullscreen="0", os="darwin")
    assert nx_options_line(o, 100) == (
        "nx/nx,link=modem,keyboard=pc105/es,client=macosx,geometry=800x600,fullscreen=0,listen=4100:100\n"
    )


def test_options_line_minimal_has_no_loopback_and_listens_on_4000_plus_display() -> None:
    line = nx_options_line(parse_client_options({}), 150)
    assert line == "nx/nx,link=adsl,client=linux,listen=4150:150\n"
    assert "loopback" not in line


def test_timezone_validation() -> None:
    assert valid_timezone("America/Argentina/Buenos_Aires")
    assert not valid_timezone("")
    assert not valid_timezone("Europe/../Madrid")
    assert not valid_timezone("/etc/localtime")
