"""The real minimal desktop image for tests, built once into /var/cache/qvd/images.

Kept across CI runs on purpose: the first build takes about a minute, later ones are
a cache hit or a few-second re-pack when the agent's code changed.  Override the
directory with ``QVD_TEST_IMAGE_CACHE``.  Outside CI a machine that cannot build it
skips the tests that need it; under CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qvd.core.errors import ImageError
from qvd.images.build import build_image

IMAGE_CACHE = Path(os.environ.get("QVD_TEST_IMAGE_CACHE", "/var/cache/qvd/images"))


def build_minimal_image() -> Path:
    """Build (or take from the cache) the minimal image; skip when this machine cannot."""
    missing = [t for t in ("mmdebstrap", "zstd", "tar") if shutil.which(t) is None]
    why = "building the desktop image needs root" if os.geteuid() != 0 else (
        f"building the desktop image needs {', '.join(missing)}" if missing else "")
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    lines: list[str] = []
    try:
        return build_image("minimal", cache_dir=IMAGE_CACHE, progress=lines.append)
    except ImageError as e:
        pytest.fail(f"building the minimal image failed: {e}\n" + "\n".join(lines[-40:]))

