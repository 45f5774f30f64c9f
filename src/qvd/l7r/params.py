"""The query of ``connect_to_vm``: which keys are accepted, and what their values may be.

Accepted names (reference §2.4): ``id``, ``qvd.client.*`` and ``custom.*``; any
other name refuses the request with ``403 Invalid parameters <names>``.

``qvd.client.*`` values end up as nxagent options inside the desktop, whose
syntax is ``key=value,key=value``; the reference forwarded them unchecked (and
``qvd.client.nxagent.extra_args`` verbatim, §10.2.10).  Here only the keys below
are forwarded, each value must match its pattern (a bad one is a 422 naming the
key), ``qvd.client.nxagent.extra_args`` is dropped, and unknown ``qvd.client.*``
keys (newer clients add some) are dropped with a log line, not refused, so
clients we do not know yet still connect.  The desktop's agent validates again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qvd.core.errors import InputError

log = logging.getLogger(__name__)

CLIENT_PREFIX = "qvd.client."
CUSTOM_PREFIX = "custom."

_FLAG = r"|0|1|true|false|yes|no|on|off"
_NAME = r"[A-Za-z0-9_+-]{1,32}"

#: Forwarded client keys and the full-match pattern of their values ("" = not given, always allowed).
CLIENT_KEYS: Mapping[str, tuple[str, str]] = {
    "keyboard": (rf"{_NAME}/{_NAME}(\({_NAME}\))?", "model/layout such as pc105/us"),
    "os": (r"linux|windows|darwin|android|ios", "linux, windows, darwin, android or ios"),
    "link": (r"modem|isdn|adsl|wan|lan", "one of modem, isdn, adsl, wan, lan"),
    "geometry": (r"[0-9]{1,5}x[0-9]{1,5}", "WIDTHxHEIGHT such as 1024x768"),
    "fullscreen": (_FLAG, "0 or 1"),
    "timezone": (rf"{_NAME}(/{_NAME}){{0,3}}", "a time zone name such as Europe/Madrid"),
    "type": (r"[A-Za-z0-9_.-]{1,32}", "a client type name"),
    "printing.enabled": (_FLAG, "0 or 1"),
    "printing.flavor": (r"[A-Za-z0-9_-]{1,16}", "a printing flavour name"),
    "usb.enabled": (_FLAG, "0 or 1"),
    "usb.implementation": (r"[A-Za-z0-9_-]{1,16}", "a USB implementation name"),
    "audio.enable": (_FLAG, "0 or 1"),
    "audio.compression.enable": (_FLAG, "0 or 1"),
    "audio.sound.enable": (_FLAG, "0 or 1"),
    "audio.microphone.enable": (_FLAG, "0 or 1"),
    "audio.redirect.enable": (_FLAG, "0 or 1"),
    "audio.redirect.server": (r"[A-Za-z0-9.:_-]{1,255}", "a host name"),
    "audio.redirect.port": (r"[0-9]{1,5}", "a port number"),
    "os.name": (r"[A-Za-z0-9 ._()+/-]{1,64}", "an OS name"),
    "os.version": (r"[A-Za-z0-9 ._()+/-]{1,64}", "an OS version"),
    "hostname": (r"[A-Za-z0-9._-]{1,255}", "a host name"),
}
_COMPILED = {CLIENT_PREFIX + k: re.compile(p, re.ASCII) for k, (p, _) in CLIENT_KEYS.items()}
_EXPECTED = {CLIENT_PREFIX + k: what for k, (_, what) in CLIENT_KEYS.items()}
#: Never forwarded, whatever the value (options injected verbatim into nxagent).
DROPPED_KEYS = frozenset({CLIENT_PREFIX + "nxagent.extra_args"})

_CUSTOM_NAME = re.compile(r"custom\.[A-Za-z0-9_.:-]{1,128}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_VALUE = 1024
GEOMETRY_MIN = (320, 200)
GEOMETRY_MAX = (16384, 16384)


@dataclass
class ConnectQuery:
    """A ``connect_to_vm`` query taken apart."""

    vm_id: str | None = None
    client: dict[str, str] = field(default_factory=dict)
    custom: dict[str, str] = field(default_factory=dict)
    invalid_names: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def split_query(pairs: Iterable[tuple[str, str]], *, allow_custom: bool = True) -> ConnectQuery:
    """Sort the query keys; a repeated key keeps its last value."""
    q = ConnectQuery()
    for name, value in pairs:
        if name == "id":
            q.vm_id = value
        elif name.startswith(CLIENT_PREFIX):
            if name in DROPPED_KEYS or name not in _COMPILED:
                if name not in q.dropped:
                    q.dropped.append(name)
            else:
                q.client[name] = value
        elif allow_custom and name.startswith(CUSTOM_PREFIX) and _CUSTOM_NAME.fullmatch(name):
            q.custom[name] = value
        elif name not in q.invalid_names:
            q.invalid_names.append(name)
    return q


def parse_vm_id(raw: str | None) -> int:
    """The VM id.  Raises :class:`InputError` (422) when missing or not a positive integer."""
    if raw is None or raw == "":
        raise InputError("parameter id is missing")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12 or int(raw) <= 0:
        raise InputError(f"parameter id is invalid: {raw[:20]!r}")
    return int(raw)


def validate_client(values: Mapping[str, str]) -> dict[str, str]:
    """Checked client options (empty values dropped).  Raises :class:`InputError` naming the key."""
    out: dict[str, str] = {}
    for name, raw in values.items():
        value = raw.strip()
        if value == "":
            continue
        if not _COMPILED[name].fullmatch(value):
            raise InputError(f"invalid value {value[:40]!r} for {name}: expected {_EXPECTED[name]}")
        if name == CLIENT_PREFIX + "geometry":
            w, h = (int(x) for x in value.split("x"))
            if not (GEOMETRY_MIN[0] <= w <= GEOMETRY_MAX[0] and GEOMETRY_MIN[1] <= h <= GEOMETRY_MAX[1]):
                raise InputError(
                    f"invalid value {value!r} for {name}: expected a size from "
                    f"{GEOMETRY_MIN[0]}x{GEOMETRY_MIN[1]} to {GEOMETRY_MAX[0]}x{GEOMETRY_MAX[1]}"
                )
        if name == CLIENT_PREFIX + "timezone" and ".." in value:
            raise InputError(f"invalid value {value[:40]!r} for {name}: expected a time zone name")
        out[name] = value
    return out


def validate_custom(values: Mapping[str, str]) -> dict[str, str]:
    """``custom.*`` values are free text for hooks, but bounded and without control characters."""
    for name, value in values.items():
        if len(value) > MAX_VALUE or _CONTROL.search(value):
            raise InputError(f"invalid value for {name}: at most {MAX_VALUE} characters, no control characters")
    return dict(values)


def log_dropped(names: Iterable[str], vm_id: int) -> None:
    for n in names:
        if n in DROPPED_KEYS:
            log.warning("vm %s: dropping %s (extra nxagent options are never accepted from clients)", vm_id, n)
        else:
            log.info("vm %s: ignoring unknown client option %s", vm_id, n[:80])
