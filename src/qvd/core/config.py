"""Typed configuration: every key, its type, default and meaning, in code.

Layers, later wins:

1. the defaults below (:data:`KEYS`);
2. the node file ``$QVD_ROOT/etc/node.toml`` (TOML; dotted keys or tables, both flatten
   to the same dotted name: ``l7r.port = 8443`` or ``[l7r] port = 8443``);
3. global rows of the ``configs`` table;
4. per-tenant rows of the ``configs`` table, only for keys marked ``tenant=True``.

A key that is not declared here, or a value that does not fit its key, is refused
with a :class:`~qvd.core.errors.ConfigError` naming the key, the value and what is
allowed.  Key names follow the reference QVD (``l7r.port``, ``vm.network.ip.start``,
``internal.l7r.timeout.vm_start``...); where our default differs from QVD's it is on
purpose (faster failure detection, shorter timeouts) and the help says so.

This module does no I/O except reading the node file in :func:`load_node_config`;
the database layers are read by ``qvd.db.queries.load_config``.  It imports only the
standard library because the in-desktop agent (VMA) uses it too.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvd.core.errors import ConfigError

DEFAULT_ROOT = Path("/var/lib/qvd")


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``str``, ``choice``, ``ipv4``,
    ``list`` (comma separated strings).  ``tenant`` says whether a tenant may
    override it in the database; ``node_only`` keys are never read from the database.
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    tenant: bool = False
    node_only: bool = False

    def allowed(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("int", "float"):
            what = "an integer" if self.kind == "int" else "a number"
            if self.minimum is not None and self.maximum is not None:
                return f"{what} from {self.minimum:g} to {self.maximum:g}"
            if self.minimum is not None:
                return f"{what} >= {self.minimum:g}"
            return what
        return {
            "bool": "a boolean (true/false, 1/0, yes/no, on/off)",
            "str": "a string",
            "ipv4": "an IPv4 address such as 10.0.0.1",
            "list": "a comma-separated list of names",
        }[self.kind]


def _k(name: str, kind: str, default: Any, help: str, **kw: Any) -> Key:
    return Key(name, kind, default, help, **kw)


_PORT = {"minimum": 1, "maximum": 65535}
_POS = {"minimum": 0}
_SECS = {"minimum": 0}

_KEY_LIST: list[Key] = [
    # --- node identity and storage -------------------------------------------------------------
    _k("nodename", "str", "", "name of this node (hosts.name); empty = the machine's host name", node_only=True),
    _k("node.address", "str", "127.0.0.1", "address other nodes and the L7R use to reach this node",
       node_only=True),
    _k("node.frontend", "bool", True, "this node runs an L7R", node_only=True),
    _k("node.backend", "bool", True, "this node runs desktops (HKD)", node_only=True),
    _k("path.storage.images", "str", "", "directory of the disk images (DIs); empty = $QVD_ROOT/storage/images. "
       "In a cluster every node must see the same images: a shared directory (NFS, ...)", node_only=True),
    _k("path.storage.homes", "str", "", "directory of the desktops' persistent homes; empty = "
       "$QVD_ROOT/storage/homes. In a cluster: a directory shared by all nodes, so that a desktop restarted "
       "on another node finds its home", node_only=True),
    _k("database.url", "str", "", "SQLAlchemy URL; empty = SQLite at $QVD_ROOT/qvd.db; for PostgreSQL "
       "postgresql+psycopg://user:pass@host/db", node_only=True),
    _k("log.level", "choice", "INFO", "log level of the daemons", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _k("model.user.login.case-sensitive", "bool", False, "keep the case of logins and tenant names"),
    # --- admin API -----------------------------------------------------------------------------
    _k("api.address", "str", "127.0.0.1", "address qvd-api listens on", node_only=True),
    _k("api.port", "int", 8080, "port qvd-api listens on", node_only=True, **_PORT),
    _k("api.token.ttl", "int", 8 * 3600, "lifetime of an admin API token, seconds", minimum=60),
    _k("api.page.max", "int", 1000, "largest page a list request may ask for", minimum=1),
    # --- L7R -----------------------------------------------------------------------------------
    _k("l7r.address", "str", "0.0.0.0", "address the L7R listens on", node_only=True),
    _k("l7r.port", "int", 8443, "port the L7R listens on (the one port users reach)", node_only=True, **_PORT),
    _k("l7r.use_ssl", "bool", True, "TLS on the L7R port (plain HTTP only for tests)", node_only=True),
    _k("l7r.ssl.cert", "str", "", "PEM certificate; empty = $QVD_ROOT/etc/l7r/cert.pem (generated if absent)",
       node_only=True),
    _k("l7r.ssl.key", "str", "", "PEM key; empty = $QVD_ROOT/etc/l7r/key.pem (generated if absent)",
       node_only=True),
    _k("l7r.client.cert.require", "bool", False, "require TLS client certificates"),
    _k("l7r.auth.plugins", "list", "", "authentication plugins between head and tail", tenant=True),
    _k("l7r.auth.plugins.head", "list", "", "plugins always run first", tenant=True),
    _k("l7r.auth.plugins.tail", "list", "default", "plugins always run last", tenant=True),
    _k("l7r.auth.plugin.default.separators", "str", "@#", "characters that split login and tenant"),
    _k("l7r.auth.plugin.default.tenant", "str", "default", "tenant of logins without a tenant suffix"),
    _k("l7r.auth.plugin.totp.token_size", "int", 6, "digits of a TOTP code", minimum=6, maximum=8, tenant=True),
    _k("l7r.auth.plugin.totp.interval", "int", 30, "TOTP step, seconds", minimum=1, tenant=True),
    _k("l7r.auth.plugin.totp.t0", "int", 0, "TOTP epoch offset", tenant=True),
    _k("l7r.auth.plugin.totp.leeway", "int", 1, "steps accepted before now", minimum=0, tenant=True),
    _k("l7r.auth.plugin.totp.leeway_before", "int", 0, "steps accepted after now", minimum=0, tenant=True),
    _k("l7r.auth.plugin.totp.optional", "bool", False, "users without a TOTP secret log in with the password "
       "alone (default: every user of a tenant using the totp plugin needs one)", tenant=True),
    _k("l7r.auth.plugin.totp.issuer", "str", "QVD", "issuer shown by authenticator apps", tenant=True),
    _k("l7r.auth.lockout.max_failures", "int", 5, "failures before a temporary lockout", minimum=1,
       tenant=True),
    _k("l7r.auth.lockout.time", "int", 300, "lockout duration, seconds", minimum=1, tenant=True),
    _k("l7r.auth.lockout.delay", "float", 1.0, "pause imposed after the n-th consecutive failed login of a "
       "login name, n >= 2: delay * 2^(n-2) seconds, at most l7r.auth.lockout.time (0 = none)", minimum=0,
       tenant=True),
    _k("l7r.auth.lockout.address.max_failures", "int", 100, "failed logins from one client address within "
       "l7r.auth.lockout.time before the address is locked out (0 = no per-address lockout)", minimum=0),
    _k("l7r.auth.token.ttl", "int", 24 * 3600, "lifetime of a user bearer token, seconds", minimum=1,
       tenant=True),
    _k("auth.ldap.host", "str", "", "LDAP URL(s), ldap://host or ldaps://host", tenant=True),
    _k("auth.ldap.base", "str", "", "search base", tenant=True),
    _k("auth.ldap.filter", "str", "(uid=%u)", "search filter, %u = login", tenant=True),
    _k("auth.ldap.scope", "choice", "sub", "search scope", choices=("base", "one", "sub"), tenant=True),
    _k("auth.ldap.deref", "choice", "never", "alias dereferencing",
       choices=("never", "search", "find", "always"), tenant=True),
    _k("auth.ldap.binddn", "str", "", "service account DN for search-then-bind", tenant=True),
    _k("auth.ldap.bindpass", "str", "", "service account password", tenant=True),
    _k("auth.ldap.userbindpattern", "str", "", "direct bind DN pattern, %u = login", tenant=True),
    _k("auth.ldap.starttls", "bool", False, "use StartTLS on ldap:// URLs", tenant=True),
    _k("auth.ldap.ca", "str", "", "CA file to verify the LDAP server; empty = system CAs", tenant=True),
    _k("auth.ldap.group", "str", "", "DN of a group whose members may log in; empty = everybody",
       tenant=True),
    _k("auth.ldap.timeout", "int", 5, "LDAP connect/operation timeout, seconds", minimum=1, tenant=True),
    _k("auth.auto.osf", "str", "", "OSF name of VMs created for auto-provisioned users", tenant=True),
    _k("auth.auto.di_tag", "str", "default", "DI tag of auto-provisioned VMs", tenant=True),
    _k("auth.auto.max_vms", "int", 1, "VMs created per auto-provisioned user", minimum=0, tenant=True),
    _k("l7r.loadbalancer.plugin", "str", "default", "load balancer plugin"),
    _k("l7r.loadbalancer.plugin.default.weight.ram", "float", 1.0, "weight of free RAM", minimum=0),
    _k("l7r.loadbalancer.plugin.default.weight.cpu", "float", 1.0, "weight of free CPU", minimum=0),
    _k("l7r.loadbalancer.plugin.default.weight.random", "float", 0.1, "weight of the random term", minimum=0),
    _k("internal.l7r.timeout.vm_start", "int", 270, "seconds to wait for a VM to run", **_SECS),
    _k("internal.l7r.timeout.vm_stop", "int", 270, "seconds to wait for a VM to stop", **_SECS),
    _k("internal.l7r.timeout.x_start", "int", 10, "seconds to wait for the X session to listen", **_SECS),
    _k("internal.l7r.timeout.vma", "int", 4, "timeout of one VMA call, seconds", minimum=1),
    _k("internal.l7r.timeout.takeover", "int", 30, "seconds to take a VM over from another client", **_SECS),
    _k("internal.l7r.retry.x_start", "int", 20, "x_start retries", **_POS),
    _k("internal.l7r.poll_time.vm", "float", 0.5, "VM state poll period, seconds (QVD: 2)", minimum=0.05),
    _k("internal.l7r.poll_time.x", "float", 0.25, "X state poll period, seconds (QVD: 1)", minimum=0.05),
    _k("internal.l7r.short_session", "int", 120, "sessions shorter than this are counted as short", **_SECS),
    _k("internal.l7r.timeout.shutdown", "float", 5.0,
       "on SIGTERM, seconds live tunnels may keep running before the L7R closes them", minimum=0),
    _k("l7r.metrics.address", "str", "127.0.0.1", "address of the L7R's Prometheus metrics endpoint",
       node_only=True),
    _k("l7r.metrics.port", "int", 9101, "port of the L7R's Prometheus metrics endpoint (0 = disabled)",
       node_only=True, minimum=0, maximum=65535),
    # --- HKD -----------------------------------------------------------------------------------
    _k("vm.hypervisor", "choice", "lxc", "desktop backend (fake is for unit tests only)",
       choices=("lxc", "kvm", "fake")),
    _k("internal.hkd.max_heavy", "int", 10, "desktops starting or stopping at once on a node", minimum=1),
    _k("internal.hkd.agent.ticker.delay", "float", 2.0, "heartbeat period, seconds (QVD: 120)", minimum=0.1),
    _k("internal.hkd.agent.ticker.timeout", "float", 6.0,
       "self-fencing: stop own desktops when the heartbeat cannot be written this long (QVD: 450)",
       minimum=0.5),
    _k("internal.hkd.cluster.node.timeout", "float", 10.0,
       "a peer whose heartbeat is older is declared lost (QVD: 600)", minimum=1),
    _k("internal.hkd.agent.cluster_monitor.delay", "float", 2.0, "lost-node check period, seconds", minimum=0.1),
    _k("internal.hkd.agent.command_handler.delay", "float", 1.0, "command poll period, seconds (QVD: 60)",
       minimum=0.05),
    _k("internal.hkd.agent.expiration_monitor.delay", "float", 60.0, "expiration check period (QVD: 3600)",
       minimum=1),
    _k("internal.hkd.agent.rpc.timeout", "float", 3.0, "timeout of one HKD->VMA call", minimum=0.1),
    _k("internal.hkd.agent.rpc.retry.count", "int", 3, "retries of HKD->VMA calls", **_POS),
    _k("internal.hkd.agent.rpc.retry.delay", "float", 1.0, "pause between HKD->VMA retries", **_POS),
    _k("internal.hkd.vmhandler.vma.failed.max_count.on.starting", "int", 40, "failed pings while starting",
       minimum=1),
    _k("internal.hkd.vmhandler.vma.failed.max_count.on.running", "int", 5, "failed pings while running",
       minimum=1),
    _k("internal.hkd.vmhandler.vma.failed.max_time.on.starting", "float", 60.0,
       "seconds without an answer while starting before the desktop is declared dead", minimum=1),
    _k("internal.hkd.vmhandler.vma.failed.max_time.on.running", "float", 30.0,
       "seconds without an answer while running before the desktop is declared dead", minimum=1),
    _k("internal.hkd.vmhandler.vma_monitor.delay.after.ok", "float", 10.0, "ping period when healthy",
       minimum=0.1),
    _k("internal.hkd.vmhandler.vma_monitor.delay.after.error", "float", 2.0, "ping period after a failure",
       minimum=0.1),
    _k("internal.hkd.lxc.timeout.on_state.shutdown", "float", 15.0,
       "graceful stop (VMA poweroff) before forcing, seconds", minimum=0),
    _k("internal.hkd.lxc.timeout.on_state.stop", "float", 15.0, "forced stop before reaping", minimum=0),
    _k("internal.hkd.stopping.vms.timeout", "float", 60.0, "time to stop all desktops at HKD stop", minimum=0),
    _k("internal.hkd.zombie.retry.delay", "float", 10.0,
       "pause between attempts to reap a desktop that failed to stop (QVD: 60)", minimum=0.1),
    _k("internal.vm.debug.enable", "bool", False, "keep desktops whose agent died in 'debugging'"),
    _k("internal.vm.port.vma", "int", 3030, "VMA port inside a desktop", **_PORT),
    _k("internal.nxagent.display", "int", 100, "X display of the session; NX port = 4000 + display",
       minimum=1, maximum=1000),
    _k("vm.network.bridge", "str", "qvdnet", "bridge the desktops' veths join"),
    _k("vm.network.ip.start", "ipv4", "10.231.0.100", "first desktop address; nodes use network+1..start-1"),
    _k("vm.network.netmask", "ipv4", "255.255.0.0", "netmask of the desktop network"),
    _k("vm.network.gateway", "str", "", "gateway given to desktops; empty = network + 1 (the bridge)"),
    _k("vm.network.host.address", "str", "", "this node's address on the desktop network (between network + 1 "
       "and vm.network.ip.start - 1, different on every node of a cluster); empty = the gateway (one node)",
       node_only=True),
    _k("vm.network.domain", "str", "", "DNS domain of desktops"),
    _k("vm.network.mac.prefix", "str", "54:52:00", "first three octets of desktop MACs"),
    _k("internal.vm.network.firewall.enable", "bool", True, "isolate desktops with iptables"),
    _k("vm.lxc.home.per.user", "bool", False, "one home per user instead of per VM"),
    _k("vm.overlay.persistent", "bool", False, "keep a desktop's system overlay between starts"),
    _k("vm.kvm.cpus", "int", 1, "vCPUs of KVM desktops", minimum=1),
    _k("vm.kvm.accel", "choice", "auto", "KVM acceleration", choices=("auto", "kvm", "tcg")),
    _k("osf.default.memory", "int", 256, "memory of new OSFs, MB", minimum=16),
    _k("osf.default.overlay", "bool", True, "new OSFs use an overlay"),
    # --- images --------------------------------------------------------------------------------
    _k("image.suite", "str", "bookworm", "Debian suite of built images"),
    _k("image.mirror", "str", "", "Debian mirror; empty = the one configured in apt"),
    _k("image.cache", "str", "", "build cache directory; empty = /var/cache/qvd/images", node_only=True),
    # --- VMA (inside the desktop) --------------------------------------------------------------
    _k("vma.user.default.name", "str", "qvd", "desktop user when the broker gives none"),
    _k("vma.user.groups", "str", "qvduser", "extra groups of the desktop user"),
    _k("vma.user.shell", "str", "/bin/bash", "login shell of the desktop user"),
    _k("vma.user.home.path", "str", "/home", "parent of desktop homes"),
    _k("vma.default.lang", "str", "C.UTF-8", "LANG of sessions"),
    _k("vma.x-session", "str", "", "session command; empty = a window manager and a terminal"),
    _k("internal.nxagent.timeout.listening", "float", 30.0, "seconds an unattached session waits (QVD: 10)",
       minimum=1),
    _k("internal.nxagent.timeout.suspending", "float", 20.0, "seconds allowed to suspend", minimum=1),
    _k("internal.nxagent.timeout.stopping", "float", 20.0, "seconds allowed to stop", minimum=1),
    *[_k(f"vma.on_action.{a}", "str", "", f"hook run before '{a}' (non-zero exit aborts)")
      for a in ("pre-connect", "connect", "suspend", "stop", "poweroff", "expire")],
    *[_k(f"vma.on_state.{s}", "str", "", f"hook run when the session becomes {s}")
      for s in ("connected", "suspended", "disconnected")],
    *[_k(f"vma.on_provisioning.{p}", "str", "", f"provisioning hook '{p}'")
      for p in ("mount_home", "add_user", "after_add_user")],
    # --- client --------------------------------------------------------------------------------
    _k("client.host.port", "int", 8443, "default L7R port of qvd-client", **_PORT),
    _k("client.link", "choice", "adsl", "NX link type", choices=("modem", "isdn", "adsl", "wan", "lan")),
    _k("client.geometry", "str", "1024x768", "desktop size"),
    _k("client.fullscreen", "bool", False, "full screen"),
]

KEYS: Mapping[str, Key] = {k.name: k for k in _KEY_LIST}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def key(name: str) -> Key:
    """Return the declared key or raise :class:`ConfigError` naming close matches."""
    try:
        return KEYS[name]
    except KeyError:
        close = difflib.get_close_matches(name, KEYS.keys(), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown configuration key '{name}'{hint}") from None


def parse_value(name: str, raw: object) -> object:
    """Validate ``raw`` (a TOML value or a string from the database) for key ``name``."""
    k = key(name)

    def bad() -> ConfigError:
        return ConfigError(f"invalid value {raw!r} for configuration key '{name}': expected {k.allowed()}")

    if k.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise bad()
    if k.kind in ("int", "float"):
        if isinstance(raw, bool):
            raise bad()
        try:
            if k.kind == "int":
                if isinstance(raw, float):
                    raise ValueError
                num: float = int(raw) if isinstance(raw, int) else int(str(raw).strip(), 10)
            else:
                num = float(raw) if isinstance(raw, int | float) else float(str(raw).strip())
        except (TypeError, ValueError):
            raise bad() from None
        if (k.minimum is not None and num < k.minimum) or (k.maximum is not None and num > k.maximum):
            raise bad()
        return num
    if not isinstance(raw, str):
        if k.kind == "list" and isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            raw = ",".join(raw)
        else:
            raise bad()
    if k.kind == "choice":
        if raw not in k.choices:
            raise bad()
        return raw
    if k.kind == "ipv4":
        try:
            return str(ipaddress.IPv4Address(raw.strip()))
        except ValueError:
            raise bad() from None
    if k.kind == "list":
        return ",".join(p.strip() for p in raw.split(",") if p.strip())
    return raw


def flatten_toml(data: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    """Turn nested TOML tables into dotted keys: ``{"l7r": {"port": 1}}`` -> ``{"l7r.port": 1}``."""
    out: dict[str, object] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_toml(v, name + "."))
        else:
            out[name] = v
    return out


@dataclass(frozen=True)
class Config:
    """An immutable set of validated values over the defaults."""

    values: Mapping[str, object] = field(default_factory=dict)

    def get(self, name: str) -> object:
        k = key(name)
        return self.values.get(name, k.default)

    def get_int(self, name: str) -> int:
        v = self.get(name)
        if key(name).kind != "int" or not isinstance(v, int):
            raise TypeError(f"{name} is not an int key")
        return v

    def get_float(self, name: str) -> float:
        v = self.get(name)
        if key(name).kind not in ("float", "int") or not isinstance(v, int | float):
            raise TypeError(f"{name} is not a number key")
        return float(v)

    def get_bool(self, name: str) -> bool:
        v = self.get(name)
        if key(name).kind != "bool" or not isinstance(v, bool):
            raise TypeError(f"{name} is not a bool key")
        return v

    def get_str(self, name: str) -> str:
        v = self.get(name)
        if key(name).kind not in ("str", "choice", "ipv4", "list"):
            raise TypeError(f"{name} is not a string key")
        return str(v)

    def get_list(self, name: str) -> list[str]:
        return [p for p in self.get_str(name).split(",") if p]

    def overlay(self, raw: Mapping[str, object], *, source: str, tenant: bool = False) -> Config:
        """Return a new Config with ``raw`` validated and laid over this one.

        ``source`` names the layer in error messages; with ``tenant`` only
        tenant-overridable keys are accepted.
        """
        merged = dict(self.values)
        for name, value in raw.items():
            try:
                k = key(name)
                if source != "node file" and k.node_only:
                    raise ConfigError(f"configuration key '{name}' can only be set in the node file")
                if tenant and not k.tenant:
                    raise ConfigError(f"configuration key '{name}' cannot be set per tenant")
                merged[name] = parse_value(name, value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e.message}") from None
        return Config(merged)


def resolve_root(cli_root: str | os.PathLike[str] | None = None) -> Path:
    """``--root`` beats ``$QVD_ROOT`` beats ``/var/lib/qvd``."""
    if cli_root:
        return Path(cli_root).resolve()
    env = os.environ.get("QVD_ROOT")
    return Path(env).resolve() if env else DEFAULT_ROOT


@dataclass(frozen=True)
class Paths:
    """Every path of a node, all under one root."""

    root: Path
    #: ``path.storage.images`` / ``path.storage.homes`` when set (shared storage of a cluster)
    images_dir: Path | None = None
    homes_dir: Path | None = None

    @classmethod
    def for_node(cls, root: Path, cfg: Config) -> Paths:
        """The paths of a node, with the storage directories its configuration moves elsewhere."""
        images, homes = cfg.get_str("path.storage.images"), cfg.get_str("path.storage.homes")
        for key, value in (("path.storage.images", images), ("path.storage.homes", homes)):
            if value and not Path(value).is_absolute():
                raise ConfigError(f"invalid value {value!r} for configuration key '{key}': expected an absolute path")
        return cls(root, Path(images) if images else None, Path(homes) if homes else None)

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def node_file(self) -> Path:
        return self.etc / "node.toml"

    @property
    def qa_file(self) -> Path:
        return self.etc / "qa.toml"

    @property
    def admin_password_file(self) -> Path:
        return self.etc / "admin-password"

    @property
    def sqlite_db(self) -> Path:
        return self.root / "qvd.db"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def images(self) -> Path:
        return self.images_dir or self.storage / "images"

    @property
    def homes(self) -> Path:
        return self.homes_dir or self.storage / "homes"

    @property
    def l7r_dir(self) -> Path:
        return self.etc / "l7r"


def load_node_file(path: Path) -> dict[str, object]:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return flatten_toml(data)


def load_node_config(root: Path, extra: Mapping[str, object] | None = None) -> Config:
    """Defaults + ``$QVD_ROOT/etc/node.toml`` (+ ``extra``, e.g. command-line overrides)."""
    cfg = Config().overlay(load_node_file(Paths(root).node_file), source="node file")
    if extra:
        cfg = cfg.overlay(extra, source="node file")
    return cfg


def describe(names: Iterable[str] | None = None) -> list[Key]:
    """Keys for documentation and ``qvd config keys``."""
    return [KEYS[n] for n in (names or sorted(KEYS))]
