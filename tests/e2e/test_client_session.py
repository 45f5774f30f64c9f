"""End to end, with real parts only: a user logs in with ``qvd-client``, the L7R has the
node daemon start the user's LXC desktop, the client shows it through real nxproxy on an
Xvfb screen; text typed with xdotool appears (read back from a screenshot by OCR); the
client goes away and a second client finds the same terminal with the same text (NX
suspend/resume).  Refusals (wrong password, another user's VM, a blocked VM) reach the
client as the right HTTP status and message.

Everything runs under a private QVD_ROOT, bridge and address range; every process is
killed by PID and the desktops, bridge and firewall rules are removed at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from tests.conftest import free_port

from qvd.core.config import load_node_config
from qvd.core.states import HostState, VmState
from qvd.db.engine import make_engine, make_sessionmaker
from qvd.db.models import HostRuntime, VmRuntime
from qvd.services.base import SYSTEM
from qvd.services.images import create_di, create_osf
from qvd.services.users import create_user
from qvd.services.vms import create_vm, update_vm

pytestmark = [pytest.mark.lxc, pytest.mark.nx, pytest.mark.slow]

TOOLS = ("lxc-start", "nxproxy", "Xvfb", "xdotool", "import", "convert", "tesseract")
BIN = Path(sys.executable).parent

if os.geteuid() != 0:
    pytest.skip("needs root (LXC)", allow_module_level=True)
_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing:
    if os.environ.get("CI"):
        raise RuntimeError(f"e2e tools missing: {_missing}")
    pytest.skip(f"missing tools: {_missing}", allow_module_level=True)


@dataclass
class Stack:
    root: Path
    port: int
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    vm_ids: dict[str, int]
    passwords: dict[str, str]
    display: str
    factory: object


def _wait(pred, timeout: float, what: str, step: float = 0.3):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _free_display() -> int:
    for d in range(180, 260):
        if not Path(f"/tmp/.X{d}-lock").exists() and not Path(f"/tmp/.X11-unix/X{d}").exists():
            return d
    raise RuntimeError("no free X display")


def _kill(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.fixture
def stack(tmp_path: Path, minimal_image: Path) -> Iterator[Stack]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    n = random.randint(1, 250)
    port = free_port()
    bridge = f"qvde{n}"
    (root / "etc" / "node.toml").write_text(
        f'nodename = "e2e{n}"\n'
        f'node.address = "127.0.0.1"\n'
        f'vm.network.bridge = "{bridge}"\n'
        f'vm.network.ip.start = "10.235.{n}.100"\n'
        f'vm.network.netmask = "255.255.255.0"\n'
        f"l7r.port = {port}\n"
        f'l7r.address = "127.0.0.1"\n'
        f"l7r.metrics.port = 0\n"
        f"api.port = {free_port()}\n"
    )
    env = dict(os.environ, QVD_ROOT=str(root), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    subprocess.run([str(BIN / "qvd"), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    cfg = load_node_config(root)
    engine = make_engine(f"sqlite:///{root / 'qvd.db'}")
    factory = make_sessionmaker(engine)
    create_osf(factory, SYSTEM, cfg, {"name": "desktop", "memory": 512})
    create_di(factory, SYSTEM, root / "storage" / "images", {"osf": "desktop", "disk_image": str(minimal_image)})
    passwords = {"alice": "alice-secret", "bob": "bob-secret"}
    vm_ids = {}
    for user, pw in passwords.items():
        create_user(factory, SYSTEM, cfg, {"name": user, "password": pw})
        vm_ids[user] = create_vm(factory, SYSTEM, cfg, {"name": f"{user}-desk", "user": user, "osf": "desktop"})["id"]
    display = _free_display()
    procs: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        fh = (logs / f"{name}.log").open("wb")
        p = subprocess.Popen(argv, env={**env, **(extra_env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    xvfb = spawn("xvfb", ["Xvfb", f":{display}", "-screen", "0", "1280x900x24", "-nolisten", "tcp"])
    _wait(lambda: Path(f"/tmp/.X11-unix/X{display}").exists(), 20, "Xvfb")
    hkd = spawn("hkd", [str(BIN / "qvd-hkd"), "--root", str(root)])
    l7r = spawn("l7r", [str(BIN / "qvd-l7r"), "--root", str(root)])
    try:
        _wait(lambda: (root / "etc" / "l7r" / "cert.pem").exists() and _port_open(port), 60, "the L7R to listen")
        _wait(lambda: _host_running(factory), 60, "the node daemon to be running")
        _wait(lambda: _ping_ok(port), 30, "the L7R to answer /qvd/ping")
        yield Stack(root, port, env, procs, vm_ids, passwords, f":{display}", factory)
    finally:
        for p in (l7r, hkd):  # HKD last: it stops the desktops
            _kill(p, timeout=120)
        _kill(xvfb)
        for p in procs:
            _kill(p, signal.SIGKILL)
        import asyncio

        from qvd.backends.lxc import LxcBackend

        backend = LxcBackend(root, cfg)
        for vm_id in vm_ids.values():
            asyncio.run(backend.stop(vm_id))
            asyncio.run(backend.cleanup(vm_id))
        asyncio.run(backend.teardown_network())
        engine.dispose()
        for name in ("hkd", "l7r"):
            log = logs / f"{name}.log"
            if log.exists():
                sys.stderr.write(f"--- {name} log (tail) ---\n" + log.read_text(errors="replace")[-3000:])


def _host_running(factory) -> bool:  # type: ignore[no-untyped-def]
    with factory() as s:
        return any(h.state == HostState.RUNNING for h in s.scalars(select(HostRuntime)))


def _ping_ok(port: int) -> bool:
    import http.client
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate on loopback
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/qvd/ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def client(stack: Stack, user: str, password: str, *extra: str) -> subprocess.Popen[bytes]:
    argv = [str(BIN / "qvd-client"), "--host", "127.0.0.1", "--port", str(stack.port), "--user", user,
            f"--password={password}", "--insecure", "--geometry", "1024x768", *extra]
    return subprocess.Popen(argv, env={**stack.env, "DISPLAY": stack.display}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_client(stack: Stack, user: str, password: str, *extra: str) -> tuple[int, str]:
    p = client(stack, user, password, *extra)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out.decode(errors="replace")


def xdo(stack: Stack, *args: str) -> str:
    r = subprocess.run(["xdotool", *args], env={**stack.env, "DISPLAY": stack.display}, capture_output=True,
                       text=True, timeout=30, check=False)
    return r.stdout.strip()


MARKER_WORDS = ["apple", "river", "garden", "window", "yellow", "market", "winter", "pencil", "forest", "orange",
                "camera", "silver", "rocket", "bridge", "planet", "guitar"]


def screenshot_text(stack: Stack, path: Path) -> str:
    subprocess.run(["import", "-window", "root", str(path)], env={**stack.env, "DISPLAY": stack.display},
                   check=True, timeout=30)
    big = path.with_suffix(".ocr.png")
    # Trim the black screen around the desktop's windows: tesseract reads the terminal
    # reliably once it is most of the picture, scaled up.
    subprocess.run(["convert", str(path), "-fuzz", "10%", "-trim", "+repage", "-resize", "300%",
                    "-colorspace", "Gray", str(big)], check=True, timeout=60)
    r = subprocess.run(["tesseract", str(big), "-"], capture_output=True, text=True, timeout=120, check=False)
    return r.stdout


def distinct_colours(path: Path) -> int:
    r = subprocess.run(["convert", str(path), "-format", "%k", "info:"], capture_output=True, text=True,
                       timeout=60, check=True)
    return int(r.stdout.strip())


def nx_window(stack: Stack, proc: subprocess.Popen[bytes]) -> str:
    def find() -> str:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"qvd-client exited with {proc.returncode}:\n{out}")
        return (xdo(stack, "search", "--onlyvisible", "--name", "QVD").split("\n")[0]
                or xdo(stack, "search", "--onlyvisible", "--class", "nxproxy").split("\n")[0])

    return str(_wait(find, 240, "the desktop window of nxproxy", step=1))


def type_into_desktop(stack: Stack, proc: subprocess.Popen[bytes], text: str) -> None:
    win = nx_window(stack, proc)
    xdo(stack, "windowactivate", win)
    xdo(stack, "mousemove", "--window", win, "300", "300")
    time.sleep(0.5)
    xdo(stack, "click", "1")
    xdo(stack, "type", "--delay", "60", text)
    xdo(stack, "key", "Return")


def test_login_desktop_typing_and_resume(stack: Stack, tmp_path: Path) -> None:
    # Words, not digits: tesseract reads a terminal's 9 as S now and then.
    marker = "hello from the desktop " + " ".join(random.sample(MARKER_WORDS, 2))
    first = client(stack, "alice", stack.passwords["alice"])
    try:
        nx_window(stack, first)
        with stack.factory() as s:  # type: ignore[attr-defined]
            rt = s.get(VmRuntime, stack.vm_ids["alice"])
            assert rt.vm_state == VmState.RUNNING and rt.user_state.value == "connected"
        # the desktop is painted (not one flat colour)
        time.sleep(3)
        shot0 = tmp_path / "desktop.png"
        screenshot_text(stack, shot0)
        assert distinct_colours(shot0) > 4, "the client screen shows no desktop"
        type_into_desktop(stack, first, f"echo {marker}")
        text = _wait(lambda: (t := screenshot_text(stack, tmp_path / "typed.png")) and marker in t and t,
                     60, f"the typed text '{marker}' on the client screen", step=2)
        assert marker in text
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(60)
        except subprocess.TimeoutExpired:
            first.kill()
    # the session is suspended, not lost: a second client finds the same terminal and text
    with stack.factory() as s:  # type: ignore[attr-defined]
        _wait(lambda: s.get(VmRuntime, stack.vm_ids["alice"]).user_state.value == "disconnected"
              or s.expire_all(), 60, "the first tunnel to close")
    second = client(stack, "alice", stack.passwords["alice"])
    try:
        nx_window(stack, second)
        text = _wait(lambda: (t := screenshot_text(stack, tmp_path / "resumed.png")) and marker in t and t,
                     90, "the same terminal text after reconnecting", step=2)
        assert marker in text
    finally:
        second.send_signal(signal.SIGINT)
        try:
            second.wait(60)
        except subprocess.TimeoutExpired:
            second.kill()


def test_refusals_reach_the_client(stack: Stack) -> None:
    code, out = run_client(stack, "alice", "wrong-password", "--list")
    assert code == 3 and "login refused" in out, out
    code, out = run_client(stack, "alice", stack.passwords["alice"], "--vm", str(stack.vm_ids["bob"]))
    assert code == 5 and "does not exist" in out, out
    update_vm(stack.factory, SYSTEM, load_node_config(stack.root), stack.vm_ids["alice"],  # type: ignore[arg-type]
              {"blocked": True}, "vm.block")
    code, out = run_client(stack, "alice", stack.passwords["alice"], "--vm", str(stack.vm_ids["alice"]))
    assert code == 4 and "maintenance" in out.lower(), out
    with stack.factory() as s:  # type: ignore[attr-defined]
        rows = list(s.scalars(select(VmRuntime)))
    assert all(r.vm_state == VmState.STOPPED for r in rows)
