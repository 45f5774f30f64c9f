"""Shared fixtures of the integration tests.

``minimal_image``: the real minimal desktop image, built once per session into
/var/cache/qvd/images (kept across CI runs on purpose: the first build takes about
a minute, later ones are a cache hit or a few-second re-pack when the agent's
code changed).  Override the directory with ``QVD_TEST_IMAGE_CACHE``.
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
    if os.geteuid() != 0:
        pytest.skip("building the desktop image needs root")
    for tool in ("mmdebstrap", "zstd", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"building the desktop image needs {tool}")
    lines: list[str] = []
    try:
        return build_image("minimal", cache_dir=IMAGE_CACHE, progress=lines.append)
    except ImageError as e:
        pytest.fail(f"building the minimal image failed: {e}\n" + "\n".join(lines[-40:]))


@pytest.fixture(scope="session")
def minimal_image() -> Path:
    return build_minimal_image()
