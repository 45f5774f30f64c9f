"""Import every backend implementation so that it registers itself in base.REGISTRY."""

from __future__ import annotations
