"""Check a DI tarball before anything unpacks it.

:func:`inspect_di_tarball` reads the whole archive once, as a stream (no extraction,
no seeking), so a 200 MB image costs one decompression pass.  It refuses with
:class:`~qvd.core.errors.ImageError`:

* anything that is not a tar archive (plain, gzip, xz, bzip2 or zstd);
* a truncated or corrupt archive: the decompressor must reach its end marker and
  the tar stream its end-of-archive blocks (Python's ``tarfile`` alone silently
  accepts a tar cut at a member boundary, hence the explicit check);
* members with absolute paths or ``..`` components, hard links that point outside
  the archive, and device nodes outside ``dev/`` (a privileged container could use
  a stray block device node to reach the node's disks);
* foreign tarballs: no ``sbin``/``usr/bin`` at the top or no ``/etc/qvd/image.toml``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from qvd.core.errors import ImageError

DI_FORMAT = "qvd-di-1"
METADATA_PATH = "etc/qvd/image.toml"
_METADATA_MAX = 64 * 1024
_BLOCK = 512
_CHUNK = 1 << 20

_HINT = "(build one with 'qvd image build')"


@dataclass(frozen=True)
class DiMetadata:
    """What ``/etc/qvd/image.toml`` says, plus what reading the archive showed."""

    format: str
    profile: str
    packages: tuple[str, ...]
    built_at: str
    source_hash: str
    suite: str
    compression: str  # "zstd", "gzip", "xz", "bzip2" or "none"
    members: int
    tar_bytes: int  # size of the uncompressed tar stream


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _CountingReader:
    """Counts the bytes ``tarfile`` pulls, to tell a complete archive from a cut one."""

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.total += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _sniff(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


@contextmanager
def _zstd_stream(path: Path) -> Iterator[_Readable]:
    """Decompress with the zstd tool (Python 3.11 has no zstd module)."""
    if shutil.which("zstd") is None:
        raise ImageError(f"{path}: is zstd-compressed but the 'zstd' tool is not installed")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ["zstd", "-d", "-c", "-q", "--no-progress", "--", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        )
        assert proc.stdout is not None  # for mypy: stdout=PIPE
        ok = False
        try:
            yield proc.stdout
            ok = True
        finally:
            if not ok:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip().splitlines()
            detail = msg[-1] if msg else f"exit status {rc}"
            raise ImageError(f"{path}: corrupt or truncated zstd data ({detail})")


@contextmanager
def _decompressed(path: Path, fh: IO[bytes], kind: str) -> Iterator[_Readable]:
    if kind == "zstd":
        with _zstd_stream(path) as s:
            yield s
    elif kind == "gzip":
        with gzip.GzipFile(fileobj=fh, mode="rb") as g:
            yield g
    elif kind == "xz":
        with lzma.LZMAFile(fh, mode="rb") as x:
            yield x
    elif kind == "bzip2":
        with bz2.BZ2File(fh, mode="rb") as b:
            yield b
    else:
        yield fh


def _check_name(path: Path, name: str, what: str = "member") -> str:
    """Return the member name relative to the root; refuse escapes."""
    if name.startswith("/"):
        raise ImageError(f"{path}: unsafe archive, {what} has an absolute path: {name!r}")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ImageError(f"{path}: unsafe archive, {what} contains '..': {name!r}")
    rel = "/".join(p for p in parts if p != ".")
    return rel


def _parse_metadata(path: Path, raw: bytes) -> dict[str, object]:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ImageError(f"{path}: /{METADATA_PATH} is not valid TOML: {e}") from None
    fmt = data.get("format")
    if fmt != DI_FORMAT:
        raise ImageError(
            f"{path}: unsupported image format {fmt!r} in /{METADATA_PATH} (expected {DI_FORMAT!r}) {_HINT}"
        )
    return data


def inspect_di_tarball(path: Path) -> DiMetadata:
    """Read ``path`` through completely and return its metadata, or raise ImageError."""
    try:
        fh = path.open("rb")
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image: {e.strerror}") from None
    with fh:
        head = fh.read(8)
        if not head:
            raise ImageError(f"{path}: empty file, not a tar archive")
        fh.seek(0)
        kind = _sniff(head)
        members = 0
        seen: set[str] = set()
        meta_raw: bytes | None = None
        try:
            with _decompressed(path, fh, kind) as stream:
                counter = _CountingReader(stream)
                try:
                    tf = tarfile.open(fileobj=counter, mode="r|", bufsize=_CHUNK)  # type: ignore[call-overload]  # noqa: SIM115
                except tarfile.ReadError:
                    raise ImageError(f"{path}: not a tar archive (compression: {kind})") from None
                with tf:
                    for m in tf:
                        members += 1
                        rel = _check_name(path, m.name)
                        if m.islnk():
                            _check_name(path, m.linkname, "hard link target")
                        if (m.ischr() or m.isblk()) and not rel.startswith("dev/"):
                            raise ImageError(f"{path}: unsafe archive, device node outside /dev: {m.name!r}")
                        if rel in ("sbin", "usr/bin") and (m.isdir() or m.issym()):
                            seen.add(rel)
                        elif rel == METADATA_PATH and m.isfile():
                            if m.size > _METADATA_MAX:
                                raise ImageError(f"{path}: /{METADATA_PATH} is too large ({m.size} bytes)")
                            f = tf.extractfile(m)
                            meta_raw = f.read() if f is not None else b""
                    end = tf.offset
                # The tar end marker is two zero blocks; tarfile stops after the first
                # one, or at a bare EOF, so demand that both are really there.
                counter.drain()
                if counter.total < end + 2 * _BLOCK:
                    raise ImageError(f"{path}: truncated tar archive (the end-of-archive marker is missing)")
        except ImageError:
            raise
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
            if members == 0:
                raise ImageError(f"{path}: not a readable tar archive ({kind}): {e}") from None
            raise ImageError(f"{path}: corrupt or truncated archive ({kind}): {e}") from None

    missing = [d + "/" for d in ("sbin", "usr/bin") if d not in seen]
    if missing:
        raise ImageError(
            f"{path}: not a QVD desktop image: no {' or '.join(missing)} at the top of the archive {_HINT}"
        )
    if meta_raw is None:
        raise ImageError(f"{path}: not a QVD desktop image: no /{METADATA_PATH} {_HINT}")
    data = _parse_metadata(path, meta_raw)
    pkgs = data.get("packages", [])
    return DiMetadata(
        format=DI_FORMAT,
        profile=str(data.get("profile", "")),
        packages=tuple(str(p) for p in pkgs) if isinstance(pkgs, list) else (),
        built_at=str(data.get("built_at", "")),
        source_hash=str(data.get("source_hash", "")),
        suite=str(data.get("suite", "")),
        compression=kind,
        members=members,
        tar_bytes=counter.total,
    )
