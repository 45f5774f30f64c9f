"""Where a desktop runs: the load balancer framework and its default plugin.

The framework (:func:`choose_host`) keeps the hard rules, which no plugin can bend:
candidates are backend nodes that are ``running``, not blocked, whose heartbeat is
fresher than ``internal.hkd.cluster.node.timeout``, and that can fit the OSF's memory
(free RAM published by the node's heartbeat, minus what desktops placed there since
then still need).  The plugin named by ``l7r.loadbalancer.plugin`` then picks one of
those candidates; a plugin answering anything else is an error.

Plugins are classes derived from :class:`LoadBalancer`, found by name among the
Python entry points of group ``qvd.loadbalancer`` (the shipped ``default`` is also
built in).  An unknown or broken plugin stops the L7R and the API at start
(:func:`check_plugin`), never at a user's connect.

The default plugin scores every candidate::

    w_ram * free_ram_after / ram_needed  +  w_cpu * idle_cpus  -  running_desktops / 10
    + random(0, w_random)

(weights ``l7r.loadbalancer.plugin.default.weight.{ram,cpu,random}``), so the node with
the most room wins, ties are broken by load, and the random term spreads simultaneous
starts over equal nodes.
"""

from __future__ import annotations

import datetime as dt
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qvd.core.config import Config
from qvd.core.errors import ConfigError
from qvd.core.plugins import load_plugin
from qvd.core.states import HostState, VmState
from qvd.db.models import Host, HostRuntime, Osf, Vm, VmRuntime, utcnow

ENTRY_POINT_GROUP = "qvd.loadbalancer"


@dataclass(frozen=True)
class Candidate:
    """A node that may run the desktop, with the facts its heartbeat published."""

    host_id: int
    name: str
    free_ram_mb: int  # after what desktops already placed there need
    usable_cpu: float  # idle CPUs
    load: float  # load average
    desktops: int  # desktops assigned to the node (running or on their way)


@dataclass(frozen=True)
class Need:
    """What the desktop to place needs."""

    vm_id: int | None
    memory_mb: int


class LoadBalancer(ABC):
    """A load balancer plugin: picks one of the candidates the framework found suitable."""

    name: ClassVar[str]

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], need: Need) -> Candidate | None:
        """One of ``candidates`` (never empty), or None to refuse placing the desktop now."""


class DefaultLoadBalancer(LoadBalancer):
    """Most free memory relative to the need, then idle CPUs, fewer desktops, a little chance."""

    name = "default"

    def score(self, c: Candidate, need: Need) -> float:
        w_ram = self.cfg.get_float("l7r.loadbalancer.plugin.default.weight.ram")
        w_cpu = self.cfg.get_float("l7r.loadbalancer.plugin.default.weight.cpu")
        w_rand = self.cfg.get_float("l7r.loadbalancer.plugin.default.weight.random")
        return (w_ram * c.free_ram_mb / max(need.memory_mb, 1) + w_cpu * c.usable_cpu - c.desktops / 10
                + random.uniform(0, w_rand))

    def choose(self, candidates: Sequence[Candidate], need: Need) -> Candidate | None:
        return max(candidates, key=lambda c: self.score(c, need))


#: Plugins shipped with QVD-py, found even before the package's entry points are installed.
BUILTIN_PLUGINS: Mapping[str, str] = {"default": "qvd.services.placement:DefaultLoadBalancer"}


def resolve_plugin(name: str) -> type[LoadBalancer]:
    """The load balancer class registered as ``name``; ConfigError naming the key otherwise."""
    cls: type[LoadBalancer] = load_plugin(ENTRY_POINT_GROUP, name, BUILTIN_PLUGINS, LoadBalancer,
                                          kind="load balancer", where="l7r.loadbalancer.plugin")
    return cls


def check_plugin(cfg: Config) -> None:
    """Fail at start (ConfigError) when ``l7r.loadbalancer.plugin`` cannot be used."""
    resolve_plugin(cfg.get_str("l7r.loadbalancer.plugin"))(cfg)


def candidates(s: Session, cfg: Config, memory_mb: int) -> list[Candidate]:
    """Running, unblocked backend nodes with a fresh heartbeat that can fit ``memory_mb``."""
    fresh_after = utcnow() - dt.timedelta(seconds=cfg.get_float("internal.hkd.cluster.node.timeout"))
    hosts = list(
        s.scalars(
            select(Host)
            .join(HostRuntime, HostRuntime.host_id == Host.id)
            .where(
                Host.backend.is_(True),
                HostRuntime.blocked.is_(False),
                HostRuntime.state == HostState.RUNNING,
                HostRuntime.ok_ts >= fresh_after,
            )
            .order_by(Host.id)
        )
    )
    if not hosts:
        return []
    ids = [h.id for h in hosts]
    # Memory already promised to desktops placed since the last heartbeat is not yet in
    # usable_ram; count what non-running desktops of each node need.
    promised: dict[int, int] = {
        hid: int(mem) for hid, mem in s.execute(
            select(VmRuntime.host_id, func.coalesce(func.sum(Osf.memory), 0))
            .join(Vm, Vm.id == VmRuntime.vm_id)
            .join(Osf, Osf.id == Vm.osf_id)
            .where(VmRuntime.host_id.in_(ids), VmRuntime.vm_state != VmState.RUNNING)
            .group_by(VmRuntime.host_id)
        ).all() if hid is not None
    }
    desktops: dict[int, int] = {
        hid: int(n) for hid, n in s.execute(
            select(VmRuntime.host_id, func.count(VmRuntime.vm_id))
            .where(VmRuntime.host_id.in_(ids))
            .group_by(VmRuntime.host_id)
        ).all() if hid is not None
    }
    out = []
    for h in hosts:
        free = h.runtime.usable_ram - promised.get(h.id, 0)
        if free >= memory_mb:
            out.append(Candidate(h.id, h.name, free, float(h.runtime.usable_cpu), float(h.runtime.load or 0.0),
                                 desktops.get(h.id, 0)))
    return out


def choose_host(s: Session, cfg: Config, memory_mb: int, vm_id: int | None = None) -> Host | None:
    """The node the configured plugin picks among the suitable ones, or None if there is none."""
    found = candidates(s, cfg, memory_mb)
    if not found:
        return None
    plugin = resolve_plugin(cfg.get_str("l7r.loadbalancer.plugin"))(cfg)
    pick = plugin.choose(found, Need(vm_id, memory_mb))
    if pick is None:
        return None
    if pick not in found:
        raise ConfigError(f"load balancer plugin '{plugin.name}' picked host {pick.host_id}, "
                          "which is not one of the suitable candidates")
    return s.get(Host, pick.host_id)
