"""Build a desktop image (DI) from Debian packages with mmdebstrap.

The result is a ``.tar.zst`` of a root file system (``tar --numeric-owner``) that
contains the packages of a profile, the in-desktop agent (VMA) copied from this
source tree, and ``/etc/qvd/image.toml``, which marks it as ours.

Two cache layers, because the agent's code changes far more often than the OS:

* ``<cache>/roots/<os_key>/``: the unpacked OS tree made by mmdebstrap (about a
  minute to build).  ``os_key`` covers the package list, suite, mirror (or the
  host's apt sources it was derived from) and :data:`FORMAT_VERSION`.
* ``<cache>/<key>.tar.zst`` + ``<key>.json``: the final tarball.  ``key`` covers
  the OS key, the profile and the content hash of the copied qvd sources, so a
  changed agent costs only a re-pack (seconds).

Every layer is built in ``<cache>/tmp/`` and renamed into place while holding an
flock on ``<cache>/locks/<key>.lock``; an interrupted build leaves no cache
entry, and its temporary tree is removed (by this build or the next one).

Building needs root: mmdebstrap's root mode creates files owned by many users.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import qvd
from qvd.core.config import Config
from qvd.core.errors import ImageError
from qvd.images.validate import DI_FORMAT, METADATA_PATH

log = logging.getLogger(__name__)

#: Bump when the layout of what we add to the OS tree changes; it is part of every key.
FORMAT_VERSION = 1

DEFAULT_CACHE_DIR = Path("/var/cache/qvd/images")

_MINIMAL = (
    "nxagent",
    "openbox",
    "xterm",
    "python3",
    "procps",
    "iproute2",
    "x11-utils",
    "x11-xserver-utils",  # xrefresh: the VMA forces a repaint after the proxy attaches (lab notes §2)
    "xdotool",
    "tini",  # PID 1 of the container: reaps the zombies of the session's processes
    "xfonts-base",  # the 'fixed' core font xterm and nxagent ask for
    "fonts-dejavu-core",
    "passwd",  # useradd/groupadd for user provisioning
    "adduser",
)

PROFILES: dict[str, tuple[str, ...]] = {
    "minimal": _MINIMAL,
    # Only has to build; CI does not test it (about 1 GB).
    "xfce": (*_MINIMAL, "xfce4", "xfce4-terminal", "dbus-x11"),
}

# dpkg drops these at unpack time; the cleanup after mmdebstrap catches what was
# extracted before the option took effect (the essential set).
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

_PKG_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_SUITE = re.compile(r"[a-z0-9][a-z0-9.-]*")

#: The parts of this source tree the agent needs inside the desktop (stdlib-only code).
_VMA_SOURCES = ("__init__.py", "core", "vma")

IMAGE_PYTHONPATH = "/usr/lib/qvd/python"
LAUNCHER_PATH = "usr/sbin/qvd-vma"
_LAUNCHER = f'#!/bin/sh\nPYTHONPATH={IMAGE_PYTHONPATH} exec python3 -m qvd.vma "$@"\n'

_MMDEBSTRAP_TIMEOUT = 1800.0
_PACK_TIMEOUT = 900.0
_ZSTD_LEVEL = "-3"  # -3 packs the minimal image in a few seconds; -6 saves ~10% for twice the time
_KEEP_TARBALLS = 2  # per (profile, OS tree): the new one and the previous one


Progress = Callable[[str], None]


def default_cache_dir(cfg: Config | None = None) -> Path:
    """``image.cache`` from the node config, or /var/cache/qvd/images."""
    raw = cfg.get_str("image.cache") if cfg is not None else ""
    return Path(raw) if raw else DEFAULT_CACHE_DIR


def resolve_packages(profile: str, packages: list[str] | None) -> list[str]:
    """The profile's packages plus the extra ones, sorted and checked."""
    if profile not in PROFILES:
        raise ImageError(f"unknown image profile {profile!r}: expected one of {', '.join(sorted(PROFILES))}")
    out = set(PROFILES[profile])
    for p in packages or []:
        # mmdebstrap takes one comma-separated --include; a stray comma or option
        # would change the command, so only Debian package names pass.
        if not _PKG_NAME.fullmatch(p):
            raise ImageError(f"invalid package name {p!r}: Debian package names use a-z, 0-9, '+', '-', '.'")
        out.add(p)
    return sorted(out)


def qvd_source_files() -> list[tuple[str, Path]]:
    """(path relative to the ``qvd`` package, file) of the sources copied into images."""
    pkg = Path(qvd.__file__).resolve().parent
    files: list[tuple[str, Path]] = []
    for entry in _VMA_SOURCES:
        p = pkg / entry
        if p.is_file():
            files.append((entry, p))
            continue
        if not p.is_dir():
            raise ImageError(f"qvd source tree incomplete: {p} is missing")
        for f in sorted(p.rglob("*.py")):
            if "__pycache__" not in f.parts:
                files.append((f.relative_to(pkg).as_posix(), f))
    return files


def source_hash(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for rel, f in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _host_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z0-9.-]+)\"?$", text, re.MULTILINE)
    return m.group(1) if m else ""


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    cur: dict[str, str] = {}
    last = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                yield cur
            cur, last = {}, ""
        elif line[0] in " \t" and last:
            cur[last] += " " + line.strip()
        elif ":" in line:
            k, v = line.split(":", 1)
            last = k.strip().lower()
            cur[last] = v.strip()


def host_apt_sources(suite: str, *, etc: Path = Path("/etc/apt"), codename: str | None = None) -> list[str]:
    """One-line ``deb URI SUITE COMPONENTS`` entries for ``suite`` from the host's apt sources.

    Only Debian's own archives are taken (entries whose suites are the host's
    release or its -updates/-security siblings, signed by Debian's keyring or
    unsigned); the host's codename is replaced by ``suite``.
    """
    codename = _host_codename() if codename is None else codename
    if not codename:
        return []
    debian_keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    entries: list[tuple[list[str], list[str], list[str], str]] = []
    legacy = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in legacy:
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) < 3 or words[0] != "deb":
                    continue
                opts = ""
                if words[1].startswith("["):
                    end = next((i for i, w in enumerate(words) if w.endswith("]")), 1)
                    opts = " ".join(words[1 : end + 1])
                    words = [words[0], *words[end + 1 :]]
                if len(words) >= 3:
                    m = re.search(r"signed-by=(\S+?)\]?$", opts)
                    entries.append(([words[1]], [words[2]], words[3:], m.group(1) if m else ""))
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for st in _deb822_stanzas(f.read_text()):
                if "deb" not in st.get("types", "").split() or st.get("enabled", "yes").lower() == "no":
                    continue
                entries.append(
                    (st.get("uris", "").split(), st.get("suites", "").split(),
                     st.get("components", "").split(), st.get("signed-by", ""))
                )
    lines: list[str] = []
    for uris, suites, comps, keyring in entries:
        if keyring not in ("", debian_keyring):
            continue
        for s in suites:
            if s != codename and not s.startswith(codename + "-"):
                continue
            target = suite + s[len(codename) :]
            for uri in uris:
                lines.append(f"deb {uri} {target} {' '.join(comps or ['main'])}")
    return list(dict.fromkeys(lines))


def _sha(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# --- locks, temporary trees, processes ----------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path, progress: Progress, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another build of {what}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mount_points() -> list[str]:
    out: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            # field 5 is the mount point, with spaces etc. escaped as \040 octal.
            mp = line.split()[4]
            out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp))
    return out


def _remove_tree(path: Path) -> None:
    """Delete a build tree, first detaching anything mounted inside it.

    A killed mmdebstrap can leave /proc, /sys or /dev bind-mounted in its target;
    deleting through such a mount would delete the host's device nodes.
    """
    if not path.exists() and not path.is_symlink():
        return
    prefix = str(path.resolve())
    mounted = sorted((m for m in _mount_points() if m == prefix or m.startswith(prefix + "/")),
                     key=len, reverse=True)
    for mp in mounted:
        # -l detaches at once even when busy, so the rmtree below cannot cross it.
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True, timeout=60)
    if any(m == prefix or m.startswith(prefix + "/") for m in _mount_points()):
        raise ImageError(f"cannot remove {path}: something is still mounted inside it")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _clean_stale(tmp_dir: Path, prefix: str) -> None:
    """Remove temporaries a killed build of the same key left (we hold its lock)."""
    if tmp_dir.is_dir():
        for p in tmp_dir.glob(prefix + "*"):
            _remove_tree(p)


def _tmp_name(tmp_dir: Path, prefix: str) -> Path:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets mmdebstrap unmount its target and stop its children; SIGKILL if it does not go."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While building, SIGTERM unwinds like Ctrl-C, so that the cleanup below runs.

    Python's default SIGTERM action ends the process without running ``finally``
    blocks: mmdebstrap would go on alone and leave its tree behind.  Only possible
    in the main thread; elsewhere the caller owns signal handling.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        # Once only: a second SIGTERM must not cut the cleanup short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_streaming(argv: list[str], progress: Progress, timeout: float, what: str) -> None:
    """Run ``argv`` in its own process group, pass its output lines to ``progress``.

    Own group: mmdebstrap signals its whole process group when it tears down,
    which must not hit us.  Ctrl-C therefore reaches only us, and the
    ``finally`` below passes it on as SIGTERM.
    """
    log.debug("running %s", argv)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        raise ImageError(f"cannot run {argv[0]}: {e.strerror}") from None
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _stop(proc)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None  # for mypy: stdout=PIPE
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail = [*tail[-19:], line]
                progress(line)
        rc = proc.wait()
    finally:
        timer.cancel()
        _stop(proc)
    if timed_out.is_set():
        raise ImageError(f"{what} took longer than {timeout:.0f} s and was stopped")
    if rc != 0:
        raise ImageError(f"{what} failed (exit status {rc}):\n" + "\n".join(tail[-10:]))


# --- the OS layer -------------------------------------------------------------------------------


def _post_clean(root: Path) -> None:
    """Drop what path-exclude could not: files of the essential set unpacked before dpkg ran."""
    share = root / "usr/share"
    for d in ("man", "info"):
        if (share / d).is_dir():
            shutil.rmtree(share / d)
    if (share / "locale").is_dir():
        for p in (share / "locale").iterdir():
            if p.name != "locale.alias":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if (share / "doc").is_dir():
        for pkgdoc in (share / "doc").iterdir():
            if pkgdoc.is_dir() and not pkgdoc.is_symlink():
                for p in pkgdoc.iterdir():
                    if p.name != "copyright":
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (root / "var/cache/apt").glob("*.bin"):
        p.unlink()
    # The desktop's host name comes from the container; a build host's name must not leak in.
    for name in ("etc/hostname", "etc/resolv.conf"):
        f = root / name
        if f.is_file() or f.is_symlink():
            f.unlink()


def _ensure_os_root(
    cache_dir: Path, os_key: str, pkgs: list[str], suite: str, mirrors: list[str],
    progress: Progress, timeout: float,
) -> Path:
    roots = cache_dir / "roots"
    final = roots / os_key
    if final.is_dir():
        progress(f"OS tree cached: {final}")
        return final
    tmp_dir = cache_dir / "tmp"
    with _flock(cache_dir / "locks" / f"os-{os_key}.lock", progress, "the same OS tree"):
        if final.is_dir():
            progress(f"OS tree cached: {final}")
            return final
        _clean_stale(tmp_dir, f"root-{os_key[:16]}-")
        target = _tmp_name(tmp_dir, f"root-{os_key[:16]}-")
        argv = [
            "mmdebstrap", "--mode=root", "--format=directory", "--variant=minbase",
            "--include=" + ",".join(pkgs),
            *[f"--dpkgopt={o}" for o in _DPKG_EXCLUDES],
            suite, str(target), *mirrors,
        ]
        progress(f"mmdebstrap: {len(pkgs)} packages of {suite} (about a minute)")
        t0 = time.monotonic()
        try:
            _run_streaming(argv, progress, timeout, "mmdebstrap")
            _post_clean(target)
            roots.mkdir(parents=True, exist_ok=True)
            (roots / f"{os_key}.json").write_text(json.dumps(
                {"packages": pkgs, "suite": suite, "mirrors": mirrors, "format_version": FORMAT_VERSION,
                 "built_at": _now()}, indent=2) + "\n")
            os.replace(target, final)
        finally:
            _remove_tree(target)
        progress(f"OS tree built in {time.monotonic() - t0:.0f} s")
        return final


# --- the final tarball --------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _toml_str(s: str) -> str:
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(s, ensure_ascii=True)


def image_toml(profile: str, pkgs: list[str], suite: str, src_hash: str, os_key: str, built_at: str) -> str:
    return (
        "# QVD desktop image metadata, written by 'qvd image build'.\n"
        f"format = {_toml_str(DI_FORMAT)}\n"
        f"profile = {_toml_str(profile)}\n"
        f"packages = [{', '.join(_toml_str(p) for p in pkgs)}]\n"
        f"suite = {_toml_str(suite)}\n"
        f"built_at = {_toml_str(built_at)}\n"
        f"source_hash = {_toml_str(src_hash)}\n"
        f"os_key = {_toml_str(os_key)}\n"
        f"format_version = {FORMAT_VERSION}\n"
    )


def _stage_qvd_files(stage: Path, files: list[tuple[str, Path]], meta: str) -> list[str]:
    """Write what we add to the OS tree; return the top paths to archive from ``stage``."""
    pydir = stage / IMAGE_PYTHONPATH.lstrip("/") / "qvd"
    for rel, src in files:
        dst = pydir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        dst.chmod(0o644)
    for d in [pydir, *pydir.rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)
    (stage / "usr/lib/qvd").chmod(0o755)
    (stage / IMAGE_PYTHONPATH.lstrip("/")).chmod(0o755)
    launcher = stage / LAUNCHER_PATH
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(_LAUNCHER)
    launcher.chmod(0o755)
    meta_file = stage / METADATA_PATH
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.parent.chmod(0o755)
    meta_file.write_text(meta)
    meta_file.chmod(0o644)
    return ["./usr/lib/qvd", "./" + LAUNCHER_PATH, "./etc/qvd"]


def _pack(os_root: Path, stage: Path, extra: list[str], out: Path, timeout: float) -> None:
    """tar (OS tree + our files) | zstd > out."""
    for p in extra:
        # Our files must be new paths: a duplicate member would shadow the OS's one
        # depending on the extractor.
        if (os_root / p).exists():
            raise ImageError(f"the OS tree already has {p.lstrip('.')}; refusing to overwrite it")
    tar_argv = ["tar", "--numeric-owner", "--sort=name", "-C", str(os_root), "-cf", "-", ".",
                "-C", str(stage), *extra]
    zstd_argv = ["zstd", _ZSTD_LEVEL, "-T0", "-q", "--no-progress", "-o", str(out)]
    tar = subprocess.Popen(tar_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    zst = subprocess.Popen(zstd_argv, stdin=tar.stdout, stderr=subprocess.PIPE)
    assert tar.stdout is not None  # for mypy: stdout=PIPE
    tar.stdout.close()  # zstd owns the read end now; tar gets SIGPIPE if zstd dies
    try:
        _, zerr = zst.communicate(timeout=timeout)
        _, terr = tar.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        raise ImageError(f"packing the image took longer than {timeout:.0f} s") from None
    finally:
        for proc in (tar, zst):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if tar.returncode != 0:
        raise ImageError(f"tar failed (exit status {tar.returncode}): {terr.decode(errors='replace').strip()}")
    if zst.returncode != 0:
        raise ImageError(f"zstd failed (exit status {zst.returncode}): {zerr.decode(errors='replace').strip()}")


def _prune(cache_dir: Path, profile: str, os_key: str, keep: Path) -> None:
    """Drop older tarballs of the same profile and OS tree (one per agent change otherwise)."""
    same: list[tuple[float, Path]] = []
    for side in cache_dir.glob("*.json"):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        tarball = side.with_suffix(".tar.zst")
        if meta.get("profile") == profile and meta.get("os_key") == os_key and tarball != keep:
            same.append((side.stat().st_mtime, tarball))
    for _, tarball in sorted(same, reverse=True)[_KEEP_TARBALLS - 1 :]:
        log.info("pruning old image %s", tarball)
        for p in (tarball, tarball.with_suffix("").with_suffix(".json")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def build_image(
    profile: str = "minimal",
    packages: list[str] | None = None,
    *,
    suite: str = "bookworm",
    mirror: str = "",
    cache_dir: Path,
    progress: Progress | None = None,
    timeout: float = _MMDEBSTRAP_TIMEOUT,
) -> Path:
    """Build (or fetch from the cache) a DI and return the path of its ``.tar.zst``.

    ``packages`` are added to the profile's.  ``mirror`` empty = Debian's entries
    of the host's apt sources (mmdebstrap's own default if there are none).
    ``progress`` gets human-readable lines.  Blocking; raises ImageError.
    Pre: running as root.  Post: the returned file passes inspect_di_tarball().
    """
    say: Progress = progress or (lambda line: log.info("%s", line))
    pkgs = resolve_packages(profile, packages)
    if not _SUITE.fullmatch(suite):
        raise ImageError(f"invalid suite name {suite!r}")
    if mirror and ("://" not in mirror or any(c.isspace() for c in mirror)):
        raise ImageError(f"invalid mirror {mirror!r}: expected a URL such as http://deb.debian.org/debian")
    if os.geteuid() != 0:
        raise ImageError("building an image needs root (mmdebstrap root mode)")
    for tool in ("mmdebstrap", "tar", "zstd"):
        if shutil.which(tool) is None:
            raise ImageError(f"building an image needs '{tool}' (apt-get install {tool})")

    files = qvd_source_files()
    src_hash = source_hash(files)
    mirrors = [mirror] if mirror else host_apt_sources(suite)
    os_key = _sha(["os", str(FORMAT_VERSION), suite, *pkgs, "--", *mirrors])
    key = _sha(["di", str(FORMAT_VERSION), profile, os_key, src_hash])
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{key}.tar.zst"
    sidecar = cache_dir / f"{key}.json"
    if out.is_file() and sidecar.is_file():
        say(f"image cached: {out}")
        return out

    with _sigterm_as_exit(), _flock(cache_dir / "locks" / f"{key}.lock", say, "the same image"):
        if out.is_file() and sidecar.is_file():
            say(f"image cached: {out}")
            return out
        t0 = time.monotonic()
        if not mirror:
            say("mirror: " + ("; ".join(mirrors) if mirrors else "mmdebstrap default (no Debian entry in apt)"))
        os_root = _ensure_os_root(cache_dir, os_key, pkgs, suite, mirrors, say, timeout)

        tmp_dir = cache_dir / "tmp"
        _clean_stale(tmp_dir, f"di-{key[:16]}-")
        work = _tmp_name(tmp_dir, f"di-{key[:16]}-")
        try:
            work.mkdir()
            stage = work / "stage"
            built_at = _now()
            say(f"adding the agent ({len(files)} files, source hash {src_hash[:12]})")
            extra = _stage_qvd_files(stage, files, image_toml(profile, pkgs, suite, src_hash, os_key, built_at))
            say("packing the image (tar | zstd)")
            part = work / "image.tar.zst"
            _pack(os_root, stage, extra, part, _PACK_TIMEOUT)
            meta = {"profile": profile, "packages": pkgs, "suite": suite, "mirror": mirror,
                    "os_key": os_key, "source_hash": src_hash, "built_at": built_at,
                    "format": DI_FORMAT, "format_version": FORMAT_VERSION, "size": part.stat().st_size}
            side_tmp = work / "image.json"
            side_tmp.write_text(json.dumps(meta, indent=2) + "\n")
            # Tarball first: a sidecar without its tarball must never look like a cache hit.
            os.replace(part, out)
            os.replace(side_tmp, sidecar)
        finally:
            _remove_tree(work)
        _prune(cache_dir, profile, os_key, out)
        say(f"image ready: {out} ({out.stat().st_size / 1e6:.0f} MB, {time.monotonic() - t0:.1f} s)")
        return out
