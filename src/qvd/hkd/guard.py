"""The node's fence guard: a dead man's switch that stops the desktops of a dead node daemon.

    python -m qvd.hkd.guard [--root R] [--detach]

Why: peers declare a node lost when its heartbeat is older than
``internal.hkd.cluster.node.timeout`` and restart its desktops elsewhere.  A live HKD
that cannot write its heartbeat fences itself (:meth:`qvd.hkd.daemon.NodeDaemon._fence`),
but an HKD that died (SIGKILL, crash) leaves its LXC containers running: the same
desktop would run on two nodes.  The guard is a small separate process that outlives
the HKD and stops those containers, without the database (it works with the network cut).

Files under ``$QVD_ROOT/run``::

    hkd.lock          the HKD's flock; holds its pid (read here, never locked here: a new
                      HKD must be able to start at any moment)
    hkd.heartbeat     rewritten by the HKD after each heartbeat written to the database
                      (mtime = last good heartbeat; JSON: pid and the HKD's effective
                      vm.*/internal.vm.*/internal.hkd.* values); removed by a clean stop
                      that left no desktop
    hkd-guard.lock    flock of the guard (one per root); holds its pid

Decision, once a second:

* a live process holds ``hkd.lock`` open (the pid it names, not a zombie): do nothing,
  the HKD fences itself when it cannot heartbeat;
* no live HKD and no desktop on the node: nothing to guard, exit (a new HKD starts a
  new guard);
* no live HKD and desktops: once the last heartbeat is older than
  ``internal.hkd.agent.ticker.timeout`` + 1 s (the HKD's own value, from the heartbeat
  file; without a heartbeat file, counted from when the guard saw the HKD gone), stop
  and clean every desktop through the backend (``list_desktops``, ``stop``, ``cleanup``,
  as the HKD's self-fencing does), re-checking before each desktop that no HKD came
  back.  A desktop that cannot be stopped is retried the next second.

An HKD restarted within that time takes ``hkd.lock`` at its first start step, so the
guard leaves the desktops alone and the new HKD adopts them.

The HKD starts the guard right after taking its lock (:func:`ensure_guard`): ``--detach``
takes the guard lock (or reports the guard already holding it), forks the guard into a
new session, parented to init, and returns.  The guard thus shares the HKD's network
namespace, which LXC needs: ``lxc-stop``/``lxc-info`` reach a container through an
abstract unix socket, scoped by network namespace.  It logs to
``$QVD_ROOT/log/hkd-guard.log``.  SIGTERM/SIGINT stop it (a second one also interrupts
a stop in progress); any other error is logged and it looks again a second later.  It
never imports :mod:`qvd.db`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from qvd.backends import netsetup
from qvd.backends.base import Backend, backend_class
from qvd.core.config import KEYS, Config, Paths, load_node_config, resolve_root
from qvd.core.errors import BackendError, InvalidState, QvdError, short_message

PROG = "qvd-hkd-guard"
HKD_LOCK = "hkd.lock"
HEARTBEAT = "hkd.heartbeat"
GUARD_LOCK = "hkd-guard.lock"
LOG_FILE = "hkd-guard.log"
TIMEOUT_KEY = "internal.hkd.agent.ticker.timeout"
#: Added to the ticker timeout: the HKD rewrites the file only after its database write.
MARGIN = 1.0
POLL = 1.0
#: Keys the HKD copies into the heartbeat file (no secrets among them).
_SHARED_PREFIXES = ("vm.", "internal.vm.", "internal.hkd.")
_SPAWN_TIMEOUT = 30.0

log = logging.getLogger(__name__)


# --- the heartbeat file (written by the HKD) ---------------------------------------------------


class HeartbeatFile:
    """``run/hkd.heartbeat`` as the HKD writes it.  Failures are logged, never raised:
    a node whose heartbeat reached the database must not fence because of a local file."""

    def __init__(self, run_dir: Path, logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log) -> None:
        self.path = run_dir / HEARTBEAT
        self.log = logger
        self._failing = False

    def touch(self, pid: int, cfg: Config) -> None:
        shared = {k: v for k, v in cfg.values.items() if k.startswith(_SHARED_PREFIXES) and not KEYS[k].node_only}
        tmp = self.path.with_name(f".{HEARTBEAT}.{pid}.tmp")
        try:
            tmp.write_text(json.dumps({"pid": pid, "config": shared}, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            if not self._failing:
                self.log.error("cannot write %s (the fence guard will take the node daemon for dead): %s",
                               self.path, short_message(e))
            self._failing = True
            return
        if self._failing:
            self.log.warning("%s written again", self.path)
            self._failing = False

    def remove(self) -> None:
        """After a clean stop that left no desktop."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            self.log.error("cannot remove %s: %s", self.path, short_message(e))


@dataclass(frozen=True)
class Heartbeat:
    mtime: float  # wall clock
    pid: int | None
    config: dict[str, object]


def read_heartbeat(run_dir: Path) -> Heartbeat | None:
    """The last heartbeat the HKD recorded; None when the file is absent (clean stop)."""
    path = run_dir / HEARTBEAT
    try:
        mtime = path.stat().st_mtime
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read %s: %s", path, short_message(e))
        return Heartbeat(mtime=0.0, pid=None, config={})  # unreadable: as old as can be
    try:
        data = json.loads(raw)
        pid = data.get("pid")
        config = data.get("config")
    except (ValueError, AttributeError):
        return Heartbeat(mtime=mtime, pid=None, config={})
    return Heartbeat(mtime=mtime, pid=pid if isinstance(pid, int) else None,
                     config=config if isinstance(config, dict) else {})


# --- is a node daemon alive? -------------------------------------------------------------------


def _proc_state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    return next((ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")), "")


def holds_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` lives (not a zombie) and has ``path`` open."""
    if _proc_state(pid) in ("", "Z", "X"):
        return False
    try:
        target = path.stat()
    except OSError:
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except PermissionError:
        # Its descriptors are hidden from us: fall back to its command line.
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return "hkd" in cmd and "guard" not in cmd
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            st = fd.stat()  # follows the descriptor to its file
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                return True
    return False


def live_hkd(run_dir: Path) -> int | None:
    """The pid of the live node daemon holding ``run/hkd.lock``, or None."""
    lock = run_dir / HKD_LOCK
    try:
        raw = lock.read_text().strip()
    except OSError:
        return None
    if not raw.isdigit():
        return None
    pid = int(raw)
    return pid if holds_open(pid, lock) else None


# --- the guard ---------------------------------------------------------------------------------


def _default_backend(root: Path, cfg: Config) -> Backend:
    return backend_class(cfg.get_str("vm.hypervisor"))(root, cfg)


class Guard:
    """The decision loop.  ``hkd_alive``, ``make_backend`` and the clocks are injectable for tests."""

    def __init__(self, root: Path, *, hkd_alive: Callable[[], int | None] | None = None,
                 make_backend: Callable[[Path, Config], Backend] = _default_backend,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 poll: float = POLL) -> None:
        self.root = root
        self.run_dir = Paths(root).run
        self.hkd_alive = hkd_alive or (lambda: live_hkd(self.run_dir))
        self.make_backend = make_backend
        self.wall = wall
        self.mono = mono
        self.poll = poll
        self.stopping = asyncio.Event()
        self.fenced: list[int] = []  # vm_ids this guard stopped (for tests and the final log line)
        self._lock_fd: int | None = None
        self._hkd: int | None = None
        self._dead_since: float | None = None
        self._announced = False
        self._last_error = ""

    # --- the lock ----------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take ``run/hkd-guard.lock``; False when another guard holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.run_dir / GUARD_LOCK)
        if fd is None:
            return False
        self._lock_fd = fd
        self.write_pid()
        return True

    def write_pid(self) -> None:
        """Record this process as the guard (again after a fork)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Pre: :meth:`acquire` succeeded.  Watch until nothing is left to guard or stopped."""
        try:
            while not self.stopping.is_set():
                try:
                    more = await self.tick()
                except Exception:  # a watchdog must not die of a surprise: log it, look again
                    log.exception("unexpected error; looking again in %g s", self.poll)
                    more = True
                if not more:
                    # Leave, unless an HKD started meanwhile and found our lock still taken.
                    self.release()
                    if self.hkd_alive() is None:
                        log.info("no node daemon and no desktop on this node: nothing to guard, exiting")
                        return
                    if not self.acquire():
                        log.info("a node daemon started with another guard: exiting")
                        return
                    log.info("a node daemon started while this guard was leaving: watching it")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.poll)
            log.info("guard stopped")
        finally:
            self.release()

    async def tick(self) -> bool:
        """One look at the node; False when there is nothing left to guard."""
        pid = self.hkd_alive()
        if pid is not None:
            if pid != self._hkd:
                log.info("node daemon pid %d holds %s: watching", pid, self.run_dir / HKD_LOCK)
            self._hkd, self._dead_since = pid, None
            return True
        now = self.mono()
        if self._dead_since is None:
            self._dead_since = now
            self.fenced = []
            self._announced = False
            if self._hkd is not None:
                log.warning("node daemon pid %d is gone", self._hkd)
            self._hkd = None
        hb = read_heartbeat(self.run_dir)
        cfg = self._config(hb)
        limit = cfg.get_float(TIMEOUT_KEY) + MARGIN
        dead_for = now - self._dead_since
        age = dead_for if hb is None else max(self.wall() - hb.mtime, dead_for)
        try:
            backend = self.make_backend(self.root, cfg)
            desktops = await backend.list_desktops()
        except (QvdError, OSError) as e:
            self._error(f"cannot list the node's desktops: {short_message(e)}")
            return True
        if not desktops:
            if self.fenced:
                log.warning("stopped %d desktop(s) of the dead node daemon: %s", len(self.fenced),
                            ", ".join(str(i) for i in self.fenced))
            return False
        if age <= limit:
            return True
        if not self._announced:
            if hb is None:
                why = (f"no node daemon has run for {age:.0f} s and none left a heartbeat "
                       f"({TIMEOUT_KEY} = {limit - MARGIN:g} + {MARGIN:g} s)")
            else:
                why = (f"the node daemon died and did not come back within {limit:g} s "
                       f"(last heartbeat {age:.0f} s ago, {TIMEOUT_KEY} = {limit - MARGIN:g} + {MARGIN:g} s)")
            log.error("%s: stopping its %d desktop(s) so that peers can restart them", why, len(desktops))
            self._announced = True
        for d in desktops:
            if self.stopping.is_set():
                return True
            back = self.hkd_alive()
            if back is not None:
                log.warning("node daemon pid %d came back: leaving the remaining desktops to it", back)
                return True
            try:
                await backend.stop(d.vm_id)
                await backend.cleanup(d.vm_id)
            except Exception as e:  # any failure: retry at the next look
                log.error("vm_id=%d: cannot stop the desktop (retrying in %g s): %s", d.vm_id, self.poll,
                          short_message(e))
                continue
            self.fenced.append(d.vm_id)
            log.warning("vm_id=%d: desktop stopped by the fence guard", d.vm_id)
        return True

    def _config(self, hb: Heartbeat | None) -> Config:
        """The node file under the HKD's own values (heartbeat file); defaults if unreadable."""
        try:
            cfg = load_node_config(self.root)
        except QvdError as e:
            self._error(f"node file unusable, using the defaults: {e.message}")
            cfg = Config()
        if hb is not None and hb.config:
            try:
                cfg = cfg.overlay(hb.config, source="heartbeat file")
            except QvdError as e:
                self._error(f"ignoring the configuration of {self.run_dir / HEARTBEAT}: {e.message}")
        return cfg

    def _error(self, msg: str) -> None:
        if msg != self._last_error:
            log.error("%s", msg)
        self._last_error = msg


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def guard_pid(run_dir: Path) -> int | None:
    """The pid written in ``run/hkd-guard.lock`` (whether or not it still runs)."""
    try:
        raw = (run_dir / GUARD_LOCK).read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


# --- started by the HKD ------------------------------------------------------------------------


async def ensure_guard(paths: Paths) -> str:
    """Make sure a guard runs for ``paths.root`` (started from this process, so in its network
    namespace).  Returns what happened, for the log; raises InvalidState if it cannot start."""
    paths.log.mkdir(parents=True, exist_ok=True)
    try:
        res = await netsetup.run([sys.executable, "-m", "qvd.hkd.guard", "--root", str(paths.root), "--detach"],
                                 timeout=_SPAWN_TIMEOUT, check=False)
    except BackendError as e:
        raise InvalidState(f"cannot start the fence guard: {e.message}") from None
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or [f"exit status {res.returncode}"]
        raise InvalidState(f"cannot start the fence guard: {lines[-1]}")
    return res.stdout.strip() or "fence guard started"


# --- the command -------------------------------------------------------------------------------


def _setup_logging(stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {PROG}[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _open_log(paths: Paths) -> int:
    paths.log.mkdir(parents=True, exist_ok=True)
    return os.open(paths.log / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _redirect_to_log(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)


async def _serve(guard: Guard) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal(name: str) -> None:
        if guard.stopping.is_set() and task is not None:
            task.cancel()  # asked twice: interrupt a stop in progress
            return
        log.info("%s: stopping", name)
        guard.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    with contextlib.suppress(asyncio.CancelledError):
        await guard.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Fence guard of a QVD node: stops the node's desktops "
                                "when its node daemon (qvd-hkd) died and did not come back in time.")
    p.add_argument("--root", help="node state directory (default: $QVD_ROOT or /var/lib/qvd)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background, logging to $QVD_ROOT/log/hkd-guard.log (how qvd-hkd starts it)")
    args = p.parse_args(argv)
    paths = Paths(resolve_root(args.root))
    guard = Guard(paths.root)
    try:
        if not guard.acquire():
            print(f"fence guard already running (pid {guard_pid(paths.run)})", flush=True)
            return 0
    except OSError as e:
        print(f"{PROG}: error: cannot lock {paths.run / GUARD_LOCK}: {e.strerror}", file=sys.stderr)
        return 1
    if args.detach:
        try:
            log_fd = _open_log(paths)
        except OSError as e:
            print(f"{PROG}: error: cannot open {paths.log / LOG_FILE}: {e.strerror}", file=sys.stderr)
            return 1
        pid = os.fork()
        if pid:
            # The child shares the locked open file: the lock stays held by it alone.
            guard.release()
            print(f"fence guard started (pid {pid})", flush=True)
            os._exit(0)
        os.setsid()
        os.chdir("/")  # pin no directory of whoever started us
        guard.write_pid()
        _redirect_to_log(log_fd)
    _setup_logging(sys.stderr)
    import qvd.backends.available  # noqa: F401  (now, not when the code on disk may be mid-upgrade)

    log.info("watching the node daemon of %s", paths.root)
    asyncio.run(_serve(guard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
