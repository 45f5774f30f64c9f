"""Every process the VMA starts, signals or reaps goes through this module.

Why one place:

* the VMA runs as root and starts programs as the desktop user; all of it is
  here so it can be reviewed at a glance (argv lists only, never a shell);
* the VMA may be PID 1 of a container (no ``tini``), and then it must reap
  orphans.  A blanket ``waitpid(-1)`` would steal the exit status of a hook
  that :func:`run` is waiting for and turn a failure into a success, so spawning
  and reaping share one lock and the reaper only collects zombies nobody else
  owns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from qvd.core.errors import BackendError

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: children whose exit status somebody will collect (a waiting run(), a session handle)
_owned: dict[int, subprocess.Popen[bytes]] = {}
#: fire-and-forget children (state hooks, xrefresh, secondary desktop clients): polled by reap()
_detached: dict[int, subprocess.Popen[bytes]] = {}

StdStream = int | IO[bytes] | None


@dataclass(frozen=True)
class RunAs:
    """Credentials and working directory of a child started for the desktop user."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: Path


@dataclass(frozen=True)
class RunResult:
    returncode: int
    output: str


class ProcHandle(Protocol):
    """A process the session watches (nxagent, the desktop session leader)."""

    @property
    def pid(self) -> int: ...

    @property
    def start_time(self) -> int | None: ...

    def alive(self) -> bool: ...

    def send(self, sig: int) -> None: ...

    def send_group(self, sig: int) -> None: ...


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; ``None`` otherwise.

    Together with the pid it identifies a process across a VMA restart, so a
    recycled pid is never mistaken for the old nxagent.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; the rest follows the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def proc_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _kill(pid: int, sig: int, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as e:  # a recycled pid of somebody else: never escalate
        log.warning("cannot signal %s %d: %s", "group" if group else "pid", pid, e)


class ChildHandle:
    """A child of this VMA process, started with its own session (pgid == pid)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._start_time = proc_start_time(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def start_time(self) -> int | None:
        return self._start_time

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def alive(self) -> bool:
        if self._popen.poll() is None:
            return True
        with _lock:
            _owned.pop(self._popen.pid, None)
        return False

    def send(self, sig: int) -> None:
        # poll() first: once the child is reaped its pid may belong to someone else.
        if self.alive():
            _kill(self.pid, sig)

    def send_group(self, sig: int) -> None:
        _kill(self.pid, sig, group=True)


class AdoptedHandle:
    """A process started by a previous VMA instance (now a child of PID 1)."""

    def __init__(self, pid: int, start_time: int) -> None:
        self._pid = pid
        self._start_time = start_time

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def start_time(self) -> int | None:
        return self._start_time

    def alive(self) -> bool:
        return proc_start_time(self._pid) == self._start_time

    def send(self, sig: int) -> None:
        if self.alive():
            _kill(self._pid, sig)

    def send_group(self, sig: int) -> None:
        if self.alive():
            _kill(self._pid, sig, group=True)


def adopt(pid: int, start_time: int | None, *, name: str | None = None) -> AdoptedHandle | None:
    """Re-attach to a process recorded in a state file, if it is still that process."""
    now = proc_start_time(pid)
    if now is None or (start_time is not None and now != start_time):
        return None
    if name is not None and proc_name(pid) != name:
        return None
    return AdoptedHandle(pid, now)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    run_as: RunAs | None = None,
    stdout: StdStream = subprocess.DEVNULL,
    stderr: StdStream = subprocess.DEVNULL,
    detached: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (so it survives a VMA restart and can be killed as a group).

    With ``run_as`` the child drops to the user's uid, gid and groups after
    fork (``Popen(user=, group=, extra_groups=)``: no ``preexec_fn``, which is
    unsafe in a threaded process) and starts in the user's home.
    ``detached`` children are reaped by :func:`reap`; the others belong to the caller.
    Raises ``OSError`` when the program cannot be executed.
    """
    with _lock:
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=str(run_as.home) if run_as else None,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=list(run_as.groups) if run_as else None,
            umask=0o022 if run_as else -1,
            start_new_session=True,
            close_fds=True,
        )
        (_detached if detached else _owned)[p.pid] = p
    return p


def start_watched(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    run_as: RunAs | None = None,
    stdout: StdStream = subprocess.DEVNULL,
    stderr: StdStream = subprocess.DEVNULL,
) -> ChildHandle:
    return ChildHandle(spawn(argv, env=env, run_as=run_as, stdout=stdout, stderr=stderr))


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | None = None,
) -> RunResult:
    """Run ``argv`` to completion as root.

    Output goes to ``output`` if given (the hooks log), otherwise it is captured
    and returned.  On timeout the whole process group is killed and
    :class:`BackendError` raised; so is a program that cannot be executed.
    """
    try:
        p = spawn(
            argv,
            env=env,
            stdout=output if output is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except OSError as e:
        raise BackendError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(p.pid, signal.SIGKILL, group=True)
        p.communicate()
        raise BackendError(f"{argv[0]} did not finish within {timeout:g} s") from None
    finally:
        with _lock:
            _owned.pop(p.pid, None)
    return RunResult(p.returncode, (out or b"").decode("utf-8", "replace"))


def reap() -> None:
    """Collect finished detached children, and orphans when this process is PID 1."""
    with _lock:
        for pid, p in list(_detached.items()):
            if p.poll() is not None:
                del _detached[pid]
        if os.getpid() == 1:
            _reap_orphans()


def _reap_orphans() -> None:
    """Wait for zombie children that no Popen owns (orphans re-parented to PID 1).  Lock held."""
    me = os.getpid()
    known = set(_owned) | set(_detached)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in known:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
