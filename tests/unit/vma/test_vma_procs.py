"""Process helpers: identity across restarts, run(), reaping."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvd.vma import procs


def test_start_time_identifies_a_process() -> None:
    me = procs.proc_start_time(os.getpid())
    assert me is not None
    assert procs.adopt(os.getpid(), me) is not None
    assert procs.adopt(os.getpid(), me + 1) is None  # recycled pid
    assert procs.adopt(os.getpid(), me, name="definitely-not-me") is None


def test_zombie_is_not_alive() -> None:
    p = subprocess.Popen(["true"])
    for _ in range(100):
        if procs.proc_start_time(p.pid) is None:
            break
        time.sleep(0.01)
    assert procs.proc_start_time(p.pid) is None  # exited, not yet reaped: a zombie
    p.wait()


def test_run_returns_code_and_output() -> None:
    res = procs.run(["sh", "-c", "echo hi; exit 4"], timeout=5)
    assert (res.returncode, res.output) == (4, "hi\n")


def test_child_handle() -> None:
    h = procs.start_watched(["sleep", "30"])
    assert h.alive() and h.start_time is not None
    h.send(signal.SIGTERM)
    for _ in range(100):
        if not h.alive():
            break
        time.sleep(0.01)
    assert not h.alive()
    h.send(signal.SIGTERM)  # harmless once gone
    assert h.pid not in procs._owned


ORPHAN_SCRIPT = r"""
import os, sys, time
from qvd.vma import procs
assert os.getpid() == 1, os.getpid()
# sh starts a background sleep and exits at once: the sleep is re-parented to us (PID 1).
res = procs.run(["sh", "-c", "sleep 0.2 & exit 7"], timeout=5)
assert res.returncode == 7, res  # the reaper must not steal run()'s exit status
time.sleep(0.6)
def zombies():
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat", "rb").read()
            except OSError:
                continue
            if st[st.rfind(b")") + 2:].split()[0] == b"Z":
                out.append(int(e))
    return out
assert zombies(), "expected the orphaned sleep as a zombie before reaping"
procs.reap()
assert zombies() == [], zombies()
print("ok")
"""


def test_pid1_reaps_orphans_but_not_owned_children() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a PID namespace")
    src = str(Path(procs.__file__).resolve().parents[2])
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", ORPHAN_SCRIPT],
                         env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
