"""The client's session options: validation and the nxagent options line.

The client sends ``qvd.client.*`` query parameters through the L7R; they end up
in the nxagent options file, whose syntax is ``nx/nx,key=value,...:<display>``.
A value containing ``,``, ``=`` or ``:`` could inject any nxagent option
(the reference VMA even copied ``qvd.client.nxagent.extra_args`` verbatim, bug
10.2.10), so only the keys below are used and every value must match a strict
pattern; a value that does not is refused, an unknown ``qvd.client.`` key is
ignored and logged.
"""

from __future__ import annotations

import functools
import logging
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass

from qvd.core.errors import InputError

log = logging.getLogger(__name__)

PREFIX = "qvd.client."

LINKS = ("modem", "isdn", "adsl", "wan", "lan", "local")
#: the stock client may also send a bandwidth (``client.link = 1m``); nxagent takes it as is
_BANDWIDTH = re.compile(r"[1-9][0-9]{0,6}[kmg]")
DEFAULT_LINK = "adsl"  # lab: compression on, ~40 kbit/s for a terminal; lan disables compression

#: client OS names the QVD clients send -> nxagent's ``client=`` values
NX_CLIENT_OS: Mapping[str, str] = {
    "linux": "linux",
    "windows": "windows",
    "darwin": "macosx",
    "android": "linux",
}

GEOMETRY_MIN = (320, 200)
GEOMETRY_MAX = (16384, 16384)

_KEYBOARD = re.compile(r"[A-Za-z0-9_+-]{1,32}/[A-Za-z0-9_+-]{1,32}(\([A-Za-z0-9_+-]{1,32}\))?")
_GEOMETRY = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_TZ = re.compile(r"[A-Za-z0-9_+-]{1,32}(/[A-Za-z0-9_+-]{1,32}){0,3}")

KNOWN_KEYS = frozenset(
    PREFIX + k for k in ("keyboard", "link", "geometry", "fullscreen", "os", "timezone")
)


@dataclass(frozen=True)
class ClientOptions:
    """Validated client options; ``None`` means "not given, let nxagent decide"."""

    link: str = DEFAULT_LINK
    keyboard: str | None = None
    geometry: tuple[int, int] | None = None
    fullscreen: bool | None = None
    os: str = "linux"
    timezone: str | None = None


def _bad(key: str, value: str, allowed: str) -> InputError:
    # The value is echoed with repr() and cut, so an attacker cannot forge log lines.
    return InputError(f"invalid value {value[:64]!r} for {key}: expected {allowed}")


@functools.cache
def _tzdb_present() -> bool:
    return bool(zoneinfo.available_timezones())


def valid_timezone(name: str) -> bool:
    """Whether ``name`` is a time zone of the system's tz database.

    Without a tz database (a minimal image without ``tzdata``) a well-formed
    name is accepted: TZ is then simply not set for the session.
    """
    if not _TZ.fullmatch(name) or ".." in name:
        return False
    if not _tzdb_present():
        return True
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def parse_client_options(params: Mapping[str, str]) -> ClientOptions:
    """Validate the ``qvd.client.*`` entries of ``params``.

    Raises :class:`InputError` naming the key when a known key has a bad value.
    Empty values mean "not given", as in the reference.
    """
    for name in params:
        if name.startswith(PREFIX) and name not in KNOWN_KEYS:
            if name == PREFIX + "nxagent.extra_args":
                log.warning("dropping %s: extra nxagent options are never accepted from clients", name)
            else:
                log.info("ignoring unknown client option %s", name[:80])

    def get(short: str) -> str:
        return params.get(PREFIX + short, "").strip()

    link = get("link") or DEFAULT_LINK
    if link not in LINKS and not _BANDWIDTH.fullmatch(link):
        raise _bad(PREFIX + "link", link, "one of " + ", ".join(LINKS) + " or a bandwidth such as 1m")

    keyboard = get("keyboard") or None
    if keyboard is not None and not _KEYBOARD.fullmatch(keyboard):
        raise _bad(PREFIX + "keyboard", keyboard, "model/layout such as pc105/us")

    geometry: tuple[int, int] | None = None
    raw = get("geometry")
    if raw:
        m = _GEOMETRY.fullmatch(raw)
        if not m:
            raise _bad(PREFIX + "geometry", raw, "WIDTHxHEIGHT such as 1024x768")
        w, h = int(m.group(1)), int(m.group(2))
        if not (GEOMETRY_MIN[0] <= w <= GEOMETRY_MAX[0] and GEOMETRY_MIN[1] <= h <= GEOMETRY_MAX[1]):
            raise _bad(
                PREFIX + "geometry",
                raw,
                f"a size from {GEOMETRY_MIN[0]}x{GEOMETRY_MIN[1]} to {GEOMETRY_MAX[0]}x{GEOMETRY_MAX[1]}",
            )
        geometry = (w, h)

    fullscreen: bool | None = None
    raw = get("fullscreen")
    if raw:
        if raw not in ("0", "1"):
            raise _bad(PREFIX + "fullscreen", raw, "0 or 1")
        fullscreen = raw == "1"

    os_name = get("os") or "linux"
    if os_name not in NX_CLIENT_OS:
        raise _bad(PREFIX + "os", os_name, "one of " + ", ".join(NX_CLIENT_OS))

    timezone = get("timezone") or None
    if timezone is not None and not valid_timezone(timezone):
        raise _bad(PREFIX + "timezone", timezone, "a time zone name such as Europe/Madrid")

    return ClientOptions(
        link=link, keyboard=keyboard, geometry=geometry, fullscreen=fullscreen, os=os_name, timezone=timezone
    )


def nx_port(display: int) -> int:
    """The TCP port nxagent listens on for the client's nxproxy."""
    return 4000 + display


def nx_options_line(opts: ClientOptions, display: int) -> str:
    """The content of the nxagent options file.

    ``listen=<port>`` alone makes nxagent accept from any address (it logs
    ``Waiting for connection from any host on socket 'tcp:*:<port>'``): the L7R
    reaches the desktop over the node bridge, and the node firewall is what keeps
    everybody else out.  No ``loopback=1`` for that reason, and no cookie
    because QVD clients do not send one.
    """
    parts = ["nx/nx", f"link={opts.link}"]
    if opts.keyboard:
        parts.append(f"keyboard={opts.keyboard}")
    parts.append(f"client={NX_CLIENT_OS[opts.os]}")
    if opts.geometry:
        parts.append(f"geometry={opts.geometry[0]}x{opts.geometry[1]}")
    if opts.fullscreen is not None:
        parts.append(f"fullscreen={int(opts.fullscreen)}")
    parts.append(f"listen={nx_port(display)}")
    return ",".join(parts) + f":{display}\n"
