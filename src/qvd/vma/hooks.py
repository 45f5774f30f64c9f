"""Hooks: administrator programs run at session events (reference section 4.4).

A hook is an executable path from the configuration.  It receives the session
parameters as ``key value`` argument pairs followed by pairs that say why it
runs:

* action hooks (``vma.on_action.<action>``) run synchronously before the
  action; a non-zero exit aborts the action with an error.  Extra pairs:
  ``qvd.vm.session.state <x state>`` ``qvd.hook.on_action <action>``;
* state hooks (``vma.on_state.{connected,suspended,disconnected}``) run
  detached when the session enters that X state (``disconnected`` = stopped);
  failures are only logged.  Extra: ``qvd.vm.session.state``, ``qvd.hook.on_state``;
* provisioning hooks (``vma.on_provisioning.{mount_home,add_user,after_add_user}``),
  synchronous.  Extra: ``qvd.hook.on_provisioning <name>``.

Secret parameters (the user's bearer token, the slave key, anything that looks
like a password) are not put on the command line, where every process of the
desktop could read them in ``/proc``; they are passed in the environment as
``QVD_PARAM_<NAME>`` (non-alphanumerics replaced by ``_``, upper case).

Output of every hook is appended to ``hooks.log`` in the state directory.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from qvd.core.config import Config
from qvd.core.errors import BackendError
from qvd.vma import procs

log = logging.getLogger(__name__)

Params = Sequence[tuple[str, str]]

ACTION_KEYS: Mapping[str, str] = {
    "pre_connect": "vma.on_action.pre-connect",
    "connect": "vma.on_action.connect",
    "suspend": "vma.on_action.suspend",
    "stop": "vma.on_action.stop",
    "poweroff": "vma.on_action.poweroff",
    "expire": "vma.on_action.expire",
}
STATE_KEYS: Mapping[str, str] = {
    "connected": "vma.on_state.connected",
    "suspended": "vma.on_state.suspended",
    "stopped": "vma.on_state.disconnected",
}
PROVISIONING_KEYS: Mapping[str, str] = {
    "mount_home": "vma.on_provisioning.mount_home",
    "add_user": "vma.on_provisioning.add_user",
    "after_add_user": "vma.on_provisioning.after_add_user",
}

DEFAULT_TIMEOUT = 120.0
_SECRET = re.compile(r"(^auth_token$|^qvd\.slave\.key$|passw|secret|token)", re.IGNORECASE)
_HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def split_params(params: Mapping[str, str]) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """(pairs for argv, environment with the secret ones)."""
    public: list[tuple[str, str]] = []
    env: dict[str, str] = {}
    for k, v in params.items():
        if is_secret(k):
            env["QVD_PARAM_" + re.sub(r"[^A-Za-z0-9]", "_", k).upper()] = v
        else:
            public.append((k, v))
    return tuple(public), env


class Hooks:
    """Runs the hooks configured in ``cfg``; a hook that is not configured is a no-op."""

    def __init__(self, cfg: Config, log_path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._cfg = cfg
        self._log_path = log_path
        self._timeout = timeout

    def path_of(self, key: str) -> str:
        return self._cfg.get_str(key).strip()

    def _argv(self, path: str, params: Params, extra: Params) -> list[str]:
        argv = [path]
        for k, v in (*params, *extra):
            argv += [k, v]
        return argv

    def _env(self, secrets: Mapping[str, str]) -> dict[str, str]:
        return {"PATH": _HOOK_PATH, "LANG": "C.UTF-8", **secrets}

    def _open_log(self) -> int:
        return os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _run_sync(self, kind: str, name: str, path: str, params: Params, extra: Params,
                  secrets: Mapping[str, str]) -> None:
        fd = self._open_log()
        try:
            os.write(fd, f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {kind} hook {name}: {path}\n".encode())
            with os.fdopen(os.dup(fd), "wb") as out:
                res = procs.run(self._argv(path, params, extra), timeout=self._timeout,
                                env=self._env(secrets), output=out)
        finally:
            os.close(fd)
        if res.returncode != 0:
            log.warning("%s hook %s (%s) exited with %d", kind, name, path, res.returncode)
            raise BackendError(f"{kind} hook '{name}' failed (exit code {res.returncode})")
        log.info("%s hook %s ran", kind, name)

    def run_action(self, action: str, params: Params, state: str, *, secrets: Mapping[str, str] | None = None,
                   extra: Params = ()) -> None:
        """Run the action hook if configured.  Raises :class:`BackendError` when it fails."""
        path = self.path_of(ACTION_KEYS[action])
        if not path:
            return
        self._run_sync("action", action, path, params,
                       (*extra, ("qvd.vm.session.state", state), ("qvd.hook.on_action", action)), secrets or {})

    def run_provisioning(self, name: str, params: Params, *, secrets: Mapping[str, str] | None = None) -> bool:
        """Run a provisioning hook; ``False`` if none is configured.  Raises when it fails."""
        path = self.path_of(PROVISIONING_KEYS[name])
        if not path:
            return False
        self._run_sync("provisioning", name, path, params, (("qvd.hook.on_provisioning", name),), secrets or {})
        return True

    def fire_state(self, state: str, params: Params, *, secrets: Mapping[str, str] | None = None) -> None:
        """Start the state hook of ``state`` (if any) without waiting for it."""
        key = STATE_KEYS.get(state)
        path = self.path_of(key) if key else ""
        if not path:
            return
        argv = self._argv(path, params, (("qvd.vm.session.state", state), ("qvd.hook.on_state", state)))
        fd = self._open_log()
        try:
            os.write(fd, f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} state hook {state}: {path}\n".encode())
            procs.spawn(argv, env=self._env(secrets or {}), stdout=fd, stderr=fd, detached=True)
        except OSError as e:
            log.warning("state hook %s (%s) could not start: %s", state, path, e)
        finally:
            os.close(fd)
