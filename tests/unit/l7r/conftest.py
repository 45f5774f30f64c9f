from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import NodeFx
from tests.unit.l7r.harness import Rig, make_rig


@pytest.fixture
def rig(node: NodeFx) -> Iterator[Rig]:
    yield from make_rig(node)
