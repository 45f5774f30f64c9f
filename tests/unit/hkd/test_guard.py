"""The fence guard (qvd.hkd.guard): its decisions on the fake backend with fake clocks, the
heartbeat file the daemon keeps for it, and the real detached process (lock, exit, SIGTERM).

The fake backend's desktops live in this process, so the decision tests run the guard in
process; the real LXC case (SIGKILLed daemon, containers stopped by the guard process) is
tests/integration/test_guard_lxc.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qvd.backends.base import DesktopSpec
from qvd.backends.fake import FakeBackend, FakeMachine
from qvd.core.config import Config, Paths, load_node_config
from qvd.core.states import VmState
from qvd.hkd import guard as g
from tests.unit.hkd.hkd_fakes import FAST, Node, arun, crash

TIMEOUT = 2.0  # internal.hkd.agent.ticker.timeout of the node file below
LIMIT = TIMEOUT + g.MARGIN


def spec(vm_id: int) -> DesktopSpec:
    return DesktopSpec(vm_id=vm_id, name=f"d{vm_id}", di_id=1, image=Path(), memory_mb=128,
                       address=f"10.231.0.{100 + vm_id}", prefix_len=16, gateway="10.231.0.1",
                       mac="54:52:00:e7:00:fa", home_key=f"vm-{vm_id}")


class Clock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


class Scene:
    """A node root with fake desktops, a steerable 'is an HKD alive' answer and fake clocks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = Paths(root)
        self.paths.etc.mkdir(parents=True)
        self.paths.run.mkdir()
        self.paths.node_file.write_text(f'vm.hypervisor = "fake"\n"internal.hkd.agent.ticker.timeout" = {TIMEOUT}\n')
        self.machine: FakeMachine = FakeBackend(root).machine
        self.alive: list[int | None] = [None]  # answers in turn; the last one sticks
        self.wall = Clock(1_000_000.0)
        self.mono = Clock(50.0)

    def hkd_alive(self) -> int | None:
        return self.alive.pop(0) if len(self.alive) > 1 else self.alive[0]

    def guard(self) -> g.Guard:
        return g.Guard(self.root, hkd_alive=self.hkd_alive, wall=self.wall, mono=self.mono, poll=0.01)

    def desktops(self, *ids: int) -> None:
        for i in ids:
            self.machine.add_orphan(spec(i))

    def heartbeat(self, at: float, cfg: Config | None = None) -> None:
        g.HeartbeatFile(self.paths.run).touch(4242, cfg or load_node_config(self.root))
        os.utime(self.paths.run / g.HEARTBEAT, (at, at))

    def advance(self, seconds: float) -> None:
        self.wall.t += seconds
        self.mono.t += seconds


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path / "root")
    try:
        yield s
    finally:
        FakeBackend.forget(s.root)


def tick(guard: g.Guard) -> bool:
    return asyncio.run(guard.tick())


# --- decisions ---------------------------------------------------------------------------------


def test_a_live_daemon_is_left_alone_whatever_its_heartbeat(scene: Scene) -> None:
    scene.desktops(1, 2)
    scene.heartbeat(at=scene.wall.t - 3600)  # e.g. fenced for an hour: the daemon handles that itself
    scene.alive = [777]
    guard = scene.guard()
    for _ in range(3):
        assert tick(guard) is True
        scene.advance(10)
    assert scene.machine.running_ids() == {1, 2}
    assert scene.machine.calls == []


def test_desktops_of_a_dead_daemon_are_stopped_once_its_heartbeat_is_too_old(
        scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.desktops(1, 2)
    scene.heartbeat(at=scene.wall.t)
    guard = scene.guard()
    assert tick(guard) is True
    scene.advance(LIMIT - 0.1)
    assert tick(guard) is True
    assert scene.machine.running_ids() == {1, 2}  # a restarted daemon may still adopt them
    scene.advance(0.2)
    with caplog.at_level(logging.INFO, logger="qvd.hkd.guard"):
        assert tick(guard) is True
        assert scene.machine.desktops == {}
        assert [c for c in scene.machine.calls if c[0] in ("stop", "cleanup")] == [
            ("stop", 1), ("cleanup", 1), ("stop", 2), ("cleanup", 2)]
        assert tick(guard) is False  # nothing left to guard
    text = caplog.text
    assert f"the node daemon died and did not come back within {LIMIT:g} s" in text
    assert "stopping its 2 desktop(s) so that peers can restart them" in text
    assert "vm_id=1: desktop stopped by the fence guard" in text
    assert "stopped 2 desktop(s) of the dead node daemon: 1, 2" in text


def test_the_daemons_own_timeout_from_the_heartbeat_file_wins(scene: Scene) -> None:
    scene.desktops(1)
    hkd_cfg = load_node_config(scene.root).overlay({"internal.hkd.agent.ticker.timeout": 10.0}, source="database")
    scene.heartbeat(at=scene.wall.t, cfg=hkd_cfg)
    data = json.loads((scene.paths.run / g.HEARTBEAT).read_text())
    assert data == {"pid": 4242, "config": {"vm.hypervisor": "fake", "internal.hkd.agent.ticker.timeout": 10.0}}
    guard = scene.guard()
    scene.advance(LIMIT + 5)
    assert tick(guard) is True
    assert scene.machine.running_ids() == {1}
    scene.advance(10)
    assert tick(guard) is True
    assert scene.machine.running_ids() == set()


def test_without_a_heartbeat_file_the_wait_counts_from_the_daemons_disappearance(scene: Scene) -> None:
    scene.desktops(3)
    scene.alive = [55, None]
    guard = scene.guard()
    assert tick(guard) is True  # the daemon lives
    scene.advance(100)
    assert tick(guard) is True  # gone now: the wait starts here, not at some old timestamp
    scene.advance(LIMIT - 0.1)
    assert tick(guard) is True
    assert scene.machine.running_ids() == {3}
    scene.advance(0.2)
    assert tick(guard) is True
    assert scene.machine.running_ids() == set()


def test_a_clock_stepped_back_does_not_postpone_the_fence(scene: Scene) -> None:
    scene.desktops(1)
    scene.heartbeat(at=scene.wall.t + 3600)  # the heartbeat looks an hour in the future
    guard = scene.guard()
    assert tick(guard) is True
    scene.mono.t += LIMIT + 0.5
    assert tick(guard) is True
    assert scene.machine.running_ids() == set()


def test_nothing_to_guard_after_a_clean_stop(scene: Scene) -> None:
    guard = scene.guard()
    assert tick(guard) is False
    scene.alive = [9]
    assert tick(guard) is True  # a daemon runs: it may start desktops at any moment


def test_a_desktop_that_cannot_be_stopped_is_retried(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.desktops(1, 2)
    scene.heartbeat(at=scene.wall.t - 60)
    scene.machine.fail_at("stop", vm_id=1)
    guard = scene.guard()
    assert tick(guard) is True
    assert scene.machine.running_ids() == {1}
    assert "vm_id=1: cannot stop the desktop (retrying" in caplog.text
    assert tick(guard) is True
    assert scene.machine.desktops == {}
    assert tick(guard) is False


def test_a_daemon_coming_back_mid_fence_gets_the_remaining_desktops(
        scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.desktops(1, 2, 3)
    scene.heartbeat(at=scene.wall.t - 60)
    scene.alive = [None, None, 888]  # dead at the look and before desktop 1; back before desktop 2
    guard = scene.guard()
    assert tick(guard) is True
    assert scene.machine.running_ids() == {2, 3}
    assert "node daemon pid 888 came back: leaving the remaining desktops to it" in caplog.text
    assert tick(guard) is True
    assert scene.machine.running_ids() == {2, 3}


def test_an_unusable_node_file_still_fences_with_the_heartbeat_files_values(scene: Scene) -> None:
    scene.desktops(1)
    scene.heartbeat(at=scene.wall.t - 60)  # carries vm.hypervisor = fake
    scene.paths.node_file.write_text("not toml [")
    assert tick(scene.guard()) is True
    assert scene.machine.running_ids() == set()


# --- the loop and its lock ---------------------------------------------------------------------


def test_run_exits_when_nothing_is_left_and_frees_its_lock(scene: Scene) -> None:
    guard = scene.guard()
    assert guard.acquire()
    assert g.guard_pid(scene.paths.run) == os.getpid()
    assert not scene.guard().acquire()  # one guard per root
    asyncio.run(asyncio.wait_for(guard.run(), 10))
    other = scene.guard()
    assert other.acquire()
    other.release()


def test_a_surprise_does_not_kill_the_guard(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def make_backend(root: Path, cfg: Config) -> FakeBackend:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("surprise")
        return FakeBackend(root, cfg)

    guard = g.Guard(scene.root, hkd_alive=scene.hkd_alive, make_backend=make_backend, poll=0.01)
    assert guard.acquire()
    asyncio.run(asyncio.wait_for(guard.run(), 10))
    assert len(calls) == 2  # looked again after the error, then found nothing to guard
    assert "unexpected error; looking again" in caplog.text and "RuntimeError: surprise" in caplog.text


def test_a_daemon_starting_while_the_guard_leaves_keeps_it(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    # Nothing to guard at the first look; the daemon appears just before the guard lets go.
    scene.alive = [None, 31, 31, 31, 31, 31, 31]
    guard = scene.guard()
    assert guard.acquire()

    async def scenario() -> None:
        task = asyncio.create_task(guard.run())
        deadline = time.monotonic() + 10
        while len(scene.alive) > 1 and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not task.done(), "the guard left although a daemon had started"
        assert not scene.guard().acquire()  # it holds the lock again
        guard.stopping.set()
        await asyncio.wait_for(task, 10)

    with caplog.at_level(logging.INFO, logger="qvd.hkd.guard"):
        asyncio.run(scenario())
    assert "a node daemon started while this guard was leaving: watching it" in caplog.text
    assert "node daemon pid 31 holds" in caplog.text


# --- with the real daemon (fake backend) ---------------------------------------------------------


def test_live_hkd_means_the_named_process_holds_the_lock_open(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lock = run / g.HKD_LOCK
    assert g.live_hkd(run) is None  # no lock file
    lock.write_text(f"{os.getpid()}\n")
    assert g.live_hkd(run) is None  # our pid, but we do not hold it
    fd = os.open(lock, os.O_RDONLY)
    try:
        assert g.live_hkd(run) == os.getpid()
    finally:
        os.close(fd)
    other = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f"{other.pid}\n")
        assert g.live_hkd(run) is None  # alive, but not the node daemon of this root
    finally:
        other.kill()
        other.wait()
    zombie = subprocess.Popen([sys.executable, "-c", f"import os; os.open({str(lock)!r}, os.O_RDONLY)"])
    try:
        deadline = time.monotonic() + 20
        while g._proc_state(zombie.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.02)
        lock.write_text(f"{zombie.pid}\n")
        assert g.live_hkd(run) is None  # exited (not yet reaped): dead
    finally:
        zombie.wait()


def test_the_daemon_keeps_the_heartbeat_file_and_removes_it_at_a_clean_stop(hnode: Node) -> None:
    hb = hnode.paths.run / g.HEARTBEAT

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.wait_for("the heartbeat file", hb.exists)
        data = json.loads(hb.read_text())
        assert data["pid"] == os.getpid()
        assert data["config"]["internal.hkd.agent.ticker.timeout"] == FAST["internal.hkd.agent.ticker.timeout"]
        first = hb.stat().st_mtime_ns
        await hnode.wait_for("a newer heartbeat", lambda: hb.stat().st_mtime_ns != first)
        assert await d.shutdown() == 0
        assert not hb.exists()
        assert not (hnode.paths.run / g.GUARD_LOCK).exists()  # no guard for the in-process fake backend

    arun(hnode, scenario)


def test_a_crashed_daemon_is_fenced_and_a_quickly_restarted_one_adopts(hnode: Node) -> None:
    """The in-process daemon writes the heartbeat file; crash() is what SIGKILL leaves behind."""
    skew = [0.0]
    guard = g.Guard(hnode.root, wall=lambda: time.time() + skew[0], poll=0.01)
    limit = float(FAST["internal.hkd.agent.ticker.timeout"]) + g.MARGIN  # type: ignore[arg-type]

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        adopted, fenced = hnode.add_vm("adopted"), hnode.add_vm("fenced")
        for vm in (adopted, fenced):
            await hnode.run(hnode.start, vm)
            await hnode.wait_state(vm, VmState.RUNNING)
        assert await guard.tick() is True
        await crash(d)
        # Restarted in time: the guard sees the new daemon and leaves the desktop to it.
        hnode.daemons.clear()
        d2 = hnode.daemon()
        await d2.startup()
        skew[0] = 3 * limit
        assert await guard.tick() is True
        assert hnode.machine.running_ids() == {adopted, fenced}
        assert hnode.runtime(adopted).run_attempts == 1
        await hnode.run(hnode.stop, adopted)
        await hnode.wait_state(adopted, VmState.STOPPED)
        # Killed for good: once the last heartbeat is old enough, the guard stops the rest.
        skew[0] = 0.0
        await crash(d2)
        hnode.daemons.clear()
        assert await guard.tick() is True
        assert hnode.machine.running_ids() == {fenced}
        skew[0] = limit + 0.5
        assert await guard.tick() is True
        assert hnode.machine.desktops == {}
        assert await guard.tick() is False
        # The next daemon finds the desktop gone and records it.
        await hnode.daemon().startup()
        rt = await hnode.wait_state(fenced, VmState.STOPPED)
        assert "no longer running" in rt.last_error

    arun(hnode, scenario)


# --- the real process --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    return g._proc_state(pid) not in ("", "Z", "X")


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"guard {pid} still running after {timeout:g} s"
        time.sleep(0.05)


def _kill_guard(root: Path) -> None:
    """Test cleanup: the guard of ``root`` (checked by its command line), by pid."""
    pid = g.guard_pid(Paths(root).run)
    if pid is None or not _alive(pid):
        return
    with contextlib.suppress(OSError):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"qvd.hkd.guard" in cmd and str(root).encode() in cmd:
            os.kill(pid, signal.SIGKILL)


def _spawn(root: Path) -> str:
    async def go() -> str:
        return await g.ensure_guard(Paths(root))

    return asyncio.run(go())


@pytest.fixture
def hkd_lock(scene: Scene) -> Iterator[Callable[[], None]]:
    """This test process plays the node daemon: it holds run/hkd.lock open with its pid."""
    lock = scene.paths.run / g.HKD_LOCK
    lock.write_text(f"{os.getpid()}\n")
    fd: list[int] = [os.open(lock, os.O_RDONLY)]

    def release() -> None:
        if fd:
            os.close(fd.pop())

    try:
        yield release
    finally:
        release()
        _kill_guard(scene.root)


def test_the_detached_guard_watches_then_leaves_after_the_daemon(scene: Scene, hkd_lock: Callable[[], None]) -> None:
    out = _spawn(scene.root)
    assert out.startswith("fence guard started (pid ")
    pid = g.guard_pid(scene.paths.run)
    assert pid is not None and f"(pid {pid})" in out and pid != os.getpid()
    assert _alive(pid)
    assert os.getsid(pid) != os.getsid(0)  # its own session: a signal to our group does not reach it
    assert _spawn(scene.root) == f"fence guard already running (pid {pid})"
    time.sleep(1.5)
    assert _alive(pid)  # a daemon holds the lock: the guard stays
    hkd_lock()  # the daemon stops (no heartbeat file, no desktop: a clean stop)
    _wait_gone(pid)
    logtext = (scene.paths.log / g.LOG_FILE).read_text()
    assert f"node daemon pid {os.getpid()} holds" in logtext
    assert "nothing to guard, exiting" in logtext
    assert g.try_lock(scene.paths.run / g.GUARD_LOCK) is not None


def test_sigterm_stops_the_guard(scene: Scene, hkd_lock: Callable[[], None]) -> None:
    _spawn(scene.root)
    pid = g.guard_pid(scene.paths.run)
    assert pid is not None
    deadline = time.monotonic() + 20
    while "holds" not in (scene.paths.log / g.LOG_FILE).read_text():
        assert time.monotonic() < deadline, "the guard never looked at the daemon"
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    logtext = (scene.paths.log / g.LOG_FILE).read_text()
    assert "SIGTERM: stopping" in logtext and "guard stopped" in logtext


def test_the_guard_never_loads_the_database_layer() -> None:
    code = ("import sys, qvd.hkd.guard; from qvd.backends.base import backend_class; backend_class('lxc'); "
            "print(sorted(m for m in sys.modules if m.startswith(('qvd.db', 'sqlalchemy', 'psycopg'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert res.stdout.strip() == "[]"
