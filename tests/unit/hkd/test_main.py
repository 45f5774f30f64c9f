"""The qvd-hkd command: arguments, start failures as one clear line, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from qvd.core.states import HostState
from qvd.db.models import Host
from tests.unit.hkd.hkd_fakes import Node

HKD = [sys.executable, "-m", "qvd.hkd.main"]


def run(*args: str, root: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [*HKD, *(["--root", str(root)] if root else []), *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)


def test_version_and_help() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("qvd-hkd ")
    r = run("--help")
    assert r.returncode == 0 and "--name" in r.stdout and "--address" in r.stdout and "--root" in r.stdout


def test_bad_node_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "node.toml").write_text("internal.hkd.max_heavy = 0\n")
    r = run(root=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("qvd-hkd: error: node file: invalid value 0")


def test_database_without_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "node.toml").write_text('vm.hypervisor = "fake"\n')
    r = run(root=tmp_path)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qvd-hkd: error: schema: database schema is at revision none"), last
    assert "qvd db upgrade" in last


def test_runs_until_sigterm(hnode: Node) -> None:
    p = subprocess.Popen([*HKD, "--root", str(hnode.root), "--name", "cli-node", "--address", "10.1.2.3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline and state != HostState.RUNNING:
            time.sleep(0.1)
            with hnode.factory() as s:
                h = s.scalars(select(Host).where(Host.name == "cli-node")).one_or_none()
                state = h.runtime.state if h else None
        assert state == HostState.RUNNING, p.stderr.read() if p.poll() is not None and p.stderr else "not running"
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    assert "stop requested (SIGTERM)" in err and "node daemon stopped" in err
    with hnode.factory() as s:
        h = s.scalars(select(Host).where(Host.name == "cli-node")).one()
        assert h.address == "10.1.2.3" and h.runtime.state == HostState.STOPPED and h.runtime.pid is None
