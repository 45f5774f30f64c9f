"""What the heartbeat publishes about the node's capacity."""

from __future__ import annotations

from qvd.hkd.sysinfo import available_mb, capacity, parse_meminfo

MEMINFO = """MemTotal:       24684096 kB
MemFree:        23471700 kB
MemAvailable:    4194304 kB
Buffers:          102400 kB
Cached:           204800 kB
HugePages_Total:       0
"""


def test_parse_meminfo() -> None:
    m = parse_meminfo(MEMINFO)
    assert m["MemAvailable"] == 4194304 and m["HugePages_Total"] == 0
    assert available_mb(m) == 4096


def test_old_kernels_without_memavailable() -> None:
    m = parse_meminfo("MemFree: 1024000 kB\nBuffers: 1024 kB\nCached: 23552 kB\n")
    assert available_mb(m) == 1024


def test_capacity_subtracts_promised_memory_and_load() -> None:
    c = capacity(1000, meminfo_text=MEMINFO, load1=0.5, cpus=2)
    assert (c.usable_ram, c.usable_cpu, c.load) == (3096, 1.5, 0.5)
    c = capacity(10_000, meminfo_text=MEMINFO, load1=3.0, cpus=2)
    assert (c.usable_ram, c.usable_cpu) == (0, 0.0)  # never negative


def test_capacity_of_this_machine() -> None:
    c = capacity(0)
    assert c.usable_ram > 0 and c.usable_cpu >= 0 and c.load >= 0
