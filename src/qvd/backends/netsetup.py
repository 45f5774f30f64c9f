"""Privileged host commands of the LXC backend, in one place for review.

Everything that changes the node (links, bridges, addresses, firewall rules, sysctls,
mounts) goes through :func:`run`: explicit argv lists, never a shell, always a
timeout, failures raised as :class:`~qvd.core.errors.BackendError` naming the
command.  The ``lxc-*`` and ``tar`` calls live in the "privileged commands"
section of :mod:`qvd.backends.lxc` and use :func:`run` too.

The desktop network is one flat IPv4 network (``vm.network.ip.start`` /
``vm.network.netmask``): nodes use network + 1 .. ip.start - 1 (the "host range"),
desktops ip.start .. broadcast - 1 (the "desktop range").  On one node the bridge
carries the node's address and the desktops' veths.  In a cluster the operator also
enslaves a NIC (the "uplink") in every node's bridge, so that all bridges form one
L2 segment and any node reaches any desktop; each node then has its own address in
the host range (``vm.network.host.address``).

Network policy for the desktops' bridge (set by :func:`ensure_firewall`):

* desktops on one node cannot talk to each other: every desktop's bridge port is
  "isolated" (``bridge link set dev <veth> isolated on``; isolated ports only forward
  to non-isolated ones: the bridge itself and the uplink).  Tested on this kernel:
  works for IPv4 and IPv6 alike, and needs no br_netfilter.
* frames the bridge forwards between a desktop's port and another port (in practice
  the uplink) pass an nftables ``bridge`` table, ``qvd_<bridge>``
  (:func:`bridge_ruleset`).  From a desktop's port: ARP whose sender address is in the
  desktop range, and IPv4 from the desktop range to the host range (replies to the
  nodes).  To a desktop's port: ARP, and IPv4 from the host range to the desktop range
  (any node reaching the VMA and nxagent of any desktop).  Everything else is dropped:
  desktop <-> desktop across nodes, IPv6, other ether types, and a desktop forging a
  node's address (desktops keep CAP_NET_RAW, so their root could send such frames).
  Frames to and from the node itself do not pass the bridge's forward hook.  Desktop
  ports are told by their name (the prefix the backend gives its veths, ``qvd`` +
  VM id): this kernel has no ``meta ibrname`` (``CONFIG_NFT_BRIDGE_META``), so the
  table cannot select its bridge by name.  An uplink must not be named like that
  (it would be treated as a desktop port and cross-node traffic refused);
  :meth:`qvd.backends.lxc.LxcBackend.check` refuses such a port.  Several QVD bridges
  in one network namespace (several node roots on one machine, as in the tests) must
  not span nodes: every table judges the desktop ports of all of them.
* desktops cannot open connections to any node: INPUT from the bridge accepts
  only ESTABLISHED/RELATED, so a node reaches the desktops (its own and, through the
  uplink, the other nodes') but nothing in a desktop reaches a node's services, on
  any of its addresses.  The node's connections to a desktop on another node come
  back through the uplink into its own bridge as ESTABLISHED;
* nothing is routed between the bridge and other interfaces (iptables FORWARD in and
  out of the bridge: DROP).  When br_netfilter is loaded (it is built into this
  kernel, and Docker loads it) bridged IPv4 frames also traverse iptables FORWARD;
  they are accepted there (``-m physdev --physdev-is-bridged``) because the nftables
  table above has already judged them, while routed packets are still dropped.  The
  physdev rule is only added when br_netfilter is present (``/proc/sys/net/bridge``):
  the match would load the module, which then sends every bridge's frames through
  iptables.  If br_netfilter is loaded after the node daemon started, restart it;
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


async def run(argv: list[str], *, timeout: float = 30.0, check: bool = True,
              input_text: str | None = None) -> CommandResult:
    """Run one command, with ``input_text`` on its stdin.  With ``check``, a non-zero exit raises BackendError."""
    log.debug("run %s", argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL if input_text is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
    except OSError as e:
        raise BackendError(f"cannot run {argv[0]}: {e.strerror}") from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(None if input_text is None else input_text.encode()), timeout)
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
    """Create ``bridge`` if needed, give it ``address`` (the node's address on it), bring it up."""
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


def bridge_table(bridge: str) -> str:
    """Name of the nftables ``bridge`` table filtering what ``bridge`` forwards."""
    return f"qvd_{check_ifname(bridge)}"


def _tools() -> list[str]:
    return [t for t in ("iptables", "ip6tables") if shutil.which(t)]


def _span(first: ipaddress.IPv4Address, last: ipaddress.IPv4Address) -> str:
    return str(first) if first == last else f"{first}-{last}"


def address_ranges(net: ipaddress.IPv4Network, first_desktop: ipaddress.IPv4Address) -> tuple[str | None, str | None]:
    """(host range, desktop range) of the desktop network as nftables ranges; None when empty.

    Nodes: network + 1 .. ``first_desktop`` - 1; desktops: ``first_desktop`` .. broadcast - 1.
    """
    if first_desktop not in net:
        raise BackendError(f"first desktop address {first_desktop} (vm.network.ip.start) is outside {net}")
    lowest, highest = net.network_address + 1, net.broadcast_address - 1
    hosts = _span(lowest, first_desktop - 1) if first_desktop > lowest else None
    desktops = _span(max(first_desktop, lowest), highest) if highest >= max(first_desktop, lowest) else None
    return hosts, desktops


def bridge_ruleset(bridge: str, net: ipaddress.IPv4Network, first_desktop: ipaddress.IPv4Address,
                   desktop_port_prefix: str) -> str:
    """The ``nft -f`` input that atomically (re)places the bridge table of ``bridge``.

    Only frames the bridge forwards between two of its ports reach the ``forward`` hook;
    the chains judge those coming from or going to a desktop's port (``<prefix>*``).
    """
    table = bridge_table(bridge)
    check_ifname(desktop_port_prefix)
    hosts, desktops = address_ranges(net, first_desktop)
    from_desktop: list[str] = []
    to_desktop = ["ether type arp accept"]
    if desktops is not None:
        from_desktop.append(f"ether type arp arp saddr ip {desktops} accept")
    if hosts is not None and desktops is not None:
        from_desktop.append(f"ip saddr {desktops} ip daddr {hosts} accept")
        to_desktop.append(f"ip saddr {hosts} ip daddr {desktops} accept")

    def chain(name: str, rules: list[str]) -> str:
        return f"\tchain {name} {{\n" + "".join(f"\t\t{r}\n" for r in [*rules, "drop"]) + "\t}\n"

    return (f"# QVD: what bridge {bridge} forwards from and to desktops ({net}, desktops from {first_desktop})\n"
            f"table bridge {table}\ndelete table bridge {table}\n"
            f"table bridge {table} {{\n"
            "\tchain forward {\n"
            "\t\ttype filter hook forward priority filter; policy accept;\n"
            f"\t\tiifname \"{desktop_port_prefix}*\" jump from_desktop\n"
            f"\t\toifname \"{desktop_port_prefix}*\" jump to_desktop\n"
            "\t}\n"
            + chain("from_desktop", from_desktop) + chain("to_desktop", to_desktop) + "}\n")


def br_netfilter_active() -> bool:
    """Whether bridged IPv4 frames may traverse iptables here (br_netfilter present in this netns)."""
    return Path("/proc/sys/net/bridge").is_dir()


async def _ensure_jump(tool: str, parent: str, match: list[str], chain: str) -> None:
    rule = [parent, *match, "-j", chain]
    if (await run([tool, "-w", "-C", *rule], check=False)).returncode != 0:
        await run([tool, "-w", "-I", *rule])


async def ensure_firewall(bridge: str, net: ipaddress.IPv4Network, first_desktop: ipaddress.IPv4Address,
                          desktop_port_prefix: str) -> None:
    """Install (or refresh) the desktop isolation rules for ``bridge``.  Idempotent.

    ``net`` and ``first_desktop`` give the address plan; desktops' bridge ports are the
    ones named ``desktop_port_prefix`` + something.
    """
    check_ifname(bridge)
    tools = _tools()
    if "iptables" not in tools:
        raise BackendError("iptables is not installed: cannot isolate desktops from the node "
                           "(apt-get install iptables, or set internal.vm.network.firewall.enable = false)")
    if shutil.which("nft") is None:
        raise BackendError("nft is not installed: cannot filter what the desktop bridge forwards "
                           "(apt-get install nftables, or set internal.vm.network.firewall.enable = false)")
    # First the bridge table: the physdev ACCEPT below relies on it.  One nft transaction:
    # the old table is replaced without a moment with no rules.
    await run(["nft", "-f", "-"], timeout=10, input_text=bridge_ruleset(bridge, net, first_desktop,
                                                                        desktop_port_prefix))
    chain_in, chain_fwd = _chains(bridge)
    forward = [["-j", "DROP"]]
    if br_netfilter_active():
        forward.insert(0, ["-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT"])
    wanted = {
        chain_in: [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"], ["-j", "DROP"]],
        chain_fwd: forward,
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
    if shutil.which("nft") is not None:
        table = bridge_table(bridge)
        # Declaring the table first makes the delete succeed whether or not it exists.
        await run(["nft", "-f", "-"], timeout=10, input_text=f"table bridge {table}\ndelete table bridge {table}\n")


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
