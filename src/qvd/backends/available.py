"""Import every backend implementation so that it registers itself in base.REGISTRY."""

from __future__ import annotations

import qvd.backends.fake  # noqa: F401  (unit tests only)
from qvd.backends import lxc  # noqa: F401
