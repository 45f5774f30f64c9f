"""NX session states, the mapping to the X states the broker sees, and nxagent log parsing.

nxagent reports its life cycle on stderr with lines such as::

    Info: Agent running with pid '6025'.
    Session: Starting session at 'Wed Nov 25 22:20:23 2026'.
    Session: Session started at 'Wed Nov 25 22:20:30 2026'.

``Session: <Verb> session ...`` announces a transition in progress (starting,
suspending, resuming, terminating, aborting) and ``Session: Session <verb> at``
its end (started, suspended, resumed, terminated, aborted).  Anything else
(``Session: Display failure detected at``, ``Info:``, ``Warning:``) is ignored.

Signal behaviour of nxagent 3.5.99.26 (Debian 12), measured for this module:

==========================  ===========================  ==============================
NX state                    SIGHUP                       SIGTERM
==========================  ===========================  ==============================
starting (never attached)   session aborted              session aborted
started / resumed           suspending -> suspended      terminating -> terminated
suspended                   resuming (listens again)     terminating -> terminated
resuming (nobody attached)  back to suspended            back to suspended (!)
==========================  ===========================  ==============================

The last row is why a stop request re-sends SIGTERM once the session reports
``suspended`` (see :mod:`qvd.vma.session`).

The log is secret: with NX cookies it would print the expected cookie, and it
carries the user's session details.  It is read here and never served.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class NxState(enum.StrEnum):
    """What nxagent (or the VMA around it) is doing."""

    STOPPED = "stopped"
    INITIATING = "initiating"  # VMA accepted x_start, nxagent not yet reporting
    PROVISIONING = "provisioning"  # VMA creating the user
    STARTING = "starting"
    STARTED = "started"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    RESUMED = "resumed"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    ABORTING = "aborting"
    ABORTED = "aborted"


class XState(enum.StrEnum):
    """The session state exported by ``x_state`` (what the L7R acts on)."""

    STOPPED = "stopped"
    STARTING = "starting"
    PROVISIONING = "provisioning"
    LISTENING = "listening"
    CONNECTED = "connected"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    STOPPING = "stopping"


X_OF_NX: Mapping[NxState, XState] = {
    NxState.STOPPED: XState.STOPPED,
    NxState.TERMINATED: XState.STOPPED,
    NxState.ABORTED: XState.STOPPED,
    NxState.INITIATING: XState.STARTING,
    NxState.PROVISIONING: XState.PROVISIONING,
    NxState.STARTING: XState.LISTENING,
    NxState.RESUMING: XState.LISTENING,
    NxState.STARTED: XState.CONNECTED,
    NxState.RESUMED: XState.CONNECTED,
    NxState.SUSPENDING: XState.SUSPENDING,
    NxState.SUSPENDED: XState.SUSPENDED,
    NxState.TERMINATING: XState.STOPPING,
    NxState.ABORTING: XState.STOPPING,
}

#: NX states after which nxagent exits.
FINAL_NX_STATES = frozenset({NxState.STOPPED, NxState.TERMINATED, NxState.ABORTED})


def x_state_of(nx: NxState | None) -> XState:
    """The exported X state of an NX state; no state at all means ``stopped``."""
    return XState.STOPPED if nx is None else X_OF_NX[nx]


_IN_PROGRESS = re.compile(r"^Session: (Starting|Suspending|Resuming|Terminating|Aborting) session\b")
_DONE = re.compile(r"^Session: Session (started|suspended|resumed|terminated|aborted) at\b")
_PID = re.compile(r"^Info: Agent running with pid '(\d+)'")
_WAITING = re.compile(r"^Info: Waiting for connection from ")


@dataclass(frozen=True)
class NxEvent:
    """One meaningful nxagent log line: a new state or the agent's pid."""

    state: NxState | None = None
    pid: int | None = None
    #: "Info: Waiting for connection from ...": the agent's listening socket is open now
    waiting: bool = False


def parse_line(line: str) -> NxEvent | None:
    """Parse one nxagent output line; ``None`` for the many lines that do not matter."""
    line = line.rstrip("\r\n")
    m = _IN_PROGRESS.match(line) or _DONE.match(line)
    if m:
        return NxEvent(state=NxState(m.group(1).lower()))
    m = _PID.match(line)
    if m:
        return NxEvent(pid=int(m.group(1)))
    if _WAITING.match(line):
        return NxEvent(waiting=True)
    return None


class LogFollower:
    """Reads the lines nxagent appends to its log file, like ``tail -f``.

    nxagent writes straight into the file (not into a pipe to the VMA), so it
    survives a VMA restart and a restarted VMA can re-read the whole history.
    Partial lines are kept until their newline arrives; absurdly long lines are
    cut so a misbehaving agent cannot make the VMA hold unbounded memory.
    """

    MAX_LINE = 64 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._buf = b""

    def _open(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
        return self._fd

    def read_lines(self) -> list[str]:
        """Complete lines appended since the last call (all of them on the first call)."""
        fd = self._open()
        if fd is None:
            return []
        chunks = [self._buf]
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        buf = b"".join(chunks)
        *lines, rest = buf.split(b"\n")
        if len(rest) > self.MAX_LINE:
            lines.append(rest[: self.MAX_LINE])
            rest = b""
        self._buf = rest
        return [ln[: self.MAX_LINE].decode("utf-8", "replace") for ln in lines]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = b""
