"""Session start time through the whole product: ``connect_to_vm`` -> ``101``, cold and resumed, against a
bare ``lxc-start`` of the same image in the same run.

Run as root from the repository root::

    .venv/bin/python -m bench.session_start [--runs 5] [--json [FILE]] [--keep-workdir]

Set-up: a temporary node root (SQLite) whose node file sets a private bridge ``qvdb<hex>`` and a free
``10.234.X.0/24`` (desktops from .100, the baseline containers from .10); the real minimal desktop image
(``qvd.images.build.build_image('minimal')``, cached in /var/cache/qvd/images); a user, OSF, DI and VM
created through ``qvd.services``; the real node daemon ``qvd-hkd`` (LXC backend) and the real ``qvd-l7r``
(TLS) on that root, both with their default timings (the node daemon looks for commands every
``internal.hkd.agent.command_handler.delay`` = 1 s on SQLite; the L7R polls the VM every 0.5 s and the X
session every 0.25 s).  The client is ``qvd.client`` in this process (``L7rConnection.connect_to_vm``,
then ``run_session`` with Debian's ``nxproxy`` on an Xvfb), so that the clock can stop exactly at ``101``.

Measured, ``--runs`` times each, median reported:

(a) cold: the VM is stopped; ``connect_to_vm`` -> ``101`` covers host assignment, the node daemon picking
    up the command, container start, the VMA answering, ``x_start`` (user provisioning + nxagent) and
    nxagent listening.  The arrival of each ``102`` line is recorded too.  After ``101`` the client attaches
    (nxproxy) until the desktop is painted, then the VM is stopped again through ``qvd.services``.
    Before the runs, one unmeasured warm-up start unpacks the DI (reported apart).
(b) resume: the session is suspended (client gone, VM running); ``connect_to_vm`` -> ``101`` covers the
    take-over bookkeeping, ``x_start`` (SIGHUP to nxagent) and nxagent listening again.
    For both, ``101_to_connected`` (the VMA reports the NX session connected) and ``101_to_painted`` (the
    client's screen shows the xterm) are recorded after the ``101``; a resume whose NX session dies right
    after the ``101`` is retried and listed as failed.
(c) baseline: ``lxc-start -d`` of a hand-written container on the same unpacked image (overlay, veth on the
    same bridge, tini as init running ``nxagent`` directly with the options the VMA would give it): time to
    the first process of the container (a timestamp its init writes) and to nxagent listening ("Waiting for
    connection" in its log, polled every 10 ms).

If ``qvd-hkd`` does not start, (a) and (b) are skipped with the reason and (c) still runs.  Everything
started (processes by pid, containers, the bridge and its firewall rules, the node root) is removed at the
end, also on error and on SIGINT/SIGTERM/SIGHUP.  Traffic goes only to loopback and to the containers
created here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/session_start.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    BARE_LXC_CONFIG,
    PATH_ENV,
    BenchError,
    Janitor,
    LoopThread,
    ProcRef,
    TempNode,
    VmaRefused,
    Xvfb,
    add_common_args,
    count_white,
    fmt_ratio,
    grab,
    machine_line,
    median,
    need_tools,
    qvd_command,
    ratio,
    run,
    run_bench,
    save_png,
    say,
    tail,
    vma_call,
    wait_until,
    x_env,
)

IMAGE_CACHE = Path(os.environ.get("QVD_TEST_IMAGE_CACHE", "/var/cache/qvd/images"))
NX_DISPLAY = 100  # internal.nxagent.display default: nxagent listens on 4000 + 100
NX_PORT = 4000 + NX_DISPLAY
VMA_PORT = 3030
GEOMETRY = "1024x768"
MEMORY_MB = 512
# xterm (80x24, 'fixed') on nxagent's black root is ~115,000 white pixels on the client's screen.
PAINT_WHITE_PIXELS = 80_000
T_START = 180.0
T_STOP = 120.0

BARE_INIT = """#!/bin/sh
# Baseline desktop without QVD: nxagent with the options the VMA would give it.
date +%s.%N > /vdi-run/t-init
mkdir -p /tmp/.X11-unix && chmod 1777 /tmp/.X11-unix
export HOME=/root LANG=C.UTF-8
echo "nx/nx,link=adsl,client=linux,geometry={geometry},listen={port}:{display}" > /tmp/nxagent.conf
exec nxagent -nolisten tcp -ac -name NX -D -display nx/nx,options=/tmp/nxagent.conf:{display} :{display} \\
    > /vdi-run/nxagent.log 2>&1
"""



def choose_net() -> ipaddress.IPv4Network:
    """A 10.234.X.0/24 that no address or route of this machine overlaps."""
    text = run(["ip", "-4", "-o", "addr", "show"]).stdout + run(["ip", "-4", "route", "show"]).stdout
    taken = []
    for m in re.finditer(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", text):
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.IPv4Network(m.group(1), strict=False))
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.234.{random.randint(1, 254)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise BenchError("no free 10.234.X.0/24 network")


def choose_vm_id() -> int:
    """A VM id no other QVD root of this machine uses now: veth (qvd<id>) and cgroup names are node-wide."""
    from qvd.backends import netsetup

    for _ in range(100):
        vm_id = random.randint(80000, 89999) * 100
        if not netsetup.link_exists(f"qvd{vm_id}") and not Path(f"/sys/fs/cgroup/memory/lxc.payload.qvd-{vm_id}"
                                                                  ).exists():
            return vm_id
    raise BenchError("no free VM id")


class SessionLost(BenchError):
    """The client's NX session ended on its own before the desktop showed."""


@dataclass
class Timing:
    kind: str
    seconds_101: float = 0.0
    infos: dict[str, float] = field(default_factory=dict)  # first arrival of each 102 line, seconds
    extra: dict[str, float] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace, janitor: Janitor, work: Path) -> None:
        self.args = args
        self.j = janitor
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self.net = choose_net()
        self.bridge = f"qvdb{secrets.token_hex(3)}"
        self.token = secrets.token_hex(3)
        self.nodename = f"bench-ss-{self.token}"
        self.login = f"ss{self.token}"
        self.password = secrets.token_hex(8)
        self.lt = LoopThread.get()
        self.session_task: asyncio.Task[None] | None = None
        self.hkd: ProcRef | None = None
        self.node: TempNode | None = None
        self.vm_id = 0
        self.di_id = 0
        self.vm_ip = ""
        self.notes: list[str] = []

    # --- set-up -------------------------------------------------------------------------------

    def image(self) -> Path:
        from qvd.images.build import build_image

        lines: list[str] = []
        say("desktop image: build_image('minimal') (a cache hit or a re-pack)")
        src = build_image("minimal", cache_dir=IMAGE_CACHE, progress=lines.append)
        dst = self.work / src.name
        shutil.copyfile(src, dst)  # other builds prune the cache while we run
        return dst

    def setup_node(self, image: Path) -> TempNode:
        from qvd.db.models import Vm, VmRuntime
        from qvd.services.base import SYSTEM
        from qvd.services.vms import delete_vm

        settings: dict[str, object] = {
            "nodename": self.nodename, "node.address": "127.0.0.1",
            "vm.network.bridge": self.bridge, "vm.network.ip.start": str(self.net.network_address + 100),
            "vm.network.netmask": str(self.net.netmask), "l7r.use_ssl": True,
        }
        node = TempNode(self.j, self.work / "root", settings)
        self.node = node
        self.j.push(f"remove the desktops, bridge {self.bridge} and its firewall rules", self.teardown_network)
        uid = node.add_user(self.login, self.password)
        osf = node.add_osf("startbench", memory=MEMORY_MB)
        say("DI: importing the image through qvd.services")
        self.di_id = node.add_di(osf, image)
        # A placeholder row makes SQLite number our VM after a high id (veth/cgroup names are node-wide).
        base = choose_vm_id()
        with node.node.factory() as s, s.begin():
            ph = Vm(id=base, name="id-placeholder", user_id=uid, osf_id=osf, ip=str(self.net.broadcast_address - 1))
            ph.runtime = VmRuntime()
            s.add(ph)
        self.vm_id = node.add_vm("desk", uid, osf)
        delete_vm(node.node.factory, SYSTEM, node.node.cfg, base)
        return node

    def teardown_network(self) -> None:
        from qvd.backends import netsetup
        from qvd.backends.lxc import LxcBackend
        from qvd.core.config import load_node_config

        root = self.work / "root"
        if not (root / "etc" / "node.toml").exists():
            return
        backend = LxcBackend(root, load_node_config(root))
        loop = asyncio.new_event_loop()
        try:
            for info in loop.run_until_complete(backend.list_desktops()):
                loop.run_until_complete(backend.cleanup(info.vm_id))
            loop.run_until_complete(backend.teardown_network())
        finally:
            loop.close()
        if netsetup.link_exists(self.bridge):
            raise BenchError(f"bridge {self.bridge} is still there")
        left = netsetup.mounts_under(self.work)
        if left:
            raise BenchError(f"mounts left under {self.work}: {left}")

    def start_hkd(self) -> None:
        assert self.node is not None
        log = self.logs / "hkd.log"
        self.hkd = self.j.spawn([*qvd_command("qvd-hkd"), "--root", str(self.node.root)],
                                env={"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": "/root"}, log=log,
                                what="qvd-hkd", stop_timeout=150.0)
        hkd = self.hkd

        def running() -> bool:
            if not hkd.alive():
                raise BenchError("qvd-hkd exited while starting" + tail(log))
            return self.host_state() == "running"

        wait_until("qvd-hkd to report its host running", running, 60.0, poll=0.1)
        say(f"qvd-hkd running (pid {hkd.pid})")

    def _query(self, sql: str, *params: object) -> tuple[Any, ...] | None:
        assert self.node is not None
        # A read-only connection: the ORM would take SQLite's write lock at every BEGIN while polling.
        con = sqlite3.connect(f"file:{self.node.node.paths.sqlite_db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute(sql, params).fetchone()
        finally:
            con.close()
        return tuple(row) if row is not None else None

    def host_state(self) -> str:
        row = self._query("SELECT r.state FROM host_runtimes r JOIN hosts h ON h.id = r.host_id WHERE h.name = ?",
                          self.nodename)
        return str(row[0]) if row else ""

    def vm_row(self) -> tuple[str, str, str, str]:
        row = self._query("SELECT vm_state, COALESCE(vm_address, ''), COALESCE(last_error, ''), "
                          "COALESCE(user_state, '') FROM vm_runtimes WHERE vm_id = ?", self.vm_id)
        if row is None:
            raise BenchError(f"VM {self.vm_id} has no runtime row")
        return str(row[0]), str(row[1]), str(row[2]), str(row[3])

    # --- the client ---------------------------------------------------------------------------

    async def _connect(self, timing: Timing) -> Any:
        from qvd.client.main import client_context
        from qvd.client.protocol import L7rConnection, basic_auth

        assert self.node is not None
        conn = await L7rConnection.open("127.0.0.1", self.node.l7r_port, basic_auth(self.login, self.password),
                                        client_context())
        await conn.list_of_vm()  # log in on this connection first, as qvd-client does (the login is cached)
        params = {"qvd.client.os": "linux", "qvd.client.link": "adsl", "qvd.client.geometry": GEOMETRY,
                  "qvd.client.fullscreen": "", "qvd.client.keyboard": "pc105/us"}
        t0 = time.monotonic()

        def on_info(info: str) -> None:
            key = re.sub(r"\d+", "N", info).rstrip(". ")
            timing.infos.setdefault(key, round(time.monotonic() - t0, 3))

        try:
            switched = await conn.connect_to_vm(self.vm_id, params, on_info=on_info)
        except BaseException:
            await conn.close()
            raise
        timing.seconds_101 = time.monotonic() - t0
        return conn, switched

    def connect(self, kind: str) -> tuple[Timing, Any, Any]:
        timing = Timing(kind)
        try:
            conn, switched = self.lt.call(self._connect(timing), timeout=T_START + 30)
        except Exception as e:
            raise BenchError(f"{kind}: connect_to_vm failed: {getattr(e, 'message', None) or e}"
                             + tail(self.logs / "l7r.log") + tail(self.logs / "hkd.log")) from None
        return timing, conn, switched

    def attach(self, conn: Any, switched: Any, timing: Timing, display: Xvfb) -> None:
        """Splice the tunnel into nxproxy on the client's screen; wait until the desktop is painted."""
        from qvd.client.nxproxy import run_session

        env = x_env(display.name, self.work / "home")
        home = self.work / "home"
        home.mkdir(exist_ok=True)
        t0 = time.monotonic()

        async def session() -> None:
            try:
                await run_session((conn.reader, conn.writer), switched.trailing, "nxproxy",
                                  log_path=self.logs / "nxproxy.log", env=env)
            finally:
                await conn.close()

        async def start() -> asyncio.Task[None]:
            return asyncio.ensure_future(session())

        task = self.lt.call(start())
        self.session_task = task
        white = [0]

        def painted() -> bool:
            if task.done():
                exc = None if task.cancelled() else task.exception()
                raise SessionLost(f"the NX session ended before the desktop was painted ({exc or 'closed'})"
                                  + tail(self.logs / "nxproxy.log", 4))
            if "101_to_connected" not in timing.extra and self.x_state() == "connected":
                timing.extra["101_to_connected"] = round(time.monotonic() - t0, 3)
            white[0] = count_white(grab(display.name))
            return white[0] >= PAINT_WHITE_PIXELS

        try:
            wait_until("the desktop painted on the client's screen", painted, 60, poll=0.2)
        except BenchError:
            save_png(grab(display.name), self.logs / "not-painted.png")
            raise
        timing.extra["101_to_painted"] = round(time.monotonic() - t0, 3)

    def detach(self) -> None:
        """The client goes away (nxproxy stopped, tunnel closed): the session is suspended."""
        task = self.session_task
        if task is not None and not task.done():
            # run_session's own clean-up then stops nxproxy (SIGTERM) and closes the tunnel.
            self.lt.loop.call_soon_threadsafe(task.cancel)
            wait_until("the client session to end", task.done, 20)
        self.session_task = None

    def x_state(self) -> str:
        try:
            return str(vma_call(self.vm_ip, VMA_PORT, "x_state", timeout=3))
        except (OSError, ValueError, VmaRefused):
            return "?"

    def wait_x_state(self, wanted: str, timeout: float = 60) -> None:
        wait_until(f"x_state {wanted} (VMA at {self.vm_ip})", lambda: self.x_state() == wanted, timeout, poll=0.1)

    def stop_vm(self) -> None:
        from qvd.services.base import SYSTEM
        from qvd.services.vms import stop_vm

        assert self.node is not None
        if self.vm_row()[0] != "stopped":
            stop_vm(self.node.node.factory, SYSTEM, self.node.node.cfg, self.vm_id)

        def stopped() -> bool:
            if self.hkd is not None and not self.hkd.alive():
                raise BenchError("qvd-hkd exited" + tail(self.logs / "hkd.log"))
            return self.vm_row()[0] == "stopped"

        wait_until(f"VM {self.vm_id} stopped by qvd-hkd", stopped, T_STOP, poll=0.2)

    def vma_started_at(self) -> float | None:
        """Wall-clock time of the VMA's 'listening' line in this boot's console log."""
        console = self.work / "root" / "log" / "lxc" / f"qvd-{self.vm_id}.console.log"
        try:
            text = console.read_text(errors="replace")
        except OSError:
            return None
        m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO qvd\.vma\.main: qvd-vma .* listening on", text,
                      re.M)
        if not m:
            return None
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000

    def cold_once(self, display: Xvfb, kind: str = "cold") -> Timing:
        state = self.vm_row()[0]
        if state != "stopped":
            raise BenchError(f"VM {self.vm_id} is {state}, expected stopped")
        wall0 = time.time()
        timing, conn, switched = self.connect(kind)
        self.vm_ip = self.vm_row()[1]
        vma_at = self.vma_started_at()
        if vma_at is not None:
            timing.extra["vma_listening"] = round(vma_at - wall0, 3)
        self.attach(conn, switched, timing, display)
        return timing

    # --- the baseline ---------------------------------------------------------------------------

    def bare_once(self, index: int, base: Path) -> Timing:
        timing = Timing("bare")
        name = f"ssbare{self.token}-{index}"
        lxcpath = self.work / "bare"
        ctdir = lxcpath / name
        run_dir = ctdir / "run"
        vdi = lxcpath / "vdi"
        if not vdi.exists():
            vdi.mkdir(parents=True)
            (vdi / "init.sh").write_text(BARE_INIT.replace("{geometry}", GEOMETRY).replace("{port}", str(NX_PORT))
                                         .replace("{display}", str(NX_DISPLAY)))
            (vdi / "init.sh").chmod(0o755)
        (ctdir / "upper").mkdir(parents=True)
        run_dir.mkdir()
        ip = str(self.net.network_address + 10 + index)
        (ctdir / "config").write_text(BARE_LXC_CONFIG.format(generator="bench/session_start.py",
            name=name, base=base, upper=ctdir / "upper", path=PATH_ENV, vdi=vdi, run=run_dir, memory=MEMORY_MB,
            bridge=self.bridge, veth=f"vb{self.token}{index}", ip=ip, prefix=self.net.prefixlen, ctdir=ctdir))
        self.j.push(f"remove baseline container {name}", lambda: self.remove_bare(name, lxcpath))
        agent_log = run_dir / "nxagent.log"
        wall0 = time.time()
        t0 = time.monotonic()
        run(["lxc-start", "-n", name, "-P", str(lxcpath), "-d"], timeout=60)
        timing.extra["lxc_start_returned"] = round(time.monotonic() - t0, 3)

        def listening() -> bool:
            try:
                return "Waiting for connection" in agent_log.read_text(errors="replace")
            except OSError:
                return False

        try:
            wait_until(f"{name}: nxagent listening", listening, 60, poll=0.01)
        except BenchError as e:
            raise BenchError(str(e) + tail(agent_log) + tail(ctdir / "lxc.log")) from None
        timing.seconds_101 = time.monotonic() - t0  # "ready": nxagent listens
        with contextlib.suppress(OSError, ValueError):
            timing.extra["first_process"] = round(float((run_dir / "t-init").read_text()) - wall0, 3)
        timing.extra["nxagent_listening"] = round(timing.seconds_101, 3)
        self.remove_bare(name, lxcpath)
        return timing

    @staticmethod
    def remove_bare(name: str, lxcpath: Path) -> None:
        def running() -> bool:
            res = run(["lxc-info", "-n", name, "-P", str(lxcpath), "-s", "-H"], timeout=10, check=False)
            return res.returncode == 0 and res.stdout.strip() not in ("STOPPED", "")

        if running():
            run(["lxc-stop", "-n", name, "-P", str(lxcpath), "-k"], timeout=30, check=False)
            wait_until(f"{name} to stop", lambda: not running(), 15, poll=0.1)
        shutil.rmtree(lxcpath / name, ignore_errors=True)

    def basefs(self, image: Path) -> Path:
        """The unpacked image: the node's (after our first start), else unpacked here for the baseline."""
        ours = self.work / "root" / "storage" / "basefs" / str(self.di_id)
        if ours.is_dir():
            return ours
        mine = self.work / "bare-base"
        if not mine.is_dir():
            mine.mkdir()
            say("unpacking the image for the baseline")
            run(["tar", "-x", "--numeric-owner", "-f", str(image), "-C", str(mine)], timeout=900)
        return mine


def summarize(timings: list[Timing]) -> dict[str, Any]:
    if not timings:
        return {}
    out: dict[str, Any] = {"median_s": median([t.seconds_101 for t in timings]),
                           "min_s": min(t.seconds_101 for t in timings), "max_s": max(t.seconds_101 for t in timings),
                           "runs_s": [round(t.seconds_101, 3) for t in timings]}
    keys = sorted({k for t in timings for k in t.infos}, key=lambda k: median([t.infos[k] for t in timings
                                                                              if k in t.infos]))
    out["102_median_s"] = {k: median([t.infos[k] for t in timings if k in t.infos]) for k in keys}
    extras = sorted({k for t in timings for k in t.extra})
    out["extra_median_s"] = {k: median([t.extra[k] for t in timings if k in t.extra]) for k in extras}
    out["extra_runs_s"] = {k: [t.extra.get(k) for t in timings] for k in extras}
    return out


def body(args: argparse.Namespace, janitor: Janitor, work: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("run as root (privileged LXC containers, bridge, firewall)")
    need_tools("lxc-start", "lxc-stop", "lxc-info", "Xvfb", "xdpyinfo", "xwd", "nxproxy", "ip", "iptables", "tar")
    if not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        raise BenchError("the cgroup v1 memory controller is not mounted at /sys/fs/cgroup/memory")
    b = Bench(args, janitor, work)
    say(f"network {b.net}, bridge {b.bridge}")
    image = b.image()
    node = b.setup_node(image)
    result: dict[str, Any] = {"machine": machine_line(), "runs": args.runs, "image": image.name,
                              "network": str(b.net), "bridge": b.bridge, "notes": b.notes}
    blocked = ""
    try:
        b.start_hkd()
    except BenchError as e:
        blocked = f"qvd-hkd did not start: {e}"
        say(blocked)
        if b.hkd is not None:
            janitor.stop(b.hkd)
            b.hkd = None
    display = Xvfb(janitor, b.logs, "client", screen=f"{GEOMETRY}x24")
    janitor.push("end the client session (nxproxy)", b.detach)
    cold: list[Timing] = []
    resume: list[Timing] = []
    lost: list[str] = []  # resumes whose session died right after the 101
    if not blocked:
        node.start_l7r(tls=True, log=b.logs / "l7r.log")
        node.wait_serving(30)
        try:
            say("warm-up: first start of the VM (unpacks the DI), not in the figures")
            warm = b.cold_once(display, "first start")
            result["first_start"] = {"seconds_101": round(warm.seconds_101, 3), "infos": warm.infos,
                                     "extra": warm.extra}
            say(f"  first start: 101 after {warm.seconds_101:.2f} s")
            b.detach()
            b.stop_vm()
            for i in range(args.runs):
                t = b.cold_once(display)
                cold.append(t)
                say(f"(a) cold {i + 1}/{args.runs}: 101 after {t.seconds_101:.2f} s, painted "
                    f"{t.extra['101_to_painted']:.2f} s later")
                b.detach()
                b.stop_vm()
            say("(b) resume: starting the VM and suspending its session")
            t = b.cold_once(display, "start before resume")
            b.detach()
            b.wait_x_state("suspended")
            attempts = 0
            while len(resume) < args.runs and attempts < 2 * args.runs:
                attempts += 1
                timing, conn, switched = b.connect("resume")
                try:
                    b.attach(conn, switched, timing, display)
                except SessionLost as e:
                    # Seen here: the L7R reaches nxagent before it listens again and the tunnel closes at once.
                    lost.append(f"attempt {attempts}: 101 after {timing.seconds_101:.3f} s, then {e}")
                    say(f"(b) resume attempt {attempts} failed after 101: {str(e).splitlines()[0]}")
                    b.detach()
                    b.wait_x_state("suspended", 120)  # the VMA's listening timeout sends it back
                    continue
                resume.append(timing)
                say(f"(b) resume {len(resume)}/{args.runs}: 101 after {timing.seconds_101:.2f} s, connected "
                    f"{timing.extra.get('101_to_connected', float('nan')):.2f} s and painted "
                    f"{timing.extra['101_to_painted']:.2f} s later")
                b.detach()
                b.wait_x_state("suspended")
            b.stop_vm()
        except BenchError as e:
            blocked = f"ours failed: {e}"
            say(blocked)
            b.detach()
    base = b.basefs(image)
    bare: list[Timing] = []
    say("(c) baseline: bare lxc-start of the same image")
    b.bare_once(0, base)  # warm-up: page cache, LXC's own first-run work
    for i in range(args.runs):
        t = b.bare_once(i + 1, base)
        bare.append(t)
        say(f"(c) bare {i + 1}/{args.runs}: first process {t.extra.get('first_process', float('nan')):.3f} s, "
            f"nxagent listening {t.seconds_101:.3f} s")
    result["blocked"] = blocked
    result["cold"] = summarize(cold)
    result["resume"] = summarize(resume)
    result["resume_failures"] = lost
    result["bare"] = summarize(bare)
    bare_listen = result["bare"].get("median_s")
    bare_first = result["bare"].get("extra_median_s", {}).get("first_process")
    result["ratios"] = {
        "cold 101 / bare nxagent listening": ratio(result["cold"].get("median_s"), bare_listen),
        "resume 101 / bare nxagent listening": ratio(result["resume"].get("median_s"), bare_listen),
        "cold 101 / bare first process": ratio(result["cold"].get("median_s"), bare_first),
    }
    b.notes += [
        "(a)/(b) are client-side times in this process: from writing connect_to_vm (after list_of_vm on the same "
        "TLS connection) to reading 101",
        "the node daemon polls for commands every 1 s (SQLite has no LISTEN/NOTIFY), the L7R polls the VM every "
        "0.5 s and the X session every 0.25 s: defaults, all in (a)",
        "(c) has no agent, no user provisioning, no database and no broker: it is the floor LXC + nxagent give",
    ]
    return result


def report(r: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"QVD session start benchmark: median of {r['runs']} runs each")
    add(f"machine: {r['machine']}")
    add(f"image {r['image']}; network {r['network']} on bridge {r['bridge']}")
    for n in r["notes"]:
        add(f"note: {n}")
    if r.get("blocked"):
        add(f"BLOCKED: {r['blocked']}")
    if r.get("first_start"):
        add(f"first start of the VM (DI unpack included, not in the figures): 101 after "
            f"{r['first_start']['seconds_101']:.2f} s")
    add("")

    def block(title: str, s: dict[str, Any]) -> None:
        if not s:
            add(f"{title}: not measured")
            return
        add(f"{title}: median {s['median_s']:.3f} s  [min {s['min_s']:.3f}, max {s['max_s']:.3f}]  runs "
            + ", ".join(f"{x:.3f}" for x in s["runs_s"]))
        for k, v in s.get("102_median_s", {}).items():
            add(f"    102 {k!r:<58} at {v:6.3f} s")
        for k, v in s.get("extra_median_s", {}).items():
            runs = ", ".join("-" if x is None else f"{x:.2f}" for x in s.get("extra_runs_s", {}).get(k, []))
            add(f"    {k:<40} median {v:6.3f} s   runs {runs}")

    block("(a) cold start, connect_to_vm -> 101", r.get("cold", {}))
    block("(b) resume, connect_to_vm -> 101", r.get("resume", {}))
    for f in r.get("resume_failures", []):
        add(f"    FAILED resume, not in the figures: {f.splitlines()[0]}")
    block("(c) bare lxc-start -> nxagent listening", r.get("bare", {}))
    add("")
    add("Ratios (medians):")
    for k, v in r["ratios"].items():
        add(f"  {k:<40} {fmt_ratio(v)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.session_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="measured runs of each kind; the median counts (default 5)")
    add_common_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 50:
        p.error("--runs must be from 1 to 50")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("session_start", args, lambda j, w: body(args, j, w), report)


if __name__ == "__main__":
    sys.exit(main())
