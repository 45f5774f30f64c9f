"""The real ``qvd-hkd`` process with the real LXC backend and the real minimal image.

A node root of its own (SQLite), a test bridge ``qvdt<random>`` and a random
``10.232.X.0/24`` desktop network written to ``$QVD_ROOT/etc/node.toml``; the
administrator acts through the domain services, as the API does.  Traffic goes only
to loopback and to the desktops this module starts.

Everything created here is removed by the ``hkd`` fixture's finalizer, also on
failure: the daemon (by pid: SIGTERM, then SIGKILL), every desktop left on the node
(stop + cleanup through the backend), the bridge and its firewall rules, and the
root with its unpacked base.  The finalizer fails the module if a mount, a veth,
the bridge or a container process survived.

:class:`HkdNode` is reused by ``tests/e2e/test_desktops.py``.
"""

from __future__ import annotations

import asyncio
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
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from qvd.backends import netsetup
from qvd.backends.base import DesktopInfo
from qvd.backends.lxc import LxcBackend
from qvd.core.config import Config, Paths, load_node_config
from qvd.core.errors import Blocked
from qvd.core.states import HostState, VmCmd, VmState
from qvd.db.engine import make_engine, make_sessionmaker
from qvd.db.models import AuditEntry, Host, VmRuntime
from qvd.db.schema import upgrade
from qvd.services.base import SYSTEM
from qvd.services.images import create_di, create_osf, update_di
from qvd.services.tenancy import seed
from qvd.services.users import create_user
from qvd.services.vms import create_vm, get_vm_row, start_vm, stop_vm

pytestmark = [pytest.mark.lxc, pytest.mark.slow]

IN_DESKTOP_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HKD_START_TIMEOUT = 120.0
VM_START_TIMEOUT = 240.0  # the first start unpacks the image (~600 MB) on a busy 2-core machine


def lxc_unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (privileged LXC containers)"
    ok, why = LxcBackend.supported()
    return None if ok else why


def free_test_net(prefix: str = "10.232") -> ipaddress.IPv4Network:
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"{prefix}.{random.randint(1, 254)}.0/24")
        head = ".".join(str(net.network_address).split(".")[:3]) + "."
        if head not in used and head not in routes:
            return net
    raise RuntimeError(f"no free {prefix}.X.0/24 test network")


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


@dataclass
class HkdNode:
    """One node root with a real qvd-hkd process on it."""

    root: Path
    net: ipaddress.IPv4Network
    bridge: str
    name: str
    image: Path
    paths: Paths = field(init=False)
    cfg: Config = field(init=False)
    engine: Engine = field(init=False)
    factory: sessionmaker[Session] = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)
    osf: str = "desktop"
    #: database.url of the node; empty = SQLite under the root
    db_url: str = ""

    # --- setup ------------------------------------------------------------------------------

    def configure(self, **extra: object) -> None:
        values: dict[str, object] = {
            "nodename": self.name,
            "node.address": "127.0.0.1",
            "vm.hypervisor": "lxc",
            "vm.network.bridge": self.bridge,
            "vm.network.ip.start": str(self.net.network_address + 100),
            "vm.network.netmask": str(self.net.netmask),
            "internal.hkd.agent.ticker.delay": 1.0,
            "internal.hkd.agent.command_handler.delay": 0.2,
            "internal.hkd.vmhandler.vma_monitor.delay.after.ok": 2.0,
            "internal.hkd.vmhandler.vma_monitor.delay.after.error": 1.0,
            "internal.hkd.vmhandler.vma.failed.max_time.on.starting": 90.0,
            **extra,
        }
        if self.db_url:
            values["database.url"] = self.db_url
        self.paths.etc.mkdir(parents=True, exist_ok=True)
        self.paths.node_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        self.cfg = load_node_config(self.root)

    def setup(self) -> None:
        self.paths = Paths(self.root)
        self.configure()
        self.engine = make_engine(self.db_url or f"sqlite:///{self.paths.sqlite_db}")
        upgrade(self.engine)
        self.factory = make_sessionmaker(self.engine)
        with self.factory() as s, s.begin():
            seed(s)
        create_user(self.factory, SYSTEM, self.cfg, {"name": "alice", "password": "secret-pw"})
        self.add_image(self.osf, memory=256)

    def add_image(self, osf: str, *, memory: int = 256) -> int:
        create_osf(self.factory, SYSTEM, self.cfg, {"name": osf, "memory": memory})
        row = create_di(self.factory, SYSTEM, self.paths.images, {"osf": osf, "disk_image": str(self.image)})
        return int(row["id"])

    # --- the daemon -------------------------------------------------------------------------

    def start_hkd(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        log = (self.root / "hkd.log").open("ab")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "qvd.hkd.main", "--root", str(self.root)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        finally:
            log.close()
        self.pids.append(self.proc.pid)
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, f"qvd-hkd exited with {proc.returncode}\n{self.log_tail()}"
            return self.host_state() == HostState.RUNNING

        wait_for("qvd-hkd to run", up, HKD_START_TIMEOUT, 0.1)

    def stop_hkd(self, timeout: float = 120) -> int:
        p = self.proc
        assert p is not None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                raise AssertionError(f"qvd-hkd did not stop within {timeout} s\n{self.log_tail()}") from None
        return int(p.returncode)

    def kill_hkd(self) -> None:
        p = self.proc
        assert p is not None and p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait(10)  # reaped: a zombie would still look alive to the next daemon

    def log_tail(self, n: int = 60) -> str:
        p = self.root / "hkd.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def host_state(self) -> HostState | None:
        with self.factory() as s:
            h = s.scalars(select(Host).where(Host.name == self.name)).one_or_none()
            return h.runtime.state if h else None

    # --- administrator actions ----------------------------------------------------------------

    def new_vm(self, name: str, osf: str | None = None) -> int:
        row = create_vm(self.factory, SYSTEM, self.cfg, {"name": name, "user": "alice", "osf": osf or self.osf})
        return int(row["id"])

    def start_vm(self, vm_id: int) -> None:
        start_vm(self.factory, SYSTEM, self.cfg, vm_id)

    def stop_vm(self, vm_id: int) -> None:
        stop_vm(self.factory, SYSTEM, self.cfg, vm_id)

    def vm_row(self, vm_id: int) -> dict[str, Any]:
        return get_vm_row(self.factory, SYSTEM, self.cfg, vm_id)  # what `qa vm <name> get` shows

    def runtime(self, vm_id: int) -> VmRuntime:
        with self.factory() as s:
            rt = s.get(VmRuntime, vm_id)
            assert rt is not None
            s.expunge(rt)
            return rt

    def wait_state(self, vm_id: int, state: VmState, timeout: float = VM_START_TIMEOUT) -> VmRuntime:
        def reached() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"qvd-hkd died ({self.proc.returncode})\n{self.log_tail()}")
            return self.runtime(vm_id).vm_state == state

        try:
            wait_for(f"VM {vm_id} {state.value}", reached, timeout, 0.05)
        except AssertionError as e:
            rt = self.runtime(vm_id)
            raise AssertionError(f"{e}; it is {rt.vm_state.value}/{rt.vm_step}, last_error {rt.last_error!r}\n"
                                 f"{self.log_tail()}") from None
        return self.runtime(vm_id)

    def start_and_wait(self, vm_id: int, label: str) -> VmRuntime:
        t0 = time.monotonic()
        self.start_vm(vm_id)
        rt = self.wait_state(vm_id, VmState.RUNNING)
        self.timings.setdefault(label, []).append(round(time.monotonic() - t0, 2))
        return rt

    # --- the desktops -------------------------------------------------------------------------

    def vma(self, vm_id: int, method: str, params: dict[str, str] | None = None, timeout: float = 10) -> object:
        rt = self.runtime(vm_id)
        url = f"http://{rt.vm_address}:{rt.vm_vma_port}/vma/{method}?{urllib.parse.urlencode(params or {})}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout) as r:
            items = json.loads("[" + r.read().decode() + "]")
        assert len(items) == 1, f"{method}: {items}"
        return items[0]

    def attach(self, vm_id: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = ["lxc-attach", "-n", f"qvd-{vm_id}", "-P", str(self.root / "run" / "lxc"), "--clear-env",
               "--set-var", IN_DESKTOP_PATH, "--", *argv]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)

    def backend(self) -> LxcBackend:
        return LxcBackend(self.root, self.cfg)

    def desktops(self) -> list[DesktopInfo]:
        return asyncio.run(self.backend().list_desktops())

    def leftovers(self, vm_id: int) -> list[str]:
        """What is left of a desktop on the node (empty when it is fully gone)."""
        left = []
        if vm_id in [d.vm_id for d in self.desktops()]:
            left.append("listed by the backend")
        if (self.root / "run" / "lxc" / f"qvd-{vm_id}").exists():
            left.append("LXC run dir")
        if netsetup.link_exists(f"qvd{vm_id}"):
            left.append(f"veth qvd{vm_id}")
        mounts = [m for m in netsetup.mounts_under(self.root)
                  if m.endswith((f"/qvd-{vm_id}", f"/overlays/{vm_id}")) or f"/qvd-{vm_id}/" in m
                  or f"/overlays/{vm_id}/" in m]
        left += [f"mount {m}" for m in mounts]
        tag = f"qvd-{vm_id}"
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if tag in cmd and str(self.root) in cmd:
                        left.append(f"process {p.name}: {cmd.strip()}")
        return left

    def assert_gone(self, vm_id: int, timeout: float = 15) -> None:
        """Nothing of the desktop is left.  LXC's monitor process can outlive the cleanup
        by a moment (it is still tearing down when SIGKILLed), hence the short wait."""
        t0 = time.monotonic()
        left = self.leftovers(vm_id)
        while left and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
            left = self.leftovers(vm_id)
        assert left == [], f"left of desktop {vm_id} after {timeout:g} s: {left}"
        lingered = time.monotonic() - t0
        if lingered > 0.05:
            self.timings.setdefault("leftover_linger", []).append(round(lingered, 2))

    # --- teardown -----------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        errors: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                rc = self.stop_hkd(timeout=120)
                if rc != 0:
                    errors.append(f"qvd-hkd exited with {rc} at teardown")
            except AssertionError as e:
                errors.append(str(e).splitlines()[0])
        for pid in self.pids:  # by pid, never by name
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
        backend = self.backend()

        async def clean() -> None:
            for d in await backend.list_desktops():
                errors.append(f"desktop {d.vm_id} left by the daemon")
                try:
                    await backend.cleanup(d.vm_id)
                except Exception as e:  # keep cleaning the rest
                    errors.append(f"cleanup({d.vm_id}): {e}")
            await backend.teardown_network()

        try:
            asyncio.run(clean())
        except Exception as e:  # report, then go on removing what we can
            errors.append(f"teardown: {e}")
        self.engine.dispose()
        with contextlib.suppress(OSError):  # keep the daemon's log for diagnosis (pytest keeps its tmp dirs)
            shutil.copy(self.root / "hkd.log", self.root.with_name(self.root.name + "-hkd.log"))
        mounts = netsetup.mounts_under(self.root)
        if mounts:
            errors.append(f"mounts left under {self.root}: {mounts}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        if netsetup.link_exists(self.bridge):
            errors.append(f"bridge {self.bridge} left")
        fw = subprocess.run(["iptables", "-w", "-S"], check=False, capture_output=True, text=True).stdout
        if self.bridge in fw:
            errors.append(f"iptables rules for {self.bridge} left")
        return errors


@contextlib.contextmanager
def hkd_node(image: Path, tmp_root: Path, prefix: str = "hkdt") -> Iterator[HkdNode]:
    """A configured node with a running qvd-hkd; everything removed afterwards."""
    why = lxc_unusable()
    if why:
        pytest.skip(why)
    node = HkdNode(root=tmp_root, net=free_test_net(), bridge=f"qvdt{secrets.token_hex(3)}",
                   name=f"{prefix}-{secrets.token_hex(3)}", image=image)
    errors: list[str] = []
    try:
        node.setup()
        node.start_hkd()
        yield node
    finally:
        errors = node.teardown()
        print(f"\nHKD timings (s): {json.dumps(node.timings)}")
    if errors:
        pytest.fail("HKD node teardown: " + "; ".join(errors))


@pytest.fixture(scope="module")
def hkd(minimal_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HkdNode]:
    with hkd_node(minimal_image, tmp_path_factory.mktemp("hkd-lxc")) as node:
        yield node


# --- the tests ---------------------------------------------------------------------------------


def test_two_desktops_run_and_one_stops(hkd: HkdNode) -> None:
    a, b = hkd.new_vm("it-a"), hkd.new_vm("it-b")
    try:
        ra = hkd.start_and_wait(a, "start_to_running_first")  # unpacks the image
        rb = hkd.start_and_wait(b, "start_to_running")
        for vm, rt in ((a, ra), (b, rb)):
            assert rt.vm_address and rt.vm_address.startswith(str(hkd.net.network_address)[:-1])
            assert (rt.vm_vma_port, rt.vm_x_port, rt.run_ok, rt.last_error) == (3030, 4100, 1, "")
            assert hkd.vma(vm, "ping") == "pong"
            assert hkd.vma(vm, "x_state") == "stopped"
        assert {d.vm_id for d in hkd.desktops() if d.running} >= {a, b}
        t0 = time.monotonic()
        hkd.stop_vm(a)
        rt = hkd.wait_state(a, VmState.STOPPED, 120)
        hkd.timings.setdefault("stop_to_stopped", []).append(round(time.monotonic() - t0, 2))
        assert rt.host_id is None and rt.vm_address is None and rt.last_error == ""
        hkd.assert_gone(a)
        assert hkd.runtime(b).vm_state == VmState.RUNNING and hkd.vma(b, "ping") == "pong"
        assert "powered off by its agent" in hkd.log_tail(400)  # graceful, not killed
    finally:
        for vm in (a, b):
            with contextlib.suppress(Exception):
                hkd.stop_vm(vm)
        for vm in (a, b):
            hkd.wait_state(vm, VmState.STOPPED, 120)
            hkd.assert_gone(vm)


def test_home_survives_a_restart_of_the_desktop(hkd: HkdNode) -> None:
    vm = hkd.new_vm("it-home")
    token = secrets.token_hex(8)
    try:
        hkd.start_and_wait(vm, "start_to_running")
        res = hkd.attach(vm, ["sh", "-c", f"echo {token} > /home/marker && echo gone > /etc/qvd-it-marker"])
        assert res.returncode == 0, res.stderr
        hkd.stop_vm(vm)
        hkd.wait_state(vm, VmState.STOPPED, 120)
        hkd.assert_gone(vm)
        rt = hkd.start_and_wait(vm, "start_to_running")
        assert rt.run_attempts == 2
        assert hkd.attach(vm, ["cat", "/home/marker"]).stdout == f"{token}\n"
        assert hkd.attach(vm, ["test", "-e", "/etc/qvd-it-marker"]).returncode == 1  # fresh system layer
    finally:
        with contextlib.suppress(Exception):
            hkd.stop_vm(vm)
        hkd.wait_state(vm, VmState.STOPPED, 120)
    hkd.assert_gone(vm)


def test_a_blocked_image_is_never_started(hkd: HkdNode) -> None:
    di = hkd.add_image("blocked-osf")
    update_di(hkd.factory, SYSTEM, di, {"blocked": True})
    vm = hkd.new_vm("it-blocked", osf="blocked-osf")
    with pytest.raises(Blocked):
        hkd.start_vm(vm)  # the services refuse it up front...
    # ...and a start command that raced the blocking is refused by the node itself.
    with hkd.factory() as s, s.begin():
        hid = s.scalars(select(Host.id).where(Host.name == hkd.name)).one()
        s.execute(update(VmRuntime).where(VmRuntime.vm_id == vm).values(vm_cmd=VmCmd.START, host_id=hid))
    wait_for("the start to be refused", lambda: hkd.runtime(vm).last_error != "", 30)
    rt = hkd.runtime(vm)
    assert rt.vm_state == VmState.STOPPED and rt.vm_cmd is None and rt.host_id is None
    assert "blocked" in rt.last_error and rt.last_error_ts is not None
    assert hkd.vm_row(vm)["last_error"] == rt.last_error
    hkd.assert_gone(vm)
    assert not (hkd.root / "storage" / "basefs" / str(di)).exists()  # never even unpacked
    with hkd.factory() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.object_id == vm, AuditEntry.action == "vm.start",
                                                  AuditEntry.status == "start-failed")).all()
        assert [(r.admin_name, r.message) for r in rows] == [(f"hkd:{hkd.name}", rt.last_error)]


def test_sigkill_during_a_start_leaves_the_node_consistent(hkd: HkdNode) -> None:
    running, victim = hkd.new_vm("it-adopt"), hkd.new_vm("it-victim")
    try:
        hkd.start_and_wait(running, "start_to_running")
        pid_before = {d.vm_id: d.pid for d in hkd.desktops()}[running]
        # Kill the daemon while the container is being launched or its agent awaited; those
        # steps last a fraction of a second, so retry a few times before settling for 'heavy'.
        killed_at = ""
        for attempt in range(8):
            wanted = ("launch", "wait_vma") if attempt < 7 else ("heavy", "launch", "wait_vma")
            hkd.start_vm(victim)
            steps: list[str] = []

            def mid_start(wanted: tuple[str, ...] = wanted, steps: list[str] = steps) -> bool:
                rt = hkd.runtime(victim)
                if not steps or steps[-1] != rt.vm_step:
                    steps.append(rt.vm_step)
                return rt.vm_state == VmState.RUNNING or (rt.vm_state == VmState.STARTING and rt.vm_step in wanted)

            wait_for("the start to pass 'prepare'", mid_start, 120, 0.005)
            if hkd.runtime(victim).vm_state == VmState.STARTING:
                hkd.kill_hkd()
                killed_at = hkd.runtime(victim).vm_step
                break
            hkd.stop_vm(victim)  # too late this time: it already runs
            hkd.wait_state(victim, VmState.STOPPED, 120)
        assert killed_at, "never caught the start in flight"
        hkd.timings.setdefault("sigkill_at_step", []).append(killed_at)  # type: ignore[arg-type]
        hkd.start_hkd()
        # The node daemon settles the desktop: adopted if it had been running, otherwise reaped.
        wait_for("the victim to settle", lambda: hkd.runtime(victim).vm_state in (VmState.RUNNING,
                                                                                  VmState.STOPPED), 120)
        rt = hkd.runtime(victim)
        if rt.vm_state == VmState.STOPPED:
            hkd.assert_gone(victim)
            assert "restarted" in rt.last_error and f"step '{killed_at}'" in rt.last_error
        else:
            assert hkd.vma(victim, "ping") == "pong"
        # The healthy desktop was adopted: same container, still answering, no second copy.
        rt_running = hkd.runtime(running)
        assert rt_running.vm_state == VmState.RUNNING and rt_running.run_attempts == 1
        desktops = hkd.desktops()
        assert [d.vm_id for d in desktops].count(running) == 1
        assert {d.vm_id: d.pid for d in desktops}[running] == pid_before
        assert hkd.vma(running, "ping") == "pong"
        assert "adopted the running desktop" in hkd.log_tail(200)
        # Exactly what the database says runs here, runs here.
        with hkd.factory() as s:
            in_db = set(s.scalars(select(VmRuntime.vm_id).where(VmRuntime.vm_state == VmState.RUNNING)))
        assert {d.vm_id for d in hkd.desktops() if d.running} == in_db
    finally:
        for vm in (running, victim):
            with contextlib.suppress(Exception):
                hkd.stop_vm(vm)
        for vm in (running, victim):
            hkd.wait_state(vm, VmState.STOPPED, 120)
    for vm in (running, victim):
        hkd.assert_gone(vm)


def test_sigterm_stops_every_desktop(hkd: HkdNode) -> None:
    vm = hkd.new_vm("it-sigterm")
    hkd.start_and_wait(vm, "start_to_running")
    assert hkd.stop_hkd() == 0
    rt = hkd.runtime(vm)
    assert rt.vm_state == VmState.STOPPED and rt.host_id is None
    assert hkd.host_state() == HostState.STOPPED
    hkd.assert_gone(vm)
    assert hkd.desktops() == []
    hkd.start_hkd()  # leave the module's node running for what follows
