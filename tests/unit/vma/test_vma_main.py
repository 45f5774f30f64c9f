"""The qvd-vma command: options, configuration errors, start and SIGTERM (as a real process)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qvd.vma.main import main

SRC = str(Path(__file__).resolve().parents[3] / "src")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "qvd-vma" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--state-dir" in out and "--config" in out


def test_bad_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "vma.toml"
    cfg.write_text('vma.user.shel = "/bin/sh"\n')
    assert main(["--config", str(cfg), "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "vma.user.shel" in err and "vma.user.shell" in err  # names the key and suggests the right one
    cfg.write_text("internal.nxagent.display = 0\n")
    assert main(["--config", str(cfg), "--state-dir", str(tmp_path / "s")]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_runs_answers_and_exits_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    state = tmp_path / "state"
    p = subprocess.Popen([sys.executable, "-m", "qvd.vma", "--config", str(tmp_path / "absent.toml"),
                          "--address", "127.0.0.1", "--port", str(port), "--state-dir", str(state),
                          "--log-file", str(tmp_path / "vma.log")],
                         env={**os.environ, "PYTHONPATH": SRC})
    try:
        body = b""
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/vma/x_state?auth_token=S3CRET", timeout=2) as r:
                    body = r.read()
                break
            except OSError:
                time.sleep(0.05)
        assert body == b'"stopped"\r\n'
        assert (state / "nxdialog").stat().st_mode & 0o777 == 0o755
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        log = (tmp_path / "vma.log").read_text()
        assert "listening on 127.0.0.1" in log
        assert "S3CRET" not in log  # query strings are never logged
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_port_in_use(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            assert main(["--config", str(tmp_path / "absent.toml"), "--address", "127.0.0.1", "--port", str(port),
                         "--state-dir", str(tmp_path / "s"), "--log-file", str(tmp_path / "log")]) == 1
        assert "cannot listen" in (tmp_path / "log").read_text()
    finally:  # main() installed its own log handler on the root logger
        for h in root.handlers:
            if h not in saved[0]:
                h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
