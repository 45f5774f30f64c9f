"""Fixtures of the cluster tests: a whole QVD cluster on this machine (:mod:`tests.multinode`).

It needs root, LXC, iproute2, iptables, nftables, PostgreSQL's server binaries, Xvfb, xwininfo and
nxproxy.  Outside
CI a machine without them skips these tests; under CI (``CI`` set) that is a failure, as for the
desktop image (:mod:`tests.images`).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.multinode import Cluster, missing_requirements

_current: list[Cluster] = []  # the cluster of the running module, for the failure report


def require_cluster_tools() -> None:
    missing = missing_requirements()
    if missing:
        why = f"a cluster on this machine needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three nodes (real qvd-hkd + qvd-l7r each) on one PostgreSQL, six users with one VM each."""
    require_cluster_tools()
    image: Path = request.getfixturevalue("minimal_image")
    keep = os.environ.get("QVD_TEST_KEEP_CLUSTER_LOGS") == "1"  # keep the work dir (logs) for a person to read
    with Cluster(image, nodes=3, users=6, keep_workdir=keep) as c:
        _current.append(c)
        try:
            yield c
        finally:
            _current.remove(c)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failed cluster test shows the tails of the cluster's logs (daemons, guards, clients)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and _current:
        rep.sections.append(("cluster logs (tails)", _current[-1].log_tails(40)))
