"""nxagent log parsing, the NX -> X state table and the log follower."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvd.vma.nx import X_OF_NX, LogFollower, NxEvent, NxState, XState, parse_line, x_state_of

# Lines as nxagent 3.5.99.26 prints them (captured on this machine).
REAL_LOG = """\
NXAGENT - Version 3.5.99.26
Info: Agent running with pid '6025'.
Session: Starting session at 'Wed Nov 25 22:20:23 2026'.
Info: Waiting for connection from any host on socket 'tcp:*:4177'.
Info: Accepted connection from '192.0.2.2'.
Session: Session started at 'Wed Nov 25 22:20:30 2026'.
Session: Display failure detected at 'Wed Nov 25 22:20:52 2026'.
Session: Suspending session at 'Wed Nov 25 22:20:52 2026'.
Session: Session suspended at 'Wed Nov 25 22:20:53 2026'.
Session: Resuming session at 'Wed Nov 25 22:20:54 2026'.
Session: Session resumed at 'Wed Nov 25 22:21:00 2026'.
Session: Terminating session at 'Wed Nov 25 22:22:04 2026'.
Session: Session terminated at 'Wed Nov 25 22:22:04 2026'.
Error: Aborting session with 'Unable to open display 'nx/nx,options=/x:177''.
Session: Aborting session at 'Wed Nov 25 22:22:14 2026'.
Session: Session aborted at 'Wed Nov 25 22:22:14 2026'.
"""


def test_real_log_gives_the_state_sequence() -> None:
    events = [e for e in (parse_line(x) for x in REAL_LOG.splitlines()) if e is not None]
    assert events[0] == NxEvent(pid=6025)
    assert events[2] == NxEvent(waiting=True)  # the socket listens only after "Starting session"
    assert [e.state for e in events[1:] if not e.waiting] == [
        NxState.STARTING, NxState.STARTED, NxState.SUSPENDING, NxState.SUSPENDED, NxState.RESUMING,
        NxState.RESUMED, NxState.TERMINATING, NxState.TERMINATED, NxState.ABORTING, NxState.ABORTED,
    ]


@pytest.mark.parametrize(
    "line",
    [
        "Session: Display failure detected at 'x'.",
        "Info: Session started at 'x'.",
        "  Session: Session started at 'x'.",
        "Session: Session exploded at 'x'.",
        "Warning: Cannot read keystroke file",
        "",
    ],
)
def test_other_lines_are_ignored(line: str) -> None:
    assert parse_line(line) is None


def test_state_table_is_the_reference_one() -> None:
    expected = {
        "stopped": "stopped", "terminated": "stopped", "aborted": "stopped",
        "initiating": "starting", "provisioning": "provisioning",
        "starting": "listening", "resuming": "listening",
        "started": "connected", "resumed": "connected",
        "suspending": "suspending", "suspended": "suspended",
        "terminating": "stopping", "aborting": "stopping",
    }
    assert {str(k): str(v) for k, v in X_OF_NX.items()} == expected
    assert set(X_OF_NX) == set(NxState)  # every NX state is mapped
    assert x_state_of(None) is XState.STOPPED


def test_follower_returns_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "nxagent.log"
    f = LogFollower(log)
    assert f.read_lines() == []  # no file yet
    log.write_bytes(b"one\ntw")
    assert f.read_lines() == ["one"]
    with log.open("ab") as fh:
        fh.write(b"o\nthree\n")
    assert f.read_lines() == ["two", "three"]
    assert f.read_lines() == []
    f.close()


def test_follower_cuts_huge_lines(tmp_path: Path) -> None:
    log = tmp_path / "nxagent.log"
    log.write_bytes(b"x" * (LogFollower.MAX_LINE * 2))
    f = LogFollower(log)
    lines = f.read_lines()
    assert len(lines) == 1 and len(lines[0]) == LogFollower.MAX_LINE
    f.close()
