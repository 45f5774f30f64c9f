"""The authentication chain: plugins by name, the login flows, and the login lockout.

See :mod:`qvd.l7r.auth.base` for the hook order.  Everything here is
synchronous and runs in a worker thread of the L7R.

Lockout (:mod:`qvd.services.lockout`): the counters live in the database so
that they hold across L7R processes and nodes.  A locked login name or client
address is refused with :class:`~qvd.core.errors.TooManyFailures` before any
plugin sees the password, whether a user has that name or not.  Failures caused
by a back-end outage (a plugin raising an error of status >= 500, or a bug) are
not counted: an LDAP outage must not lock everybody out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AuthenticationFailed, ConfigError, QvdError, TooManyFailures
from qvd.core.plugins import load_plugin
from qvd.db.engine import transaction
from qvd.db.models import Tenant, User
from qvd.db.queries import load_db_config
from qvd.l7r.auth.base import Attempt, AuthPlugin, Identity, PluginContext, VmInfo
from qvd.l7r.auth.credentials import BasicCredentials, BearerCredentials, Credentials
from qvd.services import lockout
from qvd.services.base import Actor

log = logging.getLogger(__name__)

T = TypeVar("T")

ENTRY_POINT_GROUP = "qvd.auth"
#: Plugins shipped with QVD-py, found even before the package's entry points are installed.
BUILTIN_PLUGINS: Mapping[str, str] = {
    "default": "qvd.l7r.auth.default:DefaultPlugin",
    "ldap": "qvd.l7r.auth.ldap:LdapPlugin",
    "auto": "qvd.l7r.auth.auto:AutoPlugin",
    "totp": "qvd.l7r.auth.totp:TotpPlugin",
}
#: Failures between two clean-ups of idle lockout counters (per L7R process).
PRUNE_EVERY = 500


def resolve_plugin_class(name: str) -> type[AuthPlugin]:
    """The plugin class registered as ``name``.  Raises :class:`ConfigError` for an unknown name."""
    return load_plugin(ENTRY_POINT_GROUP, name, BUILTIN_PLUGINS, AuthPlugin, kind="authentication",
                       where="l7r.auth.plugins(.head/.tail)")


def plugin_names(cfg: Config) -> list[str]:
    """head + plugins + tail, each name once, in order."""
    names: list[str] = []
    for key in ("l7r.auth.plugins.head", "l7r.auth.plugins", "l7r.auth.plugins.tail"):
        for n in cfg.get_list(key):
            if n not in names:
                names.append(n)
    if not names:
        raise ConfigError("no authentication plugin configured (l7r.auth.plugins.tail is empty)")
    return names


class ConfigCache:
    """Effective configuration (node file + database, global and per tenant), re-read every ``ttl`` s."""

    def __init__(self, factory: sessionmaker[Session], node_cfg: Config, *, ttl: float = 5.0) -> None:
        self._factory = factory
        self._node = node_cfg
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[int | None, tuple[float, Config]] = {}

    def fresh(self, tenant_id: int | None = None) -> Config | None:
        """The cached configuration if it is recent enough, without touching the database."""
        with self._lock:
            hit = self._cache.get(tenant_id)
        if hit is not None and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        return None

    def get(self, tenant_id: int | None = None) -> Config:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tenant_id)
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1]
        with transaction(self._factory) as s:
            cfg = load_db_config(s, self._node, tenant_id)
        with self._lock:
            self._cache[tenant_id] = (now, cfg)
        return cfg


class AuthChain:
    """Runs the configured plugins.  Thread-safe; one instance per L7R process."""

    def __init__(self, ctx: PluginContext, configs: ConfigCache) -> None:
        self.ctx = ctx
        self.configs = configs
        self._lock = threading.Lock()
        self._instances: dict[str, AuthPlugin] = {}
        self._failures = 0

    # ------------------------------------------------------------------ plugins

    def _plugin(self, name: str) -> AuthPlugin:
        with self._lock:
            p = self._instances.get(name)
            if p is None:
                p = resolve_plugin_class(name)(self.ctx)
                self._instances[name] = p
            return p

    def plugins(self, cfg: Config) -> list[AuthPlugin]:
        return [self._plugin(n) for n in plugin_names(cfg)]

    def validate(self) -> list[str]:
        """Check the chain of every tenant at L7R start: each plugin loads and accepts that tenant's
        settings (:meth:`AuthPlugin.check_config`).  Raises :class:`ConfigError` naming the tenant.

        The chain is rebuilt per tenant at login (its rows over the global ones), so every tenant is
        checked, not only the global configuration; without tenants the global one is checked.
        """
        with transaction(self.ctx.factory) as s:
            tenants: list[tuple[int | None, str]] = [
                (int(r.id), str(r.name)) for r in s.execute(select(Tenant.id, Tenant.name).order_by(Tenant.id))
            ]
        if not tenants:
            tenants = [(None, "(global)")]
        names: list[str] = []
        for tid, tname in tenants:
            cfg = self.configs.get(tid)
            for n in plugin_names(cfg):
                plugin = self._plugin(n)
                try:
                    plugin.check_config(cfg, tid)
                except ConfigError as e:
                    raise ConfigError(f"authentication plugin '{n}' of tenant '{tname}': {e.message}") from None
                if n not in names:
                    names.append(n)
        return names

    @staticmethod
    def _guard(plugin: AuthPlugin, hook: str, call: Callable[[], T], outages: list[str] | None = None) -> T | None:
        """Run one authentication hook; a failing plugin is a refusal, logged, never a crash.

        Errors of status >= 500 (a back-end down) and bugs are noted in ``outages``: such a
        failure says nothing about the password and must not count towards a lockout.
        """
        try:
            return call()
        except QvdError as e:
            log.info("auth plugin %s.%s refused: %s", plugin.name, hook, e.message)
            if e.http_status >= 500 and outages is not None:
                outages.append(plugin.name)
        except Exception:  # a plugin bug or an LDAP outage must not take the connection down
            log.exception("auth plugin %s.%s failed", plugin.name, hook)
            if outages is not None:
                outages.append(plugin.name)
        return None

    # ------------------------------------------------------------------ lockout

    def _actor(self, client_ip: str) -> Actor:
        return Actor(admin_id=None, name=self.ctx.actor_name, tenant_id=None, source="l7r", ip=client_ip)

    def _check_lock(self, tenant_id: int | None, login: str, client_ip: str, what: str) -> lockout.LockState:
        state = lockout.check(self.ctx.factory, tenant_id, login, client_ip)
        if state.address_locked_until is not None:
            raise TooManyFailures(f"address {client_ip} is locked out until {state.address_locked_until:%H:%M:%S} "
                                  f"UTC ({what})")
        if state.login_locked_until is not None:
            raise TooManyFailures(f"login {what} is locked out until {state.login_locked_until:%H:%M:%S} UTC")
        return state

    def _failed(self, policy: lockout.Policy, *, tenant_id: int | None, login: str, client_ip: str,
                reason: str) -> AuthenticationFailed:
        """Count a failed login (database + audit) and return the error to raise."""
        try:
            out = lockout.record_failure(self.ctx.factory, policy, self._actor(client_ip), tenant_id=tenant_id,
                                         login=login, user_id=None, address=client_ip, reason=reason)
        except Exception:  # the database may be down: the login fails anyway, uncounted
            log.exception("cannot record a failed login")
            return AuthenticationFailed(reason)
        if out.login_lockout_started:
            log.warning("login %s (tenant %s) locked out until %s after %d failed logins", login[:64], tenant_id,
                        out.login_locked_until, out.login_failures)
        if out.address_lockout_started:
            log.warning("client address %s locked out until %s after %d failed logins", client_ip,
                        out.address_locked_until, out.address_failures)
        with self._lock:
            self._failures += 1
            prune = self._failures % PRUNE_EVERY == 0
        if prune:
            try:
                lockout.prune(self.ctx.factory)
            except Exception:  # housekeeping only
                log.exception("cannot prune old lockout counters")
        return AuthenticationFailed(reason)

    # ------------------------------------------------------------------ login

    def authenticate(self, creds: Credentials, *, extras: Mapping[str, str] | None = None,
                     client_ip: str = "") -> Identity:
        """The identity behind ``creds``.  Raises :class:`AuthenticationFailed` (logged with the reason)."""
        if isinstance(creds, BearerCredentials):
            return self._bearer(creds, client_ip)
        return self._basic(creds, dict(extras or {}), client_ip)

    @staticmethod
    def _norm(name: str, cfg: Config) -> str:
        name = name.strip()
        return name if cfg.get_bool("model.user.login.case-sensitive") else name.lower()

    def _basic(self, creds: BasicCredentials, extras: dict[str, str], client_ip: str) -> Identity:
        gcfg = self.configs.get(None)
        gpolicy = lockout.Policy.from_config(gcfg)
        split: tuple[str, str] | None = None
        for p in self.plugins(gcfg):
            split = self._guard(p, "find_tenant", partial(p.find_tenant, creds.login, gcfg))
            if split is not None:
                break
        if split is None:
            self._check_lock(None, "", client_ip, "unrecognised login")
            raise self._failed(gpolicy, tenant_id=None, login=creds.login, client_ip=client_ip,
                               reason=f"no plugin recognises the login {creds.login[:64]!r}")
        login, tenant = self._norm(split[0], gcfg), self._norm(split[1], gcfg)
        if not login or not tenant:
            self._check_lock(None, "", client_ip, "empty login")
            raise self._failed(gpolicy, tenant_id=None, login=creds.login, client_ip=client_ip,
                               reason="empty login or tenant")
        tcol = Tenant.name if gcfg.get_bool("model.user.login.case-sensitive") else func.lower(Tenant.name)
        with transaction(self.ctx.factory) as s:
            trow = s.execute(select(Tenant.id, Tenant.name, Tenant.blocked).where(tcol == tenant)).first()
        if trow is None:
            self._check_lock(None, "", client_ip, f"{login}@{tenant}")
            raise self._failed(gpolicy, tenant_id=None, login=f"{login}@{tenant}", client_ip=client_ip,
                               reason=f"tenant {tenant[:64]!r} does not exist")
        if trow.blocked:
            raise AuthenticationFailed(f"tenant {trow.name!r} is blocked")
        cfg = self.configs.get(trow.id)
        policy = lockout.Policy.from_config(cfg, gcfg)
        tenant_id = int(trow.id)
        who = f"{login}@{trow.name}"
        # Before any plugin sees the password, and the same for logins that exist and logins that do not.
        state = self._check_lock(tenant_id, login, client_ip, who)
        attempt = Attempt(raw_login=creds.login, login=login, tenant=trow.name, password=creds.password,
                          client_ip=client_ip, extras=extras, tenant_id=tenant_id)
        plugins = self.plugins(cfg)
        outages: list[str] = []
        for p in plugins:
            parts = self._guard(p, "split_second_factor", partial(p.split_second_factor, attempt, cfg), outages)
            if parts is not None:
                attempt.password, attempt.second_factor = parts
                break
        by = next((p.name for p in plugins
                   if self._guard(p, "authenticate_basic", partial(p.authenticate_basic, attempt, cfg),
                                  outages) is True),
                  None)
        if by is None:
            if outages:
                raise AuthenticationFailed(f"{who} not authenticated: plugin(s) {', '.join(outages)} unavailable")
            raise self._failed(policy, tenant_id=tenant_id, login=login, client_ip=client_ip,
                               reason=f"wrong password for {who}")
        if attempt.second_factor is not None and not any(
            self._guard(p, "authenticate_second_factor", partial(p.authenticate_second_factor, attempt, cfg),
                        outages) is True
            for p in plugins
        ):
            if outages:
                raise AuthenticationFailed(f"{who}: second factor not checked, plugin(s) {', '.join(outages)} "
                                           "unavailable")
            raise self._failed(policy, tenant_id=tenant_id, login=login, client_ip=client_ip,
                               reason=f"wrong second factor for {who}")
        attempt.params.setdefault("qvd.vm.user.name", attempt.login)
        for p in plugins:
            try:
                p.after_authenticate(attempt, cfg)
            except QvdError as e:
                raise AuthenticationFailed(f"plugin {p.name} refused {who} after login: {e}") from None
        ucol = User.login if cfg.get_bool("model.user.login.case-sensitive") else func.lower(User.login)
        ulogin = self._norm(attempt.login, cfg)
        with transaction(self.ctx.factory) as s:
            urow = s.execute(
                select(User.id, User.login, User.blocked).where(User.tenant_id == trow.id, ucol == ulogin)
            ).first()
        if urow is None:
            raise AuthenticationFailed(f"{ulogin}@{trow.name} passed '{by}' but is not a user of QVD")
        if urow.blocked:
            raise AuthenticationFailed(f"user {urow.login}@{trow.name} is blocked")
        if state.login_counted:
            try:
                lockout.clear_login(self.ctx.factory, tenant_id, login)
            except Exception:  # the login succeeded; a stale counter only delays the next failure's reset
                log.exception("cannot clear the failed logins of %s", who)
        log.debug("user %s@%s authenticated by %s", urow.login, trow.name, by)
        return Identity(user_id=int(urow.id), login=urow.login, tenant_id=int(trow.id), tenant=trow.name,
                        params=dict(attempt.params), method="basic")

    def _bearer(self, creds: BearerCredentials, client_ip: str = "") -> Identity:
        gcfg = self.configs.get(None)
        if client_ip:
            self._check_lock(None, "", client_ip, "bearer token")
        grant = None
        by = ""
        outages: list[str] = []
        for p in self.plugins(gcfg):
            grant = self._guard(p, "authenticate_bearer", partial(p.authenticate_bearer, creds.token, gcfg), outages)
            if grant is not None:
                by = p.name
                break
        if grant is None:
            reason = "unknown, expired or already used bearer token"
            if outages:
                raise AuthenticationFailed(reason)
            raise self._failed(lockout.Policy.from_config(gcfg), tenant_id=None, login="(bearer token)",
                               client_ip=client_ip, reason=reason)
        with transaction(self.ctx.factory) as s:
            user = s.get(User, grant.user_id)
            if user is None:
                raise AuthenticationFailed(f"bearer token of a deleted user ({grant.user_id})")
            if user.blocked or user.tenant.blocked:
                raise AuthenticationFailed(f"user {user.login}@{user.tenant.name} or its tenant is blocked")
            ident = Identity(user_id=user.id, login=user.login, tenant_id=user.tenant_id, tenant=user.tenant.name,
                             params={"qvd.vm.user.name": user.login, **grant.params}, method="bearer",
                             vm_id=grant.vm_id)
        log.debug("user %s authenticated by a bearer token (%s)", ident.display, by)
        return ident

    # ------------------------------------------------------------------ after login

    def allow_access_to_vm(self, identity: Identity, vm: VmInfo) -> bool:
        if identity.vm_id is not None and identity.vm_id != vm.id:
            return False  # a token bound to one VM opens nothing else
        cfg = self.configs.get(identity.tenant_id)
        return any(p.allow_access_to_vm(identity, vm, cfg) is True for p in self.plugins(cfg))

    def list_of_vm(self, identity: Identity, applications: bool, query: Mapping[str, str]) -> list[VmInfo] | None:
        cfg = self.configs.get(identity.tenant_id)
        for p in self.plugins(cfg):
            found = p.list_of_vm(identity, applications, query, cfg)
            if found is not None:
                return found
        return None

    def before_connect_to_vm(self, identity: Identity, vm: VmInfo, params: dict[str, str]) -> None:
        """Raises :class:`Forbidden` (or another QvdError) when a plugin refuses the connection."""
        cfg = self.configs.get(identity.tenant_id)
        for p in self.plugins(cfg):
            p.before_connect_to_vm(identity, vm, params, cfg)

