"""The authentication chain: plugins by name, the login flows, and a login lockout.

See :mod:`qvd.l7r.auth.base` for the hook order.  Everything here is
synchronous and runs in a worker thread of the L7R.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from importlib.metadata import entry_points
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AuthenticationFailed, ConfigError, QvdError
from qvd.db.engine import transaction
from qvd.db.models import ConfigRow, Tenant, User
from qvd.db.queries import load_db_config
from qvd.l7r.auth.base import Attempt, AuthPlugin, Identity, PluginContext, VmInfo
from qvd.l7r.auth.credentials import BasicCredentials, BearerCredentials, Credentials

log = logging.getLogger(__name__)

T = TypeVar("T")

ENTRY_POINT_GROUP = "qvd.auth"
#: Plugins shipped with QVD-py, found even before the package's entry points are installed.
BUILTIN_PLUGINS: Mapping[str, str] = {"default": "qvd.l7r.auth.default:DefaultPlugin"}


def resolve_plugin_class(name: str) -> type[AuthPlugin]:
    """The plugin class registered as ``name``.  Raises :class:`ConfigError` for an unknown name."""
    found = entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    target = next(iter(found)).value if found else BUILTIN_PLUGINS.get(name)
    if target is None:
        known = sorted({*BUILTIN_PLUGINS, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigError(
            f"unknown authentication plugin '{name}' in l7r.auth.plugins(.head/.tail); known: {', '.join(known)}"
        )
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"authentication plugin '{name}' ({target}) cannot be loaded: {e}") from None
    if not (isinstance(obj, type) and issubclass(obj, AuthPlugin)):
        raise ConfigError(f"authentication plugin '{name}' ({target}) is not an AuthPlugin subclass")
    return obj


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


class Lockout:
    """Too many failed logins of one account lock it for a while (per L7R process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[tuple[int, str], deque[float]] = {}

    def locked(self, key: tuple[int, str], max_failures: int, window: float) -> bool:
        now = time.monotonic()
        with self._lock:
            q = self._failures.get(key)
            if q is None:
                return False
            while q and now - q[0] > window:
                q.popleft()
            return len(q) >= max_failures

    def failed(self, key: tuple[int, str], window: float) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:
                # Bound the memory an attacker trying many logins can make us use.
                for k in [k for k, q in self._failures.items() if not q or now - q[-1] > window]:
                    del self._failures[k]
            self._failures.setdefault(key, deque(maxlen=64)).append(now)

    def succeeded(self, key: tuple[int, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)


class AuthChain:
    """Runs the configured plugins.  Thread-safe; one instance per L7R process."""

    def __init__(self, ctx: PluginContext, configs: ConfigCache) -> None:
        self.ctx = ctx
        self.configs = configs
        self.lockout = Lockout()
        self._lock = threading.Lock()
        self._instances: dict[str, AuthPlugin] = {}

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
        """Load every plugin named globally or by any tenant; raises :class:`ConfigError` (at L7R start)."""
        with transaction(self.ctx.factory) as s:
            rows = s.scalars(select(ConfigRow.tenant_id).where(ConfigRow.tenant_id.is_not(None)))
            tenant_ids: list[int | None] = [None, *sorted({t for t in rows if t is not None})]
        names: list[str] = []
        for tid in tenant_ids:
            for n in plugin_names(self.configs.get(tid)):
                self._plugin(n)
                if n not in names:
                    names.append(n)
        return names

    @staticmethod
    def _guard(plugin: AuthPlugin, hook: str, call: Callable[[], T]) -> T | None:
        """Run one authentication hook; a failing plugin is a refusal, logged, never a crash."""
        try:
            return call()
        except QvdError as e:
            log.info("auth plugin %s.%s refused: %s", plugin.name, hook, e.message)
        except Exception:  # a plugin bug or an LDAP outage must not take the connection down
            log.exception("auth plugin %s.%s failed", plugin.name, hook)
        return None

    # ------------------------------------------------------------------ login

    def authenticate(self, creds: Credentials, *, extras: Mapping[str, str] | None = None,
                     client_ip: str = "") -> Identity:
        """The identity behind ``creds``.  Raises :class:`AuthenticationFailed` (logged with the reason)."""
        if isinstance(creds, BearerCredentials):
            return self._bearer(creds)
        return self._basic(creds, dict(extras or {}), client_ip)

    @staticmethod
    def _norm(name: str, cfg: Config) -> str:
        name = name.strip()
        return name if cfg.get_bool("model.user.login.case-sensitive") else name.lower()

    def _basic(self, creds: BasicCredentials, extras: dict[str, str], client_ip: str) -> Identity:
        gcfg = self.configs.get(None)
        split: tuple[str, str] | None = None
        for p in self.plugins(gcfg):
            split = self._guard(p, "find_tenant", partial(p.find_tenant, creds.login, gcfg))
            if split is not None:
                break
        if split is None:
            raise AuthenticationFailed(f"no plugin recognises the login {creds.login[:64]!r}")
        login, tenant = self._norm(split[0], gcfg), self._norm(split[1], gcfg)
        if not login or not tenant:
            raise AuthenticationFailed("empty login or tenant")
        tcol = Tenant.name if gcfg.get_bool("model.user.login.case-sensitive") else func.lower(Tenant.name)
        with transaction(self.ctx.factory) as s:
            trow = s.execute(select(Tenant.id, Tenant.name, Tenant.blocked).where(tcol == tenant)).first()
        if trow is None:
            raise AuthenticationFailed(f"tenant {tenant[:64]!r} does not exist")
        if trow.blocked:
            raise AuthenticationFailed(f"tenant {trow.name!r} is blocked")
        cfg = self.configs.get(trow.id)
        key = (int(trow.id), login)
        window = float(cfg.get_int("l7r.auth.lockout.time"))
        if self.lockout.locked(key, cfg.get_int("l7r.auth.lockout.max_failures"), window):
            raise AuthenticationFailed(f"login {login}@{trow.name} is locked after repeated failures")
        attempt = Attempt(raw_login=creds.login, login=login, tenant=trow.name, password=creds.password,
                          client_ip=client_ip, extras=extras, tenant_id=int(trow.id))
        plugins = self.plugins(cfg)
        for p in plugins:
            parts = self._guard(p, "split_second_factor", partial(p.split_second_factor, attempt, cfg))
            if parts is not None:
                attempt.password, attempt.second_factor = parts
                break
        by = next((p.name for p in plugins
                   if self._guard(p, "authenticate_basic", partial(p.authenticate_basic, attempt, cfg)) is True),
                  None)
        if by is None:
            self.lockout.failed(key, window)
            raise AuthenticationFailed(f"wrong password for {login}@{trow.name}")
        if attempt.second_factor is not None and not any(
            self._guard(p, "authenticate_second_factor", partial(p.authenticate_second_factor, attempt, cfg)) is True
            for p in plugins
        ):
            self.lockout.failed(key, window)
            raise AuthenticationFailed(f"wrong second factor for {login}@{trow.name}")
        attempt.params.setdefault("qvd.vm.user.name", attempt.login)
        for p in plugins:
            try:
                p.after_authenticate(attempt, cfg)
            except QvdError as e:
                raise AuthenticationFailed(f"plugin {p.name} refused {login}@{trow.name} after login: {e}") from None
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
        self.lockout.succeeded(key)
        log.debug("user %s@%s authenticated by %s", urow.login, trow.name, by)
        return Identity(user_id=int(urow.id), login=urow.login, tenant_id=int(trow.id), tenant=trow.name,
                        params=dict(attempt.params), method="basic")

    def _bearer(self, creds: BearerCredentials) -> Identity:
        gcfg = self.configs.get(None)
        grant = None
        by = ""
        for p in self.plugins(gcfg):
            grant = self._guard(p, "authenticate_bearer", partial(p.authenticate_bearer, creds.token, gcfg))
            if grant is not None:
                by = p.name
                break
        if grant is None:
            raise AuthenticationFailed("unknown, expired or already used bearer token")
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

