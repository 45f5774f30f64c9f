"""Hooks run for real (small shell scripts): argument pairs, failures, secrets, detached state hooks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qvd.core.config import Config
from qvd.core.errors import BackendError
from qvd.vma import procs
from qvd.vma.hooks import Hooks, split_params


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def hooks_with(tmp_path: Path, **keys: str) -> Hooks:
    return Hooks(Config().overlay(keys, source="test"), tmp_path / "hooks.log", timeout=10)


def test_action_hook_gets_pairs_state_and_action(tmp_path: Path) -> None:
    out = tmp_path / "args"
    path = script(tmp_path / "h",
                  f'for a in "$@"; do echo "$a"; done > {out}\necho "T=$QVD_PARAM_AUTH_TOKEN" >> {out}\n')
    hooks = hooks_with(tmp_path, **{"vma.on_action.pre-connect": path})
    public, secrets = split_params({"qvd.vm.user.name": "al ice", "auth_token": "s3cr3t"})
    hooks.run_action("pre_connect", public, "starting", secrets=secrets)
    assert out.read_text().splitlines() == [
        "qvd.vm.user.name", "al ice",
        "qvd.vm.session.state", "starting",
        "qvd.hook.on_action", "pre_connect",
        "T=s3cr3t",  # in the environment, not in argv
    ]
    assert "hook pre_connect" in (tmp_path / "hooks.log").read_text()


def test_failing_action_hook_raises(tmp_path: Path) -> None:
    path = script(tmp_path / "h", "echo nope; exit 3\n")
    hooks = hooks_with(tmp_path, **{"vma.on_action.stop": path})
    with pytest.raises(BackendError) as e:
        hooks.run_action("stop", (), "connected")
    assert "exit code 3" in e.value.message
    assert "nope" in (tmp_path / "hooks.log").read_text()


def test_missing_hook_program_raises(tmp_path: Path) -> None:
    hooks = hooks_with(tmp_path, **{"vma.on_action.stop": str(tmp_path / "absent")})
    with pytest.raises(BackendError):
        hooks.run_action("stop", (), "connected")


def test_unconfigured_hooks_do_nothing(tmp_path: Path) -> None:
    hooks = hooks_with(tmp_path)
    hooks.run_action("suspend", (), "connected")
    assert hooks.run_provisioning("add_user", ()) is False
    hooks.fire_state("connected", ())
    assert not (tmp_path / "hooks.log").exists()


def test_provisioning_hook(tmp_path: Path) -> None:
    out = tmp_path / "args"
    path = script(tmp_path / "h", f'echo "$@" > {out}\n')
    hooks = hooks_with(tmp_path, **{"vma.on_provisioning.after_add_user": path})
    assert hooks.run_provisioning("after_add_user", (("qvd.vm.user.name", "bob"),))
    assert out.read_text().split() == ["qvd.vm.user.name", "bob", "qvd.hook.on_provisioning", "after_add_user"]


def test_state_hook_is_detached(tmp_path: Path) -> None:
    out = tmp_path / "args"
    path = script(tmp_path / "h", f'sleep 1.5; echo "$@" > {out}.tmp; mv {out}.tmp {out}\n')
    hooks = hooks_with(tmp_path, **{"vma.on_state.disconnected": path})
    before = set(procs._detached)
    t0 = time.monotonic()
    hooks.fire_state("stopped", (("k", "v"),))
    assert time.monotonic() - t0 < 1.0  # did not wait for the hook
    assert not out.exists()
    (pid,) = set(procs._detached) - before
    for _ in range(200):
        if out.exists():
            break
        time.sleep(0.05)
    assert out.read_text().split() == ["k", "v", "qvd.vm.session.state", "stopped", "qvd.hook.on_state", "stopped"]
    for _ in range(100):
        procs.reap()
        if pid not in procs._detached:
            break
        time.sleep(0.05)
    assert pid not in procs._detached  # reaped, no zombie left


def test_hook_timeout_kills_it(tmp_path: Path) -> None:
    path = script(tmp_path / "h", "sleep 30\n")
    hooks = Hooks(Config().overlay({"vma.on_action.expire": path}, source="test"), tmp_path / "hooks.log",
                  timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(BackendError):
        hooks.run_action("expire", (), "stopped")
    assert time.monotonic() - t0 < 5


def test_secret_detection() -> None:
    public, secrets = split_params({"auth_token": "a", "qvd.slave.key": "b", "custom.db_password": "c",
                                    "qvd.vm.user.name": "u", "host_address": "10.0.0.1"})
    assert dict(public) == {"qvd.vm.user.name": "u", "host_address": "10.0.0.1"}
    assert secrets == {"QVD_PARAM_AUTH_TOKEN": "a", "QVD_PARAM_QVD_SLAVE_KEY": "b", "QVD_PARAM_CUSTOM_DB_PASSWORD": "c"}
    assert os.environ.get("QVD_PARAM_AUTH_TOKEN") is None
