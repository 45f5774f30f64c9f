"""The real :class:`qvd.vma.session.SessionRuntime`: accounts, nxagent and the desktop programs.

nxagent command line (checked on Debian 12, nxagent 3.5.99.26)::

    nxagent -nolisten tcp -ac -name QVD -D -display nx/nx,options=<state>/nxagent.conf:<d> :<d>

* ``-D``: desktop (not rootless) mode;
* ``-nolisten tcp``: X clients connect through ``/tmp/.X11-unix/X<d>`` only; the one
  TCP port is the NX one (``listen=4000+d`` in the options file);
* ``-ac``: no X authority; any process of the desktop may use the display (one
  user per desktop, as in QVD);
* it runs as the user with ``HOME`` set (it keeps ``~/.nx/C-<d>/``), its output
  goes to ``nxagent.log`` in the state directory, ``NX_CLIENT`` points at the
  ``nxdialog`` helper so closing the window suspends.

Desktop programs: ``vma.x-session`` if set (split like a shell would, run
without one), otherwise ``openbox`` and ``xterm`` when installed.  The first
program (the session command, or the window manager) is the session leader:
when it exits the user has logged out and the session stops.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from qvd.core.config import Config
from qvd.core.errors import BackendError
from qvd.vma import procs
from qvd.vma.hooks import Hooks
from qvd.vma.procs import ProcHandle
from qvd.vma.provision import Account, Provisioner
from qvd.vma.session import SessionRequest
from qvd.vma.statedir import StateDir

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
SYSTEM_ENV_FILES = (Path("/etc/default/locale"), Path("/etc/locale.conf"), Path("/etc/environment"))
USER_ENV_FILE = ".qvd_environment"  # read as intended (the reference never read it, bug 10.2.14)
#: variables the environment files may not change: they identify the user and the session
FORCED = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "DISPLAY", "XDG_RUNTIME_DIR", "NX_CLIENT", "TZ"})
ENV_FILE_MAX = 64 * 1024
X11_UNIX = Path("/tmp/.X11-unix")  # noqa: S108 - fixed by X11, not a temp file


def parse_env_text(text: str) -> dict[str, str]:
    """``KEY=value`` lines (``export`` prefix, quotes and ``#`` comments allowed); anything else is skipped."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not (key[0].isalpha() or key[0] == "_") or not all(
                c.isalnum() or c == "_" for c in key) or not key.isascii():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def read_env_file(path: Path, *, owner: int | None = None) -> dict[str, str]:
    """Read an environment file without following symlinks; with ``owner`` it must belong to that uid.

    The user's own file is read by root: refusing symlinks and foreign owners
    stops a user from pointing it at a root-only file to get its content
    into the session environment.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > ENV_FILE_MAX or (owner is not None and st.st_uid != owner):
            log.warning("ignoring environment file %s (not a small regular file of uid %s)", path, owner)
            return {}
        data = os.read(fd, ENV_FILE_MAX)
    except OSError:
        return {}
    finally:
        os.close(fd)
    return parse_env_text(data.decode("utf-8", "replace"))


def session_env(account: Account, display: int, *, lang: str, timezone: str | None,
                runtime_dir: Path | None) -> dict[str, str]:
    """The environment of nxagent and the desktop programs (a login-like one, built from scratch)."""
    env = {"PATH": DEFAULT_PATH, "LANG": lang}
    for f in SYSTEM_ENV_FILES:
        env.update({k: v for k, v in read_env_file(f).items() if k not in FORCED})
    env.update({k: v for k, v in read_env_file(account.home / USER_ENV_FILE, owner=account.uid).items()
                if k not in FORCED})
    env.update(HOME=str(account.home), USER=account.name, LOGNAME=account.name, SHELL=account.shell,
               DISPLAY=f":{display}")
    if runtime_dir is not None:
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    if timezone:
        env["TZ"] = timezone  # only when the client sent one (the reference always set an empty zone, 10.2.13)
    return env


class HostRuntime:
    """Runs sessions on this machine (inside the desktop).  Needs root."""

    def __init__(self, cfg: Config, hooks: Hooks, state_dir: StateDir) -> None:
        self._cfg = cfg
        self._dir = state_dir
        self._provisioner = Provisioner(cfg, hooks)

    def provision(self, request: SessionRequest) -> Account:
        return self._provisioner.provision(request.user, request.hook_params, request.secrets)

    def _runtime_dir(self, account: Account) -> Path | None:
        """``/run/user/<uid>`` as a login manager would make it (0700, the user's)."""
        path = Path("/run/user") / str(account.uid)
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not path.is_dir() or path.is_symlink():
                path.mkdir(mode=0o700)
            os.chown(path, account.uid, account.gid, follow_symlinks=False)
            os.chmod(path, 0o700)
        except OSError as e:
            log.info("no XDG_RUNTIME_DIR for %s: %s", account.name, e)
            return None
        return path

    def _env(self, account: Account, request: SessionRequest, display: int) -> dict[str, str]:
        return session_env(account, display, lang=self._cfg.get_str("vma.default.lang"),
                           timezone=request.client.timezone, runtime_dir=self._runtime_dir(account))

    def prepare_display(self, display: int) -> None:
        """``/tmp/.X11-unix`` must exist sticky and world-writable (nxagent runs as the user and
        cannot create it), and a lock left by a dead X server would make nxagent refuse the display."""
        if not X11_UNIX.is_dir():
            X11_UNIX.mkdir(mode=0o1777, exist_ok=True)
        os.chmod(X11_UNIX, 0o1777)  # noqa: S103 - the X socket directory is world-writable and sticky
        lock = Path(f"/tmp/.X{display}-lock")  # noqa: S108 - X server lock file, fixed by X11
        try:
            owner = int(lock.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            owner = 0
        if owner > 0 and procs.proc_start_time(owner) is not None:
            raise BackendError(f"display :{display} is in use by process {owner}")
        log.info("removing stale X lock of display :%d", display)
        lock.unlink(missing_ok=True)
        (X11_UNIX / f"X{display}").unlink(missing_ok=True)

    def start_nxagent(self, account: Account, request: SessionRequest, display: int) -> ProcHandle:
        binary = shutil.which("nxagent")
        if binary is None:
            raise BackendError("nxagent is not installed in this desktop image")
        argv = [binary, "-nolisten", "tcp", "-ac", "-name", "QVD", "-D",
                "-display", f"nx/nx,options={self._dir.options_file}:{display}", f":{display}"]
        env = self._env(account, request, display)
        env["NX_CLIENT"] = str(self._dir.nxdialog)
        fd = self._dir.open_nxagent_log()
        try:
            return procs.start_watched(argv, env=env, run_as=account.run_as(), stdout=fd, stderr=fd)
        finally:
            os.close(fd)

    def desktop_commands(self) -> list[list[str]]:
        """What to run in the session; the first is the session leader."""
        configured = self._cfg.get_str("vma.x-session").strip()
        if configured:
            try:
                argv = shlex.split(configured)
            except ValueError as e:
                argv = []
                log.error("vma.x-session cannot be parsed (%s); using the default desktop", e)
            if argv and shutil.which(argv[0]):
                return [argv]
            if argv:
                log.error("vma.x-session program %s not found; using the default desktop", argv[0])
        return [[p] for p in ("openbox", "xterm") if shutil.which(p)]

    def start_desktop(self, account: Account, request: SessionRequest, display: int) -> ProcHandle | None:
        commands = self.desktop_commands()
        if not commands:
            log.warning("no desktop programs installed (neither vma.x-session, openbox nor xterm)")
            return None
        env = self._env(account, request, display)
        fd = self._dir.open_xsession_log()
        try:
            leader = procs.start_watched(commands[0], env=env, run_as=account.run_as(), stdout=fd, stderr=fd)
            for argv in commands[1:]:
                procs.spawn(argv, env=env, run_as=account.run_as(), stdout=fd, stderr=fd, detached=True)
        finally:
            os.close(fd)
        log.info("desktop started for %s: %s", account.name, ", ".join(c[0] for c in commands))
        return leader

    def refresh(self, account: Account, request: SessionRequest, display: int) -> None:
        binary = shutil.which("xrefresh")
        if binary is None:
            return
        env: Mapping[str, str] = {"PATH": DEFAULT_PATH, "DISPLAY": f":{display}", "HOME": str(account.home)}
        procs.spawn([binary], env=env, run_as=account.run_as(), detached=True)

    def adopt(self, pid: int, start_time: int | None, *, name: str | None) -> ProcHandle | None:
        return procs.adopt(pid, start_time, name=name)
