"""What the heartbeat publishes about the node's capacity, read from /proc.

``usable_ram`` (MB) is ``MemAvailable`` minus what running desktops may still take:
a desktop's cgroup limit is its OSF memory, but ``MemAvailable`` only shows what it
uses now, so a node full of idle desktops would look empty.  We subtract the whole
OSF memory of every running desktop; this counts their current use twice, which errs
on the side of not over-booking a node.  Desktops that are still starting are not
subtracted here because the load balancer adds them itself
(:mod:`qvd.services.placement`), and counting them in both places would hide the
node.

``usable_cpu`` is the idle CPUs estimate ``max(0, cpus - loadavg(1 min))`` and
``load`` the 1-minute load average.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Capacity:
    usable_ram: int
    usable_cpu: float
    load: float


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as {field: kB}; lines that do not parse are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0])
    return out


def available_mb(meminfo: dict[str, int]) -> int:
    # Kernels before 3.14 have no MemAvailable: approximate it as the kernel did.
    kb = meminfo.get("MemAvailable")
    if kb is None:
        kb = meminfo.get("MemFree", 0) + meminfo.get("Buffers", 0) + meminfo.get("Cached", 0)
    return kb // 1024


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def capacity(promised_mb: int, *, meminfo_text: str | None = None, load1: float | None = None,
             cpus: int | None = None) -> Capacity:
    """The node's capacity now; the keyword arguments replace /proc readings (tests)."""
    text = meminfo_text if meminfo_text is not None else MEMINFO.read_text()
    avail = available_mb(parse_meminfo(text))
    load = load1 if load1 is not None else os.getloadavg()[0]
    n = cpus if cpus is not None else cpu_count()
    return Capacity(usable_ram=max(0, avail - max(0, promised_mb)), usable_cpu=round(max(0.0, n - load), 2),
                    load=round(load, 2))
