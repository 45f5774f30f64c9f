"""One contract suite for every desktop backend this machine supports (the fake one excluded).

Real desktops from the real minimal image (``minimal_image``), on a test bridge
``qvdt<random>`` with a random 10.239.X.0/24 network.  Everything the suite
creates (desktops, mounts, veths, the bridge, firewall rules, the node root with
its unpacked base) is removed by the ``env`` fixture's finalizer, also on failure.
Traffic goes only to loopback, the node's own addresses and the test's desktops.

Running commands inside a desktop is backend-specific: see :func:`exec_in` (the
KVM backend adds its branch there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

import qvd.backends.available  # noqa: F401  (fills the registry)
from qvd.backends import netsetup
from qvd.backends.base import REGISTRY, Backend, DesktopSpec, backend_class
from qvd.core.config import Config
from qvd.core.errors import BackendError
from tests.integration.conftest import build_minimal_image

pytestmark = pytest.mark.lxc

T = TypeVar("T")
VMA_WAIT = 60.0
_IN_DESKTOP_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _backend_params() -> list[Any]:
    params = []
    for name in sorted(REGISTRY):
        if name == "fake":  # unit tests only; no feature counts as done on it
            continue
        ok, why = getattr(REGISTRY[name], "supported", lambda: (False, "no supported()"))()
        params.append(pytest.param(name, marks=[] if ok else [pytest.mark.skip(reason=f"{name}: {why}")]))
    return params


@pytest.fixture(scope="session")
def minimal_image() -> Path:
    return build_minimal_image()


@dataclass
class Env:
    name: str
    backend: Backend
    root: Path
    loop: asyncio.AbstractEventLoop
    net: ipaddress.IPv4Network
    bridge: str
    image: Path
    vm_base: int
    used: set[int] = field(default_factory=set)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @property
    def gateway(self) -> str:
        return str(self.net.network_address + 1)

    def spec(self, n: int, **kw: Any) -> DesktopSpec:
        vm_id = self.vm_base + n
        self.used.add(vm_id)
        ip = self.net.network_address + 100 + n
        mac = "54:52:00:" + ":".join(f"{b:02x}" for b in ip.packed[1:])
        base = DesktopSpec(vm_id=vm_id, name=f"contract-{n}", di_id=1, image=self.image, memory_mb=256,
                           address=str(ip), prefix_len=self.net.prefixlen, gateway=self.gateway, mac=mac,
                           home_key=f"vm-{vm_id}")
        return replace(base, **kw)


def _free_test_net() -> ipaddress.IPv4Network:
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.239.{random.randint(1, 254)}.0/24")
        prefix = ".".join(str(net.network_address).split(".")[:3]) + "."
        if prefix not in used and prefix not in routes:
            return net
    raise RuntimeError("no free 10.239.X.0/24 test network")


def _mounts_under(path: Path) -> list[str]:
    return netsetup.mounts_under(path)


@pytest.fixture(scope="module", params=_backend_params())
def env(request: pytest.FixtureRequest, minimal_image: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    name: str = request.param
    root = tmp_path_factory.mktemp(f"contract-{name}")
    net = _free_test_net()
    bridge = f"qvdt{secrets.token_hex(3)}"
    cfg = Config().overlay({"vm.network.bridge": bridge, "vm.network.ip.start": str(net.network_address + 100),
                            "vm.network.netmask": str(net.netmask)}, source="node file")
    loop = asyncio.new_event_loop()
    backend = backend_class(name)(root, cfg)
    e = Env(name, backend, root, loop, net, bridge, minimal_image, vm_base=random.randint(900, 989) * 10000)
    try:
        e.run(backend.check())
        yield e
    finally:
        errors: list[str] = []
        with contextlib.suppress(Exception):
            e.used |= {d.vm_id for d in e.run(backend.list_desktops())}
        for vm_id in sorted(e.used):
            try:
                e.run(backend.cleanup(vm_id))
            except Exception as exc:
                errors.append(f"cleanup({vm_id}): {exc}")
        teardown = getattr(backend, "teardown_network", None)
        try:
            if teardown is not None:
                e.run(teardown())
            else:
                e.run(netsetup.delete_bridge(bridge))
        except Exception as exc:
            errors.append(f"network teardown: {exc}")
        loop.close()
        if not _mounts_under(root):
            shutil.rmtree(root, ignore_errors=True)  # the unpacked base is ~600 MB
        else:
            errors.append(f"mounts left under {root}: {_mounts_under(root)}")
        fw = subprocess.run(["iptables", "-w", "-S"], check=False, capture_output=True, text=True).stdout
        if bridge in fw:
            errors.append(f"iptables rules for {bridge} left")
        if netsetup.link_exists(bridge):
            errors.append(f"bridge {bridge} left")
        if errors:
            pytest.fail("contract env cleanup: " + "; ".join(errors))


# --- helpers -------------------------------------------------------------------------------------


def exec_in(env: Env, vm_id: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command inside a desktop as root."""
    if env.name == "lxc":
        cmd = ["lxc-attach", "-n", f"qvd-{vm_id}", "-P", str(env.root / "run" / "lxc"), "--clear-env",
               "--set-var", _IN_DESKTOP_PATH, "--", *argv]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    raise NotImplementedError(f"exec_in: no way to run commands in a {env.name} desktop yet")


def vma_ping(host: str, port: int, wait: float = VMA_WAIT) -> str:
    """GET /vma/ping until it answers; return the body (raises after ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/vma/ping", timeout=2) as r:
                return str(r.read().decode())
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise AssertionError(f"the VMA at {host}:{port} did not answer in {wait:g} s: {last}")


PROBE = ("import socket,sys\n"
         "s=socket.socket(); s.settimeout(3)\n"
         "print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))\n")


def can_connect(env: Env, vm_id: int, host: str, port: int) -> bool:
    res = exec_in(env, vm_id, ["python3", "-c", PROBE, host, str(port)])
    assert res.returncode == 0, res.stderr
    return res.stdout.strip() == "0"


def start_desktop(env: Env, spec: DesktopSpec) -> None:
    env.run(env.backend.prepare(spec))
    env.run(env.backend.start(spec))
    assert env.run(env.backend.is_running(spec.vm_id))
    ep = env.backend.endpoint_vma(spec)
    assert "pong" in vma_ping(ep.host, ep.port)


def assert_gone(env: Env, vm_id: int) -> None:
    """After stop + cleanup nothing of the desktop runs, is mounted or is plugged in."""
    assert not env.run(env.backend.is_running(vm_id))
    assert vm_id not in [d.vm_id for d in env.run(env.backend.list_desktops())]
    assert _mounts_under(env.root) == []
    if env.name == "lxc":
        assert not netsetup.link_exists(f"qvd{vm_id}")
        assert not (env.root / "run" / "lxc" / f"qvd-{vm_id}").exists()
        tag = f"qvd-{vm_id}"
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    assert not (tag in cmd and str(env.root) in cmd), f"process left: {p.name} {cmd}"
        assert not Path(f"/sys/fs/cgroup/pids/lxc.payload.{tag}").exists()


@contextlib.contextmanager
def host_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP service of 'the node' on every address; yields (port, peers that got in)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    peers: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peers.append(addr[0])
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], peers
    finally:
        stop.set()
        t.join(2)
        srv.close()


def _memory_cgroup(pid: int) -> Path | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


# --- the contract --------------------------------------------------------------------------------


def test_two_desktops_of_one_image_start_concurrently(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = env.spec(1, di_id=2), env.spec(2, di_id=2)
    unpacks: list[Path] = []
    real_untar = getattr(env.backend, "_untar", None)
    if real_untar is not None:  # the LXC backend: count the unpacks of the DI

        async def counting_untar(image: Path, dest: Path) -> None:
            unpacks.append(dest)
            await real_untar(image, dest)

        monkeypatch.setattr(env.backend, "_untar", counting_untar)

    async def both() -> None:
        await asyncio.gather(env.backend.prepare(a), env.backend.prepare(b))
        await asyncio.gather(env.backend.start(a), env.backend.start(b))

    try:
        env.run(both())
        if real_untar is not None:
            assert len(unpacks) == 1
            basefs = env.root / "storage" / "basefs"
            assert (basefs / "2" / "usr" / "bin" / "nxagent").exists()
            assert not list(basefs.glob(".untar-*"))
        for s in (a, b):
            assert env.run(env.backend.is_running(s.vm_id))
            ep = env.backend.endpoint_vma(s)
            assert (ep.host, ep.port) == (s.address, s.vma_port)
            assert "pong" in vma_ping(ep.host, ep.port)
        running = {d.vm_id: d for d in env.run(env.backend.list_desktops())}
        assert running[a.vm_id].running and running[b.vm_id].running
        assert env.backend.endpoint_nx(a).port == a.nx_port
    finally:
        for s in (a, b):
            env.run(env.backend.cleanup(s.vm_id))
    for s in (a, b):
        assert_gone(env, s.vm_id)


def test_desktops_reach_neither_each_other_nor_the_node(env: Env) -> None:
    env.run(env.backend.check())  # a second check() changes nothing and must not fail
    a, b = env.spec(3), env.spec(4)
    try:
        start_desktop(env, a)
        start_desktop(env, b)
        with host_listener() as (port, peers):
            # Controls: the probe works, and the node reaches both desktops.
            assert can_connect(env, a.vm_id, "127.0.0.1", a.vma_port)
            with socket.create_connection(("127.0.0.1", port), timeout=3):
                pass
            assert "pong" in vma_ping(b.address, b.vma_port, wait=5)
            # The policy.
            assert not can_connect(env, a.vm_id, b.address, b.vma_port), "desktop reached another desktop"
            assert not can_connect(env, b.vm_id, a.address, a.vma_port), "desktop reached another desktop"
            assert not can_connect(env, a.vm_id, env.gateway, port), "desktop reached a node service"
            host_ips = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                                      text=True, check=True).stdout
            for line in host_ips.splitlines():
                ip = line.split()[3].split("/")[0]
                if not ip.startswith(str(env.net.network_address)[:-1]):
                    assert not can_connect(env, a.vm_id, ip, port), f"desktop reached the node at {ip}"
            assert peers == ["127.0.0.1"]
    finally:
        for s in (a, b):
            env.run(env.backend.cleanup(s.vm_id))


def test_home_survives_a_restart_and_the_system_layer_does_not(env: Env) -> None:
    a = env.spec(5)
    try:
        start_desktop(env, a)
        res = exec_in(env, a.vm_id, ["sh", "-c", "echo kept > /home/marker && echo lost > /etc/qvd-marker"])
        assert res.returncode == 0, res.stderr
        env.run(env.backend.stop(a.vm_id))
        assert not env.run(env.backend.is_running(a.vm_id))
        env.run(env.backend.cleanup(a.vm_id))
        assert_gone(env, a.vm_id)

        start_desktop(env, a)
        assert exec_in(env, a.vm_id, ["cat", "/home/marker"]).stdout == "kept\n"
        assert exec_in(env, a.vm_id, ["test", "-e", "/etc/qvd-marker"]).returncode == 1
        # The image itself was never written to.
        assert not list((env.root / "storage" / "basefs").glob("*/etc/qvd-marker"))
    finally:
        env.run(env.backend.cleanup(a.vm_id))
    assert_gone(env, a.vm_id)


def test_persistent_system_layer_is_kept(env: Env) -> None:
    a = env.spec(6, persistent_overlay=True)
    try:
        start_desktop(env, a)
        assert exec_in(env, a.vm_id, ["sh", "-c", "echo stays > /etc/qvd-marker"]).returncode == 0
        env.run(env.backend.stop(a.vm_id))
        env.run(env.backend.cleanup(a.vm_id))
        start_desktop(env, a)
        assert exec_in(env, a.vm_id, ["cat", "/etc/qvd-marker"]).stdout == "stays\n"
    finally:
        env.run(env.backend.cleanup(a.vm_id))
    assert_gone(env, a.vm_id)


def test_memory_hog_is_killed_and_the_node_survives(env: Env) -> None:
    a = env.spec(7, memory_mb=128)
    hog = "a = []\nwhile True:\n    a.append(b'x' * (16 << 20))\n"
    cg: Path | None = None
    try:
        start_desktop(env, a)
        if env.name == "lxc" and Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
            pid = next(d.pid for d in env.run(env.backend.list_desktops()) if d.vm_id == a.vm_id)
            assert pid is not None
            cg = _memory_cgroup(pid)
            assert cg is not None and cg.name.startswith("lxc.payload.")
            assert int((cg / "memory.limit_in_bytes").read_text()) == 128 << 20
        res = exec_in(env, a.vm_id, ["python3", "-c", hog], timeout=120)
        assert res.returncode in (137, -9), (res.returncode, res.stderr[-500:])
        if cg is not None:
            oom = dict(line.split(maxsplit=1) for line in (cg / "memory.oom_control").read_text().splitlines())
            assert int(oom.get("oom_kill", "0")) >= 1
        # The node and the desktop's agent live on.
        assert env.run(env.backend.is_running(a.vm_id))
        assert "pong" in vma_ping(a.address, a.vma_port, wait=10)
        assert os.getloadavg() is not None
    finally:
        env.run(env.backend.cleanup(a.vm_id))
    assert_gone(env, a.vm_id)


def test_every_step_is_idempotent(env: Env) -> None:
    a = env.spec(8)
    try:
        env.run(env.backend.prepare(a))
        env.run(env.backend.prepare(a))
        env.run(env.backend.start(a))
        env.run(env.backend.prepare(a))  # while running: must not disturb the desktop
        env.run(env.backend.start(a))
        assert "pong" in vma_ping(a.address, a.vma_port)
    finally:
        env.run(env.backend.stop(a.vm_id))
        env.run(env.backend.stop(a.vm_id))
        env.run(env.backend.cleanup(a.vm_id))
        env.run(env.backend.cleanup(a.vm_id))
    assert_gone(env, a.vm_id)


def test_foreign_image_is_refused(env: Env, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    (junk / "data").mkdir(parents=True)
    (junk / "data" / "file.txt").write_text("not a desktop\n")
    tarball = tmp_path / "foreign.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(junk), "."], check=True)
    a = env.spec(9, di_id=3, image=tarball)
    with pytest.raises(BackendError, match="not a QVD desktop image"):
        env.run(env.backend.prepare(a))
    if env.name == "lxc":
        basefs = env.root / "storage" / "basefs"
        assert not (basefs / "3").exists()
        assert not list(basefs.glob(".untar-3-*"))
    env.run(env.backend.cleanup(a.vm_id))
