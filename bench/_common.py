"""Helpers shared by the benchmark scripts ``bench/bandwidth.py``, ``bench/tunnel.py`` and
``bench/session_start.py``: logging, a cleanup stack with signal handling, processes by pid + start time,
a byte-counting asyncio TCP relay, Xvfb with a health check, screen grabs, memory/CPU figures of a
process, and a temporary node root (SQLite database, node file, objects created through
``qvd.services``) with a real ``qvd-l7r`` process whose node daemon is played by the script.

Everything here talks to loopback only.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from qvd.vma.procs import proc_start_time

PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB = 1024
MIB = 1024 * 1024

_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress on stderr (stdout carries only the report, or the JSON)."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP: unwind to the cleanup.  A BaseException so no ``except Exception`` eats it."""


def qvd_command(name: str) -> list[str]:
    """argv of one of our console scripts (``qvd-l7r``...), from the virtualenv the script runs in."""
    exe = VENV_BIN / name
    if exe.exists():
        return [str(exe)]
    module = {"qvd-l7r": "qvd.l7r.main", "qvd-hkd": "qvd.hkd.main", "qvd-client": "qvd.client.main",
              "qvd-vma": "qvd.vma"}[name]
    return [sys.executable, "-m", module]


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=PATH_ENV) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (scripts/install-deps.sh test installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-files limit (children inherit it) towards ``wanted``; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def wait_until(what: str, pred: Callable[[], bool], timeout: float, *, poll: float = 0.05) -> float:
    """Poll ``pred`` until true; returns the seconds it took; BenchError after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def tail(path: Path, n: int = 8) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f"\n--- last lines of {path} ---\n" + "\n".join(lines[-n:])


def run(argv: list[str], *, timeout: float = 60.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        detail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
        raise BenchError(f"{' '.join(argv)} failed (exit status {res.returncode}): {' | '.join(detail)}")
    return res


def machine_line() -> str:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{os.cpu_count()} CPUs, {mem_kib / KIB / KIB:.1f} GiB, kernel {os.uname().release}, "
            f"load average at start {' '.join(load)}")


# --- processes and the cleanup stack -------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].split()


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(x) for x in f.read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    seen: list[int] = []
    todo = [pid]
    while todo:
        for c in children_of(todo.pop()):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process (0 when gone)."""
    f = _stat_fields(pid)
    if not f or len(f) < 13:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class ProcRef:
    """A process we started, known by pid and start time so that a recycled pid is never signalled."""

    pid: int
    start_time: int | None
    what: str
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log: Path | None = None
    token: int = 0  # its entry in the Janitor that started it

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.start_time is not None and proc_start_time(self.pid) == self.start_time

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """True if the process ended within ``timeout`` (reaped if it is our child)."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(1)
        return True

    def stop(self, timeout: float = 5.0, first: int = signal.SIGTERM) -> None:
        """``first`` signal, then SIGKILL after ``timeout``; the descendants it left behind too (by pid)."""
        kids = [(p, proc_start_time(p)) for p in descendants(self.pid)] if self.alive() else []
        for sig in (first, signal.SIGKILL):
            if not self.alive():
                break
            self.send(sig)
            self.wait(timeout)
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(2)
        for pid, st in kids:
            ProcRef(pid, st, f"child {pid} of {self.what}").stop(timeout=2.0)


class Janitor:
    """A stack of cleanup actions run in reverse order (processes, accounts, directories...).

    ``spawn`` registers a process; ``push`` any other action.  :meth:`cleanup` runs them all,
    never stops at an error, and returns the errors.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, str, Callable[[], None]]] = []
        self._seq = 0
        self.cleaning = False

    def push(self, what: str, action: Callable[[], None]) -> int:
        self._seq += 1
        self._stack.append((self._seq, what, action))
        return self._seq

    def pop(self, token: int, *, run_it: bool = True) -> None:
        """Run (or just forget) one action now."""
        for i, (seq, _what, action) in enumerate(self._stack):
            if seq == token:
                del self._stack[i]
                if run_it:
                    action()
                return

    def spawn(self, argv: list[str], *, env: dict[str, str], log: Path, what: str, cwd: Path | None = None,
              stop_timeout: float = 5.0, first_signal: int = signal.SIGTERM) -> ProcRef:
        """Start a process in a session of its own (a Ctrl-C reaches only us; we stop it in order)."""
        with log.open("ab") as fh:
            try:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, start_new_session=True)
            except OSError as e:
                raise BenchError(f"cannot start {argv[0]}: {e.strerror or e}") from None
        ref = ProcRef(p.pid, proc_start_time(p.pid), what, p, log)
        ref.token = self.push(f"stop {what} (pid {p.pid})", lambda: ref.stop(stop_timeout, first_signal))
        return ref

    def stop(self, ref: ProcRef) -> None:
        """Stop a spawned process now (its cleanup entry runs and is forgotten)."""
        if any(seq == ref.token for seq, _w, _a in self._stack):
            self.pop(ref.token)
        else:
            ref.stop()

    def cleanup(self) -> list[str]:
        self.cleaning = True
        errors: list[str] = []
        while self._stack:
            _seq, what, action = self._stack.pop()
            try:
                action()
            except BaseException as e:  # keep going: everything else must still be removed
                errors.append(f"{what}: {type(e).__name__}: {e}")
        return errors


def install_signals(janitor: Janitor) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if janitor.cleaning:
            say(f"{name} ignored: cleaning up, please wait")
            return
        raise Interrupted(name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="results as JSON: on stdout instead of the report (the report then goes to stderr), "
                        "or into FILE (the report stays on stdout)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary directory (logs, screenshots) instead of removing it")


def run_bench(prog: str, args: argparse.Namespace, body: Callable[[Janitor, Path], dict[str, Any]],
              report: Callable[[dict[str, Any]], str]) -> int:
    """Work directory, signal handling, cleanup, report/JSON output: the frame of every script."""
    janitor = Janitor()
    install_signals(janitor)
    work = Path(tempfile.mkdtemp(prefix=f"qvd-bench-{prog}-", dir="/var/tmp"))
    work.chmod(0o755)  # desktop users of the host-side VMA read files below it
    if not args.keep_workdir:
        janitor.push(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
    say(f"{prog}: work dir {work}")
    result: dict[str, Any] | None = None
    code = 1
    try:
        result = body(janitor, work)
        code = 0
    except Interrupted as e:
        print(f"{prog}: interrupted by {e}", file=sys.stderr)
        code = 130
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except Exception:
        traceback.print_exc()
    finally:
        say("cleaning up")
        errors = janitor.cleanup()
        for err in errors:
            print(f"{prog}: cleanup: {err}", file=sys.stderr)
        if errors:
            code = code or 1
        say("cleanup " + ("incomplete" if errors else "complete") + (f"; files kept in {work}"
                                                                       if args.keep_workdir else ""))
    if result is not None:
        text = report(result)
        if args.json == "-":
            print(text, file=sys.stderr)
            print(json.dumps(result, indent=1))
        else:
            print(text)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return code


# --- the byte-counting relay ---------------------------------------------------------------------


class LoopThread:
    """One asyncio loop in a daemon thread, shared by every relay of the process."""

    _instance: LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-relays", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> LoopThread:
        if cls._instance is None:
            cls._instance = LoopThread()
        return cls._instance

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


Target = tuple[str, int] | str  # (host, port) or the path of a unix socket


class Relay:
    """TCP relay on 127.0.0.1 in front of a server, counting the bytes of every connection each way.

    ``up`` = client -> server, ``down`` = server -> client, application bytes as read from the sockets
    (TLS records included when the traffic is TLS).  Both sockets get TCP_NODELAY, like the programs
    on either side.
    """

    CHUNK = 64 * 1024

    def __init__(self, target: Target, *, port: int = 0, name: str = "relay", tls_records: bool = False) -> None:
        self.target = target
        self.port = port
        self.name = name
        self.up = 0
        self.down = 0
        self.tls_records = tls_records  # also count TLS records each way (the stream must be TLS)
        self.records_up = 0
        self.records_down = 0
        self.connections = 0
        self.failed = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._lt = LoopThread.get()

    def start(self, janitor: Janitor | None = None) -> Relay:
        self._lt.call(self._start())
        if janitor is not None:
            janitor.push(f"stop relay {self.name} (port {self.port})", self.stop)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", self.port, backlog=256)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def counts(self) -> tuple[int, int]:
        return self.up, self.down

    @staticmethod
    def _nodelay(w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _on_client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                s_reader, s_writer = await asyncio.open_unix_connection(self.target)
            else:
                s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.failed += 1
            c_writer.close()
            return
        self.connections += 1
        for w in (c_writer, s_writer):
            self._nodelay(w)
            self._writers.add(w)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, is_up: bool) -> None:
            records = _TlsRecords() if self.tls_records else None
            try:
                while True:
                    data = await src.read(self.CHUNK)
                    if not data:
                        break
                    n = records.feed(data) if records else 0
                    if is_up:
                        self.up += len(data)
                        self.records_up += n
                    else:
                        self.down += len(data)
                        self.records_down += n
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                dst.transport.abort()

        try:
            await asyncio.gather(pump(c_reader, s_writer, True), pump(s_reader, c_writer, False))
        finally:
            for w in (c_writer, s_writer):
                self._writers.discard(w)
                w.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def stop(self) -> None:
        self._lt.call(self._stop())


class _TlsRecords:
    """Counts TLS records in one direction of a TLS stream (5-byte header: type, version, length)."""

    def __init__(self) -> None:
        self.header = b""
        self.body_left = 0

    def feed(self, data: bytes) -> int:
        records, i, n = 0, 0, len(data)
        while i < n:
            if self.body_left:
                k = min(self.body_left, n - i)
                self.body_left -= k
                i += k
                continue
            k = min(5 - len(self.header), n - i)
            self.header += data[i:i + k]
            i += k
            if len(self.header) == 5:
                records += 1
                self.body_left = int.from_bytes(self.header[3:5], "big")
                self.header = b""
        return records


# --- X: Xvfb, xdotool, screen grabs --------------------------------------------------------------


def x_socket_accepts(display: int) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(f"/tmp/.X11-unix/X{display}")
        except OSError:
            return False
    return True


def display_free(n: int) -> bool:
    return (not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists()
            and port_free(6000 + n))


class Xvfb:
    """An Xvfb on a free display (``-nolisten tcp``), started and health-checked.

    Not ``-displayfd``: with it Xvfb writes no lock file, and another X server started meanwhile could take
    the display over.  :meth:`check` (call it before trusting a measurement) raises if the server died or
    stopped answering.
    """

    def __init__(self, janitor: Janitor, logdir: Path, tag: str, *, screen: str = "1280x800x24",
                 first: int = 300) -> None:
        env = {"PATH": PATH_ENV}
        for n in range(first, first + 300):
            if not display_free(n):
                continue
            ref = janitor.spawn(["Xvfb", f":{n}", "-nolisten", "tcp", "-screen", "0", screen, "-noreset"],
                                env=env, log=logdir / f"xvfb-{tag}.log", what=f"Xvfb :{n} ({tag})")
            lock = Path(f"/tmp/.X{n}-lock")
            deadline = time.monotonic() + 10.0
            while ref.alive() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if x_socket_accepts(n) and lock.read_text().strip() == str(ref.pid):
                        self.display, self.ref, self.janitor, self.tag = n, ref, janitor, tag
                        self.check()
                        return
                time.sleep(0.05)
            janitor.stop(ref)  # lost a race for the display with somebody else (it exits): next one
        raise BenchError(f"no free X display from :{first}")

    @property
    def name(self) -> str:
        return f":{self.display}"

    def check(self) -> None:
        if not self.ref.alive():
            raise BenchError(f"Xvfb {self.name} ({self.tag}) died" + tail(self.ref.log or Path("/nonexistent")))
        res = run(["xdpyinfo", "-display", self.name], timeout=10, check=False)
        if res.returncode != 0:
            raise BenchError(f"Xvfb {self.name} ({self.tag}) does not answer: {res.stderr.strip()[:200]}")

    def stop(self) -> None:
        self.janitor.stop(self.ref)


def x_env(display: str, home: Path) -> dict[str, str]:
    return {"PATH": PATH_ENV, "DISPLAY": display, "HOME": str(home), "LANG": "C.UTF-8"}


def xdotool(display: str, *args: str, timeout: float = 30.0, check: bool = True) -> str:
    res = run(["xdotool", *args], timeout=timeout, check=check, env={"PATH": PATH_ENV, "DISPLAY": display})
    return res.stdout.strip()


def grab(display: str) -> bytes:
    """XWD dump of the root window ('' when it fails)."""
    res = subprocess.run(["xwd", "-root", "-silent", "-display", display], capture_output=True, timeout=20,
                         check=False)
    return res.stdout if res.returncode == 0 and len(res.stdout) > 100 else b""


def count_white(xwd: bytes) -> int:
    """Pure-white pixels of an XWD dump of a 24/32-bit screen (Xvfb -screen WxHx24)."""
    if len(xwd) < 100:
        return 0
    h = struct.unpack(">25I", xwd[:100])
    header_size, width, height, byte_order, bytes_per_line, ncolors = h[0], h[4], h[5], h[7], h[12], h[19]
    if bytes_per_line != 4 * width:
        raise BenchError(f"unexpected XWD dump: {bytes_per_line} bytes per line for {width} pixels")
    mask = h[14] | h[15] | h[16]
    off = header_size + 12 * ncolors
    px = array.array("I")
    px.frombytes(xwd[off: off + bytes_per_line * height])
    if (byte_order == 0) != (sys.byteorder == "little"):
        px.byteswap()
    return px.count(mask) + px.count(mask | (0xFFFFFFFF & ~mask))


def save_png(xwd: bytes, path: Path) -> None:
    """Keep a screenshot for a person to look at (ImageMagick's real convert, if installed)."""
    raw = path.with_suffix(".xwd")
    raw.write_bytes(xwd)
    conv = Path("/usr/bin/convert")
    if conv.exists():
        res = subprocess.run([str(conv), f"xwd:{raw}", str(path)], capture_output=True, timeout=30, check=False)
        if res.returncode == 0:
            raw.unlink()


# --- the VMA's HTTP API --------------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy from the environment


class VmaRefused(Exception):
    pass


def vma_call(host: str, port: int, method: str, params: dict[str, str] | None = None,
             timeout: float = 5.0) -> object:
    from qvd.vma.rpc import decode_body

    url = f"http://{host}:{port}/vma/{method}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with _OPENER.open(url, timeout=timeout) as r:
        ok, value = decode_body(r.read())
    if not ok:
        raise VmaRefused(str(value))
    return value


def vma_state(host: str, port: int) -> str:
    try:
        return str(vma_call(host, port, "x_state"))
    except (OSError, ValueError, VmaRefused):
        return "?"


# --- a temporary node with a real qvd-l7r --------------------------------------------------------


def toml_line(key: str, value: object) -> str:
    return f"{json.dumps(key)} = {json.dumps(value)}\n"


class TempNode:
    """A node root of our own: node file, SQLite database (upgraded, seeded), objects made through
    ``qvd.services``, and a real ``qvd-l7r`` process.  The node daemon is played by the caller
    (:meth:`set_host_running`, :meth:`set_vm_running`) unless a real ``qvd-hkd`` runs on the root.
    """

    def __init__(self, janitor: Janitor, root: Path, settings: dict[str, object]) -> None:
        from qvd.cli.common import open_node
        from qvd.db import schema
        from qvd.services.tenancy import seed

        self.janitor = janitor
        self.root = root
        self.settings = {"log.level": "INFO", "l7r.metrics.port": 0, **settings}
        (root / "etc").mkdir(parents=True, exist_ok=True)
        self.write_node_file()
        self.node = open_node(str(root))
        janitor.push(f"close the database of {root}", self.node.engine.dispose)
        schema.upgrade(self.node.engine)
        with self.node.factory() as s, s.begin():
            seed(s)
        self.l7r: ProcRef | None = None
        self.l7r_port = 0
        self.l7r_tls = True

    @property
    def nodename(self) -> str:
        return str(self.settings.get("nodename", ""))

    def write_node_file(self) -> None:
        text = "# Written by a bench/ script for one run.\n" + "".join(
            toml_line(k, v) for k, v in self.settings.items())
        (self.root / "etc" / "node.toml").write_text(text)

    def reload_config(self) -> None:
        from qvd.core.config import load_node_config

        self.node.cfg = load_node_config(self.root)

    # objects, through the services (what the admin API and qa call)
    def add_user(self, login: str, password: str) -> int:
        from qvd.services.base import SYSTEM
        from qvd.services.users import create_user

        return int(create_user(self.node.factory, SYSTEM, self.node.cfg,
                               {"name": login, "password": password, "tenant": "default"})["id"])

    def add_osf(self, name: str, memory: int = 512) -> int:
        from qvd.services.base import SYSTEM
        from qvd.services.images import create_osf

        return int(create_osf(self.node.factory, SYSTEM, self.node.cfg,
                              {"name": name, "tenant": "default", "memory": memory})["id"])

    def add_di(self, osf_id: int, image: Path) -> int:
        from qvd.services.base import SYSTEM
        from qvd.services.images import create_di

        return int(create_di(self.node.factory, SYSTEM, self.node.paths.images,
                             {"osf_id": osf_id, "disk_image": str(image)})["id"])

    def add_vm(self, name: str, user_id: int, osf_id: int) -> int:
        from qvd.services.base import SYSTEM
        from qvd.services.vms import create_vm

        return int(create_vm(self.node.factory, SYSTEM, self.node.cfg,
                             {"name": name, "user_id": user_id, "osf_id": osf_id})["id"])

    def add_vms_bulk(self, prefix: str, count: int, user_id: int, osf_id: int) -> list[int]:
        """Many VM rows at once, straight through the ORM (the services allocate IPs from one /24 and
        audit every call: too slow and too small for a thousand rows that never run a desktop)."""
        from qvd.db.models import Vm, VmRuntime

        ids: list[int] = []
        with self.node.factory() as s, s.begin():
            for i in range(count):
                vm = Vm(name=f"{prefix}{i}", user_id=user_id, osf_id=osf_id,
                        ip=f"10.{200 + i // 65536}.{(i // 256) % 256}.{i % 256}")
                vm.runtime = VmRuntime()
                s.add(vm)
                s.flush()
                ids.append(int(vm.id))
        return ids

    # the node daemon's part, played by the script
    def host_id(self) -> int:
        from sqlalchemy import select

        from qvd.db.models import Host

        with self.node.factory() as s:
            hid = s.scalars(select(Host.id).where(Host.name == self.nodename)).first()
        if hid is None:
            raise BenchError(f"host {self.nodename!r} is not registered")
        return int(hid)

    def set_host_running(self) -> None:
        from sqlalchemy import update

        from qvd.core.states import HostState
        from qvd.db.models import HostRuntime, utcnow

        with self.node.factory() as s, s.begin():
            s.execute(update(HostRuntime).where(HostRuntime.host_id == self.host_id()).values(
                state=HostState.RUNNING, ok_ts=utcnow(), usable_ram=8192, usable_cpu=2.0))

    def set_vm_running(self, vm_ids: list[int], address: str, vma_port: int, x_port: int) -> None:
        from sqlalchemy import update

        from qvd.core.states import VmState
        from qvd.db.models import VmRuntime, utcnow

        hid = self.host_id()
        with self.node.factory() as s, s.begin():
            s.execute(update(VmRuntime).where(VmRuntime.vm_id.in_(vm_ids)).values(
                vm_state=VmState.RUNNING, vm_state_ts=utcnow(), vm_cmd=None, host_id=hid, vm_address=address,
                vm_vma_port=vma_port, vm_x_port=x_port))

    # the L7R
    def start_l7r(self, *, tls: bool, log: Path, timeout: float = 60.0) -> ProcRef:
        """A real qvd-l7r on 127.0.0.1:<free port>; returns once /qvd/ping answers (any status)."""
        if self.l7r is not None:
            raise BenchError("an L7R already runs on this node")
        self.settings["l7r.use_ssl"] = tls
        self.write_node_file()
        self.reload_config()
        port = free_port()
        offset = log.stat().st_size if log.exists() else 0  # the log may hold an earlier run's lines
        env = {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": str(self.root)}
        ref = self.janitor.spawn([*qvd_command("qvd-l7r"), "--root", str(self.root), "--address", "127.0.0.1",
                                  "--port", str(port)], env=env, log=log, what=f"qvd-l7r ({'TLS' if tls else 'HTTP'})",
                                 stop_timeout=15.0)
        self.l7r, self.l7r_port, self.l7r_tls = ref, port, tls

        def up() -> bool:
            if not ref.alive():
                raise BenchError("qvd-l7r exited while starting" + tail(log))
            with log.open("rb") as fh:
                fh.seek(offset)
                return b"qvd-l7r ready" in fh.read()

        wait_until("qvd-l7r to be ready", up, timeout, poll=0.1)
        return ref

    def stop_l7r(self) -> None:
        if self.l7r is not None:
            self.janitor.stop(self.l7r)
            self.l7r = None

    def client_context(self) -> ssl.SSLContext | None:
        if not self.l7r_tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def ping(self) -> int:
        """Status of GET /qvd/ping (200 once the node is running for the L7R, 503 before)."""
        try:
            raw = socket.create_connection(("127.0.0.1", self.l7r_port), timeout=10)
        except OSError:
            return 0
        ctx = self.client_context()
        sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
        try:
            sock.sendall(b"GET /qvd/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        try:
            return int(data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return 0

    def wait_serving(self, timeout: float = 15.0) -> None:
        """The L7R re-reads the node status every second: wait until it serves users."""
        wait_until("the L7R to see its node running", lambda: self.ping() == 200, timeout, poll=0.2)


def basic_auth(login: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def connect_request(vm_id: int, auth: str, params: dict[str, str] | None = None) -> bytes:
    query = urllib.parse.urlencode({"id": str(vm_id), **(params or {})})
    return (f"GET /qvd/connect_to_vm?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
            "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\nUser-Agent: qvd-bench\r\n\r\n").encode()


async def read_until_101(reader: asyncio.StreamReader) -> tuple[int, bytes, list[str]]:
    """Read ``102`` lines until the final status; returns (status, bytes after the head, 102 infos)."""
    infos: list[str] = []
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                raise BenchError(f"the L7R closed the connection (read so far: {buf[:300]!r})")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        if status == 102:
            infos += [ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("x-qvd-vm-info")]
            continue
        if status != 101:
            length = 0
            for ln in lines[1:]:
                if ln.lower().startswith("content-length:"):
                    length = int(ln.split(":", 1)[1])
            while len(buf) < length:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
            raise BenchError(f"connect_to_vm answered {lines[0]}: {buf[:length].decode(errors='replace').strip()}")
        return status, buf, infos


def median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"
