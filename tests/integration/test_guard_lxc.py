"""The fence guard with the real ``qvd-hkd`` process, the real LXC backend and the real minimal image.

The node is :class:`tests.integration.test_hkd_lxc.HkdNode` (own root, its own PostgreSQL
database: the guard runs only for cluster nodes; test bridge, random desktop network).
The daemon starts the guard (``python -m qvd.hkd.guard``) at its first start step; the
tests SIGKILL the daemon and watch what the guard does:

* restarted quickly, the daemon adopts its still-running container and the guard,
  although it saw the daemon gone, leaves it alone;
* not restarted, the guard stops the container once the last heartbeat is older than
  ``internal.hkd.agent.ticker.timeout`` + 1 s (3 s here), and then exits;
* after a clean stop the guard exits by itself.

Everything is removed by the fixture's finalizer, also on failure: the daemon and the
node through :meth:`HkdNode.teardown` (containers, bridge, firewall rules, root), and
every guard process seen, by pid, after checking its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qvd.core.states import HostState, VmState
from qvd.hkd import guard as g
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.test_hkd_lxc import HkdNode, free_test_net, lxc_unusable, wait_for

pytestmark = [pytest.mark.lxc, pytest.mark.slow]

TICKER = "internal.hkd.agent.ticker.timeout"
SHORT_TICKER = 3.0
FENCE_TIMEOUT = 60.0  # generous: the guard acts ~4 s after the last heartbeat


def _proc_cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class GuardedNode(HkdNode):
    guards: list[int] = field(default_factory=list)

    def guard_alive(self, pid: int) -> bool:
        return g._proc_state(pid) not in ("", "Z", "X") and "qvd.hkd.guard" in _proc_cmd(pid) \
            and str(self.root) in _proc_cmd(pid)

    def guard(self) -> int:
        """The pid of the running guard of this root (checked, and remembered for the cleanup)."""
        pid = g.guard_pid(self.paths.run)
        assert pid is not None, "no guard lock file"
        assert self.guard_alive(pid), f"guard {pid} is not running: {_proc_cmd(pid)!r}\n{self.guard_log()}"
        if pid not in self.guards:
            self.guards.append(pid)
        return pid

    def wait_guard_gone(self, pid: int, timeout: float = 20.0) -> None:
        wait_for(f"guard {pid} to exit", lambda: not self.guard_alive(pid), timeout, 0.1)

    def guard_log(self) -> str:
        p = self.paths.log / g.LOG_FILE
        return p.read_text(errors="replace") if p.exists() else ""

    def running(self, vm_id: int) -> bool:
        return asyncio.run(self.backend().is_running(vm_id))

    def desktop_pid(self, vm_id: int) -> int | None:
        return {d.vm_id: d.pid for d in self.desktops()}.get(vm_id)


@pytest.fixture(scope="module")
def node(minimal_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedNode]:
    why = lxc_unusable()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("guard-lxc")
    pg = create_pg_database()  # the guard runs only for nodes of a cluster (a shared PostgreSQL)
    n = GuardedNode(root=root, net=free_test_net(), bridge=f"qvdt{secrets.token_hex(3)}",
                    name=f"grd-{secrets.token_hex(3)}", image=minimal_image,
                    db_url=f"postgresql+psycopg:///{pg}?host=/var/run/postgresql")
    errors: list[str] = []
    try:
        n.setup()
        n.start_hkd()
        n.guard()
        yield n
    finally:
        with contextlib.suppress(OSError):  # keep the guard's log for diagnosis
            shutil.copy(n.paths.log / g.LOG_FILE, root.with_name(root.name + "-guard.log"))
        with contextlib.suppress(AssertionError):
            n.guard()  # remember the current one
        errors = n.teardown()
        for pid in n.guards:
            try:
                n.wait_guard_gone(pid, 20)
            except AssertionError:
                errors.append(f"guard {pid} still running 20 s after the teardown")
                if n.guard_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        print(f"\nHKD timings (s): {n.timings}")
        drop_pg_database(pg)
    if errors:
        pytest.fail("guarded node teardown: " + "; ".join(errors))


def test_a_quickly_restarted_daemon_adopts_what_the_guard_left_alone(node: GuardedNode) -> None:
    vm = node.new_vm("grd-adopt")
    try:
        node.start_and_wait(vm, "start_to_running_first")
        desktop_pid = node.desktop_pid(vm)
        guard = node.guard()
        hkd_pid = node.proc.pid if node.proc else 0
        node.kill_hkd()
        killed = time.monotonic()
        # The guard notices the daemon is gone...
        wait_for("the guard to see the daemon gone", lambda: f"node daemon pid {hkd_pid} is gone" in node.guard_log(),
                 30, 0.05)
        assert node.running(vm)
        # ...and a daemon back within internal.hkd.agent.ticker.timeout (6 s) + 1 s takes the desktop over.
        node.start_hkd()
        assert node.guard() == guard  # the same guard kept watching; no second one
        assert node.runtime(vm).vm_state == VmState.RUNNING
        assert node.desktop_pid(vm) == desktop_pid
        assert node.vma(vm, "ping") == "pong"
        wait_for("the adoption to be logged", lambda: "adopted the running desktop" in node.log_tail(200), 30, 0.05)
        new_pid = node.proc.pid if node.proc else 0
        wait_for("the guard to watch the new daemon", lambda: f"node daemon pid {new_pid} holds" in node.guard_log(),
                 30, 0.05)
        # Past the old daemon's deadline: the guard leaves the desktops of a live daemon alone.
        time.sleep(max(0.0, killed + 6 + g.MARGIN + 2 - time.monotonic()))
        assert node.running(vm) and node.desktop_pid(vm) == desktop_pid
        assert "stopping its" not in node.guard_log()
    finally:
        with contextlib.suppress(Exception):
            node.stop_vm(vm)
        node.wait_state(vm, VmState.STOPPED, 120)
    node.assert_gone(vm)


def test_a_clean_stop_lets_the_guard_exit(node: GuardedNode) -> None:
    guard = node.guard()
    assert (node.paths.run / g.HEARTBEAT).exists()
    assert node.stop_hkd() == 0
    assert not (node.paths.run / g.HEARTBEAT).exists()
    node.wait_guard_gone(guard, 20)
    assert "nothing to guard, exiting" in node.guard_log()
    node.start_hkd()
    assert node.guard() != guard


def test_the_guard_stops_the_desktops_of_a_daemon_that_does_not_come_back(node: GuardedNode) -> None:
    node.stop_hkd()
    node.configure(**{TICKER: SHORT_TICKER})
    node.start_hkd()
    vm = node.new_vm("grd-fence")
    try:
        node.start_and_wait(vm, "start_to_running")
        guard = node.guard()
        node.kill_hkd()
        t0 = time.monotonic()
        assert node.running(vm)  # not at once: a restarted daemon could still adopt it
        wait_for("the guard to stop the container", lambda: not node.running(vm), FENCE_TIMEOUT, 0.1)
        node.timings.setdefault("sigkill_to_fenced", []).append(round(time.monotonic() - t0, 2))
        node.assert_gone(vm)  # stopped and cleaned: nothing of it is left on the node
        wait_for("the guard to log the stop", lambda: f"vm_id={vm}: desktop stopped by" in node.guard_log(), 30, 0.05)
        log = node.guard_log()
        assert f"the node daemon died and did not come back within {SHORT_TICKER + g.MARGIN:g} s" in log
        assert "stopping its 1 desktop(s) so that peers can restart them" in log
        assert f"vm_id={vm}: desktop stopped by the fence guard" in log
        node.wait_guard_gone(guard, 20)  # nothing left to guard
        # The next daemon finds the desktop gone and records it.
        node.start_hkd()
        rt = node.wait_state(vm, VmState.STOPPED, 60)
        assert "no longer running" in rt.last_error
        assert node.host_state() == HostState.RUNNING
        node.guard()
    finally:
        # Back to the usual settings, with a daemon that settles whatever the test left.
        node.configure()
        if node.proc is not None and node.proc.poll() is None:
            node.stop_hkd()
        node.start_hkd()
        with contextlib.suppress(Exception):
            node.stop_vm(vm)
        node.wait_state(vm, VmState.STOPPED, 120)
