"""Session environment: env files (bug 10.2.14: ~/.qvd_environment is read), TZ only when given (10.2.13)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qvd.core.config import Config
from qvd.vma.desktop import HostRuntime, parse_env_text, read_env_file, session_env
from qvd.vma.hooks import Hooks
from qvd.vma.provision import Account
from qvd.vma.statedir import StateDir


def test_parse_env_text() -> None:
    text = """
# comment
LANG=es_ES.UTF-8
export EDITOR="vim"
QUOTED='a b'
bad key=1
1BAD=x
=nokey
NOEQUALS
EMPTY=
"""
    assert parse_env_text(text) == {"LANG": "es_ES.UTF-8", "EDITOR": "vim", "QUOTED": "a b", "EMPTY": ""}


def account(home: Path) -> Account:
    st = home.stat()
    return Account(name="alice", uid=st.st_uid, gid=st.st_gid, home=home, shell="/bin/bash", groups=(st.st_gid,))


def test_user_env_file_is_read_but_cannot_override_identity(tmp_path: Path) -> None:
    (tmp_path / ".qvd_environment").write_text("FOO=bar\nHOME=/root\nDISPLAY=:0\nTZ=Asia/Tokyo\nLANG=de_DE.UTF-8\n")
    env = session_env(account(tmp_path), 100, lang="C.UTF-8", timezone=None, runtime_dir=None)
    assert env["FOO"] == "bar"
    assert env["LANG"] == "de_DE.UTF-8"
    assert env["HOME"] == str(tmp_path) and env["DISPLAY"] == ":100" and env["USER"] == "alice"
    assert "TZ" not in env  # no zone from the client: none is set


def test_timezone_set_only_when_given(tmp_path: Path) -> None:
    env = session_env(account(tmp_path), 7, lang="C.UTF-8", timezone="Europe/Madrid", runtime_dir=tmp_path)
    assert env["TZ"] == "Europe/Madrid"
    assert env["XDG_RUNTIME_DIR"] == str(tmp_path)


def test_symlinked_env_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("STOLEN=yes\n")
    link = tmp_path / ".qvd_environment"
    link.symlink_to(secret)
    assert read_env_file(link) == {}


def test_env_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("A=1\n")
    assert read_env_file(f, owner=os.getuid()) == {"A": "1"}
    assert read_env_file(f, owner=os.getuid() + 1) == {}


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_env_file(fifo) == {}


@pytest.mark.parametrize(
    ("setting", "installed", "expected"),
    [
        ("", {"openbox", "xterm"}, [["openbox"], ["xterm"]]),
        ("", {"xterm"}, [["xterm"]]),
        ("", set(), []),
        ("startxfce4 --replace", {"startxfce4", "openbox", "xterm"}, [["startxfce4", "--replace"]]),
        ("missing-session", {"openbox"}, [["openbox"]]),
        ("'unbalanced", {"xterm"}, [["xterm"]]),
    ],
)
def test_desktop_commands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str, installed: set[str],
                          expected: list[list[str]]) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None)
    cfg = Config().overlay({"vma.x-session": setting}, source="test")
    rt = HostRuntime(cfg, Hooks(cfg, tmp_path / "h.log"), StateDir(tmp_path))
    assert rt.desktop_commands() == expected
