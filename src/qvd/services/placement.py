"""Where a desktop runs: the default load balancer.

Candidates are backend nodes that are running, not blocked and whose heartbeat is
fresh.  A node that cannot fit the OSF's memory is never chosen.  Score:

    w_ram * free_ram_after / ram_needed  +  w_cpu * idle_cpus  -  running_desktops / 10
    + random(0, w_random)

so the node with the most room wins, ties are broken by load, and the random term
spreads simultaneous starts.  Everything read here is published by the nodes'
heartbeats (``host_runtimes.usable_ram``/``usable_cpu``).
"""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qvd.core.config import Config
from qvd.core.states import HostState, VmState
from qvd.db.models import Host, HostRuntime, Osf, Vm, VmRuntime, utcnow


def choose_host(s: Session, cfg: Config, memory_mb: int) -> Host | None:
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
        )
    )
    if not hosts:
        return None
    # Memory already promised to desktops placed since the last heartbeat is not yet in
    # usable_ram; count what non-stopped desktops of each node need.
    promised: dict[int, int] = {
        hid: int(mem) for hid, mem in s.execute(
            select(VmRuntime.host_id, func.coalesce(func.sum(Osf.memory), 0))
            .join(Vm, Vm.id == VmRuntime.vm_id)
            .join(Osf, Osf.id == Vm.osf_id)
            .where(VmRuntime.host_id.in_([h.id for h in hosts]), VmRuntime.vm_state != VmState.RUNNING)
            .group_by(VmRuntime.host_id)
        ).all() if hid is not None
    }
    running: dict[int, int] = {
        hid: int(n) for hid, n in s.execute(
            select(VmRuntime.host_id, func.count(VmRuntime.vm_id))
            .where(VmRuntime.host_id.in_([h.id for h in hosts]))
            .group_by(VmRuntime.host_id)
        ).all() if hid is not None
    }
    w_ram = cfg.get_float("l7r.loadbalancer.plugin.default.weight.ram")
    w_cpu = cfg.get_float("l7r.loadbalancer.plugin.default.weight.cpu")
    w_rand = cfg.get_float("l7r.loadbalancer.plugin.default.weight.random")
    best: tuple[float, Host] | None = None
    for h in hosts:
        free = h.runtime.usable_ram - int(promised.get(h.id, 0))
        if free < memory_mb:
            continue
        score = (
            w_ram * free / max(memory_mb, 1)
            + w_cpu * h.runtime.usable_cpu
            - running.get(h.id, 0) / 10
            + random.uniform(0, w_rand)
        )
        if best is None or score > best[0]:
            best = (score, h)
    return best[1] if best else None
