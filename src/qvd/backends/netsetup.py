"""Privileged host commands of the LXC backend, in one place for review.

Everything that changes the node (links, bridges, addresses, firewall rules, sysctls,
mounts) goes through :func:`run`: explicit argv lists, never a shell, always a
timeout, failures raised as :class:`~qvd.core.errors.BackendError` naming the
command.  The ``lxc-*`` and ``tar`` calls live in the "privileged commands"
section of :mod:`qvd.backends.lxc` and use :func:`run` too.

Network policy for the desktops' bridge (set by :func:`ensure_firewall`):

* desktops cannot talk to each other: every desktop's bridge port is "isolated"
  (``bridge link set dev <veth> isolated on``; isolated ports only forward to
  non-isolated ones, i.e. the bridge itself).  Tested on this kernel: works for
  IPv4 and IPv6 alike, and needs no br_netfilter.  (nft-based ebtables refuses
  ``--logical-in``; iptables FORWARD only sees bridged frames when the host sets
  ``bridge-nf-call-iptables``, which we do not want to depend on.)
* desktops cannot open connections to the node: INPUT from the bridge accepts
  only ESTABLISHED/RELATED, so the node reaches the VMA and nxagent in the desktop
  but nothing in the desktop reaches the node's services, on any of its addresses;
* nothing is forwarded between the bridge and other interfaces;
* IPv6 is off on the bridge, so desktops have no IPv6 path to the node at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qvd.core.errors import BackendError

log = logging.getLogger(__name__)

_SYS_NET = Path("/sys/class/net")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


async def run(argv: list[str], *, timeout: float = 30.0, check: bool = True) -> CommandResult:
    """Run one command.  With ``check``, a non-zero exit raises BackendError."""
    log.debug("run %s", argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
    except OSError as e:
        raise BackendError(f"cannot run {argv[0]}: {e.strerror}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        if isinstance(e, asyncio.CancelledError):
            raise
        raise BackendError(f"{' '.join(argv)}: no answer after {timeout:g} s") from None
    res = CommandResult(tuple(argv), proc.returncode if proc.returncode is not None else -1,
                        out.decode(errors="replace"), err.decode(errors="replace"))
    if check and res.returncode != 0:
        detail = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise BackendError(
            f"{' '.join(argv)} failed (exit status {res.returncode})" + (f": {detail[-1]}" if detail else "")
        )
    return res


def check_ifname(name: str) -> str:
    if not _IFNAME.fullmatch(name):
        raise BackendError(f"invalid network interface name {name!r}: at most 15 of A-Z a-z 0-9 _ . -")
    return name


# --- links and the bridge ------------------------------------------------------------------------


def link_exists(name: str) -> bool:
    return (_SYS_NET / name).exists()


def link_master(name: str) -> str | None:
    """The bridge ``name`` is a port of, if any."""
    master = _SYS_NET / name / "master"
    return master.resolve().name if master.exists() else None


def is_bridge(name: str) -> bool:
    return (_SYS_NET / name / "bridge").is_dir()


def bridge_ports(bridge: str) -> list[str]:
    brif = _SYS_NET / bridge / "brif"
    return sorted(p.name for p in brif.iterdir()) if brif.is_dir() else []


def port_isolated(name: str) -> bool:
    try:
        return (_SYS_NET / name / "brport" / "isolated").read_text().strip() == "1"
    except OSError:
        return False


async def ensure_bridge(bridge: str, address: ipaddress.IPv4Interface) -> None:
    """Create ``bridge`` with ``address`` (the desktops' gateway) if needed; bring it up."""
    check_ifname(bridge)
    if link_exists(bridge):
        if not is_bridge(bridge):
            raise BackendError(f"network interface {bridge} exists but is not a bridge (vm.network.bridge)")
    else:
        log.info("creating bridge %s with %s", bridge, address)
        await run(["ip", "link", "add", "name", bridge, "type", "bridge"], timeout=10)
    # No IPv6 on the bridge: desktops get no path to the node through link-local addresses.
    disable = Path("/proc/sys/net/ipv6/conf") / bridge / "disable_ipv6"
    if disable.exists():
        disable.write_text("1\n")
    res = await run(["ip", "-4", "-o", "addr", "show", "dev", bridge], timeout=10)
    if f" {address.with_prefixlen} " not in res.stdout + " ":
        await run(["ip", "addr", "add", address.with_prefixlen, "dev", bridge], timeout=10)
    await run(["ip", "link", "set", "dev", bridge, "up"], timeout=10)


async def delete_link(name: str) -> None:
    if link_exists(name):
        res = await run(["ip", "link", "del", "dev", check_ifname(name)], timeout=10, check=False)
        if res.returncode != 0 and link_exists(name):
            raise BackendError(f"cannot delete network interface {name}: {res.stderr.strip()}")


async def isolate_port(name: str) -> None:
    """Make a bridge port isolated (no traffic to other isolated ports)."""
    if not port_isolated(name):
        await run(["bridge", "link", "set", "dev", check_ifname(name), "isolated", "on"], timeout=10)
    if not port_isolated(name):
        raise BackendError(f"could not isolate bridge port {name}")


# --- firewall ------------------------------------------------------------------------------------


def _chains(bridge: str) -> tuple[str, str]:
    # iptables chain names are limited to 28 characters; interface names to 15.
    return f"QVD-IN-{bridge}", f"QVD-FWD-{bridge}"


def _tools() -> list[str]:
    return [t for t in ("iptables", "ip6tables") if shutil.which(t)]


async def _ensure_jump(tool: str, parent: str, match: list[str], chain: str) -> None:
    rule = [parent, *match, "-j", chain]
    if (await run([tool, "-w", "-C", *rule], check=False)).returncode != 0:
        await run([tool, "-w", "-I", *rule])


async def ensure_firewall(bridge: str) -> None:
    """Install (or refresh) the desktop isolation rules for ``bridge``.  Idempotent."""
    check_ifname(bridge)
    tools = _tools()
    if "iptables" not in tools:
        raise BackendError("iptables is not installed: cannot isolate desktops from the node "
                           "(apt-get install iptables, or set internal.vm.network.firewall.enable = false)")
    chain_in, chain_fwd = _chains(bridge)
    wanted = {
        chain_in: [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"], ["-j", "DROP"]],
        chain_fwd: [["-j", "DROP"]],
    }
    for tool in tools:
        for chain, rules in wanted.items():
            listing = await run([tool, "-w", "-S", chain], check=False)
            if listing.returncode != 0:
                await run([tool, "-w", "-N", chain])
            expected = [f"-N {chain}", *(f"-A {chain} {' '.join(r)}" for r in rules)]
            if listing.stdout.splitlines() == expected:
                continue  # already right: re-flushing would open a short gap
            await run([tool, "-w", "-F", chain])
            for r in rules:
                await run([tool, "-w", "-A", chain, *r])
        await _ensure_jump(tool, "INPUT", ["-i", bridge], chain_in)
        await _ensure_jump(tool, "FORWARD", ["-i", bridge], chain_fwd)
        await _ensure_jump(tool, "FORWARD", ["-o", bridge], chain_fwd)


async def remove_firewall(bridge: str) -> None:
    """Remove what :func:`ensure_firewall` added.  Idempotent."""
    check_ifname(bridge)
    chain_in, chain_fwd = _chains(bridge)
    for tool in _tools():
        for parent, match, chain in (("INPUT", ["-i", bridge], chain_in), ("FORWARD", ["-i", bridge], chain_fwd),
                                     ("FORWARD", ["-o", bridge], chain_fwd)):
            while (await run([tool, "-w", "-C", parent, *match, "-j", chain], check=False)).returncode == 0:
                await run([tool, "-w", "-D", parent, *match, "-j", chain])
        for chain in (chain_in, chain_fwd):
            if (await run([tool, "-w", "-n", "-L", chain], check=False)).returncode == 0:
                await run([tool, "-w", "-F", chain])
                await run([tool, "-w", "-X", chain])


async def delete_bridge(bridge: str) -> None:
    await remove_firewall(bridge)
    await delete_link(bridge)


# --- mounts --------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    prefix = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = _unescape(line.split()[4])
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                found.append(mp)
    return sorted(set(found), key=lambda m: (m.count("/"), len(m)), reverse=True)


async def unmount_under(path: Path) -> None:
    """Unmount everything at or below ``path``; a busy mount is detached lazily."""
    for mp in mounts_under(path):
        res = await run(["umount", mp], timeout=30, check=False)
        if res.returncode != 0 and mp in mounts_under(path):
            log.warning("umount %s failed (%s); detaching it lazily", mp, res.stderr.strip())
            await run(["umount", "-l", mp], timeout=30, check=False)
    left = mounts_under(path)
    if left:
        raise BackendError(f"cannot unmount {', '.join(left)}")
