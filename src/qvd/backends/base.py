"""The desktop backend interface: what the node daemon (HKD) asks of LXC, KVM, ...

Lifecycle of one desktop, driven by the HKD's VM handler (each call is one
resumable step; every call is idempotent so a restarted HKD can repeat it):

    check()                      once, at HKD start: tools present, bridge up, firewall set
    list_desktops()              at HKD start and periodically: what this node really runs
    prepare(spec)                unpack the DI base once per node (concurrency-safe), make a
                                 fresh (or persistent) system layer and the persistent home
    start(spec)                  launch; returns when the desktop's processes exist
    [HKD pings the VMA at endpoint(spec).vma until it answers]
    [graceful stop: HKD calls the VMA's poweroff and waits for is_running() to turn False]
    stop(vm_id, force=True)      forced stop when the graceful one did not finish in time
    cleanup(vm_id)               kill leftovers, unmount everything, delete veths and
                                 generated config; leaves the home (and a persistent
                                 overlay) in place.  After it, nothing of the desktop runs
                                 or is mounted.

Backends never touch the database: the HKD hands them a :class:`DesktopSpec`.
Errors are raised as :class:`qvd.core.errors.BackendError` with a message fit for
an operator (it ends up in ``vm_runtimes.last_error``).

Backends are registered by name in :data:`REGISTRY`; an unknown name fails loudly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from qvd.core.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class DesktopSpec:
    """Everything a backend needs to run one desktop."""

    vm_id: int
    name: str  # VM name, used as the desktop's host name
    di_id: int
    image: Path  # the DI tarball
    memory_mb: int
    address: str  # IPv4 of the desktop on the node bridge
    prefix_len: int  # e.g. 16 for 255.255.0.0
    gateway: str
    mac: str
    home_key: str  # "vm-<id>" or "user-<tenant>-<login>" (vm.lxc.home.per.user)
    persistent_overlay: bool = False
    user_storage_mb: int = 0
    vma_port: int = 3030
    nx_port: int = 4100
    # Backend-specific per-desktop settings.  LXC: only VMA configuration keys
    # (vma.*, internal.nxagent.*, log.level), written to the desktop's
    # /etc/qvd/vma.toml over the node's values; any other key is refused.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DesktopInfo:
    """What the backend observes about one desktop of this node."""

    vm_id: int
    running: bool
    pid: int | None = None


class Backend(abc.ABC):
    """One hypervisor.  Subclasses document their storage and network layout."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def supported(cls) -> tuple[bool, str]:
        """Whether this machine can run the backend at all, and why not."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Verify tools and prepare node-wide resources (bridge, firewall).

        Post: the node can start desktops.  Raises BackendError naming what is missing.
        """

    @abc.abstractmethod
    async def list_desktops(self) -> list[DesktopInfo]:
        """Every desktop this backend has on the node, running or left defined/mounted."""

    @abc.abstractmethod
    async def prepare(self, spec: DesktopSpec) -> None:
        """Make the root filesystem and home ready.  Idempotent; safe to run concurrently
        for desktops of the same DI (the base is unpacked once)."""

    @abc.abstractmethod
    async def start(self, spec: DesktopSpec) -> None:
        """Launch the desktop.  Pre: prepare(spec) done.  Post: is_running(vm_id)."""

    @abc.abstractmethod
    async def is_running(self, vm_id: int) -> bool:
        """Whether the desktop's processes exist."""

    @abc.abstractmethod
    def endpoint_vma(self, spec: DesktopSpec) -> Endpoint:
        """Where the node reaches the desktop's agent."""

    @abc.abstractmethod
    def endpoint_nx(self, spec: DesktopSpec) -> Endpoint:
        """Where the L7R reaches the desktop's nxagent."""

    @abc.abstractmethod
    async def stop(self, vm_id: int) -> None:
        """Force the desktop down (all its processes killed).  Post: not is_running(vm_id)."""

    @abc.abstractmethod
    async def cleanup(self, vm_id: int) -> None:
        """Remove runtime leftovers (mounts, veth, config).  Idempotent.  Keeps homes."""


REGISTRY: dict[str, Callable[..., Backend]] = {}


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def deco(cls: type[Backend]) -> type[Backend]:
        REGISTRY[name] = cls
        return cls

    return deco


def backend_class(name: str) -> Callable[..., Backend]:
    # Import the implementations so that they register themselves.
    from qvd.backends import available  # noqa: F401

    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"invalid value {name!r} for configuration key 'vm.hypervisor': expected one of "
            + ", ".join(sorted(REGISTRY))
        ) from None
