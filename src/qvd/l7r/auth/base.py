"""The authentication plugin interface of the L7R.

A request is authenticated by a *chain* of plugins (:mod:`qvd.l7r.auth.chain`),
named by the configuration keys ``l7r.auth.plugins.head`` + ``l7r.auth.plugins``
+ ``l7r.auth.plugins.tail`` (default: just ``default``, the database plugin).
Plugins are found by name in the Python entry-point group ``qvd.auth``; a
name that resolves to nothing stops the L7R at start, and so does a plugin
whose :meth:`AuthPlugin.check_config` refuses the settings of any tenant that
uses it (e.g. ``ldap`` without ``auth.ldap.host``).  See docs/auth-plugins.md.

Every hook is optional: the base class implements each one as "no opinion"
(``None``), and the chain asks the plugins in order.  Hooks run in a worker
thread, never on the event loop, so they may block (LDAP, argon2); they must
open their own short database transactions through ``self.ctx.factory`` and
never keep one open across a network call (SQLite takes its write lock at BEGIN).

Basic login, in chain order (``cfg`` is the configuration of the tenant once it is known):

1. :meth:`AuthPlugin.find_tenant` - first non-None answer splits the typed login
   into (login, tenant);
2. the chain normalises both, checks the tenant exists and is not blocked;
3. :meth:`AuthPlugin.split_second_factor` - first non-None answer splits the
   password into (password, second factor), e.g. ``secret123456`` for TOTP;
4. :meth:`AuthPlugin.authenticate_basic` - the first plugin answering True
   authenticates; it may fill :attr:`Attempt.params` (``qvd.vm.user.uid``...) or
   replace :attr:`Attempt.login` (LDAP name normalisation);
5. if there is a second factor, some :meth:`AuthPlugin.authenticate_second_factor`
   must answer True;
6. :meth:`AuthPlugin.after_authenticate` runs on every plugin (auto-provisioning
   creates the user and its VMs here);
7. the chain requires the user to exist in ``users`` and not be blocked.

Bearer login: the first :meth:`AuthPlugin.authenticate_bearer` returning a
:class:`BearerGrant` wins.

After login: :meth:`AuthPlugin.allow_access_to_vm` (any True allows; nobody
saying True denies), :meth:`AuthPlugin.list_of_vm` (first non-None answer is the
list), :meth:`AuthPlugin.before_connect_to_vm` (every plugin; may add VMA
parameters or raise :class:`~qvd.core.errors.Forbidden` to refuse).

Parameters collected in :attr:`Attempt.params` / :attr:`Identity.params` are
handed to the desktop's agent (VMA) with ``x_start``: ``qvd.vm.user.name``
(defaults to the login), ``qvd.vm.user.uid``, ``qvd.vm.user.gid``,
``qvd.vm.user.home``, ``qvd.vm.user.groups``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config, Paths, resolve_root


@dataclass(frozen=True)
class PluginContext:
    """What a plugin gets at start: the database, the node's own configuration and its files."""

    factory: sessionmaker[Session]
    node_cfg: Config
    host_id: int
    paths: Paths | None = None

    @property
    def node_paths(self) -> Paths:
        """The node's files (``$QVD_ROOT``), e.g. ``etc/secret.key``."""
        return self.paths if self.paths is not None else Paths(resolve_root())

    @property
    def actor_name(self) -> str:
        """Who the audit log says acted when a plugin changes something: ``l7r:<node>``."""
        return f"l7r:{self.node_cfg.get_str('nodename') or socket.gethostname()}"[:64]


@dataclass
class Attempt:
    """A Basic login on its way through the chain; plugins may change it.

    ``tenant_id`` is set by the chain after step 2; ``params`` become the
    session's auth parameters.
    """

    raw_login: str
    login: str
    tenant: str
    password: str = field(repr=False)
    client_ip: str = ""
    extras: Mapping[str, str] = field(default_factory=dict)
    second_factor: str | None = field(default=None, repr=False)
    tenant_id: int | None = None
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BearerGrant:
    """What a plugin that accepted a bearer token knows: the user, saved parameters, a VM binding."""

    user_id: int
    params: Mapping[str, str] = field(default_factory=dict)
    vm_id: int | None = None


@dataclass(frozen=True)
class Identity:
    """An authenticated user.  ``vm_id`` set: the credentials only open that VM (bound token)."""

    user_id: int
    login: str
    tenant_id: int
    tenant: str
    params: Mapping[str, str] = field(default_factory=dict)
    method: str = "basic"
    vm_id: int | None = None

    @property
    def display(self) -> str:
        return f"{self.login}@{self.tenant}"


@dataclass(frozen=True)
class VmInfo:
    """The VM facts access decisions and ``list_of_vm`` need."""

    id: int
    name: str
    user_id: int
    tenant_id: int
    state: str
    blocked: bool
    is_application: bool
    osf_id: int


class AuthPlugin:
    """Base of every authentication plugin.  Override the hooks you need.

    ``name`` is the plugin's configuration name (the entry-point name).
    Hooks may raise :class:`~qvd.core.errors.QvdError` subclasses; in the
    authentication hooks any such error counts as a failed login.
    """

    name: ClassVar[str] = ""

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    def check_config(self, cfg: Config, tenant_id: int | None) -> None:
        """Called at L7R start for every tenant whose chain has this plugin (``tenant_id`` None: the
        global configuration when no tenant exists).  Raise :class:`~qvd.core.errors.ConfigError`
        naming the key to refuse to start; never called at a user's login."""
        return None

    def find_tenant(self, raw_login: str, cfg: Config) -> tuple[str, str] | None:
        """(login, tenant name) for the typed login, or None to let the next plugin decide."""
        return None

    def split_second_factor(self, attempt: Attempt, cfg: Config) -> tuple[str, str] | None:
        """(password, second factor) taken apart from ``attempt.password``, or None."""
        return None

    def authenticate_basic(self, attempt: Attempt, cfg: Config) -> bool | None:
        """True: this plugin vouches for login + password.  False/None: ask the next one."""
        return None

    def authenticate_second_factor(self, attempt: Attempt, cfg: Config) -> bool | None:
        """True: ``attempt.second_factor`` is valid for this user."""
        return None

    def authenticate_bearer(self, token: str, cfg: Config) -> BearerGrant | None:
        """A grant when this plugin knows the (decoded) bearer token."""
        return None

    def after_authenticate(self, attempt: Attempt, cfg: Config) -> None:
        """Runs on every plugin after a successful Basic login (e.g. provisioning)."""
        return None

    def allow_access_to_vm(self, identity: Identity, vm: VmInfo, cfg: Config) -> bool | None:
        """True allows; any plugin allowing is enough."""
        return None

    def list_of_vm(
        self, identity: Identity, applications: bool, query: Mapping[str, str], cfg: Config
    ) -> list[VmInfo] | None:
        """The VMs to show (desktops, or applications with ``applications``), or None for the default."""
        return None

    def before_connect_to_vm(self, identity: Identity, vm: VmInfo, params: dict[str, str], cfg: Config) -> None:
        """Last word before a VM is started/connected: add VMA parameters or raise Forbidden."""
        return None
