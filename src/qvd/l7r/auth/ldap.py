"""The ``ldap`` authentication plugin (ldap3): users whose password lives in a directory.

Two ways to find the user, per tenant (keys ``auth.ldap.*``):

* **direct bind**: ``auth.ldap.userbindpattern`` = ``uid=%u,ou=people,dc=example,dc=com``;
  the login (DN-escaped) replaces ``%u`` and a bind with the user's password is the check;
* **search then bind**: bind as the service account ``auth.ldap.binddn`` /
  ``auth.ldap.bindpass`` (anonymously when unset; with ``binddn`` but no
  ``bindpass``, as ``binddn`` with the user's own password), search
  ``auth.ldap.base`` with ``auth.ldap.filter`` (``%u`` = the filter-escaped
  login), scope and alias dereferencing as configured; exactly one entry must
  match; then bind as that entry with the user's password.

``auth.ldap.host`` is one or more URLs (``ldap://`` or ``ldaps://``, comma or
space separated, tried in order while unreachable).  ``auth.ldap.starttls``
upgrades ``ldap://`` connections; certificates are always verified, against
``auth.ldap.ca`` or the system CAs.  ``auth.ldap.group`` (a group DN) admits only
its members (``member``/``uniqueMember`` = the user's DN, or ``memberUid`` = its uid).

The entry's ``uid``, ``uidNumber``, ``gidNumber`` and ``homeDirectory`` become
``qvd.vm.user.name/uid/gid/home``: the account the user gets inside the desktop.

An unreachable directory or a service account that cannot bind is an outage
(:class:`~qvd.core.errors.Unavailable`, not counted towards a lockout); a wrong
password, an unknown or ambiguous user, or a user outside the group is a refusal.
Referrals are not followed (they would send the password to another server).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from qvd.core.config import Config
from qvd.core.errors import ConfigError, Unavailable
from qvd.l7r.auth.base import Attempt, AuthPlugin

log = logging.getLogger(__name__)

#: Attributes mapped into the desktop session.
ATTRIBUTES = ("uid", "uidNumber", "gidNumber", "homeDirectory")
_SCOPES = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}
_DEREF = {"never": ldap3.DEREF_NEVER, "search": ldap3.DEREF_SEARCH, "find": ldap3.DEREF_BASE,
          "always": ldap3.DEREF_ALWAYS}
#: What the desktop agent accepts as an account name (qvd.vma.provision).
_POSIX_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_URL = re.compile(r"^ldaps?://[^/\s]+/?$", re.IGNORECASE)


def split_urls(value: str) -> list[str]:
    return [u for u in re.split(r"[\s,]+", value.strip()) if u]


@dataclass(frozen=True)
class LdapSettings:
    urls: tuple[str, ...]
    base: str = ""
    filter: str = "(uid=%u)"
    scope: str = "sub"
    deref: str = "never"
    binddn: str = ""
    bindpass: str = field(default="", repr=False)
    userbindpattern: str = ""
    starttls: bool = False
    ca: str = ""
    group: str = ""
    timeout: int = 5

    @classmethod
    def from_config(cls, cfg: Config) -> LdapSettings:
        return cls(
            urls=tuple(split_urls(cfg.get_str("auth.ldap.host"))),
            base=cfg.get_str("auth.ldap.base"),
            filter=cfg.get_str("auth.ldap.filter"),
            scope=cfg.get_str("auth.ldap.scope"),
            deref=cfg.get_str("auth.ldap.deref"),
            binddn=cfg.get_str("auth.ldap.binddn"),
            bindpass=cfg.get_str("auth.ldap.bindpass"),
            userbindpattern=cfg.get_str("auth.ldap.userbindpattern"),
            starttls=cfg.get_bool("auth.ldap.starttls"),
            ca=cfg.get_str("auth.ldap.ca"),
            group=cfg.get_str("auth.ldap.group"),
            timeout=cfg.get_int("auth.ldap.timeout"),
        )

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty = usable), each naming its key."""
        out: list[str] = []
        if not self.urls:
            out.append("auth.ldap.host is not set (e.g. ldaps://ldap.example.com)")
        for u in self.urls:
            if not _URL.match(u):
                out.append(f"auth.ldap.host: {u!r} is not an ldap:// or ldaps:// URL (host[:port], no path)")
            elif self.starttls and u.lower().startswith("ldaps://"):
                out.append(f"auth.ldap.starttls is set but {u} is already ldaps:// (use ldap:// with StartTLS)")
        if self.userbindpattern:
            if "%u" not in self.userbindpattern:
                out.append("auth.ldap.userbindpattern must contain %u (the login)")
        else:
            if not self.base:
                out.append("auth.ldap.base is not set (needed to search users; or set auth.ldap.userbindpattern)")
            if "%u" not in self.filter:
                out.append("auth.ldap.filter must contain %u (the login), e.g. (uid=%u)")
            elif not (self.filter.startswith("(") and self.filter.endswith(")")):
                out.append(f"auth.ldap.filter {self.filter!r} must be enclosed in parentheses")
        if self.ca and not os.path.isfile(self.ca):
            out.append(f"auth.ldap.ca: {self.ca} is not a file")
        return out


@dataclass(frozen=True)
class LdapEntry:
    """The user's entry: its DN and the mapped attributes (first value of each)."""

    dn: str
    attributes: Mapping[str, str]


class LdapDirectory:
    """One conversation pattern with a directory; every call opens and closes its own connections."""

    def __init__(self, settings: LdapSettings) -> None:
        self.s = settings
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca or None,
                        version=ssl.PROTOCOL_TLS_CLIENT)
        self._servers = [ldap3.Server(u, get_info=ldap3.NONE, tls=tls, connect_timeout=settings.timeout)
                         for u in settings.urls]

    def _bind(self, user: str | None, password: str | None) -> ldap3.Connection | None:
        """A bound connection (anonymous when ``user`` is None), or None for refused credentials.

        Raises :class:`Unavailable` when no server can be reached or TLS fails.
        """
        errors: list[str] = []
        for server in self._servers:
            conn = ldap3.Connection(server, user=user, password=password, auto_bind=ldap3.AUTO_BIND_NONE,
                                    authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
                                    read_only=True, auto_referrals=False, raise_exceptions=False,
                                    receive_timeout=self.s.timeout)
            try:
                conn.open()
                if self.s.starttls and not conn.start_tls():
                    raise Unavailable(f"StartTLS with {server.host} failed: {conn.result.get('description')}")
                if conn.bind():
                    return conn
                result = conn.result or {}
            except LDAPException as e:
                errors.append(f"{server.host}:{server.port}: {e}")
                with contextlib.suppress(LDAPException):
                    conn.unbind()
                continue
            except Unavailable:
                with contextlib.suppress(LDAPException):
                    conn.unbind()
                raise
            with contextlib.suppress(LDAPException):
                conn.unbind()
            if result.get("description") in ("invalidCredentials", "inappropriateAuthentication"):
                return None
            # busy, unavailable, unwillingToPerform (e.g. a password policy): not the user's fault.
            raise Unavailable(f"LDAP bind at {server.host} refused: {result.get('description')} "
                              f"{result.get('message', '')}".strip())
        raise Unavailable("no LDAP server reachable: " + "; ".join(errors))

    def _search(self, conn: ldap3.Connection, base: str, flt: str, scope: Any, limit: int = 2) -> list[LdapEntry]:
        try:
            ok = conn.search(base, flt, search_scope=scope, dereference_aliases=_DEREF[self.s.deref],
                             attributes=list(ATTRIBUTES), size_limit=limit, time_limit=self.s.timeout)
        except LDAPException as e:
            raise Unavailable(f"LDAP search failed: {e}") from None
        desc = (conn.result or {}).get("description")
        if not ok and desc not in ("success", "noSuchObject", "sizeLimitExceeded"):
            raise Unavailable(f"LDAP search in {base!r} failed: {desc}")
        out = []
        for item in conn.response or []:
            if item.get("type") != "searchResEntry":
                continue  # referrals are ignored
            attrs = {}
            for name in ATTRIBUTES:
                value = item.get("attributes", {}).get(name)
                if isinstance(value, list):
                    value = value[0] if value else None
                if value not in (None, ""):
                    attrs[name] = str(value)
            out.append(LdapEntry(str(item["dn"]), attrs))
        return out

    def authenticate(self, login: str, password: str) -> LdapEntry | None:
        """The user's entry when ``password`` is right (and the group admits it), else None."""
        if not password or not login:
            # An empty password would be an "unauthenticated bind", which servers accept.
            return None
        opened: list[ldap3.Connection] = []
        try:
            return self._authenticate(login, password, opened)
        finally:
            for c in opened:
                with contextlib.suppress(LDAPException):
                    c.unbind()

    def _authenticate(self, login: str, password: str, opened: list[ldap3.Connection]) -> LdapEntry | None:
        s = self.s
        service: ldap3.Connection | None = None
        if s.userbindpattern:
            dn = s.userbindpattern.replace("%u", escape_rdn(login))
            user_conn = self._bind(dn, password)
            if user_conn is None:
                log.info("LDAP: bind as %s refused", dn)
                return None
            opened.append(user_conn)
            found = self._search(user_conn, dn, "(objectClass=*)", ldap3.BASE, 1)
            entry = found[0] if found else LdapEntry(dn, {})
        else:
            if s.binddn:
                service_dn = s.binddn.replace("%u", escape_rdn(login))
                service = self._bind(service_dn, s.bindpass or password)
                if service is None:
                    if s.bindpass:
                        raise Unavailable(f"the LDAP service account {service_dn} cannot bind: "
                                          "wrong auth.ldap.bindpass?")
                    return None
            else:
                service = self._bind(None, None)
                if service is None:
                    raise Unavailable("the LDAP server refuses anonymous binds: set auth.ldap.binddn/bindpass")
            opened.append(service)
            flt = s.filter.replace("%u", escape_filter_chars(login))
            found = self._search(service, s.base, flt, _SCOPES[s.scope])
            if len(found) != 1:
                log.info("LDAP: %d entries match %s under %s (exactly one needed)", len(found), flt, s.base)
                return None
            entry = found[0]
            user_conn = self._bind(entry.dn, password)
            if user_conn is None:
                log.info("LDAP: wrong password for %s", entry.dn)
                return None
            opened.append(user_conn)
        if s.group and not self._member(service or user_conn, entry, login):
            log.info("LDAP: %s is not a member of %s", entry.dn, s.group)
            return None
        return entry

    def _member(self, conn: ldap3.Connection, entry: LdapEntry, login: str) -> bool:
        dn = escape_filter_chars(entry.dn)
        uid = escape_filter_chars(entry.attributes.get("uid", login))
        flt = f"(|(member={dn})(uniqueMember={dn})(memberUid={uid}))"
        return bool(self._search(conn, self.s.group, flt, ldap3.BASE, 1))


def session_params(entry: LdapEntry) -> dict[str, str]:
    """``qvd.vm.user.*`` from the entry; values the desktop agent would refuse are left out (logged)."""
    out: dict[str, str] = {}
    a = entry.attributes
    uid = a.get("uid", "").strip().lower()
    if uid:
        if _POSIX_NAME.fullmatch(uid) and not uid.endswith("."):
            out["qvd.vm.user.name"] = uid
        else:
            log.warning("LDAP uid %r of %s is not a POSIX account name; the desktop uses the login", uid[:64],
                        entry.dn)
    for attr, key in (("uidNumber", "qvd.vm.user.uid"), ("gidNumber", "qvd.vm.user.gid")):
        value = a.get(attr, "").strip()
        if value.isdigit():
            out[key] = value
        elif value:
            log.warning("LDAP %s %r of %s is not a number; ignored", attr, value[:32], entry.dn)
    home = a.get("homeDirectory", "").strip()
    if home:
        out["qvd.vm.user.home"] = home
    return out


class LdapPlugin(AuthPlugin):
    name = "ldap"

    def check_config(self, cfg: Config, tenant_id: int | None) -> None:
        problems = LdapSettings.from_config(cfg).problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def directory(self, cfg: Config) -> LdapDirectory:
        return LdapDirectory(LdapSettings.from_config(cfg))

    def authenticate_basic(self, attempt: Attempt, cfg: Config) -> bool | None:
        entry = self.directory(cfg).authenticate(attempt.login, attempt.password)
        if entry is None:
            return False
        attempt.params.update(session_params(entry))
        log.debug("LDAP: %s authenticated as %s", attempt.login, entry.dn)
        return True

