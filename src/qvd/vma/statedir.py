"""The VMA's state directory (default ``/run/qvd``): what survives a VMA restart.

==================  =====  ==========================================================
file                mode   content
==================  =====  ==========================================================
``nxagent.state``   0644   ``<nx state>:<epoch>`` (reference format)
``nxagent.pid``     0644   pid of the running nxagent
``session.json``    0600   user, display, pid start time, flags, hook parameters
``nxagent.conf``    0644   the nxagent options line (read by nxagent as the user)
``nxagent.log``     0600   nxagent's output; secret, never served over the API
``x-session.log``   0600   output of the desktop programs
``hooks.log``       0600   output of the hooks
``nxdialog``        0755   ``NX_CLIENT`` helper: "close window" suspends the session
==================  =====  ==========================================================

The directory itself is 0755 because nxagent, running as the desktop user,
reads the options file and runs ``nxdialog``; secrets stay in 0600 files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# nxagent execs $NX_CLIENT --dialog <type> ... --parent <nxagent pid> when the user closes
# the desktop window.  QVD's answer is "suspend": HUP the agent; other dialogs are ignored.
_NXDIALOG = """#!/bin/sh
# Written by qvd-vma. nxagent runs this as NX_CLIENT for its dialogs; closing the
# desktop window ("yesnosuspend") suspends the session instead of asking.
dialog=""
parent=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --dialog) [ "$#" -gt 1 ] && dialog="$2" && shift ;;
        --parent) [ "$#" -gt 1 ] && parent="$2" && shift ;;
    esac
    shift
done
if [ "$dialog" = "yesnosuspend" ] && [ -n "$parent" ]; then
    kill -HUP "$parent"
fi
exit 0
"""


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def state_file(self) -> Path:
        return self.path / "nxagent.state"

    @property
    def pid_file(self) -> Path:
        return self.path / "nxagent.pid"

    @property
    def session_file(self) -> Path:
        return self.path / "session.json"

    @property
    def options_file(self) -> Path:
        return self.path / "nxagent.conf"

    @property
    def nxagent_log(self) -> Path:
        return self.path / "nxagent.log"

    @property
    def xsession_log(self) -> Path:
        return self.path / "x-session.log"

    @property
    def hooks_log(self) -> Path:
        return self.path / "hooks.log"

    @property
    def nxdialog(self) -> Path:
        return self.path / "nxdialog"

    def ensure(self) -> None:
        """Create the directory and the ``nxdialog`` helper.  Raises OSError."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o755)  # noqa: S103 - nxagent (the user) reads the options file here
        self.write(self.nxdialog, _NXDIALOG, 0o755)

    def write(self, path: Path, text: str, mode: int) -> None:
        """Atomic replace, so a crash never leaves half a state file for the next VMA to read."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix="." + path.name + ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_state(self, nx: str, epoch: float) -> None:
        self.write(self.state_file, f"{nx}:{int(epoch)}\n", 0o644)

    def read_state(self) -> tuple[str, float] | None:
        try:
            nx, _, epoch = self.state_file.read_text(encoding="utf-8").strip().partition(":")
            return nx, float(epoch)
        except (OSError, ValueError):
            return None

    def write_pid(self, pid: int) -> None:
        self.write(self.pid_file, f"{pid}\n", 0o644)

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def write_session(self, data: dict[str, Any]) -> None:
        self.write(self.session_file, json.dumps(data, indent=1, sort_keys=True) + "\n", 0o600)

    def read_session(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.session_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.session_file, e)
            return None
        return data if isinstance(data, dict) else None

    def write_options(self, line: str) -> None:
        self.write(self.options_file, line, 0o644)

    def open_nxagent_log(self) -> int:
        """A fresh log for a new nxagent (the previous one kept as ``.1``); returns a write fd."""
        if self.nxagent_log.exists():
            os.replace(self.nxagent_log, self.nxagent_log.with_name("nxagent.log.1"))
        return os.open(self.nxagent_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def open_xsession_log(self) -> int:
        return os.open(self.xsession_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def clear_session(self) -> None:
        """Forget the session (nxagent is gone).  Logs stay for the administrator."""
        for p in (self.state_file, self.pid_file, self.session_file):
            p.unlink(missing_ok=True)
