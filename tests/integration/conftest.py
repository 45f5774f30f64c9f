"""Integration fixtures: ``minimal_image`` comes from tests/conftest.py (tests/images.py)."""

from __future__ import annotations

from tests.images import IMAGE_CACHE, build_minimal_image

__all__ = ["IMAGE_CACHE", "build_minimal_image"]
