"""The real VMA with the real nxagent/nxproxy on this machine (needs root).

What a person would see: the VMA provisions a fresh user, starts nxagent, an
``nxproxy -S`` on an Xvfb screen attaches, and the screenshot of that screen
shows the desktop (xterm + window manager), not a black rectangle.  Then the
proxy goes away (suspended), the VMA itself is restarted (it must re-attach to
the live nxagent), the session is resumed by a new proxy and painted again,
and finally stopped.

The VMA runs with Debian's ``/usr/bin/python3`` when it is 3.11+ (what desktop
images have), with only ``src`` on ``PYTHONPATH``: that also proves it needs no
third-party package.  Display and port: ``QVD_TEST_NX_DISPLAY`` (default 150,
NX port 4150); the next free display is used if it is taken.

Every process started here is killed by pid and every account removed, even on
failure.  The test process makes itself a child subreaper so the nxagent
orphaned by the VMA restart is reaped here instead of becoming a zombie.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.nx, pytest.mark.slow]

REPO_SRC = Path(__file__).resolve().parents[2] / "src"
TOOLS = ("nxagent", "nxproxy", "Xvfb", "import", "convert", "xdotool", "xterm", "useradd", "userdel")
PR_SET_CHILD_SUBREAPER = 36


def _missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


if os.geteuid() != 0:
    pytest.skip("needs root (user provisioning, setuid to the desktop user)", allow_module_level=True)
if _missing_tools():
    pytest.skip(f"missing tools: {', '.join(_missing_tools())}", allow_module_level=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _display_free(d: int) -> bool:
    return (not Path(f"/tmp/.X{d}-lock").exists() and not Path(f"/tmp/.X11-unix/X{d}").exists()
            and _port_free(4000 + d) and _port_free(6000 + d))


def _free_display(start: int, *, avoid: tuple[int, ...] = ()) -> int:
    for d in range(start, start + 100):
        if d not in avoid and _display_free(d):
            return d
    raise RuntimeError(f"no free X display from :{start}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vma_python() -> str:
    debian = "/usr/bin/python3"
    if Path(debian).exists():
        ok = subprocess.run([debian, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"], check=False)
        if ok.returncode == 0:
            return debian
    return sys.executable


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Lab:
    workdir: Path
    state_dir: Path
    config: Path
    display: int
    client_display: int
    port: int
    user: str
    group: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    vma: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def configure(self, *, listening: float = 60) -> None:
        self.config.write_text(
            'log.level = "DEBUG"\n'
            f'vma.user.groups = "{self.group}"\n'
            f"internal.nxagent.display = {self.display}\n"
            f"internal.nxagent.timeout.listening = {listening}\n"
        )

    # -------------------------------------------------------------- processes
    def start(self, argv: list[str], *, env: dict[str, str] | None = None, log: str) -> subprocess.Popen[bytes]:
        out = (self.workdir / log).open("ab")
        try:
            p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        finally:
            out.close()
        self.procs.append(p)
        return p

    @staticmethod
    def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def start_vma(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_SRC), "LANG": "C.UTF-8"}
        self.vma = self.start([_vma_python(), "-m", "qvd.vma", "--config", str(self.config), "--state-dir",
                               str(self.state_dir), "--address", "127.0.0.1", "--port", str(self.port),
                               "--log-file", str(self.workdir / "vma.log")], env=env, log="vma.stderr")

        def pings() -> bool:
            assert self.vma is not None and self.vma.poll() is None, self.diagnostics()
            try:
                return self.call("ping") == "pong"
            except OSError:
                return False

        wait_for("the VMA to answer", pings, 20)

    # -------------------------------------------------------------- API
    def raw(self, method: str, **params: str) -> tuple[bool, object]:
        url = f"http://127.0.0.1:{self.port}/vma/{method}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json-simplerpc"
            items = json.loads("[" + resp.read().decode() + "]")
        return (False, items[1]) if len(items) == 2 else (True, items[0])

    def call(self, method: str, **params: str) -> object:
        ok, value = self.raw(method, **params)
        assert ok, f"{method} failed: {value}"
        return value

    def wait_state(self, state: str, timeout: float, seen: list[object] | None = None) -> float:
        seen = [] if seen is None else seen

        def reached() -> bool:
            s = self.call("x_state")
            if not seen or seen[-1] != s:
                seen.append(s)
            return s == state

        try:
            return wait_for(f"x_state {state}", reached, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; states seen {seen}\n{self.diagnostics()}") from None

    # -------------------------------------------------------------- X
    def start_xvfb(self) -> None:
        xvfb = self.start(["Xvfb", f":{self.client_display}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                          log="xvfb.log")
        wait_for("Xvfb", lambda: Path(f"/tmp/.X11-unix/X{self.client_display}").exists(), 20)
        assert xvfb.poll() is None

    def proxy(self) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DISPLAY": f":{self.client_display}",
               "HOME": str(self.workdir)}
        return self.start(["nxproxy", "-S", f"nx/nx,connect=127.0.0.1,port={4000 + self.display}:{self.display}"],
                          env=env, log="nxproxy.log")

    def screenshot_colours(self, name: str) -> int:
        shot = self.workdir / name
        subprocess.run(["import", "-display", f":{self.client_display}", "-window", "root", str(shot)],
                       check=True, capture_output=True, timeout=20)
        out = subprocess.run(["convert", str(shot), "-format", "%k", "info:"], check=True, capture_output=True,
                             text=True, timeout=20).stdout
        return int(out.strip())

    def wait_painted(self, name: str, timeout: float = 25) -> float:
        """Time until the client screen shows more than a few colours (a black or blank screen has 1-2)."""
        colours: list[int] = []

        def painted() -> bool:
            colours.append(self.screenshot_colours(name))
            return colours[-1] >= 16

        try:
            return wait_for("the desktop to appear on the client screen", painted, timeout, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; distinct colours seen {colours[-5:]} (see {self.workdir / name})") from None

    def xterm_windows(self) -> list[str]:
        env = {**os.environ, "DISPLAY": f":{self.display}"}
        res = subprocess.run(["xdotool", "search", "--class", "xterm"], env=env, capture_output=True, text=True,
                             timeout=10, check=False)
        return res.stdout.split()

    # -------------------------------------------------------------- diagnostics / cleanup
    def diagnostics(self) -> str:
        parts = []
        for name in ("vma.log", "vma.stderr", "nxproxy.log"):
            p = self.workdir / name
            if p.exists():
                parts.append(f"--- {name}\n" + p.read_text(errors="replace")[-3000:])
        nxlog = self.state_dir / "nxagent.log"
        if nxlog.exists():
            lines = [ln for ln in nxlog.read_text(errors="replace").splitlines() if ln.startswith(("Session:", "Info:",
                                                                                                   "Error:"))]
            parts.append("--- nxagent.log (filtered)\n" + "\n".join(lines[-30:]))
        return "\n".join(parts)


def _user_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
    return pids


def _user_commands(uid: int) -> list[str]:
    names = []
    for pid in _user_pids(uid):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def _reap_zombie_children() -> None:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields and fields[0] == b"Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


@pytest.fixture
def lab() -> Iterator[Lab]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    workdir = Path(tempfile.mkdtemp(prefix="qvd-vma-it-", dir="/tmp"))
    workdir.chmod(0o755)  # the desktop user (nxagent) reads the options file in the state dir below
    display = _free_display(int(os.environ.get("QVD_TEST_NX_DISPLAY", "150")))
    client_display = _free_display(display + 1, avoid=(display,))
    tag = secrets.token_hex(3)
    user, group = f"qvdtest{tag}", f"qvdtg{tag}"
    lab = Lab(workdir=workdir, state_dir=workdir / "state", config=workdir / "vma.toml", display=display,
              client_display=client_display, port=_free_port(), user=user, group=group)
    lab.configure()
    try:
        yield lab
    finally:
        for p in reversed(lab.procs):
            Lab.stop(p)
        pid_file = lab.state_dir / "nxagent.pid"
        try:
            uid: int | None = pwd.getpwnam(user).pw_uid
        except KeyError:
            uid = None
        if uid is not None:
            # Everything the desktop user runs was started by our VMA: nxagent, openbox, xterm, its shell.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _user_pids(uid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                time.sleep(0.5)
        elif pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        _reap_zombie_children()
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        if uid is not None:
            subprocess.run(["userdel", "-r", user], capture_output=True, check=False)
            shutil.rmtree(f"/run/user/{uid}", ignore_errors=True)
        for g in (group, user):
            subprocess.run(["groupdel", g], capture_output=True, check=False)
        shutil.rmtree(f"/home/{user}", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            Path(f"/tmp/.X{display}-lock").unlink()
        if os.environ.get("QVD_TEST_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nVMA/NX timings (s): {json.dumps({k: round(v, 3) for k, v in lab.timings.items()})}")


def test_session_start_suspend_restart_resume_stop(lab: Lab) -> None:
    lab.start_vma()
    assert lab.call("x_state") == "stopped"

    # --- new session: provisioning, nxagent, listening
    t0 = time.monotonic()
    params = {
        "qvd.vm.user.name": lab.user,
        "qvd.client.geometry": "1024x768",
        "qvd.client.link": "adsl",
        "qvd.client.keyboard": "pc105/us",
        "qvd.client.os": "linux",
        "qvd.client.nxagent.extra_args": "loopback=0,evil=1",
        "auth_token": "not-on-any-command-line",
    }
    assert lab.call("x_start", **params) == "starting"
    lab.wait_state("listening", 60)
    lab.timings["x_start_to_listening"] = time.monotonic() - t0

    options = (lab.state_dir / "nxagent.conf").read_text()
    assert f"listen={4000 + lab.display}" in options and "evil" not in options and "loopback" not in options
    pw = pwd.getpwnam(lab.user)
    home = Path(pw.pw_dir)
    assert home == Path("/home") / lab.user and home.stat().st_uid == pw.pw_uid
    assert lab.group in subprocess.run(["id", "-nG", lab.user], capture_output=True, text=True, check=True).stdout
    info = lab.call("info")
    assert isinstance(info, dict) and info["user"] == lab.user and info["nx_port"] == 4000 + lab.display
    nxagent_pid = info["nxagent_pid"]
    assert isinstance(nxagent_pid, int) and os.stat(f"/proc/{nxagent_pid}").st_uid == pw.pw_uid
    assert lab.raw("x_start", **params)[0] is False  # listening: refused, not a second nxagent

    # --- a client attaches: connected, the desktop appears
    lab.start_xvfb()
    t0 = time.monotonic()
    proxy = lab.proxy()
    lab.wait_state("connected", 30)
    lab.timings["proxy_to_connected"] = time.monotonic() - t0
    wait_for("the xterm window in the session", lambda: bool(lab.xterm_windows()), 20, interval=0.2)
    lab.wait_painted("first.png")
    lab.timings["proxy_to_first_paint"] = time.monotonic() - t0

    # --- the client goes away: suspended, desktop programs keep running
    Lab.stop(proxy)
    lab.wait_state("suspended", 30)
    # (no X query here: a suspended nxagent does not answer X clients until it is resumed)
    assert "xterm" in _user_commands(pw.pw_uid), "the desktop programs must survive the suspension"

    # --- the VMA restarts: it must re-attach to the live nxagent, not kill it
    assert lab.vma is not None
    Lab.stop(lab.vma)
    assert lab.vma.returncode == 0
    assert Path(f"/proc/{nxagent_pid}").exists()
    lab.start_vma()
    assert lab.call("x_state") == "suspended"
    info = lab.call("info")
    assert isinstance(info, dict) and info["nxagent_pid"] == nxagent_pid and info["user"] == lab.user

    # --- resume with new options
    t0 = time.monotonic()
    assert lab.call("x_start", **{**params, "qvd.client.link": "modem", "qvd.client.geometry": "800x600"}) \
        == "starting"
    lab.wait_state("listening", 30)
    lab.timings["resume_x_start_to_listening"] = time.monotonic() - t0
    assert "link=modem" in (lab.state_dir / "nxagent.conf").read_text()
    t0 = time.monotonic()
    proxy = lab.proxy()
    lab.wait_state("connected", 30)
    lab.timings["resume_proxy_to_connected"] = time.monotonic() - t0
    lab.wait_painted("resumed.png")
    lab.timings["resume_proxy_to_paint"] = time.monotonic() - t0
    assert "MODEM" in (lab.workdir / "nxproxy.log").read_text()  # the new link type is in force

    # --- take-over: a second x_start while connected suspends the session and asks to retry
    ok, msg = lab.raw("x_start", **params)
    assert not ok and msg == "Can't connect to X session in state connected, suspending it, retry later"
    lab.wait_state("suspended", 30)
    Lab.stop(proxy)

    # --- stop
    t0 = time.monotonic()
    assert lab.call("x_stop") == "ok"
    lab.wait_state("stopped", 40)
    lab.timings["x_stop_to_stopped"] = time.monotonic() - t0
    wait_for("nxagent to exit", lambda: not _alive(nxagent_pid), 10)
    wait_for("the state files to go", lambda: not (lab.state_dir / "nxagent.pid").exists(), 5)

    # secrets never reached a command line or the state files
    hooks_and_state = "".join(p.read_text(errors="replace") for p in lab.state_dir.iterdir()
                              if p.is_file() and p.name != "nxagent.log")
    assert "not-on-any-command-line" not in hooks_and_state


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def test_unattached_sessions_and_poweroff(lab: Lab) -> None:
    """Listening timeout on the real nxagent: a new session nobody attaches to ends, a resumed one
    goes back to suspended (reference bug 10.2.12); then poweroff stops the session and the VMA exits 0."""
    lab.configure(listening=2)
    # The persistent /home already holds this user's home from an earlier life with another uid.
    home = Path("/home") / lab.user
    home.mkdir(mode=0o700)
    (home / "keep.txt").write_text("my data\n")
    for p in (home, home / "keep.txt"):
        os.chown(p, 54321, 54321)
    lab.start_vma()
    params = {"qvd.vm.user.name": lab.user, "qvd.client.link": "adsl"}

    # a brand-new session that no client attaches to is terminated
    assert lab.call("x_start", **params) == "starting"
    lab.wait_state("listening", 30)
    uid = pwd.getpwnam(lab.user).pw_uid
    assert home.stat().st_uid == uid and (home / "keep.txt").stat().st_uid == uid
    assert (home / "keep.txt").read_text() == "my data\n"
    first_pid = lab.call("info")["nxagent_pid"]  # type: ignore[index]
    lab.wait_state("stopped", 20)
    wait_for("the first nxagent to exit", lambda: not _alive(int(first_pid)), 10)

    # a real session, suspended
    lab.start_xvfb()
    assert lab.call("x_start", **params) == "starting"
    lab.wait_state("listening", 30)
    proxy = lab.proxy()
    lab.wait_state("connected", 30)
    Lab.stop(proxy)
    lab.wait_state("suspended", 30)
    pid = lab.call("info")["nxagent_pid"]  # type: ignore[index]

    # resumed, nobody comes: back to suspended, never stopped
    assert lab.call("x_start", **params) == "starting"
    seen: list[object] = []
    lab.wait_state("listening", 10, seen)
    took = lab.wait_state("suspended", 20, seen)
    lab.timings["unattached_resume_back_to_suspended"] = took
    assert "stopped" not in seen and "stopping" not in seen, seen
    assert _alive(int(pid))
    assert lab.call("info")["nxagent_pid"] == pid  # type: ignore[index]

    # poweroff: the answer first, then the session stops and the VMA exits 0
    assert lab.call("poweroff") == "ok"
    assert lab.vma is not None
    assert lab.vma.wait(60) == 0
    assert not _alive(int(pid))
    assert not (lab.state_dir / "nxagent.pid").exists()
