"""The pure parts of the image builder: package lists, apt sources, metadata, keys."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qvd.core.errors import ImageError
from qvd.images import build


def test_profiles_resolve_sorted_with_extras() -> None:
    pkgs = build.resolve_packages("minimal", ["htop", "nxagent"])
    assert pkgs == sorted(set(pkgs))
    for needed in ("nxagent", "python3", "tini", "openbox", "xterm", "htop", "passwd"):
        assert needed in pkgs
    assert set(build.resolve_packages("minimal", None)) < set(build.resolve_packages("xfce", None))


@pytest.mark.parametrize("bad", ["foo,bar", "--option", "Foo", "a b", "x;rm"])
def test_bad_package_names_refused(bad: str) -> None:
    with pytest.raises(ImageError, match="invalid package name"):
        build.resolve_packages("minimal", [bad])


def test_unknown_profile_refused() -> None:
    with pytest.raises(ImageError, match=r"unknown image profile 'gnome'.*minimal"):
        build.resolve_packages("gnome", None)


def test_image_toml_round_trips() -> None:
    text = build.image_toml("minimal", ["a", 'we"ird'], "bookworm", "h" * 64, "k" * 64, "2026-01-01T00:00:00Z")
    data = tomllib.loads(text)
    assert data["format"] == "qvd-di-1"
    assert data["packages"] == ["a", 'we"ird']
    assert data["source_hash"] == "h" * 64


def test_source_files_cover_the_agent() -> None:
    rels = [rel for rel, _ in build.qvd_source_files()]
    assert "__init__.py" in rels
    assert "core/config.py" in rels
    assert any(r.startswith("vma/") for r in rels)
    assert not any("__pycache__" in r for r in rels)


def test_source_hash_follows_content(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("a = 1\n")
    h1 = build.source_hash([("x.py", f)])
    f.write_text("a = 2\n")
    assert build.source_hash([("x.py", f)]) != h1


def test_host_apt_sources_takes_debian_entries_and_renames_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "vendor.sources").write_text(
        "Types: deb\nURIs: http://vendor.example/apt\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/vendor.gpg\n"
    )
    (tmp_path / "sources.list.d" / "off.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n"
    )
    got = build.host_apt_sources("trixie", etc=tmp_path, codename="bookworm")
    assert got == [
        "deb http://mirror.example/debian trixie main contrib",
        "deb http://deb.example/debian trixie main",
        "deb http://deb.example/debian trixie-updates main",
        "deb http://deb.example/debian-security trixie-security main",
    ]
