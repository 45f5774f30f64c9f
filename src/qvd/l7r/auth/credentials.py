"""What a client sends to prove who it is: the ``Authorization`` header and ``Auth-*`` extras.

Wire formats (reference §2.2):

* ``Authorization: Basic base64(login:password)``; the login may carry a tenant
  suffix (``alice@acme``), split later by the plugins' ``find_tenant``;
* ``Authorization: Bearer base64(token)``; the header value is the base64 of
  the raw token (``create_auth_token`` hands it out already encoded);
* ``Auth-<hex(name)>: base64(value)``, extra attributes for plugins.

Everything here is pure parsing; a malformed header is an
:class:`~qvd.core.errors.AuthenticationFailed`, answered with 401 like a wrong password.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

from qvd.core.errors import AuthenticationFailed

#: Longest login and password we look at; anything longer is refused unread.
MAX_FIELD = 1024


@dataclass(frozen=True)
class BasicCredentials:
    login: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BearerCredentials:
    token: str = field(repr=False)


Credentials = BasicCredentials | BearerCredentials


def _b64(value: str) -> bytes:
    compact = "".join(value.split())
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed Authorization header (not base64)") from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Old clients may encode in Latin-1; every byte sequence decodes there.
        return raw.decode("latin-1")


def parse_authorization(value: str | None) -> Credentials:
    """Credentials from an ``Authorization`` header value.  Raises :class:`AuthenticationFailed`."""
    if value is None or not value.strip():
        raise AuthenticationFailed("authentication required")
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        decoded = _text(_b64(rest))
        login, sep, password = decoded.partition(":")
        if not sep or not login or not password:
            raise AuthenticationFailed("malformed Basic credentials")
        if len(login) > MAX_FIELD or len(password) > MAX_FIELD:
            raise AuthenticationFailed("credentials too long")
        return BasicCredentials(login, password)
    if scheme == "bearer":
        token = _text(_b64(rest)).strip()
        if not token or len(token) > MAX_FIELD:
            raise AuthenticationFailed("malformed Bearer token")
        return BearerCredentials(token)
    raise AuthenticationFailed(f"unsupported authentication scheme {scheme[:20]!r}")


def parse_auth_extras(headers: Mapping[str, str]) -> dict[str, str]:
    """``Auth-<hex(name)>: base64(value)`` headers as ``{name: value}``; malformed ones are skipped."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not name.lower().startswith("auth-"):
            continue
        try:
            key = bytes.fromhex(name[5:]).decode("utf-8")
            out[key] = _text(base64.b64decode("".join(value.split()), validate=True))
        except (ValueError, binascii.Error):
            continue
    return out
