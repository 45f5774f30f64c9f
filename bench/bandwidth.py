"""Bytes on the wire of one scripted terminal workload: our L7R tunnel vs bare NX, VNC and plain X11.

Run as root from the repository root::

    .venv/bin/python -m bench.bandwidth [--only ours-adsl,bare-adsl,...] [--chars 2000] [--lines 3000]
                                        [--delay-ms 40] [--json [FILE]] [--keep-workdir]

The workload (lab notes section 2, "Bandwidth benchmark"), the same for every protocol:

1. in an xterm (100x30, Monospace 10, ``bash --norc``), type ``cat > FILE``, then a fixed text of
   ``--chars`` characters (lower-case words, a newline at most every 72 characters) with ``xdotool type
   --delay 40`` (about 47 characters per second: xdotool's delay is per half keystroke);
2. Ctrl-D, then ``ls -lR /usr/share/doc | head -3000; touch FILE.done``;
3. the bytes are counted from the first keystroke until 3 s after ``FILE.done`` appeared, and FILE must
   equal the text (checked every run).

Every key is typed with xdotool on the *client's* screen (an Xvfb, 1280x800) and travels up through the
protocol, like a user's.  Protocols:

* ``ours-adsl`` / ``ours-lan``: the whole product path on this host: a real ``qvd-l7r`` (TLS) on a
  temporary node root, the real VMA (``qvd-vma``, run on the host, not in a container) starting nxagent
  with ``vma.x-session`` = the xterm, and the real ``qvd-client`` with Debian's ``nxproxy`` on the client's
  Xvfb.  The node daemon is played by this script (the VM row is set running with the VMA's address and
  ports).  The link type is chosen by the client (``qvd-client --link``), passed by the L7R to the VMA's
  ``x_start``, which writes it into nxagent's options.  Counted by a relay in front of the L7R port:
  **TLS bytes**, the HTTP exchange included in the set-up figures.  A second relay between the L7R and
  nxagent counts the NX bytes inside the tunnel.
* ``bare-adsl`` / ``bare-lan``: the same VMA-started nxagent (same options file), ``x_start`` called
  directly, and ``nxproxy -S`` connecting straight to it through the counting relay: no L7R, no TLS.
* ``vnc``: an Xvfb (960x600) running the same xterm, ``x11vnc`` on it, viewed by Debian's TigerVNC viewer
  (``xtigervncviewer -SecurityTypes None``, automatic encoding) on the client's Xvfb.
* ``x11``: the same xterm with ``DISPLAY=127.0.0.1:N``, through the counting relay (TCP 6000+N) to the
  client's Xvfb (which itself keeps ``-nolisten tcp``).

"Down" is desktop -> viewer (for X11 that is xterm -> X server), "up" the other way.  For ours the relay
also counts TLS records, which shows where the bytes added to NX come from (22 bytes per TLS 1.3 record,
one record per write of nxproxy/nxagent).  NX and X11 give the same bytes from run to run (within ~1%);
VNC does not: x11vnc sends the frames it happens to poll, so its figure moves with the machine's load.

Everything started (processes by pid, the desktop user the VMA provisions, temporary files) is removed at
the end, also on error and on SIGINT/SIGTERM/SIGHUP.  All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/bandwidth.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    PATH_ENV,
    BenchError,
    Janitor,
    ProcRef,
    Relay,
    TempNode,
    VmaRefused,
    Xvfb,
    add_common_args,
    count_white,
    cpu_seconds,
    descendants,
    display_free,
    fmt_ratio,
    free_port,
    grab,
    machine_line,
    need_tools,
    port_free,
    qvd_command,
    ratio,
    run,
    run_bench,
    save_png,
    say,
    tail,
    vma_call,
    vma_state,
    wait_until,
    x_env,
    xdotool,
)

PROTOCOLS = ("ours-adsl", "bare-adsl", "ours-lan", "bare-lan", "vnc", "x11")
XTERM = ["xterm", "-geometry", "100x30+0+0", "-fa", "Monospace", "-fs", "10", "-e", "/bin/bash", "--norc",
         "--noprofile"]
DESKTOP_GEOMETRY = "960x600"  # nxagent's desktop and the VNC server's screen
CLIENT_SCREEN = "1280x800x24"
KEYBOARD = "pc105/us"
# An xterm 100x30 in Monospace 10 is ~400,000 white pixels; its text area drawn means well over this.
PAINT_WHITE_PIXELS = 150_000
SETTLE = 5.0  # after the first paint: the VMA nudges repaints up to 4 s after a client attached
TAIL_WAIT = 3.0  # counted after the listing is done (lab notes: "until 3 s after done")
WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
    "whiskey", "xray", "yankee", "zulu", "desktop", "session", "tunnel", "broker", "agent", "proxy", "screen",
    "window", "keyboard", "pointer", "display", "network", "bandwidth", "latency", "compress", "image",
    "render", "font", "terminal", "shell", "listing", "directory", "file", "system", "memory", "process",
    "thread", "socket", "packet",
)


def workload_text(n: int, seed: int = 2000) -> str:
    """A fixed text of exactly ``n`` characters: lower-case words, lines of at most 72, ending with a newline."""
    if n < 2:
        raise BenchError("--chars must be at least 2")
    rnd = random.Random(seed)
    lines: list[str] = []
    total = 0
    line = ""
    while True:
        word = rnd.choice(WORDS)
        candidate = f"{line} {word}" if line else word
        if len(candidate) > 72:
            lines.append(line)
            total += len(line) + 1
            line = word
        else:
            line = candidate
        if total + len(line) + 1 >= n:
            break
    rest = n - total - 1  # room for the last line before its newline
    last = line[:rest].rstrip() if rest > 0 else ""
    last = last + "x" * (rest - len(last))
    text = "\n".join([*lines, last]) + "\n"
    assert len(text) == n, (len(text), n)
    return text


def typing_chain(text: str, delay_ms: int) -> list[str]:
    """xdotool arguments (one chained command line) typing ``text`` at ``delay_ms``.

    Newlines are sent as the Return key: ``xdotool type`` sends them as the keysym Linefeed, which it
    maps onto a spare keycode of the client's X server for the moment; that remapping never reaches
    nxagent, so through NX the newline would be lost.
    """
    args: list[str] = []
    for i, line in enumerate(text.split("\n")):
        if i:
            args += ["key", "--delay", str(delay_ms), "Return"]
        if line:
            args += ["type", "--delay", str(delay_ms), "--args", "1", line]
    return args


@dataclass
class Measure:
    protocol: str
    path: str
    kib_down: float = 0.0
    kib_up: float = 0.0
    seconds: float = 0.0
    kbps_total: float = 0.0
    kbps_down: float = 0.0
    setup_kib_down: float = 0.0
    setup_kib_up: float = 0.0
    inner: dict[str, float] = field(default_factory=dict)  # ours: NX bytes between the L7R and nxagent
    tls_records: dict[str, float] = field(default_factory=dict)  # ours: TLS records in the counted window
    cpu_s: dict[str, float] = field(default_factory=dict)
    keys_typed: int = 0  # the text plus the two command lines and Ctrl-D
    typing_s: float = 0.0  # how long xdotool took for all of them
    typed_ok: bool = False
    white_pixels_after: int = 0


def kib(n: int) -> float:
    return n / 1024.0


class Bench:
    def __init__(self, args: argparse.Namespace, janitor: Janitor, work: Path) -> None:
        self.args = args
        self.j = janitor
        self.work = work
        self.home = work / "home"
        self.home.mkdir()
        self.typing = work / "typing"
        self.typing.mkdir()
        self.typing.chmod(0o1777)  # the VMA's desktop user writes here too
        self.logs = work / "logs"
        self.logs.mkdir()
        self.text = workload_text(args.chars)
        self.text_file = work / "text.txt"
        self.text_file.write_text(self.text)
        self.run_no = 0
        self.client: Xvfb | None = None
        self.vma: HostVma | None = None
        self.node: TempNode | None = None
        self.vm_id = 0
        self.password = secrets.token_hex(8)

    # --- shared pieces --------------------------------------------------------------------------

    def client_screen(self) -> Xvfb:
        if self.client is None:
            self.client = Xvfb(self.j, self.logs, "client", screen=CLIENT_SCREEN)
            say(f"client screen: Xvfb {self.client.name} {CLIENT_SCREEN}")
        self.client.check()
        return self.client

    def host_vma(self) -> HostVma:
        if self.vma is None:
            self.vma = HostVma(self)
        return self.vma

    def l7r_node(self) -> TempNode:
        if self.node is None:
            vma = self.host_vma()
            root = self.work / "root"
            say("temporary node root with a real qvd-l7r (TLS)")
            node = TempNode(self.j, root, {"nodename": "bench-bw", "node.address": "127.0.0.1"})
            uid = node.add_user(vma.user, self.password)
            osf = node.add_osf("bandwidth")
            self.vm_id = node.add_vm("desk", uid, osf)
            node.start_l7r(tls=True, log=self.logs / "l7r.log")
            self.agent_relay = Relay(("127.0.0.1", vma.nx_port), name="L7R->nxagent").start(self.j)
            node.set_host_running()
            node.set_vm_running([self.vm_id], "127.0.0.1", vma.port, self.agent_relay.port)
            node.wait_serving()
            self.node = node
        return self.node

    def wait_painted(self, what: str, display: str, alive: list[ProcRef], timeout: float = 40.0) -> int:
        white = [0]

        def painted() -> bool:
            for p in alive:
                if not p.alive():
                    raise BenchError(f"{p.what} exited while waiting for {what}" + tail(p.log or Path("/x")))
            white[0] = count_white(grab(display))
            return white[0] >= PAINT_WHITE_PIXELS

        try:
            wait_until(f"{what} painted on the client's screen", painted, timeout, poll=0.2)
        except BenchError as e:
            save_png(grab(display), self.logs / f"not-painted-{self.run_no}.png")
            raise BenchError(f"{e} (white pixels {white[0]}; screenshot in {self.logs})") from None
        return white[0]

    # --- the workload ---------------------------------------------------------------------------

    def workload(self, m: Measure, session: Session) -> Measure:
        display = self.client_screen().name
        out = self.typing / f"r{self.run_no:02d}.txt"
        done = out.with_suffix(".done")
        relay = session.relay
        session.focus()
        setup = relay.counts()
        rec0 = (relay.records_up, relay.records_down)
        inner0 = session.inner.counts() if session.inner else (0, 0)
        pids = session.cpu_pids()
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        t0 = time.monotonic()
        first, last = f"cat > {out}\n", f"ls -lR /usr/share/doc | head -{self.args.lines}; touch {done}\n"
        keys = typing_chain(first + self.text, self.args.delay_ms)
        keys += ["key", "--delay", str(self.args.delay_ms), "ctrl+d"]
        keys += typing_chain(last, self.args.delay_ms)
        m.keys_typed = len(first) + len(self.text) + 1 + len(last)
        xdotool(display, *keys, timeout=900)
        m.typing_s = time.monotonic() - t0
        def listing_done() -> bool:
            session.check()
            return done.exists()

        wait_until(f"{done} (the listing finished)", listing_done, 180, poll=0.1)
        time.sleep(TAIL_WAIT)
        end = relay.counts()
        rec1 = (relay.records_up, relay.records_down)
        t1 = time.monotonic()
        inner1 = session.inner.counts() if session.inner else (0, 0)
        cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        shot = grab(display)
        save_png(shot, self.logs / f"after-{m.protocol}.png")
        m.white_pixels_after = count_white(shot)
        up, down = end[0] - setup[0], end[1] - setup[1]
        if session.down_is_up:
            up, down = down, up
            setup = (setup[1], setup[0])
        m.kib_down, m.kib_up, m.seconds = kib(down), kib(up), t1 - t0
        m.kbps_total = (up + down) * 8 / 1000 / m.seconds
        m.kbps_down = down * 8 / 1000 / m.seconds
        m.setup_kib_down, m.setup_kib_up = kib(setup[1]), kib(setup[0])
        if session.inner:
            iu, idn = inner1[0] - inner0[0], inner1[1] - inner0[1]
            base = session.inner_base  # the L7R->nxagent relay serves every "ours" session of the run
            m.inner = {"kib_down": kib(idn), "kib_up": kib(iu), "kbps_total": (iu + idn) * 8 / 1000 / m.seconds,
                       "setup_kib_down": kib(inner0[1] - base[1]), "setup_kib_up": kib(inner0[0] - base[0])}
            ru, rd = rec1[0] - rec0[0], rec1[1] - rec0[1]
            m.tls_records = {"up": ru, "down": rd,
                             "overhead_bytes_per_record_up": (up - iu) / ru if ru else 0.0,
                             "overhead_bytes_per_record_down": (down - idn) / rd if rd else 0.0,
                             "nx_bytes_per_record_up": iu / ru if ru else 0.0,
                             "nx_bytes_per_record_down": idn / rd if rd else 0.0}
        m.cpu_s = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
        try:
            typed = out.read_text()
        except OSError:
            typed = ""
        m.typed_ok = typed == self.text
        if not m.typed_ok:
            at = next((str(i) for i, (a, c) in enumerate(zip(typed, self.text, strict=False)) if a != c), "?")
            raise BenchError(f"{m.protocol}: the typed file {out} differs from the text ({len(typed)} of "
                             f"{len(self.text)} characters; first difference at {at}); screenshot in {self.logs}")
        return m

    def measure(self, protocol: str) -> Measure:
        self.run_no += 1
        self.client_screen()
        session: Session
        if protocol.startswith("ours-"):
            session = OursSession(self, protocol.removeprefix("ours-"))
        elif protocol.startswith("bare-"):
            session = BareNxSession(self, protocol.removeprefix("bare-"))
        elif protocol == "vnc":
            session = VncSession(self)
        else:
            session = X11Session(self)
        say(f"{protocol}: setting up ({session.path})")
        try:
            session.open()
            say(f"{protocol}: typing {len(self.text)} characters, then the listing")
            m = self.workload(Measure(protocol, session.path), session)
        finally:
            session.close()
        say(f"{protocol}: {m.kib_down:.0f} KiB down, {m.kib_up:.0f} KiB up in {m.seconds:.1f} s = "
            f"{m.kbps_total:.1f} kbit/s; typed text OK ({m.keys_typed / m.typing_s:.1f} keys/s)")
        return m


# --- the real VMA on this host --------------------------------------------------------------------


class HostVma:
    """``qvd-vma`` on the host (as in tests/integration/test_vma_nx.py): provisions a desktop user of its
    own (``bw<hex>``), runs nxagent on a free display D (NX port 4000 + D) with the xterm as the session."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.user = f"bw{secrets.token_hex(3)}"
        self.display = self._free_display(170)
        self.nx_port = 4000 + self.display
        self.port = free_port()
        state = b.work / "vma-state"
        cfg = b.work / "vma.toml"
        x_session = " ".join(XTERM)
        cfg.write_text(
            'log.level = "INFO"\n'
            'vma.user.groups = ""\n'
            f"internal.nxagent.display = {self.display}\n"
            "internal.nxagent.timeout.listening = 60\n"
            f'vma.x-session = "{x_session}"\n'
        )
        b.j.push(f"remove desktop user {self.user}", self._remove_user)
        env = {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": "/root"}
        self.ref = b.j.spawn([*qvd_command("qvd-vma"), "--config", str(cfg), "--state-dir", str(state),
                              "--address", "127.0.0.1", "--port", str(self.port),
                              "--log-file", str(b.logs / "vma.log")],
                             env=env, log=b.logs / "vma.stderr", what="qvd-vma", stop_timeout=30.0,
                             first_signal=signal.SIGPWR)  # SIGPWR: stop the session, then exit
        self.state_dir = state

        def answers() -> bool:
            if not self.ref.alive():
                raise BenchError("qvd-vma exited" + tail(b.logs / "vma.stderr") + tail(b.logs / "vma.log"))
            try:
                return vma_call("127.0.0.1", self.port, "ping", timeout=1) == "pong"
            except (OSError, ValueError, VmaRefused):
                return False

        wait_until("qvd-vma to answer", answers, 20)
        say(f"qvd-vma (pid {self.ref.pid}) on 127.0.0.1:{self.port}, nxagent display :{self.display}, "
            f"NX port {self.nx_port}, desktop user {self.user}")

    @staticmethod
    def _free_display(start: int) -> int:
        for d in range(start, start + 100):
            if display_free(d) and port_free(4000 + d):
                return d
        raise BenchError(f"no free display from :{start} for nxagent")

    def call(self, method: str, params: dict[str, str] | None = None) -> object:
        return vma_call("127.0.0.1", self.port, method, params, timeout=10)

    def state(self) -> str:
        return vma_state("127.0.0.1", self.port)

    def wait_state(self, wanted: str, timeout: float) -> None:
        seen: list[str] = []

        def reached() -> bool:
            if not self.ref.alive():
                raise BenchError("qvd-vma exited" + tail(self.b.logs / "vma.log"))
            s = self.state()
            if not seen or seen[-1] != s:
                seen.append(s)
            return s == wanted

        try:
            wait_until(f"x_state {wanted}", reached, timeout, poll=0.1)
        except BenchError as e:
            raise BenchError(f"{e}; states seen {seen}" + tail(self.b.logs / "vma.log")) from None

    def nxagent_pid(self) -> int | None:
        try:
            info = self.call("info")
        except (OSError, ValueError, VmaRefused):
            return None
        pid = info.get("nxagent_pid") if isinstance(info, dict) else None
        return int(pid) if isinstance(pid, int) else None

    def wait_xterm(self, timeout: float = 20.0) -> None:
        env = {"PATH": PATH_ENV, "DISPLAY": f":{self.display}"}

        def mapped() -> bool:
            res = subprocess.run(["xdotool", "search", "--onlyvisible", "--class", "xterm"], env=env,
                                 capture_output=True, text=True, timeout=10, check=False)
            return bool(res.stdout.split())

        wait_until("the xterm inside the NX session", mapped, timeout, poll=0.2)

    def stop_session(self) -> None:
        if self.ref.alive() and self.state() not in ("stopped", "?"):
            with contextlib.suppress(OSError, ValueError, VmaRefused):
                self.call("x_stop")
            self.wait_state("stopped", 40)

    def _remove_user(self) -> None:
        try:
            uid: int | None = pwd.getpwnam(self.user).pw_uid
        except KeyError:
            uid = None
        if uid is not None:
            # Only processes of the desktop user we created (all started by our VMA): by pid.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and _uid_of(int(e)) == uid]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if pids:
                    time.sleep(0.5)
            run(["userdel", "-r", self.user], check=False)
            shutil.rmtree(f"/run/user/{uid}", ignore_errors=True)
        with contextlib.suppress(KeyError):
            grp.getgrnam(self.user)
            run(["groupdel", self.user], check=False)
        shutil.rmtree(f"/home/{self.user}", ignore_errors=True)
        lock = Path(f"/tmp/.X{self.display}-lock")
        if lock.exists():
            try:
                owner = int(lock.read_text().strip())
            except (OSError, ValueError):
                owner = 0
            if owner <= 0 or not Path(f"/proc/{owner}").exists():
                lock.unlink(missing_ok=True)
                Path(f"/tmp/.X11-unix/X{self.display}").unlink(missing_ok=True)

    def x_start_params(self, link: str) -> dict[str, str]:
        """What the L7R sends (minus the slave key): the client's options and the user name."""
        return {"qvd.vm.user.name": self.user, "qvd.client.os": "linux", "qvd.client.link": link,
                "qvd.client.geometry": DESKTOP_GEOMETRY, "qvd.client.fullscreen": "",
                "qvd.client.keyboard": KEYBOARD}


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# --- the four kinds of session ---------------------------------------------------------------------


class Session:
    path = ""
    down_is_up = False  # X11: the desktop (xterm) is the relay's client

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.relay: Relay
        self.inner: Relay | None = None
        self.inner_base = (0, 0)  # counts of ``inner`` when this session began
        self.procs: list[ProcRef] = []

    def open(self) -> None:
        raise NotImplementedError

    def focus(self) -> None:
        # No window manager on the client's screen: focus follows the pointer (lab notes).  The desktop
        # window (and the xterm inside it) sits at the top left.
        xdotool(self.b.client_screen().name, "mousemove", "200", "150")
        time.sleep(0.3)

    def check(self) -> None:
        self.b.client_screen()
        for p in self.procs:
            if not p.alive():
                raise BenchError(f"{p.what} exited during the workload" + tail(p.log or Path("/x")))

    def cpu_pids(self) -> dict[str, list[int]]:
        return {}

    def close(self) -> None:
        for p in reversed(self.procs):
            self.b.j.stop(p)


class NxSession(Session):
    def __init__(self, b: Bench, link: str) -> None:
        super().__init__(b)
        self.link = link
        self.vma = b.host_vma()

    def after_attach(self, proxy_owner: ProcRef) -> None:
        self.vma.wait_state("connected", 40)
        self.vma.wait_xterm()
        self.b.wait_painted("the NX desktop", self.b.client_screen().name, [proxy_owner])
        time.sleep(SETTLE)

    def nxproxy_pids(self) -> list[int]:
        return [p for p in descendants(self.procs[0].pid) if _comm(p) == "nxproxy"] if self.procs else []

    def close(self) -> None:
        super().close()
        self.vma.stop_session()


class OursSession(NxSession):
    def __init__(self, b: Bench, link: str) -> None:
        super().__init__(b, link)
        self.path = (f"qvd-client --link {link} -> relay (counts TLS) -> qvd-l7r (TLS) -> relay (counts NX) -> "
                     "nxagent started by the VMA on the host")

    def open(self) -> None:
        b = self.b
        node = b.l7r_node()
        self.relay = Relay(("127.0.0.1", node.l7r_port), name=f"client->L7R ({self.link})",
                           tls_records=True).start(b.j)
        self.inner = b.agent_relay
        self.inner_base = b.agent_relay.counts()
        display = b.client_screen().name
        env = x_env(display, b.home)
        argv = [*qvd_command("qvd-client"), "--host", "127.0.0.1", "--port", str(self.relay.port),
                "--user", self.vma.user, "--password", b.password, "--vm", str(b.vm_id), "--insecure",
                "--link", self.link, "--geometry", DESKTOP_GEOMETRY, "--keyboard", KEYBOARD,
                "--known-hosts", str(b.work / "known_hosts.json"),
                "--nxproxy-log", str(b.logs / f"nxproxy-ours-{self.link}-{b.run_no}.log")]
        # SIGINT first: qvd-client then stops its nxproxy itself.
        client = b.j.spawn(argv, env=env, log=b.logs / f"qvd-client-{self.link}-{b.run_no}.log",
                           what=f"qvd-client ({self.link})", first_signal=signal.SIGINT, stop_timeout=10)
        self.procs.append(client)
        self.after_attach(client)
        opts = (self.vma.state_dir / "nxagent.conf").read_text().strip()
        if f"link={self.link}" not in opts:
            raise BenchError(f"nxagent options do not have link={self.link}: {opts}")

    def cpu_pids(self) -> dict[str, list[int]]:
        nxagent = self.vma.nxagent_pid()
        node = self.b.node
        return {"nxagent": [nxagent] if nxagent else [],
                "qvd-l7r": [node.l7r.pid] if node and node.l7r else [],
                "nxproxy": self.nxproxy_pids(), "qvd-client": [self.procs[0].pid]}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.relay.stop()


class BareNxSession(NxSession):
    def __init__(self, b: Bench, link: str) -> None:
        super().__init__(b, link)
        self.path = (f"nxproxy -S -> relay (counts NX) -> nxagent started by the VMA (x_start link={link}, "
                     "called directly)")

    def open(self) -> None:
        b = self.b
        self.relay = Relay(("127.0.0.1", self.vma.nx_port), name=f"nxproxy->nxagent ({self.link})").start(b.j)
        self.vma.call("x_start", self.vma.x_start_params(self.link))
        self.vma.wait_state("listening", 40)
        env = {**x_env(b.client_screen().name, b.home), "NX_CLIENT": "/bin/false"}
        spec = f"nx/nx,connect=127.0.0.1,port={self.relay.port}:{self.vma.display}"
        proxy = b.j.spawn(["nxproxy", "-S", spec], env=env, log=b.logs / f"nxproxy-bare-{self.link}-{b.run_no}.log",
                          what=f"nxproxy ({self.link})")
        self.procs.append(proxy)
        self.after_attach(proxy)

    def nxproxy_pids(self) -> list[int]:
        return [self.procs[0].pid] if self.procs else []

    def cpu_pids(self) -> dict[str, list[int]]:
        nxagent = self.vma.nxagent_pid()
        return {"nxagent": [nxagent] if nxagent else [], "nxproxy": self.nxproxy_pids()}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.relay.stop()


class VncSession(Session):
    path = ("xterm on Xvfb 960x600 <- x11vnc -> relay (counts RFB) -> xtigervncviewer -SecurityTypes None "
            "(automatic encoding) on the client's screen")

    def open(self) -> None:
        b = self.b
        self.server = Xvfb(b.j, b.logs, "vnc-server", screen=f"{DESKTOP_GEOMETRY}x24")
        xterm = b.j.spawn(XTERM, env=x_env(self.server.name, b.home), log=b.logs / "xterm-vnc.log",
                          what="xterm (VNC desktop)", cwd=b.typing)
        self.procs.append(xterm)
        xdotool(self.server.name, "search", "--sync", "--onlyvisible", "--class", "xterm")
        port = free_port()
        self.x11vnc = b.j.spawn(["x11vnc", "-display", self.server.name, "-rfbport", str(port), "-localhost",
                                 "-forever", "-shared", "-nopw", "-noxdamage"],
                                env={"PATH": PATH_ENV, "HOME": str(b.home)}, log=b.logs / "x11vnc.log",
                                what="x11vnc")
        self.procs.append(self.x11vnc)
        wait_until("x11vnc to listen", lambda: not port_free(port) or not self.x11vnc.alive(), 20)
        self.relay = Relay(("127.0.0.1", port), name="viewer->x11vnc").start(b.j)
        display = b.client_screen().name
        self.viewer = b.j.spawn(["xtigervncviewer", "-SecurityTypes", "None", f"127.0.0.1::{self.relay.port}"],
                                env=x_env(display, b.home), log=b.logs / "viewer.log", what="xtigervncviewer")
        self.procs.append(self.viewer)
        b.wait_painted("the VNC viewer", display, [self.viewer, self.x11vnc])
        time.sleep(SETTLE)

    def focus(self) -> None:
        display = self.b.client_screen().name
        wins = xdotool(display, "search", "--onlyvisible", "--pid", str(self.viewer.pid), check=False).split()
        if not wins:
            wins = xdotool(display, "search", "--onlyvisible", "--name", "TigerVNC", check=False).split()
        super().focus()
        if wins:
            xdotool(display, "windowfocus", "--sync", wins[-1], check=False)  # the viewer needs the focus too
        time.sleep(0.3)

    def cpu_pids(self) -> dict[str, list[int]]:
        return {"x11vnc": [self.x11vnc.pid], "xtigervncviewer": [self.viewer.pid], "xterm": [self.procs[0].pid]}

    def close(self) -> None:
        try:
            super().close()
            self.relay.stop()
        finally:
            self.server.stop()


class X11Session(Session):
    path = "xterm with DISPLAY=127.0.0.1:N -> relay on TCP 6000+N (counts X11) -> the client's Xvfb unix socket"
    down_is_up = True

    def open(self) -> None:
        b = self.b
        display = b.client_screen()
        n = next((n for n in range(60, 160) if port_free(6000 + n) and display_free(n)), None)
        if n is None:
            raise BenchError("no free TCP port 6060-6159 for the X11 relay")
        self.relay = Relay(f"/tmp/.X11-unix/X{display.display}", port=6000 + n, name="xterm->X server").start(b.j)
        xterm = b.j.spawn(XTERM, env=x_env(f"127.0.0.1:{n}", b.home), log=b.logs / "xterm-x11.log",
                          what="xterm (X11)", cwd=b.typing)
        self.procs.append(xterm)
        b.wait_painted("the xterm", display.name, [xterm])
        time.sleep(SETTLE)

    def cpu_pids(self) -> dict[str, list[int]]:
        client = self.b.client
        return {"xterm": [self.procs[0].pid], "Xvfb": [client.ref.pid] if client else []}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.relay.stop()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --- report --------------------------------------------------------------------------------------

LABELS = {
    "ours-adsl": "ours, link=adsl (TLS bytes at the L7R port)",
    "bare-adsl": "bare NX, link=adsl",
    "ours-lan": "ours, link=lan (TLS bytes at the L7R port)",
    "bare-lan": "bare NX, link=lan",
    "vnc": "VNC: x11vnc + TigerVNC viewer",
    "x11": "plain X11 over TCP",
}


def report(result: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"QVD bandwidth benchmark: {result['chars']} characters typed at --delay {result['delay_ms']} ms, then "
        f"{result['lines']} lines of listing; counted from the first key to {TAIL_WAIT:g} s after the listing")
    add(f"machine: {result['machine']}")
    add(f"desktop: {result['desktop']}")
    for n in result["notes"]:
        add(f"note: {n}")
    add("")
    add(f"{'protocol':<46} {'KiB down':>9} {'KiB up':>8} {'seconds':>8} {'kbit/s':>8} {'kbit/s dn':>9} "
        f"{'setup KiB dn/up':>16}  CPU s")
    for m in result["runs"]:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in m["cpu_s"].items())
        add(f"{LABELS.get(m['protocol'], m['protocol']):<46} {m['kib_down']:9.1f} {m['kib_up']:8.1f} "
            f"{m['seconds']:8.1f} {m['kbps_total']:8.1f} {m['kbps_down']:9.1f} "
            f"{m['setup_kib_down']:7.1f} / {m['setup_kib_up']:<6.1f}  {cpu}")
        if m["inner"]:
            i = m["inner"]
            add(f"{'  same run, NX bytes between L7R and nxagent':<46} {i['kib_down']:9.1f} {i['kib_up']:8.1f} "
                f"{'':>8} {i['kbps_total']:8.1f} {'':>9} {i['setup_kib_down']:7.1f} / {i['setup_kib_up']:<6.1f}")
        if m["tls_records"]:
            r = m["tls_records"]
            add(f"    TLS records in the window: {r['up']} up / {r['down']} down; NX bytes per record "
                f"{r['nx_bytes_per_record_up']:.1f} up / {r['nx_bytes_per_record_down']:.1f} down; TLS bytes "
                f"added per record {r['overhead_bytes_per_record_up']:.1f} up / "
                f"{r['overhead_bytes_per_record_down']:.1f} down")
    add("typing rate (keys/s, xdotool): " + ", ".join(
        f"{m['protocol']} {m['keys_typed'] / m['typing_s']:.1f}" for m in result["runs"] if m["typing_s"]))
    add("")
    add("Ratios (kbit/s total of the counted window):")
    for name, value in result["ratios"].items():
        add(f"  {name:<58} {fmt_ratio(value)}")
    add("")
    add("Hand-measured in the lab notes (same workload): NX adsl ~40 kbit/s, NX lan ~325, TigerVNC ~139, "
        "plain X11 ~302.")
    return "\n".join(lines)


def ratios(runs: dict[str, Measure]) -> dict[str, float | None]:
    def total(p: str) -> float | None:
        return runs[p].kbps_total if p in runs else None

    def inner(p: str) -> float | None:
        return runs[p].inner.get("kbps_total") if p in runs and runs[p].inner else None

    return {
        "ours-adsl / bare-NX-adsl (TLS at L7R port vs NX)": ratio(total("ours-adsl"), total("bare-adsl")),
        "ours-adsl inside the tunnel / bare-NX-adsl (NX vs NX)": ratio(inner("ours-adsl"), total("bare-adsl")),
        "ours-adsl / VNC (TigerVNC)": ratio(total("ours-adsl"), total("vnc")),
        "ours-adsl / plain X11": ratio(total("ours-adsl"), total("x11")),
        "ours-lan / bare-NX-lan (TLS at L7R port vs NX)": ratio(total("ours-lan"), total("bare-lan")),
        "ours-lan inside the tunnel / bare-NX-lan (NX vs NX)": ratio(inner("ours-lan"), total("bare-lan")),
    }


def body(args: argparse.Namespace, janitor: Janitor, work: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("run as root (the VMA provisions a desktop user and runs nxagent as that user)")
    need_tools("Xvfb", "xdpyinfo", "xdotool", "xwd", "xterm", "nxagent", "nxproxy", "x11vnc", "xtigervncviewer",
               "useradd", "userdel")
    b = Bench(args, janitor, work)
    runs: dict[str, Measure] = {}
    for protocol in args.only:
        runs[protocol] = b.measure(protocol)
    notes = [
        "ours: qvd-l7r, qvd-vma and qvd-client are the real programs; the desktop (VMA + nxagent + xterm) runs "
        "on this host, not in an LXC container; the node daemon is played by this script",
        "ours: the figures are TLS bytes counted in front of the L7R port (TLS record overhead included); the "
        "indented line is the same run counted between the L7R and nxagent (what bare NX is compared with)",
        "set-up bytes (before the first key) are not in the counted window; for ours they include the TLS "
        "handshake and the QVD/1.0 HTTP exchange",
        "the typed file was compared with the text after every run: all equal",
        "VNC's bytes depend on how many frames x11vnc polls while the listing scrolls (machine load): they vary "
        "from run to run much more than NX's or X11's",
    ]
    return {
        "chars": args.chars, "lines": args.lines, "delay_ms": args.delay_ms, "machine": machine_line(),
        "desktop": f"xterm ({' '.join(XTERM[1:])}); NX desktop and VNC screen {DESKTOP_GEOMETRY}; client screen "
                   f"Xvfb {CLIENT_SCREEN}",
        "notes": notes, "runs": [asdict(m) for m in runs.values()], "ratios": ratios(runs),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.bandwidth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PROTOCOLS),
                   help=f"comma-separated protocols to run, in this order (default: all: {','.join(PROTOCOLS)})")
    p.add_argument("--chars", type=int, default=2000, help="characters typed (default 2000)")
    p.add_argument("--lines", type=int, default=3000, help="lines of the ls -lR listing (default 3000)")
    p.add_argument("--delay-ms", type=int, default=40,
                   help="xdotool type --delay (default 40 = about 47 characters per second)")
    add_common_args(p)
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.only if x not in PROTOCOLS]
    if bad or not args.only:
        p.error(f"--only: unknown protocol(s) {', '.join(bad)}; choose from {', '.join(PROTOCOLS)}")
    if not 2 <= args.chars <= 100_000 or not 1 <= args.lines <= 1_000_000 or not 1 <= args.delay_ms <= 1000:
        p.error("--chars 2-100000, --lines 1-1000000, --delay-ms 1-1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bandwidth", args, lambda j, w: body(args, j, w), report)


if __name__ == "__main__":
    sys.exit(main())
