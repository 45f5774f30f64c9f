"""Validation of the account the broker asks for (real account creation is in the integration test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qvd.core.config import Config
from qvd.core.errors import InputError
from qvd.vma.provision import _chown_tree, acceptable_home, user_spec_from_params


def spec(**params: str):  # type: ignore[no-untyped-def]
    return user_spec_from_params(params, Config())


def test_defaults_from_config() -> None:
    s = spec()
    assert s.name == "qvd" and s.home == Path("/home/qvd") and s.groups == ("qvduser",) and s.uid is None
    s = user_spec_from_params({}, Config().overlay({"vma.user.home.path": "/srv/homes", "vma.user.groups": ""},
                                                   source="test"))
    assert s.home == Path("/srv/homes/qvd") and s.groups == ()


def test_explicit_values() -> None:
    s = spec(**{"qvd.vm.user.name": "john.doe", "qvd.vm.user.uid": "2001", "qvd.vm.user.gid": "3001",
                "qvd.vm.user.home": "/home/jd", "qvd.vm.user.groups": "audio, video"})
    assert (s.name, s.uid, s.gid, s.home, s.groups) == ("john.doe", 2001, 3001, Path("/home/jd"), ("audio", "video"))


@pytest.mark.parametrize(
    "params",
    [
        {"qvd.vm.user.name": "Root"},
        {"qvd.vm.user.name": "-rf"},
        {"qvd.vm.user.name": "a b"},
        {"qvd.vm.user.name": "a:b"},
        {"qvd.vm.user.name": "x" * 40},
        {"qvd.vm.user.uid": "0"},
        {"qvd.vm.user.uid": "999"},
        {"qvd.vm.user.uid": "-5"},
        {"qvd.vm.user.uid": "1e4"},
        {"qvd.vm.user.gid": "0"},
        {"qvd.vm.user.home": "relative/home"},
        {"qvd.vm.user.home": "/"},
        {"qvd.vm.user.home": "/etc"},
        {"qvd.vm.user.home": "/home/../etc/x"},
        {"qvd.vm.user.groups": "ok,Bad Group"},
    ],
)
def test_refused(params: dict[str, str]) -> None:
    with pytest.raises(InputError):
        spec(**params)


def test_home_is_normalised() -> None:
    assert spec(**{"qvd.vm.user.home": "/home//x"}).home == Path("/home/x")


def test_acceptable_home() -> None:
    assert acceptable_home("/home/alice")
    assert not acceptable_home("/home")
    assert not acceptable_home("/")
    assert not acceptable_home("/home/alice/")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_chown_tree_only_moves_the_old_owners_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "sub" / "mine").write_text("x")
    (home / "foreign").write_text("y")
    os.chown(home, 5001, 5001)
    os.chown(home / "sub", 5001, 5001)
    os.chown(home / "sub" / "mine", 5001, 5001)
    os.chown(home / "foreign", 6000, 6000)
    (home / "link").symlink_to("/etc/passwd")
    os.lchown(home / "link", 5001, 5001)
    _chown_tree(home, old_uid=5001, old_gid=5001, uid=7001, gid=7001)
    assert (home.stat().st_uid, (home / "sub" / "mine").stat().st_uid) == (7001, 7001)
    assert (home / "foreign").stat().st_uid == 6000
    assert os.lstat(home / "link").st_uid == 7001
    assert Path("/etc/passwd").stat().st_uid == 0  # the symlink target was not touched
