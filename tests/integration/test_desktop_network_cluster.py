"""The desktop network of a two-node cluster, with real LXC desktops, in network namespaces.

Three network namespaces made here (random suffix): a "switch" with a plain bridge, and
two nodes, each with a desktop bridge ``qvdnet`` whose uplink is a veth to the switch
(the operator's NIC in a real cluster), its own ``vm.network.host.address`` and one real
desktop from the minimal image.  The backend runs in the node's namespace (a subprocess:
LXC's control sockets are abstract unix sockets, scoped by network namespace; see
:func:`in_node`).  Every address used is on the test's random 10.234.X.0/24 network, which
exists only inside these namespaces: no traffic leaves them, and neither the machine's
interfaces nor its own firewall are touched.

The ``cluster`` fixture's finalizer removes everything, also on failure: the desktops
(stop + cleanup through the backend, in their node's namespace), each node's bridge with
its nftables table and iptables chains, the processes started here (by pid), the
namespaces (with every link in them) and the node roots; it fails the module if a
namespace, a container process or a mount survived.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qvd.backends import netsetup
from qvd.backends.lxc import LxcBackend

pytestmark = [pytest.mark.lxc, pytest.mark.slow]

BRIDGE = "qvdnet"
UPLINK = "uplink0"  # the node's end of its veth to the switch, enslaved in BRIDGE
VMA_PORT = 3030
NX_PORT = 4100
NODE_SERVICE_PORT = 8443  # a service of each node, listening on all its addresses (as the L7R does)
IN_DESKTOP_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT = 240.0

# ``ip netns exec`` would remount /sys for the namespace but lose the cgroup mounts LXC
# needs: enter the namespace and a private mount namespace, remount /sys (netsetup reads
# /sys/class/net) and put the node's cgroup mounts back.  Nothing propagates to the machine.
_ENTER = ('set -e; stash=$1; shift; mount --rbind /sys/fs/cgroup "$stash"; umount -l /sys; '
          'mount -t sysfs sysfs /sys; mount --rbind "$stash" /sys/fs/cgroup; umount -l "$stash"; exec "$@"')

# Drives LxcBackend in the node's namespace: {"root", "cfg", "op", ...} in argv[1].
_DRIVER = """
import asyncio, json, sys
from pathlib import Path
from qvd.backends.base import DesktopSpec
from qvd.backends.lxc import LxcBackend
from qvd.core.config import Config

req = json.loads(sys.argv[1])
backend = LxcBackend(Path(req["root"]), Config().overlay(req["cfg"], source="node file"))

async def main():
    if req["op"] == "check":
        await backend.check()
    elif req["op"] == "start":
        spec = DesktopSpec(**{**req["spec"], "image": Path(req["spec"]["image"])})
        await backend.prepare(spec)
        await backend.start(spec)
    elif req["op"] == "cleanup":
        vms = set(req["vms"]) | {d.vm_id for d in await backend.list_desktops()}
        for vm_id in sorted(vms):
            await backend.cleanup(vm_id)
        print(json.dumps(sorted(d.vm_id for d in await backend.list_desktops())))
    elif req["op"] == "teardown":
        await backend.teardown_network()

asyncio.run(main())
"""

# Inside a desktop: connect to each (host, port) of argv[1]; print the connect_ex results.
_PROBE = """
import json, socket, sys
out = []
for host, port in json.loads(sys.argv[1]):
    s = socket.socket()
    s.settimeout(2)
    out.append(s.connect_ex((host, port)))
    s.close()
print(json.dumps(out))
"""

# Inside a desktop: TCP and UDP on argv[1]; every peer (and UDP payload) goes to argv[2].
_DESKTOP_LISTENER = """
import selectors, socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port)); tcp.listen(16)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", port))
sel = selectors.DefaultSelector()
sel.register(tcp, selectors.EVENT_READ); sel.register(udp, selectors.EVENT_READ)
def note(line):
    with open(log, "a") as f:
        f.write(line + "\\n")
note("ready")
while True:
    for key, _ in sel.select():
        if key.fileobj is tcp:
            conn, peer = tcp.accept(); note("tcp " + peer[0]); conn.close()
        else:
            data, peer = udp.recvfrom(2048); note("udp " + peer[0] + " " + data.decode(errors="replace"))
"""

# Inside a desktop, as root: send a UDP datagram with a forged source address through a raw
# socket (desktops keep CAP_NET_RAW).  A self-test over loopback first proves the forged
# packets are well formed; prints "selftest ok" and "sent", or "no raw sockets".
_FORGE = """
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
def packet(src, dst, port, payload):
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + udp
try:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
except PermissionError:
    print("no raw sockets"); sys.exit(0)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("127.0.0.1", 0)); rx.settimeout(3)
raw.sendto(packet("127.0.0.1", "127.0.0.1", rx.getsockname()[1], b"self"), ("127.0.0.1", 0))
data, peer = rx.recvfrom(64)
if data == b"self" and peer[0] == "127.0.0.1":
    print("selftest ok")
for _ in range(3):
    raw.sendto(packet(src, dst, port, payload), (dst, 0))
print("sent")
"""

# In a node's namespace: a TCP service on all addresses; every peer goes to argv[2].
_NODE_LISTENER = """
import socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(16)
open(log, "a").write("ready\\n")
while True:
    conn, peer = srv.accept()
    open(log, "a").write("tcp " + peer[0] + "\\n")
    conn.close()
"""

_VMA_PING = """
import sys, time, urllib.request
url, deadline, last = sys.argv[1], time.monotonic() + float(sys.argv[2]), None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while time.monotonic() < deadline:
    try:
        with opener.open(url, timeout=2) as r:
            print(r.read().decode()); sys.exit(0)
    except OSError as e:
        last = e; time.sleep(0.2)
print(f"no answer: {last}"); sys.exit(1)
"""

_UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def sh(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, env=_clean_env())


def ok(argv: list[str], timeout: float = 60) -> str:
    res = sh(argv, timeout)
    assert res.returncode == 0, f"{' '.join(argv)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@dataclass
class Node:
    name: str
    ns: str
    root: Path
    stash: Path
    address: ipaddress.IPv4Address
    cfg: dict[str, str]
    vm_ids: list[int] = field(default_factory=list)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run in this node's network namespace (see _ENTER)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--mount", "--propagation", "slave",
                "sh", "-c", _ENTER, "sh", str(self.stash), *argv]

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh(self.argv(argv), timeout)

    def backend(self, op: str, timeout: float = START_TIMEOUT, **kw: object) -> str:
        req = json.dumps({"root": str(self.root), "cfg": self.cfg, "op": op, **kw})
        res = self.run([sys.executable, "-c", _DRIVER, req], timeout)
        assert res.returncode == 0, f"node {self.name}: backend {op} failed:\n{res.stderr[-3000:]}"
        return res.stdout

    def attach_argv(self, vm_id: int, argv: list[str]) -> list[str]:
        return self.argv(["lxc-attach", "-n", f"qvd-{vm_id}", "-P", str(self.root / "run" / "lxc"), "--clear-env",
                          "--set-var", IN_DESKTOP_PATH, "--", *argv])

    def attach(self, vm_id: int, argv: list[str], timeout: float = 60) -> str:
        return ok(self.attach_argv(vm_id, argv), timeout)


@dataclass
class Cluster:
    net: ipaddress.IPv4Network
    switch: str
    a: Node
    b: Node
    desktop_a: int
    desktop_b: int
    addr: dict[int, str]
    procs: list[subprocess.Popen[bytes]]
    node_logs: dict[str, Path]

    def home(self, node: Node, vm_id: int) -> Path:
        return node.root / "storage" / "homes" / f"vm-{vm_id}"

    def probe(self, node: Node, vm_id: int, targets: list[tuple[str, int]]) -> list[int]:
        """connect_ex() from inside a desktop to each target: 0 = connected."""
        out = node.attach(vm_id, ["python3", "-c", _PROBE, json.dumps(targets)], timeout=120)
        return [int(x) for x in json.loads(out)]

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=_clean_env(), start_new_session=True)
        self.procs.append(p)
        return p


def _wait_line(path: Path, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if wanted in path.read_text().splitlines():
                return
        time.sleep(0.1)
    raise AssertionError(f"{path}: no line {wanted!r} after {timeout:g} s")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _our_processes(roots: list[Path]) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(str(r) in cmd for r in roots):
                    found.append(f"{p.name}: {cmd.strip()[:200]}")
    return found


@pytest.fixture(scope="module")
def cluster(minimal_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ok_lxc, why = LxcBackend.supported()
    if not ok_lxc:
        pytest.skip(why)
    missing = [t for t in ("nsenter", "unshare", "nft", "iptables") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    sfx = secrets.token_hex(3)
    net = ipaddress.IPv4Network(f"10.234.{random.randint(1, 254)}.0/24")
    first_desktop = net.network_address + 100
    base = tmp_path_factory.mktemp("cluster-net")
    switch = f"qvdsw-{sfx}"
    nodes: list[Node] = []
    for name, host in (("a", net.network_address + 1), ("b", net.network_address + 2)):
        root, stash = base / f"root-{name}", base / f"stash-{name}"
        stash.mkdir()
        cfg = {"vm.network.bridge": BRIDGE, "vm.network.ip.start": str(first_desktop),
               "vm.network.netmask": str(net.netmask), "vm.network.host.address": str(host)}
        nodes.append(Node(name, f"qvdn{name}-{sfx}", root, stash, host, cfg))
    a, b = nodes
    vm_base = random.randint(7000, 7999) * 100
    c = Cluster(net, switch, a, b, vm_base + 1, vm_base + 2,
                {vm_base + 1: str(first_desktop), vm_base + 2: str(first_desktop + 1)}, [], {})
    a.vm_ids.append(c.desktop_a)
    b.vm_ids.append(c.desktop_b)
    created: list[str] = []
    try:
        for ns in (switch, a.ns, b.ns):
            ok(["ip", "netns", "add", ns])
            created.append(ns)
            ok(["ip", "-n", ns, "link", "set", "lo", "up"])
        ok(["ip", "-n", switch, "link", "add", "sw0", "type", "bridge"])
        ok(["ip", "-n", switch, "link", "set", "sw0", "up"])
        for n in nodes:
            # What the operator does on each node: the desktop bridge, with the NIC in it.
            ok(["ip", "-n", switch, "link", "add", f"port-{n.name}", "type", "veth", "peer", "name", UPLINK,
                "netns", n.ns])
            ok(["ip", "-n", switch, "link", "set", f"port-{n.name}", "master", "sw0", "up"])
            ok(["ip", "-n", n.ns, "link", "add", BRIDGE, "type", "bridge"])
            ok(["ip", "-n", n.ns, "link", "set", UPLINK, "master", BRIDGE, "up"])
            n.backend("check")
        for n, vm_id in ((a, c.desktop_a), (b, c.desktop_b)):
            ip = ipaddress.IPv4Address(c.addr[vm_id])
            spec = {"vm_id": vm_id, "name": f"cluster-{n.name}", "di_id": 1, "image": str(minimal_image),
                    "memory_mb": 256, "address": str(ip), "prefix_len": net.prefixlen,
                    "gateway": str(net.network_address + 1), "home_key": f"vm-{vm_id}",
                    "mac": "54:52:00:" + ":".join(f"{x:02x}" for x in ip.packed[1:])}
            n.backend("start", spec=spec)
        for n in nodes:
            log = base / f"node-{n.name}-service.log"
            c.node_logs[n.name] = log
            c.spawn(["ip", "netns", "exec", n.ns, sys.executable, "-c", _NODE_LISTENER, str(NODE_SERVICE_PORT),
                     str(log)])
            _wait_line(log, "ready")
        c.spawn(b.attach_argv(c.desktop_b, ["python3", "-c", _DESKTOP_LISTENER, str(NX_PORT), "/home/peers.log"]))
        _wait_line(c.home(b, c.desktop_b) / "peers.log", "ready", timeout=60)
        yield c
    finally:
        errors: list[str] = []
        for p in c.procs:  # by pid, never by name
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        for n in nodes:
            if n.ns not in created:
                continue
            try:
                left = json.loads(n.backend("cleanup", vms=n.vm_ids) or "[]")
                if left:
                    errors.append(f"node {n.name}: desktops left after cleanup: {left}")
            except AssertionError as e:
                errors.append(str(e))
            try:
                n.backend("teardown")
            except AssertionError as e:
                errors.append(str(e))
            res = n.run(["nft", "list", "tables"])
            if netsetup.bridge_table(BRIDGE) in res.stdout:
                errors.append(f"node {n.name}: nftables table left: {res.stdout.strip()}")
            res = n.run(["iptables", "-w", "-S"])
            if f"QVD-IN-{BRIDGE}" in res.stdout or f"QVD-FWD-{BRIDGE}" in res.stdout:
                errors.append(f"node {n.name}: iptables chains left")
        for ns in reversed(created):
            res = sh(["ip", "netns", "del", ns])
            if res.returncode != 0:
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        left_ns = [ns for ns in sh(["ip", "netns", "list"]).stdout.split() if ns.endswith(sfx)]
        if left_ns:
            errors.append(f"namespaces left: {left_ns}")
        roots = [n.root for n in nodes]
        deadline = time.monotonic() + 15  # LXC's monitor can outlive the cleanup by a moment
        while _our_processes(roots) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _our_processes(roots):
            errors.append(f"processes left: {_our_processes(roots)}")
        mounts = [m for r in roots for m in netsetup.mounts_under(r)]
        if mounts:
            errors.append(f"mounts left: {mounts}")
        else:
            shutil.rmtree(base, ignore_errors=True)  # two unpacked bases, ~600 MB each
        if errors:
            pytest.fail("cluster network cleanup: " + "; ".join(errors))


# --- the tests -----------------------------------------------------------------------------------


def test_each_node_has_its_own_address_and_the_bridge_filter(cluster: Cluster) -> None:
    c = cluster
    table = netsetup.bridge_table(BRIDGE)
    for n in (c.a, c.b):
        addrs = ok(n.argv(["ip", "-4", "-o", "addr", "show", "dev", BRIDGE])).split()
        assert [w for w in addrs if "/" in w] == [f"{n.address}/{c.net.prefixlen}"]
        assert ok(n.argv(["bridge", "-d", "link", "show", "dev", UPLINK])).count("isolated off") == 1
        listing = ok(n.argv(["nft", "list", "table", "bridge", table]))
        hosts = f"{c.net.network_address + 1}-{c.net.network_address + 99}"
        desktops = f"{c.net.network_address + 100}-{c.net.broadcast_address - 1}"
        for rule in ('iifname "qvd*" jump from_desktop', 'oifname "qvd*" jump to_desktop',
                     f"arp saddr ip {desktops} accept", f"ip saddr {desktops} ip daddr {hosts} accept",
                     f"ip saddr {hosts} ip daddr {desktops} accept"):
            assert rule in listing, (rule, listing)
        fwd = ok(n.argv(["iptables", "-w", "-S", f"QVD-FWD-{BRIDGE}"])).splitlines()
        assert fwd[-1] == f"-A QVD-FWD-{BRIDGE} -j DROP"
        # A second check() (a restarting node daemon) replaces the table with the same one.
        n.backend("check")
        assert ok(n.argv(["nft", "list", "table", "bridge", table])) == listing
        assert ok(n.argv(["iptables", "-w", "-S", f"QVD-FWD-{BRIDGE}"])).splitlines() == fwd
    # The desktops' ports are isolated; their names are what the table matches.
    for n, vm_id in ((c.a, c.desktop_a), (c.b, c.desktop_b)):
        assert "isolated on" in ok(n.argv(["bridge", "-d", "link", "show", "dev", f"qvd{vm_id}"]))


def test_any_node_reaches_the_agent_and_nx_port_of_a_desktop_on_another_node(cluster: Cluster) -> None:
    c = cluster
    for n, vm_id in ((c.a, c.desktop_b), (c.b, c.desktop_a), (c.a, c.desktop_a), (c.b, c.desktop_b)):
        res = sh(["ip", "netns", "exec", n.ns, sys.executable, "-c", _VMA_PING,
                  f"http://{c.addr[vm_id]}:{VMA_PORT}/vma/ping", "60"], timeout=90)
        assert res.returncode == 0 and "pong" in res.stdout, (n.name, vm_id, res.stdout, res.stderr)
    # Node A -> the NX port of the desktop on B (the listener stands in for nxagent).
    peers = c.home(c.b, c.desktop_b) / "peers.log"
    ok(["ip", "netns", "exec", c.a.ns, sys.executable, "-c",
        "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()",
        c.addr[c.desktop_b], str(NX_PORT)])
    _wait_line(peers, f"tcp {c.a.address}")


def test_desktops_reach_no_other_desktop_and_no_node(cluster: Cluster) -> None:
    c = cluster
    a_ip, b_ip = c.addr[c.desktop_a], c.addr[c.desktop_b]
    node_a, node_b = str(c.a.address), str(c.b.address)
    # Controls: the probe works inside the desktop, and the nodes' services listen.
    assert c.probe(c.a, c.desktop_a, [("127.0.0.1", VMA_PORT)]) == [0]
    for n in (c.a, c.b):
        ok(["ip", "netns", "exec", n.ns, sys.executable, "-c",
            "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()",
            str(n.address), str(NODE_SERVICE_PORT)])
    # Desktop on A: not the desktop on B (agent, NX port), not a node (either, any service).
    targets = [(b_ip, VMA_PORT), (b_ip, NX_PORT), (node_a, NODE_SERVICE_PORT), (node_b, NODE_SERVICE_PORT),
               (node_b, 22), (node_a, VMA_PORT)]
    assert c.probe(c.a, c.desktop_a, targets) == [11] * len(targets)  # EAGAIN: nothing answers, not even a RST
    targets = [(a_ip, VMA_PORT), (node_a, NODE_SERVICE_PORT), (node_b, NODE_SERVICE_PORT)]
    assert c.probe(c.b, c.desktop_b, targets) == [11] * len(targets)
    for n in (c.a, c.b):
        assert [ln for ln in _lines(c.node_logs[n.name]) if ln != "ready"] == [f"tcp {n.address}"], n.name
    assert f"tcp {a_ip}" not in _lines(c.home(c.b, c.desktop_b) / "peers.log")


def test_a_desktop_cannot_forge_a_node_address(cluster: Cluster) -> None:
    """A desktop's root sending as node A to the desktop on B is stopped at A's bridge."""
    c = cluster
    peers = c.home(c.b, c.desktop_b) / "peers.log"
    tag = secrets.token_hex(4)
    b_ip = c.addr[c.desktop_b]
    # Control: the same datagram from node A itself arrives.
    ok(["ip", "netns", "exec", c.a.ns, sys.executable, "-c", _UDP_SEND, str(c.a.address), b_ip, str(NX_PORT),
        f"node-{tag}"])
    _wait_line(peers, f"udp {c.a.address} node-{tag}")
    out = c.a.attach(c.desktop_a, ["python3", "-c", _FORGE, str(c.a.address), b_ip, str(NX_PORT), f"forged-{tag}"])
    if "no raw sockets" in out:
        return  # the desktop cannot forge anything at all
    assert out.split() == ["selftest", "ok", "sent"], out
    time.sleep(1)
    ok(["ip", "netns", "exec", c.a.ns, sys.executable, "-c", _UDP_SEND, str(c.a.address), b_ip, str(NX_PORT),
        f"after-{tag}"])
    _wait_line(peers, f"udp {c.a.address} after-{tag}")
    assert not [ln for ln in _lines(peers) if f"forged-{tag}" in ln]
