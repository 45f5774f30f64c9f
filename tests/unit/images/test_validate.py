"""inspect_di_tarball on small synthetic tarballs: good ones pass, everything else is refused."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from qvd.core.errors import ImageError
from qvd.images.validate import inspect_di_tarball

META = b'format = "qvd-di-1"\nprofile = "minimal"\npackages = ["nxagent", "python3"]\n' \
       b'suite = "bookworm"\nbuilt_at = "2026-01-01T00:00:00Z"\nsource_hash = "abc"\n'

Member = tuple[str, str, bytes]  # (name, kind, data or link target)


def _good_members() -> list[Member]:
    return [
        ("./", "dir", b""),
        ("./usr", "dir", b""),
        ("./usr/bin", "dir", b""),
        ("./usr/sbin", "dir", b""),
        ("./sbin", "sym", b"usr/sbin"),
        ("./usr/bin/big", "file", bytes(range(256)) * 800),  # 200 KiB, so cuts can land inside it
        ("./etc", "dir", b""),
        ("./etc/qvd", "dir", b""),
        ("./etc/qvd/image.toml", "file", META),
        ("./etc/alternatives", "dir", b""),
        ("./etc/alternatives/x", "sym", b"/usr/bin/big"),  # absolute symlinks are normal in a rootfs
        ("./dev", "dir", b""),
        ("./dev/null", "chr", b""),
        ("./usr/bin/tail", "file", b"#!/bin/sh\n"),
    ]


def _tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data.decode()
                tf.addfile(ti)
            elif kind == "lnk":
                ti.type, ti.linkname = tarfile.LNKTYPE, data.decode()
                tf.addfile(ti)
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _compress(raw: bytes, kind: str) -> bytes:
    if kind == "none":
        return raw
    if kind == "gzip":
        import gzip

        return gzip.compress(raw)
    if kind == "xz":
        import lzma

        return lzma.compress(raw)
    if kind == "bzip2":
        import bz2

        return bz2.compress(raw)
    assert kind == "zstd"
    return subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout


KINDS = ["none", "gzip", "xz", "bzip2"] + (["zstd"] if shutil.which("zstd") else [])


@pytest.fixture
def write(tmp_path: Path) -> Callable[[bytes, str], Path]:
    def _write(data: bytes, name: str = "di.tar") -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p

    return _write


@pytest.mark.parametrize("kind", KINDS)
def test_good_image_passes(write: Callable[[bytes, str], Path], kind: str) -> None:
    raw = _tar_bytes(_good_members())
    meta = inspect_di_tarball(write(_compress(raw, kind), "di.img"))
    assert meta.format == "qvd-di-1"
    assert meta.profile == "minimal"
    assert meta.packages == ("nxagent", "python3")
    assert meta.compression == kind
    assert meta.members == len(_good_members())
    assert meta.tar_bytes == len(raw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_image_refused(write: Callable[[bytes, str], Path], kind: str, fraction: float) -> None:
    data = _compress(_tar_bytes(_good_members()), kind)
    with pytest.raises(ImageError, match=r"truncated|corrupt"):
        inspect_di_tarball(write(data[: int(len(data) * fraction)], "cut.img"))


def test_plain_tar_cut_at_member_boundary_refused(write: Callable[[bytes, str], Path]) -> None:
    """tarfile alone accepts this one: the end-of-archive blocks are what is missing."""
    raw = _tar_bytes(_good_members())
    buf = io.BytesIO(raw)
    with tarfile.open(fileobj=buf, mode="r:") as tf:
        last = tf.getmembers()[-1]
    cut = last.offset_data + ((last.size + 511) // 512) * 512
    with pytest.raises(ImageError, match="truncated"):
        inspect_di_tarball(write(raw[:cut], "cut.tar"))


def test_corrupt_gzip_refused(write: Callable[[bytes, str], Path]) -> None:
    data = bytearray(_compress(_tar_bytes(_good_members()), "gzip"))
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    with pytest.raises(ImageError, match=r"corrupt|truncated|not a readable"):
        inspect_di_tarball(write(bytes(data), "bad.tar.gz"))


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd not installed")
def test_corrupt_zstd_refused(write: Callable[[bytes, str], Path]) -> None:
    data = bytearray(_compress(_tar_bytes(_good_members()), "zstd"))
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64
    with pytest.raises(ImageError, match=r"corrupt|truncated|not a readable"):
        inspect_di_tarball(write(bytes(data), "bad.tar.zst"))


def test_foreign_tarball_without_metadata(write: Callable[[bytes, str], Path]) -> None:
    members = [m for m in _good_members() if not m[0].startswith("./etc/qvd")]
    with pytest.raises(ImageError, match=r"not a QVD desktop image: .*image\.toml.*qvd image build"):
        inspect_di_tarball(write(_tar_bytes(members), "foreign.tar"))


def test_foreign_tarball_without_system_dirs(write: Callable[[bytes, str], Path]) -> None:
    members = [("./etc", "dir", b""), ("./etc/qvd", "dir", b""), ("./etc/qvd/image.toml", "file", META),
               ("./data.txt", "file", b"hello")]
    with pytest.raises(ImageError, match=r"not a QVD desktop image: no sbin/ or usr/bin/"):
        inspect_di_tarball(write(_tar_bytes(members), "foreign.tar"))


def test_wrong_format_in_metadata(write: Callable[[bytes, str], Path]) -> None:
    members = [m if m[0] != "./etc/qvd/image.toml" else (m[0], "file", b'format = "other-9"\n')
               for m in _good_members()]
    with pytest.raises(ImageError, match="unsupported image format"):
        inspect_di_tarball(write(_tar_bytes(members), "other.tar"))


def test_invalid_toml_metadata(write: Callable[[bytes, str], Path]) -> None:
    members = [m if m[0] != "./etc/qvd/image.toml" else (m[0], "file", b"format = = \n")
               for m in _good_members()]
    with pytest.raises(ImageError, match="not valid TOML"):
        inspect_di_tarball(write(_tar_bytes(members), "badtoml.tar"))


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (("../escape", "file", b"x"), r"'\.\.'"),
        (("./usr/../../escape", "file", b"x"), r"'\.\.'"),
        (("/etc/passwd", "file", b"x"), "absolute path"),
        (("./usr/bin/hl", "lnk", b"../../etc/shadow"), r"hard link target contains '\.\.'"),
        (("./usr/bin/hl", "lnk", b"/etc/shadow"), "hard link target has an absolute path"),
        (("./root/sda", "chr", b""), "device node outside /dev"),
    ],
)
def test_unsafe_members_refused(write: Callable[[bytes, str], Path], member: Member, message: str) -> None:
    members = _good_members()
    members.insert(3, member)
    with pytest.raises(ImageError, match=message):
        inspect_di_tarball(write(_tar_bytes(members), "evil.tar"))


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is not a tar archive at all\n" * 50, bytes(range(256)) * 40],
    ids=["empty", "text", "binary"],
)
def test_not_a_tar_refused(write: Callable[[bytes, str], Path], data: bytes) -> None:
    with pytest.raises(ImageError, match="not a"):
        inspect_di_tarball(write(data, "junk.bin"))


def test_gzip_of_non_tar_refused(write: Callable[[bytes, str], Path]) -> None:
    with pytest.raises(ImageError, match="not a"):
        inspect_di_tarball(write(_compress(b"just text\n" * 300, "gzip"), "junk.gz"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        inspect_di_tarball(tmp_path / "nope.tar.zst")
