"""QVD-py: a Virtual Desktop Infrastructure in Python, wire-compatible with QVD clients."""

from __future__ import annotations

__version__ = "0.1.0"
