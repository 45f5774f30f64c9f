"""Desktop density and start-to-desktop time of QVD's LXC desktops, against bare LXC in the same run.

Run as root from the repository root::

    .venv/bin/python -m bench.density [--count N] [--via auto|hkd|backend] [--keep] [--json [FILE]]
    .venv/bin/python -m bench.density --cleanup DIR      # remove what a --keep run left running

What one run does (every desktop is started alone, one after the other, as in lab notes section 4):

1. takes the minimal image from the image cache (``build_image``; a cache hit or a re-pack);
2. makes a private node root in /var/tmp, a private bridge ``qvdd<hex>`` and a free
   10.233.X.0/24 network (gateway .1, our desktops from .100, the baseline ones from .10);
3. "ours": with ``--via hkd`` (the default when it starts) a real ``qvd-hkd`` on that root
   (SQLite, node file with the bridge and network), the user/OSF/DI/VMs created through
   ``qvd.services`` and every start issued with ``services.vms.start_vm`` (what the API and
   the L7R call); with ``--via backend`` ``LxcBackend.prepare/start`` directly;
4. one warm-up desktop through our stack (it unpacks the DI and fills the page cache), stopped again;
5. phase "bare": N containers started by hand with ``lxc-start`` from a hand-written config (overlay on
   the same unpacked base, veth on the same bridge) whose init runs nxagent, then openbox + xterm once a
   client attached (what the VMA does too, without the VMA); measured, then removed;
6. phase "ours": N desktops through our stack, each: start, VMA ``x_start`` + ``x_state`` until
   ``listening``, client attached, measured; left running with ``--keep``;
7. for each phase, once all N run and are idle: memory per desktop; then the ratios ours/bare.

The client of every session is Debian's ``nxproxy -S`` drawing on an Xvfb of its own (one per
session, so that a root-window grab sees exactly one desktop).  The phases never run at the same time:
PSS splits shared pages between the processes that map them, so desktops of the other phase would
lower the figures of this one.

Everything started is recorded in a state file and removed at the end, also on error and on
SIGINT/SIGTERM/SIGHUP (processes by pid + start time, containers, the backend's leftovers, the bridge
and its firewall rules, the node root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

if __package__ in (None, ""):  # run as a file (python bench/density.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import BARE_LXC_CONFIG, BenchError, Interrupted, count_white, pss_kib, say
from bench._common import grab as grab_display
from qvd.backends import netsetup
from qvd.backends.base import DesktopSpec
from qvd.backends.lxc import LxcBackend
from qvd.core.config import Config, load_node_config
from qvd.services.vms import mac_for
from qvd.vma.procs import proc_start_time
from qvd.vma.rpc import decode_body

T = TypeVar("T")

NX_DISPLAY = 100  # internal.nxagent.display default: nxagent listens on 4000 + 100
NX_PORT = 4000 + NX_DISPLAY
VMA_PORT = 3030
GEOMETRY = "1024x768"
SCREEN = "1024x768x24"  # the client's Xvfb; nxagent's window fits in it
MEMORY_MB = 512  # memory limit of every desktop, ours (OSF memory) and bare (lxc.cgroup.memory.limit_in_bytes)
POLL = 0.05  # every milestone of both kinds is polled at this period
# "Painted": an xterm (80x24, 'fixed' font) on nxagent's black root is ~115,000 pure-white pixels on the
# client's screen; nothing else on that screen is white, so 80,000 means its text area was drawn.
PAINT_WHITE_PIXELS = 80_000
BENCH_USER = "bench"
MAC_PREFIX = "54:52:00"
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_CACHE = Path(os.environ.get("QVD_TEST_IMAGE_CACHE", "/var/cache/qvd/images"))
STATE_FILE = "density-state.json"

T_RUNNING = 120.0
T_SESSION = 60.0
IDLE_MIN_WAIT = 8.0  # the VMA refreshes the screen up to 4 s after a client attaches
IDLE_WINDOW = 2.0
IDLE_MAX_WAIT = 60.0
IDLE_CPU_PER_DESKTOP = 1.0  # % of one core: below this on average the phase counts as idle

class _Flags:
    cleaning = False  # once the cleanup runs, signals no longer interrupt it


def _on_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _Flags.cleaning:
        say(f"{name} ignored: cleaning up, please wait")
        return
    raise Interrupted(name)


# --- processes -----------------------------------------------------------------------------------


@dataclass
class ProcRef:
    """A process we started, identified by pid and start time so a recycled pid is never signalled."""

    pid: int
    start_time: int | None
    what: str

    def alive(self) -> bool:
        return self.start_time is not None and proc_start_time(self.pid) == self.start_time

    def stop(self, timeout: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                _reap()
                time.sleep(0.05)
        _reap()


_children: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    for pid, p in list(_children.items()):
        if p.poll() is not None:
            del _children[pid]


def spawn(argv: list[str], *, env: dict[str, str], log: Path, what: str) -> ProcRef:
    # Own session: a Ctrl-C at the terminal reaches only us, and we stop the children in order.
    with log.open("ab") as fh:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    _children[p.pid] = p
    return ProcRef(p.pid, proc_start_time(p.pid), what)


def run(argv: list[str], *, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        detail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
        raise BenchError(f"{' '.join(argv)} failed (exit status {res.returncode}): {' | '.join(detail)}")
    return res


def tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f"\n--- last lines of {path} ---\n" + "\n".join(lines[-n:])


def wait_until(what: str, pred: Callable[[], bool], timeout: float, *, poll: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


# --- the client side: Xvfb, nxproxy, "painted" -----------------------------------------------------


def start_xvfb(logdir: Path, tag: str) -> tuple[int, ProcRef]:
    """An Xvfb on a free display from :400 up; returns when it accepts clients.

    Not -displayfd: with it Xvfb writes no /tmp/.X<n>-lock, and another X server started on the
    machine meanwhile would take the display over (it unlinks the socket it finds unlocked).
    """
    env = {"PATH": PATH_ENV}
    for n in range(400, 700):
        lock, sock = Path(f"/tmp/.X{n}-lock"), Path(f"/tmp/.X11-unix/X{n}")
        if lock.exists() or sock.exists():
            continue
        ref = spawn(["Xvfb", f":{n}", "-nolisten", "tcp", "-screen", "0", SCREEN, "-noreset"], env=env,
                    log=logdir / f"xvfb-{tag}.log", what=f"Xvfb :{n}")
        deadline = time.monotonic() + 10.0
        while ref.alive() and time.monotonic() < deadline:
            if _accepts(sock) and lock.exists() and lock.read_text().strip() == str(ref.pid):
                return n, ref
            time.sleep(0.05)
        ref.stop()  # lost a race for the display with somebody else (it exits): next one
    raise BenchError("no free X display from :400 to :699")


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


# --- the VMA's HTTP API --------------------------------------------------------------------------

# Never through a proxy from the environment: the desktops live on our private bridge.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class VmaRefused(Exception):
    pass


def vma_call(ip: str, method: str, params: dict[str, str] | None = None, timeout: float = 3.0) -> object:
    url = f"http://{ip}:{VMA_PORT}/vma/{method}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with _OPENER.open(url, timeout=timeout) as r:
        ok, value = decode_body(r.read())
    if not ok:
        raise VmaRefused(str(value))
    return value


def vma_answers(ip: str) -> bool:
    try:
        return vma_call(ip, "ping", timeout=1.0) == "pong"
    except (OSError, ValueError, VmaRefused):
        return False


def x_state(ip: str) -> str:
    try:
        return str(vma_call(ip, "x_state"))
    except (OSError, ValueError, VmaRefused):
        return "?"


# --- cgroups and memory --------------------------------------------------------------------------


def cgroup_dir(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    raise BenchError(f"process {pid} is in no {controller} cgroup (cgroup v1 expected)")


def cgroup_pids(cg: Path) -> list[int]:
    pids: set[int] = set()
    for f in [cg / "cgroup.procs", *cg.rglob("*/cgroup.procs")]:
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(x) for x in f.read_text().split())
    return sorted(pids)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def memcg_stats(cg: Path) -> dict[str, int]:
    out = {"usage": int((cg / "memory.usage_in_bytes").read_text())}
    for line in (cg / "memory.stat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k in ("total_rss", "total_cache", "total_shmem", "total_mapped_file"):
            out[k.removeprefix("total_")] = int(v)
    return out


def cpu_ns(cg: Path) -> int:
    try:
        return int((cg / "cpuacct.usage").read_text())
    except (OSError, ValueError):
        return 0


def lxc_init_pid(name: str, lxcpath: Path) -> int:
    res = run(["lxc-info", "-n", name, "-P", str(lxcpath), "-p", "-H"], timeout=10, check=False)
    out = res.stdout.strip()
    if res.returncode != 0 or not out.isdigit():
        raise BenchError(f"container {name}: no init pid ({res.stderr.strip() or out})")
    return int(out)


def lxc_running(name: str, lxcpath: Path) -> bool:
    res = run(["lxc-info", "-n", name, "-P", str(lxcpath), "-s", "-H"], timeout=10, check=False)
    return res.returncode == 0 and res.stdout.strip() not in ("STOPPED", "")


# --- state: everything started, for the cleanup (also after --keep, from the state file) -----------


@dataclass
class State:
    workdir: str
    root: str = ""
    bridge: str = ""
    via: str = ""
    hkd: ProcRef | None = None
    procs: list[ProcRef] = field(default_factory=list)  # Xvfb and nxproxy
    bare: list[tuple[str, str]] = field(default_factory=list)  # (container name, lxcpath)
    bare_veth_prefix: str = ""

    def save(self) -> None:
        tmp = Path(self.workdir) / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(Path(self.workdir) / STATE_FILE)

    @classmethod
    def load(cls, workdir: Path) -> State:
        raw = json.loads((workdir / STATE_FILE).read_text())
        hkd = ProcRef(**raw["hkd"]) if raw.get("hkd") else None
        return cls(workdir=raw["workdir"], root=raw["root"], bridge=raw["bridge"], via=raw["via"], hkd=hkd,
                   procs=[ProcRef(**p) for p in raw["procs"]], bare=[(a, b) for a, b in raw["bare"]],
                   bare_veth_prefix=raw["bare_veth_prefix"])


def stop_procs(state: State, refs: list[ProcRef], timeout: float = 5.0) -> None:
    """SIGTERM to all at once, SIGKILL to those still there after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [r for r in refs if r.alive()]
        for r in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.pid, sig)
        deadline = time.monotonic() + timeout
        while any(r.alive() for r in alive) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
    _reap()
    for ref in refs:
        if ref in state.procs:
            state.procs.remove(ref)
    state.save()


def stop_bare(state: State, containers: list[tuple[str, str]]) -> list[str]:
    errors = []
    for name, path in containers:
        if lxc_running(name, Path(path)):
            run(["lxc-stop", "-n", name, "-P", path, "-k"], timeout=30, check=False)
        deadline = time.monotonic() + 15
        while lxc_running(name, Path(path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if lxc_running(name, Path(path)):
            errors.append(f"bare container {name} still running after lxc-stop -k")
        elif (name, path) in state.bare:
            state.bare.remove((name, path))
    if state.bare_veth_prefix and not state.bare:
        for link in Path("/sys/class/net").glob(state.bare_veth_prefix + "*"):
            run(["ip", "link", "del", "dev", link.name], timeout=10, check=False)
    state.save()
    return errors


def teardown(state: State) -> list[str]:
    """Remove everything the state names; returns what could not be removed."""
    _Flags.cleaning = True
    errors: list[str] = []
    say("cleaning up")
    stop_procs(state, list(state.procs))
    if state.hkd is not None and state.hkd.alive():
        # SIGTERM: the node daemon stops its desktops (graceful, then forced) and exits.
        say(f"stopping qvd-hkd (pid {state.hkd.pid}); it stops its desktops first")
        state.hkd.stop(timeout=150.0)
        if state.hkd.alive():
            errors.append(f"qvd-hkd pid {state.hkd.pid} did not exit")
    errors += stop_bare(state, list(state.bare))
    root = Path(state.root) if state.root else None
    if root is not None and root.is_dir() and state.bridge:
        cfg = load_node_config(root)
        backend = LxcBackend(root, cfg)
        loop = asyncio.new_event_loop()
        try:
            for info in loop.run_until_complete(backend.list_desktops()):
                # Leftovers: desktops of a killed daemon, or of the --via backend path.
                try:
                    loop.run_until_complete(backend.cleanup(info.vm_id))
                except Exception as e:  # keep removing the rest
                    errors.append(f"cleanup of desktop {info.vm_id}: {e}")
            loop.run_until_complete(backend.teardown_network())
        except Exception as e:
            errors.append(f"network teardown: {e}")
        finally:
            loop.close()
    if state.bridge and netsetup.link_exists(state.bridge):
        errors.append(f"bridge {state.bridge} left")
    if state.bridge:
        fw = run(["iptables", "-w", "-S"], check=False).stdout
        if state.bridge in fw:
            errors.append(f"iptables rules for {state.bridge} left")
    work = Path(state.workdir)
    left = netsetup.mounts_under(work)
    if left:
        errors.append(f"mounts left under {work}: {left}")
    elif not errors:
        shutil.rmtree(work, ignore_errors=True)
    else:
        errors.append(f"{work} kept for inspection")
    return errors


# --- desktops ------------------------------------------------------------------------------------


@dataclass
class Desktop:
    kind: str  # "ours" or "bare"
    index: int
    name: str  # container name
    ip: str
    lxcpath: str
    vm_id: int | None = None
    display: int = 0
    marks: dict[str, float] = field(default_factory=dict)  # milestone -> seconds after the start request
    memory: dict[str, Any] = field(default_factory=dict)
    xvfb: ProcRef | None = None
    proxy: ProcRef | None = None
    memcg: str = ""
    cpucg: str = ""
    white: int = 0  # white pixels of the first frame counted as painted

    def locate(self) -> None:
        pid = lxc_init_pid(self.name, Path(self.lxcpath))
        # From the init pid, not from the name: LXC appends -1, -2... when lxc.payload.<name> is taken.
        self.memcg = str(cgroup_dir(pid, "memory"))
        self.cpucg = str(cgroup_dir(pid, "cpuacct"))


class Phase(Protocol):
    kind: str
    label: str
    desktops: list[Desktop]

    def start_desktop(self, index: int) -> Desktop: ...

    def stop_all(self) -> None: ...


class Bench:
    """Shared context: the node root, network, state and the client side of every session."""

    def __init__(self, args: argparse.Namespace, state: State) -> None:
        self.args = args
        self.state = state
        self.work = Path(state.workdir)
        self.root = self.work / "root"
        self.clients = self.work / "clients"
        self.net = choose_net()
        self.gateway = str(self.net.network_address + 1)
        self.bridge = f"qvdd{secrets.token_hex(3)}"
        self.token = secrets.token_hex(3)
        self.vm_base = choose_vm_base(args.count + 2)
        self.loop = asyncio.new_event_loop()
        self.image = Path()
        self.cfg = Config()
        self.basefs = Path()
        self.notes: list[str] = []

    def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def write_node_file(self) -> None:
        (self.root / "etc").mkdir(parents=True)
        values = {
            "node.address": "127.0.0.1",
            "vm.network.bridge": self.bridge,
            "vm.network.ip.start": str(self.net.network_address + 100),
            "vm.network.netmask": str(self.net.netmask),
            "vm.network.mac.prefix": MAC_PREFIX,
        }
        text = "# Written by bench/density.py for one run.\n" + "".join(
            f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in values.items())
        (self.root / "etc" / "node.toml").write_text(text)
        self.cfg = load_node_config(self.root)
        self.state.root, self.state.bridge = str(self.root), self.bridge
        self.state.save()

    def open_client(self, d: Desktop) -> None:
        """The user's display exists before the start request: an Xvfb of this session."""
        self.clients.mkdir(exist_ok=True)
        d.display, d.xvfb = start_xvfb(self.clients, f"{d.kind}-{d.index}")
        self.state.procs.append(d.xvfb)
        self.state.save()

    def attach(self, d: Desktop, t0: float, connected: Callable[[], bool], log_hint: Path) -> None:
        """nxproxy -S to the desktop's nxagent, then wait for 'connected' and for the painted xterm."""
        home = self.clients / f"{d.kind}-{d.index}"
        home.mkdir(exist_ok=True)
        env = {"PATH": PATH_ENV, "HOME": str(home), "DISPLAY": f":{d.display}"}  # own ~/.nx per proxy
        d.proxy = spawn(["nxproxy", "-S", f"nx/nx,connect={d.ip},port={NX_PORT}:{NX_DISPLAY}"], env=env,
                        log=home / "nxproxy.log", what=f"nxproxy {d.kind}-{d.index}")
        self.state.procs.append(d.proxy)
        self.state.save()
        d.marks["proxy"] = time.monotonic() - t0
        proxy = d.proxy

        def check_proxy() -> None:
            if not proxy.alive():
                raise BenchError(f"nxproxy of {d.name} exited" + tail(home / "nxproxy.log") + tail(log_hint))

        def is_connected() -> bool:
            check_proxy()
            return connected()

        wait_until(f"{d.name}: session connected", is_connected, T_SESSION)
        d.marks["connected"] = time.monotonic() - t0

        frame = [b""]

        def painted() -> bool:
            check_proxy()
            frame[0] = grab_display(f":{d.display}")
            return bool(frame[0]) and count_white(frame[0]) >= PAINT_WHITE_PIXELS

        wait_until(f"{d.name}: xterm painted on the client's screen", painted, T_SESSION)
        d.marks["painted"] = time.monotonic() - t0
        d.white = count_white(frame[0])
        (home / "painted.xwd").write_bytes(frame[0])  # evidence: convert xwd:painted.xwd painted.png

    def open_session(self, d: Desktop, t0: float) -> None:
        """What the L7R does once the VM runs: x_start, x_state until listening, then the client."""
        for _ in range(int(T_SESSION / POLL)):
            try:
                vma_call(d.ip, "x_start", {"qvd.vm.user.name": BENCH_USER, "qvd.client.geometry": GEOMETRY,
                                           "qvd.client.link": "adsl"}, timeout=10.0)
                break
            except VmaRefused as e:
                raise BenchError(f"{d.name}: x_start refused: {e}") from None
            except OSError:
                time.sleep(POLL)  # the agent answered the node daemon; a refused connection is a blip
        else:
            raise BenchError(f"{d.name}: x_start never got through")
        d.marks["x_start"] = time.monotonic() - t0
        last = ["?"]

        def listening() -> bool:
            last[0] = x_state(d.ip)
            if last[0] == "stopped":
                raise BenchError(f"{d.name}: the session stopped before listening (VMA log: {self.vma_log(d)})")
            return last[0] == "listening"

        wait_until(f"{d.name}: x_state listening", listening, T_SESSION)
        d.marks["listening"] = time.monotonic() - t0
        self.attach(d, t0, lambda: x_state(d.ip) == "connected", Path(self.vma_log(d)))

    def vma_log(self, d: Desktop) -> str:
        return str(self.root / "log" / "lxc" / f"{d.name}.console.log")


def choose_net() -> ipaddress.IPv4Network:
    """A 10.233.X.0/24 that no address or route of this machine overlaps."""
    text = run(["ip", "-4", "-o", "addr", "show"]).stdout + run(["ip", "-4", "route", "show"]).stdout
    taken = []
    for m in re.finditer(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", text):
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.IPv4Network(m.group(1), strict=False))
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.233.{random.randint(1, 254)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise BenchError("no free 10.233.X.0/24 network")


def choose_vm_base(n: int) -> int:
    """VM ids no other QVD root of this machine uses now: veths (qvd<id>) and cgroups are node-wide."""
    for _ in range(100):
        base = random.randint(700, 799) * 10000
        ids = range(base, base + n + 1)
        if not any(netsetup.link_exists(f"qvd{i}") or Path(f"/sys/fs/cgroup/memory/lxc.payload.qvd-{i}").exists()
                   for i in ids):
            return base
    raise BenchError("no free range of VM ids")


# --- ours through the node daemon ----------------------------------------------------------------


class OursViaHkd:
    kind = "ours"

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.desktops: list[Desktop] = []
        self.vm_ids: list[int] = []
        self.name = f"density-{b.token}"
        self.label = ""
        self.ro: sqlite3.Connection | None = None

    def setup(self) -> None:
        from qvd.cli.common import open_node
        from qvd.db import schema
        from qvd.db.models import Vm, VmRuntime
        from qvd.services.base import SYSTEM
        from qvd.services.images import create_di, create_osf
        from qvd.services.tenancy import seed
        from qvd.services.users import create_user
        from qvd.services.vms import create_vm, delete_vm

        b = self.b
        self.node = open_node(str(b.root))
        schema.upgrade(self.node.engine)
        with self.node.factory() as s, s.begin():
            seed(s)
        cfg = self.node.cfg
        user = create_user(self.node.factory, SYSTEM, cfg, {"name": BENCH_USER, "tenant": "default"})
        osf = create_osf(self.node.factory, SYSTEM, cfg, {"name": "density", "tenant": "default",
                                                          "memory": MEMORY_MB})
        di = create_di(self.node.factory, SYSTEM, self.node.paths.images, {"osf_id": osf["id"],
                                                                          "disk_image": str(b.image)})
        self.di_id = int(di["id"])
        b.basefs = b.root / "storage" / "basefs" / str(self.di_id)
        # VM ids from b.vm_base: a placeholder row with that id makes SQLite number the real ones after it
        # (veth and cgroup names are node-wide; ids 1, 2... may be in use by another root's tests).
        with self.node.factory() as s, s.begin():
            ph = Vm(id=b.vm_base, name="id-placeholder", user_id=user["id"], osf_id=osf["id"],
                    ip=str(b.net.broadcast_address - 1))
            ph.runtime = VmRuntime()
            s.add(ph)
        for i in range(b.args.count + 1):
            row = create_vm(self.node.factory, SYSTEM, cfg, {"name": f"desk-{i}", "user_id": user["id"],
                                                             "osf_id": osf["id"]})
            self.vm_ids.append(int(row["id"]))
        delete_vm(self.node.factory, SYSTEM, cfg, b.vm_base)
        self.ro = sqlite3.connect(f"file:{self.node.paths.sqlite_db}?mode=ro", uri=True, timeout=5,
                                  isolation_level=None)
        self.start_hkd()

    def start_hkd(self) -> None:
        b = self.b
        exe = Path(sys.executable).with_name("qvd-hkd")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "qvd.hkd.main"]
        argv += ["--root", str(b.root), "--name", self.name, "--address", "127.0.0.1"]
        env = {"PATH": PATH_ENV, "QVD_ROOT": str(b.root), "LANG": "C.UTF-8"}
        self.log = b.work / "hkd.log"
        ref = spawn(argv, env=env, log=self.log, what="qvd-hkd")
        b.state.hkd = ref
        b.state.save()
        say(f"qvd-hkd started (pid {ref.pid}), waiting for its host to be running")

        def running() -> bool:
            if not ref.alive():
                raise BenchError("qvd-hkd exited while starting" + tail(self.log))
            return self.host_state() == "running"

        wait_until("qvd-hkd to report its host running", running, 60.0, poll=0.1)
        self.label = (f"real node daemon: qvd-hkd pid {ref.pid} on root {b.root} (SQLite), starts issued with "
                      "qvd.services.vms.start_vm()")

    def _query(self, sql: str, *args: object) -> tuple[Any, ...] | None:
        # A read-only connection of our own: the ORM engine takes SQLite's write lock at every BEGIN, and
        # polling with it every 50 ms would compete with the daemon's own writes.
        assert self.ro is not None
        row = self.ro.execute(sql, args).fetchone()
        return tuple(row) if row is not None else None

    def host_state(self) -> str:
        row = self._query("SELECT r.state FROM host_runtimes r JOIN hosts h ON h.id = r.host_id WHERE h.name = ?",
                          self.name)
        return str(row[0]) if row else ""

    def vm_row(self, vm_id: int) -> tuple[str, str, str]:
        row = self._query("SELECT vm_state, COALESCE(vm_address, ''), COALESCE(last_error, '') FROM vm_runtimes "
                          "WHERE vm_id = ?", vm_id)
        if row is None:
            raise BenchError(f"VM {vm_id} has no runtime row")
        return str(row[0]), str(row[1]), str(row[2])

    def start_desktop(self, index: int) -> Desktop:
        from qvd.services.base import SYSTEM
        from qvd.services.vms import start_vm

        b = self.b
        vm_id = self.vm_ids[index]
        d = Desktop("ours", index, f"qvd-{vm_id}", "", str(b.root / "run" / "lxc"), vm_id=vm_id)
        b.open_client(d)
        hkd = b.state.hkd
        t0 = time.monotonic()
        start_vm(self.node.factory, SYSTEM, self.node.cfg, vm_id)
        d.marks["request"] = time.monotonic() - t0
        while True:
            state, address, error = self.vm_row(vm_id)
            if state != "stopped" and "claimed" not in d.marks:
                d.marks["claimed"] = time.monotonic() - t0
            if state == "running":
                d.marks["running"] = time.monotonic() - t0
                d.ip = address
                break
            if state in ("stopping", "zombie") or (state == "stopped" and "claimed" in d.marks):
                raise BenchError(f"VM {vm_id} did not start ({state}): {error}" + tail(self.log))
            if hkd is not None and not hkd.alive():
                raise BenchError("qvd-hkd exited" + tail(self.log))
            if time.monotonic() - t0 > T_RUNNING:
                raise BenchError(f"VM {vm_id} not running after {T_RUNNING:g} s (state {state})" + tail(self.log))
            time.sleep(POLL)
        self.desktops.append(d)
        b.open_session(d, t0)
        d.locate()
        return d

    def stop_all(self) -> None:
        from qvd.services.base import SYSTEM
        from qvd.services.vms import stop_vm

        for d in self.desktops:
            assert d.vm_id is not None
            if self.vm_row(d.vm_id)[0] != "stopped":
                stop_vm(self.node.factory, SYSTEM, self.node.cfg, d.vm_id)
        for d in self.desktops:
            assert d.vm_id is not None
            vm_id = d.vm_id

            def stopped(v: int = vm_id) -> bool:
                return self.vm_row(v)[0] == "stopped"

            wait_until(f"VM {vm_id} stopped by qvd-hkd", stopped, T_RUNNING, poll=0.2)
        stop_procs(self.b.state, [p for d in self.desktops for p in (d.proxy, d.xvfb) if p is not None])
        self.desktops = []


# --- ours through the backend directly -----------------------------------------------------------


class OursViaBackend:
    kind = "ours"

    def __init__(self, b: Bench, why: str) -> None:
        self.b = b
        self.desktops: list[Desktop] = []
        self.label = (f"LxcBackend.prepare/start called directly (no node daemon: {why}); "
                      "'running' = the VMA answers /vma/ping")

    def setup(self) -> None:
        b = self.b
        self.backend = LxcBackend(b.root, b.cfg)
        b.run_async(self.backend.check())
        images = b.root / "storage" / "images"
        images.mkdir(parents=True, exist_ok=True)
        self.image = images / b.image.name
        shutil.copyfile(b.image, self.image)  # a private copy: the cache prunes old tarballs
        b.basefs = self.backend.base_dir(1)

    def spec(self, index: int) -> DesktopSpec:
        b = self.b
        vm_id = b.vm_base + 1 + index
        ip = str(b.net.network_address + 100 + index)
        return DesktopSpec(vm_id=vm_id, name=f"desk-{index}", di_id=1, image=self.image, memory_mb=MEMORY_MB,
                           address=ip, prefix_len=b.net.prefixlen, gateway=b.gateway, mac=mac_for(ip, MAC_PREFIX),
                           home_key=f"vm-{vm_id}")

    def start_desktop(self, index: int) -> Desktop:
        b = self.b
        spec = self.spec(index)
        d = Desktop("ours", index, f"qvd-{spec.vm_id}", spec.address, str(b.root / "run" / "lxc"), vm_id=spec.vm_id)
        b.open_client(d)
        self.desktops.append(d)
        t0 = time.monotonic()
        b.run_async(self.backend.prepare(spec))
        b.run_async(self.backend.start(spec))
        d.marks["request"] = time.monotonic() - t0
        wait_until(f"{d.name}: VMA answering", lambda: vma_answers(spec.address), T_RUNNING)
        d.marks["running"] = time.monotonic() - t0
        b.open_session(d, t0)
        d.locate()
        return d

    def stop_all(self) -> None:
        for d in self.desktops:
            assert d.vm_id is not None
            self.b.run_async(self.backend.cleanup(d.vm_id))
        stop_procs(self.b.state, [p for d in self.desktops for p in (d.proxy, d.xvfb) if p is not None])
        self.desktops = []


# --- the baseline: bare lxc-start ----------------------------------------------------------------

BARE_INIT = """#!/bin/sh
# Baseline desktop without QVD: nxagent with the options the VMA would give it; openbox and xterm only
# once a client attached (started earlier they often leave a black window, lab notes section 2), and
# xrefresh at the VMA's times (0.5, 1, 2, 4 s after the attach): without it NX shows the mapped xterm only
# ~5 s later, and the baseline would measure that NX first-paint delay instead of a start.
mkdir -p /tmp/.X11-unix && chmod 1777 /tmp/.X11-unix
export HOME=/root LANG=C.UTF-8
echo "nx/nx,link=adsl,client=linux,geometry={geometry},listen={port}:{display}" > /tmp/nxagent.conf
nxagent -nolisten tcp -ac -name NX -D -display nx/nx,options=/tmp/nxagent.conf:{display} :{display} \\
    > /vdi-run/nxagent.log 2>&1 &
agent=$!
until grep -q "Session: Session started" /vdi-run/nxagent.log; do
    kill -0 $agent 2>/dev/null || exit 1
    sleep 0.05
done
export DISPLAY=:{display}
openbox > /vdi-run/x.log 2>&1 &
xterm >> /vdi-run/x.log 2>&1 &
(for pause in 0.5 0.5 1 2; do sleep $pause; xrefresh; done) >> /vdi-run/x.log 2>&1 &
wait $agent
"""



class Bare:
    kind = "bare"
    label = ("bare lxc-start, hand-written config; init = nxagent, then openbox + xterm (+ xrefresh at the VMA's "
             "times) once a client attached; no VMA, no node daemon")

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.desktops: list[Desktop] = []
        self.dir = b.work / "bare"
        self.lxcpath = self.dir / "lxc"
        self.vdi = self.dir / "vdi"
        self.veth_prefix = f"vb{b.token}"

    def setup(self) -> None:
        self.lxcpath.mkdir(parents=True)
        self.vdi.mkdir()
        init = self.vdi / "init.sh"
        init.write_text(BARE_INIT.replace("{geometry}", GEOMETRY).replace("{port}", str(NX_PORT))
                        .replace("{display}", str(NX_DISPLAY)))
        init.chmod(0o755)
        self.b.state.bare_veth_prefix = self.veth_prefix
        self.b.state.save()

    def start_desktop(self, index: int) -> Desktop:
        b = self.b
        name = f"bare{b.token}-{index}"
        ip = str(b.net.network_address + 10 + index)
        d = Desktop("bare", index, name, ip, str(self.lxcpath))
        b.open_client(d)
        ctdir = self.lxcpath / name
        run_dir = ctdir / "run"
        agent_log = run_dir / "nxagent.log"
        t0 = time.monotonic()
        (ctdir / "upper").mkdir(parents=True)
        run_dir.mkdir()
        (ctdir / "config").write_text(BARE_LXC_CONFIG.format(generator="bench/density.py",
            name=name, base=b.basefs, upper=ctdir / "upper", path=PATH_ENV, vdi=self.vdi, run=run_dir,
            memory=MEMORY_MB, bridge=b.bridge, veth=f"{self.veth_prefix}{index}", ip=ip,
            prefix=b.net.prefixlen, ctdir=ctdir))
        b.state.bare.append((name, str(self.lxcpath)))
        b.state.save()
        self.desktops.append(d)
        run(["lxc-start", "-n", name, "-P", str(self.lxcpath), "-d"], timeout=60)
        d.marks["request"] = time.monotonic() - t0

        def log_has(text: str) -> Callable[[], bool]:
            def pred() -> bool:
                try:
                    return text in agent_log.read_text(errors="replace")
                except OSError:
                    return False
            return pred

        wait_until(f"{name}: nxagent listening", log_has("Waiting for connection"), T_SESSION)
        d.marks["listening"] = time.monotonic() - t0
        b.attach(d, t0, log_has("Session: Session started"), agent_log)
        d.locate()
        return d

    def stop_all(self) -> None:
        errors = stop_bare(self.b.state, [(d.name, d.lxcpath) for d in self.desktops])
        stop_procs(self.b.state, [p for d in self.desktops for p in (d.proxy, d.xvfb) if p is not None])
        if errors:
            raise BenchError("; ".join(errors))
        self.desktops = []


# --- measuring -----------------------------------------------------------------------------------


def wait_idle(desktops: list[Desktop]) -> tuple[float, float, bool]:
    """Wait until the phase's containers are idle: (seconds waited, CPU % of one core per desktop, idle?)."""
    t0 = time.monotonic()
    time.sleep(IDLE_MIN_WAIT)
    cgs = [Path(d.cpucg) for d in desktops]
    while True:
        before = sum(cpu_ns(c) for c in cgs)
        time.sleep(IDLE_WINDOW)
        per_desktop = (sum(cpu_ns(c) for c in cgs) - before) / 1e9 / IDLE_WINDOW * 100 / max(1, len(cgs))
        waited = time.monotonic() - t0
        if per_desktop < IDLE_CPU_PER_DESKTOP:
            return waited, per_desktop, True
        if waited > IDLE_MAX_WAIT:
            return waited, per_desktop, False


def measure_memory(d: Desktop) -> None:
    procs: dict[str, int] = {}
    total = 0
    pids = cgroup_pids(Path(d.memcg))
    for pid in pids:
        kib = pss_kib(pid)
        if kib is None:
            continue
        name = comm(pid)
        procs[name] = procs.get(name, 0) + kib
        total += kib
    d.memory = {"pss_kib": total, "nprocs": len(pids), "by_process_kib": procs,
                "memcg_bytes": memcg_stats(Path(d.memcg)),
                "client_nxproxy_pss_kib": pss_kib(d.proxy.pid) if d.proxy else None}


def run_phase(b: Bench, phase: Phase, count: int) -> dict[str, Any]:
    say(f"phase {phase.kind}: {count} desktop(s), one after the other")
    for i in range(count):
        d = phase.start_desktop(i + 1)
        m = d.marks
        say(f"  {phase.kind} {d.index}: painted {m['painted']:.2f} s after the start request "
            f"(connected {m['connected']:.2f} s)")
    say(f"phase {phase.kind}: waiting until idle")
    waited, cpu, idle = wait_idle(phase.desktops)
    for d in phase.desktops:
        measure_memory(d)
    say(f"phase {phase.kind}: measured after {waited:.0f} s (CPU {cpu:.2f}% of a core per desktop)")
    return {"kind": phase.kind, "path": phase.label, "settle_s": round(waited, 1),
            "idle_cpu_pct_per_desktop": round(cpu, 3), "idle": idle,
            "desktops": [{"index": d.index, "name": d.name, "ip": d.ip, "vm_id": d.vm_id,
                          "marks_s": {k: round(v, 3) for k, v in d.marks.items()}, "painted_white_pixels": d.white,
                          "memory": d.memory}
                         for d in phase.desktops]}


def warm_up(b: Bench, ours: OursViaHkd | OursViaBackend) -> None:
    say("warm-up: one desktop through our stack (unpacks the DI, fills the page cache); not measured")
    d = ours.start_desktop(0)
    say(f"warm-up painted {d.marks['painted']:.2f} s after the start request")
    ours.stop_all()


# --- report --------------------------------------------------------------------------------------

MIB = 1024.0


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def summarize(phase: dict[str, Any]) -> dict[str, Any]:
    ds = phase["desktops"]
    marks = sorted({k for d in ds for k in d["marks_s"]})
    out: dict[str, Any] = {"marks_s": {k: _stats([d["marks_s"][k] for d in ds if k in d["marks_s"]]) for k in marks}}
    out["pss_mib"] = _stats([d["memory"]["pss_kib"] / MIB for d in ds])
    out["memcg_usage_mib"] = _stats([d["memory"]["memcg_bytes"]["usage"] / MIB / MIB for d in ds])
    out["memcg_rss_mib"] = _stats([d["memory"]["memcg_bytes"].get("rss", 0) / MIB / MIB for d in ds])
    out["client_nxproxy_pss_mib"] = _stats([d["memory"]["client_nxproxy_pss_kib"] / MIB for d in ds
                                            if d["memory"]["client_nxproxy_pss_kib"] is not None])
    names = sorted({n for d in ds for n in d["memory"]["by_process_kib"]})
    out["pss_by_process_mib"] = {n: statistics.median([d["memory"]["by_process_kib"].get(n, 0) / MIB for d in ds])
                                 for n in names}
    return out


def fmt_stats(s: dict[str, float], unit: str = "", digits: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


MARK_ORDER = ("request", "claimed", "running", "x_start", "listening", "proxy", "connected", "painted")
MARK_HELP = {
    "request": "start call returned (ours: services.vms.start_vm() wrote the command / backend.start() returned; "
               "bare: lxc-start -d returned)",
    "claimed": "the node daemon took the command (vm_state left 'stopped')",
    "running": "ours: the VM is 'running' (the node daemon's ping reached the VMA) / the VMA answers",
    "x_start": "VMA x_start answered",
    "listening": "nxagent listens (ours: x_state 'listening'; bare: 'Waiting for connection' in its log)",
    "proxy": "nxproxy -S launched on the client's Xvfb",
    "connected": "session connected (ours: x_state 'connected'; bare: 'Session started' in nxagent's log)",
    "painted": "an xwd grab of the client's Xvfb shows the xterm painted (>= "
               f"{PAINT_WHITE_PIXELS} pure-white pixels) = START-TO-DESKTOP",
}


def report(result: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"QVD density benchmark: {result['count']} desktop(s) per phase, image {result['image']}")
    add(f"machine: {result['machine']}")
    add(f"network: bridge {result['bridge']}, {result['network']} (ours from .100, bare from .10)")
    add(f"path used for 'ours': {result['path_ours']}")
    if result.get("notes"):
        for n in result["notes"]:
            add(f"note: {n}")
    add("")
    add(f"Start-to-desktop: seconds from the start request to each milestone, polled every {POLL:g} s:")
    for k in MARK_ORDER:
        add(f"  {k:<10} {MARK_HELP[k]}")
    phases = result["phases"]
    for ph in phases:
        add("")
        add(f"phase '{ph['kind']}': {ph['path']}")
        present = [k for k in MARK_ORDER if any(k in d["marks_s"] for d in ph["desktops"])]
        add("  desk  " + "".join(f"{k:>10}" for k in present) + "   PSS MiB  memcg MiB  (rss)  procs")
        for d in ph["desktops"]:
            m, mem = d["marks_s"], d["memory"]
            cells = "".join(f"{m[k]:>10.2f}" if k in m else f"{'-':>10}" for k in present)
            cg = mem["memcg_bytes"]
            add(f"  {d['index']:>4}  {cells}   {mem['pss_kib'] / MIB:7.1f}  {cg['usage'] / MIB / MIB:9.1f}"
                f"  ({cg.get('rss', 0) / MIB / MIB:5.1f})  {mem['nprocs']:5d}")
        s = ph["summary"]
        add("  median [min-max]:")
        for k in present:
            add(f"    {k:<10} {fmt_stats(s['marks_s'][k], ' s')}")
        add(f"    PSS per desktop        {fmt_stats(s['pss_mib'], ' MiB', 1)}")
        add(f"    memcg usage            {fmt_stats(s['memcg_usage_mib'], ' MiB', 1)}")
        add(f"    memcg rss (anon)       {fmt_stats(s['memcg_rss_mib'], ' MiB', 1)}")
        add("    PSS by process (median per desktop): " + ", ".join(
            f"{n} {v:.1f}" for n, v in sorted(s["pss_by_process_mib"].items(), key=lambda kv: -kv[1])) + " MiB")
        add(f"    host side, not in the figures: nxproxy PSS {fmt_stats(s['client_nxproxy_pss_mib'], ' MiB', 1)}")
        add(f"    measured {ph['settle_s']:.0f} s after the last desktop painted; idle CPU "
            f"{ph['idle_cpu_pct_per_desktop']:.2f}% of one core per desktop" + ("" if ph["idle"] else " (NOT idle)"))
    if result.get("hkd_pss_mib") is not None:
        add(f"  node daemon (host side, for all its desktops, not in the figures): qvd-hkd PSS "
            f"{result['hkd_pss_mib']:.1f} MiB")
    r = result.get("ratios", {})
    if r:
        add("")
        add("Ratios ours/bare (medians):")
        add(f"  memory per idle desktop (PSS)     {r['pss']:.2f}")
        add(f"  memory cgroup usage per desktop   {r['memcg_usage']:.2f}")
        add(f"  start-to-desktop (painted)        {r['start_to_desktop']:.2f}")
    return "\n".join(lines)


def machine_line() -> str:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{os.cpu_count()} CPUs, {mem_kib / MIB / MIB:.1f} GiB, kernel {os.uname().release}, "
            f"load average at start {' '.join(load)}")


# --- main ----------------------------------------------------------------------------------------


def hkd_usable() -> tuple[bool, str]:
    main = Path(__file__).resolve().parents[1] / "src" / "qvd" / "hkd" / "main.py"
    if not main.exists():
        return False, f"{main} does not exist"
    try:
        from qvd.hkd.daemon import NodeDaemon  # noqa: F401
        from qvd.hkd.main import main as _main  # noqa: F401
    except Exception as e:
        return False, f"qvd.hkd does not import: {type(e).__name__}: {e}"
    return True, ""


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (privileged LXC containers, bridge, firewall)")
    missing = [t for t in ("lxc-start", "lxc-stop", "lxc-info", "Xvfb", "nxproxy", "xwd", "ip", "iptables", "tar")
               if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} "
                         "(apt-get install lxc xvfb nxproxy x11-apps iproute2 iptables)")
    if not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        raise BenchError("the cgroup v1 memory controller is not mounted at /sys/fs/cgroup/memory")


def build_the_image() -> Path:
    from qvd.images.build import build_image

    lines: list[str] = []
    path = build_image("minimal", cache_dir=IMAGE_CACHE, progress=lines.append)
    for ln in lines:
        say(f"  image: {ln}")
    return path


def bench(args: argparse.Namespace, state: State) -> dict[str, Any]:
    preflight()
    b = Bench(args, state)
    say(f"work dir {b.work}, bridge {b.bridge}, network {b.net}")
    src = build_the_image()
    b.image = b.work / src.name
    shutil.copyfile(src, b.image)  # other builds prune the cache while we run
    b.write_node_file()

    ours: OursViaHkd | OursViaBackend
    ok, why = hkd_usable() if args.via != "backend" else (False, "--via backend")
    if ok:
        hk = OursViaHkd(b)
        try:
            hk.setup()
            ours = hk
        except BenchError as e:
            if args.via == "hkd":
                raise
            why = f"qvd-hkd did not start: {e}"
            ok = False
            if state.hkd is not None:
                state.hkd.stop(timeout=60)
                state.hkd = None
                state.save()
    if not ok:
        if args.via == "hkd":
            raise BenchError(f"--via hkd: {why}")
        say(f"not using the node daemon: {why}")
        # A fresh root for the backend path: a half-started daemon may have left a database behind.
        shutil.rmtree(b.root / "storage", ignore_errors=True)
        ob = OursViaBackend(b, why)
        ob.setup()
        ours = ob
    state.via = "hkd" if isinstance(ours, OursViaHkd) else "backend"
    state.save()
    if isinstance(ours, OursViaHkd):
        b.notes.append("the node daemon looks for commands every internal.hkd.agent.command_handler.delay = "
                       f"{b.cfg.get_float('internal.hkd.agent.command_handler.delay'):g} s (SQLite has no "
                       "LISTEN/NOTIFY): 'claimed' includes that wait")
    b.notes.append("ours: the VMA provisions user 'bench' and runs the session as that user; bare runs it as root")
    b.notes.append("memcg usage: the page cache of the shared base was charged to the warm-up desktop (removed "
                   "before the phases), so it counts what each desktop adds; PSS splits shared pages among the "
                   "N desktops of a phase")
    say(f"path for 'ours': {ours.label}")

    warm_up(b, ours)
    bare = Bare(b)
    bare.setup()
    phases = [run_phase(b, bare, args.count)]
    say("removing the baseline desktops before our phase (PSS would split shared pages between both)")
    bare.stop_all()
    phases.append(run_phase(b, ours, args.count))

    for ph in phases:
        ph["summary"] = summarize(ph)
    sb, so = phases[0]["summary"], phases[1]["summary"]
    ratios = {
        "pss": so["pss_mib"]["median"] / sb["pss_mib"]["median"],
        "memcg_usage": so["memcg_usage_mib"]["median"] / sb["memcg_usage_mib"]["median"],
        "start_to_desktop": so["marks_s"]["painted"]["median"] / sb["marks_s"]["painted"]["median"],
    }
    hkd_pss = pss_kib(state.hkd.pid) if state.hkd is not None and state.hkd.alive() else None
    result = {
        "count": args.count, "image": str(src), "machine": machine_line(), "bridge": b.bridge,
        "network": str(b.net), "path_ours": f"{state.via}: {ours.label}", "notes": b.notes,
        "phases": phases, "ratios": ratios, "hkd_pss_mib": hkd_pss / MIB if hkd_pss is not None else None,
        "definitions": MARK_HELP,
    }
    if not args.keep:
        ours.stop_all()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.density", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10, help="desktops per phase (default 10, at most 80)")
    p.add_argument("--via", choices=("auto", "hkd", "backend"), default="auto",
                   help="how 'ours' starts: the node daemon (auto: if it starts) or LxcBackend directly")
    p.add_argument("--keep", action="store_true",
                   help="leave our phase running (node daemon, desktops, proxies, Xvfbs, bridge) for inspection; "
                        "the baseline is always removed before our phase; clean up later with --cleanup DIR")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="also write the results as JSON (to stdout after the report, or to FILE)")
    p.add_argument("--cleanup", metavar="DIR", help="remove what a --keep run left (DIR as it printed) and exit")
    args = p.parse_args(argv)
    if not 1 <= args.count <= 80:
        p.error("--count must be from 1 to 80 (the baseline uses .10-.89 of the /24)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    if args.cleanup:
        errors = teardown(State.load(Path(args.cleanup)))
        for e in errors:
            print(f"cleanup: {e}", file=sys.stderr)
        say("cleanup incomplete" if errors else "cleanup complete")
        return 1 if errors else 0
    work = Path(tempfile.mkdtemp(prefix="qvd-density-", dir="/var/tmp"))
    state = State(workdir=str(work))
    state.save()
    result: dict[str, Any] | None = None
    code = 1
    keep = False
    try:
        result = bench(args, state)
        code = 0
        keep = args.keep
    except Interrupted as e:
        print(f"density: interrupted by {e}", file=sys.stderr)
        code = 130
    except BenchError as e:
        print(f"density: error: {e}", file=sys.stderr)
        keep = args.keep
    except Exception:
        import traceback

        traceback.print_exc()
        keep = args.keep
    finally:
        if keep:
            _Flags.cleaning = True
            state.save()
            say(f"--keep: left running; files in {work}; remove everything with:")
            say(f"  {sys.executable} -m bench.density --cleanup {work}")
        else:
            errors = teardown(state)
            for err in errors:
                print(f"density: cleanup: {err}", file=sys.stderr)
            if errors:
                code = code or 1
            else:
                say("cleanup complete")
    if result is not None:
        print(report(result))
        if args.json == "-":
            print(json.dumps(result, indent=1))
        elif args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
