"""User provisioning: make sure the desktop user, its groups and its home exist.

Desktops usually start from a fresh system layer, so ``/etc/passwd`` forgets the
user at every start while ``/home`` is a persistent bind mount (or disk): the
account is re-created each time and an existing home directory is reused and
re-owned if the uid changed.

Steps (reference section 4.5):

1. home missing and ``vma.on_provisioning.mount_home`` configured: run it;
2. supplementary groups missing: ``groupadd``;
3. user missing: ``vma.on_provisioning.add_user`` if configured, otherwise
   ``groupadd`` (primary group) + ``useradd -m``; then
   ``vma.on_provisioning.after_add_user``.  If a later step fails, the user
   and groups created here are removed again (the home is kept: it is data);
4. home created from ``/etc/skel`` if still missing; ownership fixed.

The broker is trusted but its input is still checked: a uid or gid below 1000
(root, system accounts) is refused, so is a home that is not a plain directory.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qvd.core.config import Config
from qvd.core.errors import BackendError, InputError
from qvd.vma import procs
from qvd.vma.hooks import Hooks, Params

log = logging.getLogger(__name__)

MIN_ID = 1000  # login.defs UID_MIN/GID_MIN: below are root and system accounts
MAX_ID = 2**31 - 2
_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
TOOL_TIMEOUT = 60.0


@dataclass(frozen=True)
class UserSpec:
    """The account the broker asked for (validated)."""

    name: str
    home: Path
    uid: int | None = None
    gid: int | None = None
    groups: tuple[str, ...] = ()
    shell: str = "/bin/bash"


@dataclass(frozen=True)
class Account:
    """The account as it exists after provisioning."""

    name: str
    uid: int
    gid: int
    home: Path
    shell: str
    groups: tuple[int, ...]  # every gid of the user (primary included), as initgroups() would set

    def run_as(self) -> procs.RunAs:
        return procs.RunAs(uid=self.uid, gid=self.gid, groups=self.groups, home=self.home)


def _name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value) or value.endswith("."):
        raise InputError(f"invalid {what} {value[:64]!r}: expected a lower-case POSIX name (a-z, 0-9, _ . -)")
    return value


def _id(value: str, what: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    if not value.isdigit():
        raise InputError(f"invalid {what} {value[:32]!r}: expected a number")
    n = int(value)
    if not MIN_ID <= n <= MAX_ID:
        raise InputError(f"invalid {what} {n}: must be from {MIN_ID} to {MAX_ID} (no system ids)")
    return n


def user_spec_from_params(params: Mapping[str, str], cfg: Config) -> UserSpec:
    """Validate ``qvd.vm.user.*`` (falling back on ``vma.user.*``).  Raises :class:`InputError`."""
    name = _name(params.get("qvd.vm.user.name", "").strip() or cfg.get_str("vma.user.default.name"), "user name")
    base = PurePosixPath(cfg.get_str("vma.user.home.path") or "/home")
    raw_home = params.get("qvd.vm.user.home", "").strip()
    home = PurePosixPath(raw_home) if raw_home else base / name
    if not acceptable_home(str(home)):
        raise InputError(f"invalid home directory {str(home)[:128]!r}: expected a normalised absolute path "
                         "at least two levels deep")
    raw_groups = params.get("qvd.vm.user.groups")
    groups_src = raw_groups if raw_groups is not None else cfg.get_str("vma.user.groups")
    groups = tuple(_name(g.strip(), "group name") for g in groups_src.split(",") if g.strip())
    shell = cfg.get_str("vma.user.shell")
    return UserSpec(
        name=name,
        home=Path(home),
        uid=_id(params.get("qvd.vm.user.uid", ""), "uid"),
        gid=_id(params.get("qvd.vm.user.gid", ""), "gid"),
        groups=groups,
        shell=shell,
    )


def acceptable_home(path: str) -> bool:
    """A home the VMA may create and chown: absolute, normalised, not ``/`` nor a top-level directory."""
    p = PurePosixPath(path)
    return p.is_absolute() and ".." not in p.parts and len(p.parts) >= 3 and os.path.normpath(path) == path


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _tool(argv: list[str]) -> None:
    res = procs.run(argv, timeout=TOOL_TIMEOUT)
    if res.returncode != 0:
        raise BackendError(f"{argv[0]} failed (exit code {res.returncode}): {res.output.strip()[:300]}")
    log.info("ran %s", " ".join(argv))


class Provisioner:
    """Creates the user of a session.  Runs as root, before the session's processes exist."""

    def __init__(self, cfg: Config, hooks: Hooks, *, skel: Path = Path("/etc/skel")) -> None:
        self._cfg = cfg
        self._hooks = hooks
        self._skel = skel

    def provision(self, spec: UserSpec, params: Params, secrets: Mapping[str, str]) -> Account:
        """Make ``spec`` exist and return the resulting account.  Raises QvdError subclasses."""
        if not spec.home.parent.exists():
            os.makedirs(spec.home.parent, mode=0o755, exist_ok=True)
        if not os.path.lexists(spec.home):
            self._hooks.run_provisioning("mount_home", params, secrets=secrets)

        created_groups: list[str] = []
        created_user = False
        try:
            for g in spec.groups:
                if not _group_exists(g):
                    _tool(["groupadd", g])
                    created_groups.append(g)
            pw = _user(spec.name)
            if pw is None:
                if self._hooks.run_provisioning("add_user", params, secrets=secrets):
                    pw = _user(spec.name)
                    if pw is None:
                        raise BackendError(f"the add_user hook did not create user {spec.name}")
                    created_user = True
                else:
                    group = self._primary_group(spec, created_groups)
                    argv = ["useradd", "-m", "-d", str(spec.home), "-g", group, "-s", spec.shell]
                    if spec.groups:
                        argv += ["-G", ",".join(spec.groups)]
                    if spec.uid is not None:
                        argv += ["-u", str(spec.uid)]
                    _tool([*argv, spec.name])
                    created_user = True
                    pw = _user(spec.name)
                    if pw is None:
                        raise BackendError(f"useradd did not create user {spec.name}")
                self._hooks.run_provisioning("after_add_user", params, secrets=secrets)
            else:
                self._check_existing(spec, pw)
            home = Path(pw.pw_dir or spec.home)
            if not acceptable_home(str(home)):
                raise BackendError(f"user {spec.name} has home {home}, which the VMA refuses to manage")
            if home != spec.home:
                log.warning("user %s exists with home %s; using it instead of %s", spec.name, home, spec.home)
            self._ensure_home(home, pw.pw_uid, pw.pw_gid)
        except BaseException:
            if created_user:
                self._undo(["userdel", spec.name])
            for g in reversed(created_groups):
                self._undo(["groupdel", g])
            raise
        account = Account(
            name=spec.name,
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            home=home,
            shell=pw.pw_shell or spec.shell,
            groups=tuple(os.getgrouplist(spec.name, pw.pw_gid)),
        )
        log.info("user %s ready (uid %d, gid %d, home %s)", account.name, account.uid, account.gid, account.home)
        return account

    def _primary_group(self, spec: UserSpec, created: list[str]) -> str:
        """Name of the user's primary group, created (named after the user) when needed."""
        if spec.gid is not None:
            try:
                return grp.getgrgid(spec.gid).gr_name
            except KeyError:
                pass
            if _group_exists(spec.name):
                raise BackendError(f"group {spec.name} exists with gid {grp.getgrnam(spec.name).gr_gid}, "
                                   f"the broker asks for gid {spec.gid}")
            _tool(["groupadd", "-g", str(spec.gid), spec.name])
            created.append(spec.name)
            return spec.name
        if not _group_exists(spec.name):
            argv = ["groupadd"]
            if spec.uid is not None:
                # Same number as the uid when free, like adduser does; harmless when taken.
                try:
                    grp.getgrgid(spec.uid)
                except KeyError:
                    argv += ["-g", str(spec.uid)]
            _tool([*argv, spec.name])
            created.append(spec.name)
        return spec.name

    def _check_existing(self, spec: UserSpec, pw: pwd.struct_passwd) -> None:
        if pw.pw_uid < MIN_ID:
            raise BackendError(f"refusing to run a desktop session as system account {spec.name} (uid {pw.pw_uid})")
        if spec.uid is not None and pw.pw_uid != spec.uid:
            raise BackendError(f"user {spec.name} exists with uid {pw.pw_uid}, the broker asks for uid {spec.uid}")
        missing = [g for g in spec.groups if spec.name not in grp.getgrnam(g).gr_mem and
                   grp.getgrnam(g).gr_gid != pw.pw_gid]
        if missing:
            _tool(["usermod", "-a", "-G", ",".join(missing), spec.name])

    def _ensure_home(self, home: Path, uid: int, gid: int) -> None:
        try:
            st = os.lstat(home)
        except FileNotFoundError:
            self._create_home(home, uid, gid)
            return
        if not stat.S_ISDIR(st.st_mode):
            raise BackendError(f"home {home} exists but is not a directory (a symlink is refused)")
        if st.st_uid != uid:
            log.info("home %s belongs to uid %d, giving it to uid %d", home, st.st_uid, uid)
            _chown_tree(home, old_uid=st.st_uid, old_gid=st.st_gid, uid=uid, gid=gid)
        elif st.st_gid != gid:
            os.chown(home, uid, gid, follow_symlinks=False)

    def _create_home(self, home: Path, uid: int, gid: int) -> None:
        os.mkdir(home, 0o700)
        if self._skel.is_dir():
            shutil.copytree(self._skel, home, symlinks=True, dirs_exist_ok=True)
        os.chmod(home, 0o700)
        _chown_tree(home, old_uid=None, old_gid=None, uid=uid, gid=gid)

    @staticmethod
    def _undo(argv: list[str]) -> None:
        try:
            res = procs.run(argv, timeout=TOOL_TIMEOUT)
            if res.returncode != 0:
                log.warning("cleanup %s failed: %s", " ".join(argv), res.output.strip()[:200])
        except BackendError as e:
            log.warning("cleanup %s failed: %s", " ".join(argv), e)


def _chown_tree(top: Path, *, old_uid: int | None, old_gid: int | None, uid: int, gid: int) -> None:
    """Give ``top`` and what is in it to uid/gid without following symlinks.

    With ``old_uid`` only entries owned by the previous owner change hands, so
    files that belong to somebody else (shared data, root-owned mounts) are left alone.
    Runs before any process of the user exists, so nothing swaps entries meanwhile.
    """

    def fix(path: str) -> None:
        st = os.lstat(path)
        if old_uid is not None and st.st_uid != old_uid:
            return
        new_gid = gid if old_gid is None or st.st_gid == old_gid else st.st_gid
        os.chown(path, uid, new_gid, follow_symlinks=False)

    fix(str(top))
    for root, dirs, files in os.walk(top, followlinks=False):
        for n in (*dirs, *files):
            fix(os.path.join(root, n))
