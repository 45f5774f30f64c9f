"""The real minimal desktop image: built with mmdebstrap, cached, valid, complete."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qvd.core.errors import ImageError
from qvd.images import build
from qvd.images.validate import inspect_di_tarball

from .conftest import IMAGE_CACHE

pytestmark = pytest.mark.lxc


def _names(tarball: Path) -> set[str]:
    out = subprocess.run(["tar", "-tf", str(tarball)], capture_output=True, check=True, timeout=300).stdout
    return {n.removeprefix("./").rstrip("/") for n in out.decode().splitlines()}


def test_minimal_image_is_valid_and_complete(minimal_image: Path) -> None:
    assert minimal_image.parent == IMAGE_CACHE
    assert minimal_image.name.endswith(".tar.zst")
    meta = inspect_di_tarball(minimal_image)
    assert meta.format == "qvd-di-1"
    assert meta.profile == "minimal"
    assert meta.compression == "zstd"
    assert "nxagent" in meta.packages and "tini" in meta.packages
    assert meta.source_hash == build.source_hash(build.qvd_source_files())
    names = _names(minimal_image)
    for path in ("usr/bin/nxagent", "usr/bin/python3", "usr/bin/tini", "usr/bin/xterm", "usr/bin/openbox",
                 "usr/sbin/useradd", "usr/sbin/qvd-vma", "etc/qvd/image.toml",
                 "usr/lib/qvd/python/qvd/__init__.py", "usr/lib/qvd/python/qvd/core/config.py",
                 "usr/lib/qvd/python/qvd/vma/__init__.py"):
        assert path in names, path
    # The excludes worked: no manual pages, only copyright files under /usr/share/doc.
    assert not any(n.startswith("usr/share/man/") for n in names)
    docs = [n for n in names if n.startswith("usr/share/doc/") and n.count("/") >= 4]
    assert docs and all(n.endswith("/copyright") for n in docs)
    sidecar = json.loads(minimal_image.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["os_key"] and sidecar["profile"] == "minimal"


def test_launcher_runs_the_agent_from_the_image(minimal_image: Path) -> None:
    script = subprocess.run(["tar", "-xOf", str(minimal_image), "./usr/sbin/qvd-vma"], capture_output=True,
                            check=True, timeout=300).stdout.decode()
    assert script.startswith("#!/bin/sh\n")
    assert "PYTHONPATH=/usr/lib/qvd/python exec python3 -m qvd.vma" in script


def test_second_build_is_a_cache_hit(minimal_image: Path) -> None:
    lines: list[str] = []
    again = build.build_image("minimal", cache_dir=IMAGE_CACHE, progress=lines.append)
    assert again == minimal_image
    assert lines == [f"image cached: {minimal_image}"]


def test_changed_agent_code_only_repacks(minimal_image: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "marker.py"
    extra.write_text("# a change of the agent's code\n")
    real = build.qvd_source_files
    monkeypatch.setattr(build, "qvd_source_files", lambda: [*real(), ("vma/test_marker.py", extra)])
    lines: list[str] = []
    other = build.build_image("minimal", cache_dir=IMAGE_CACHE, progress=lines.append)
    try:
        assert other != minimal_image
        assert any(line.startswith("OS tree cached") for line in lines)
        assert not any(line.startswith("mmdebstrap") for line in lines)
        assert "usr/lib/qvd/python/qvd/vma/test_marker.py" in _names(other)
    finally:
        # Do not leave a test-only image in the shared cache.
        other.unlink(missing_ok=True)
        other.with_suffix("").with_suffix(".json").unlink(missing_ok=True)


def test_failed_pack_leaves_no_cache_entry(minimal_image: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "marker2.py"
    extra.write_text("# another change\n")
    real = build.qvd_source_files
    monkeypatch.setattr(build, "qvd_source_files", lambda: [*real(), ("vma/test_marker2.py", extra)])

    def broken_pack(*args: object, **kw: object) -> None:
        raise ImageError("simulated failure while packing")

    monkeypatch.setattr(build, "_pack", broken_pack)
    before = set(IMAGE_CACHE.glob("*.tar.zst"))
    with pytest.raises(ImageError, match="simulated failure"):
        build.build_image("minimal", cache_dir=IMAGE_CACHE, progress=lambda _l: None)
    assert set(IMAGE_CACHE.glob("*.tar.zst")) == before
    assert not [p for p in (IMAGE_CACHE / "tmp").iterdir() if p.name.startswith("di-")]
