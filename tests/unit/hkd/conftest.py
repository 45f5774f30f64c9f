from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qvd.backends.fake import FakeBackend
from tests.unit.hkd.hkd_fakes import Node, make_node


@pytest.fixture
def hnode(tmp_path: Path) -> Iterator[Node]:
    """A seeded SQLite node with one OSF and one DI (tags v1, head, default) and fast timers."""
    n = make_node(tmp_path)
    try:
        yield n
    finally:
        FakeBackend.forget(n.root)
        n.engine.dispose()
