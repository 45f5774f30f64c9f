"""The daemon around the handlers: start order, restart (adopt/reap/orphans), fencing,
expiration, host commands, graceful stop."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from qvd.backends.base import DesktopSpec
from qvd.core.errors import QvdError
from qvd.core.states import HostCmd, HostState, VmCmd, VmState
from qvd.db.models import HostRuntime, utcnow
from tests.unit.hkd.hkd_fakes import FakeVma, Node, arun, crash


def host_rt(node: Node) -> HostRuntime:
    with node.factory() as s:
        rt = s.scalars(select(HostRuntime)).one()
        s.expunge(rt)
        return rt


def set_host(node: Node, **values: object) -> None:
    with node.factory() as s, s.begin():
        s.execute(update(HostRuntime).values(**values))


def spec(vm_id: int, address: str = "10.231.0.250") -> DesktopSpec:
    from pathlib import Path

    return DesktopSpec(vm_id=vm_id, name=f"orphan{vm_id}", di_id=1, image=Path(), memory_mb=128, address=address,
                       prefix_len=16, gateway="10.231.0.1", mac="54:52:00:e7:00:fa", home_key=f"vm-{vm_id}")


def test_start_registers_host_and_goes_running(hnode: Node) -> None:
    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        rt = host_rt(hnode)
        assert rt.state == HostState.RUNNING and rt.pid == os.getpid() and rt.ok_ts is not None
        assert rt.usable_ram > 0 and rt.load >= 0
        first = rt.ok_ts
        await hnode.wait_for("a heartbeat", lambda: host_rt(hnode).ok_ts != first)
        assert await d.shutdown() == 0
        rt = host_rt(hnode)
        assert rt.state == HostState.STOPPED and rt.pid is None

    arun(hnode, scenario)


def test_second_daemon_on_the_same_root_is_refused(hnode: Node) -> None:
    async def scenario() -> None:
        await hnode.daemon().startup()
        with pytest.raises(QvdError, match=r"^lock: another qvd-hkd holds .*hkd.lock \(pid \d+\)"):
            await hnode.daemon().startup()
        assert host_rt(hnode).state == HostState.RUNNING  # the refused one changed nothing

    arun(hnode, scenario)


def test_name_registered_with_another_address_is_refused(hnode: Node) -> None:
    async def scenario() -> None:
        d = hnode.daemon(address="10.9.9.9")
        await d.startup()
        await d.shutdown()
        hnode.daemons.clear()
        with pytest.raises(QvdError, match=r"^host: host 'node1' is registered with the address 10.9.9.9"):
            await hnode.daemon(address="10.9.9.8").startup()
        # and the refused start left no lock behind
        d = hnode.daemon(address="10.9.9.9")
        await d.startup()

    arun(hnode, scenario)


def test_failed_start_step_undoes_the_earlier_ones(hnode: Node) -> None:
    async def scenario() -> None:
        hnode.machine.fail_at("check")
        with pytest.raises(QvdError, match=r"^backend: fake check failure"):
            await hnode.daemon().startup()
        assert host_rt(hnode).state == HostState.STOPPED
        hnode.daemons.clear()
        await hnode.daemon().startup()  # lock released, nothing half-done
        assert host_rt(hnode).state == HostState.RUNNING

    arun(hnode, scenario)


def test_restart_adopts_a_healthy_running_desktop(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d1 = hnode.daemon(vma)
        await d1.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        pid = hnode.machine.desktops[vm].pid
        await crash(d1)
        assert host_rt(hnode).state == HostState.RUNNING  # what a SIGKILL leaves
        d2 = hnode.daemon(vma)
        await d2.startup()
        rt = hnode.runtime(vm)
        assert rt.vm_state == VmState.RUNNING and (rt.run_attempts, rt.run_ok) == (1, 1)
        assert hnode.machine.desktops[vm].pid == pid  # the same desktop, not a new one
        assert vm in d2.handlers
        assert hnode.machine.calls.count(("start", vm)) == 1
        await hnode.run(hnode.stop, vm)  # and the adopted desktop is fully managed
        await hnode.wait_state(vm, VmState.STOPPED)
        assert vm not in hnode.machine.desktops

    arun(hnode, scenario)


def test_restart_reaps_what_cannot_be_adopted(hnode: Node) -> None:
    dead_agent, gone, starting, zombie = (hnode.add_vm(f"desk{i}") for i in range(4))

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d1 = hnode.daemon(vma)
        await d1.startup()
        for vm in (dead_agent, gone, zombie):
            await hnode.run(hnode.start, vm)
            await hnode.wait_state(vm, VmState.RUNNING)
        hnode.machine.delay["start"] = 30  # 'starting' is caught inside backend.start
        await hnode.run(hnode.start, starting)
        await hnode.wait_for("launch", lambda: hnode.runtime(starting).vm_step == "launch")
        await crash(d1)
        hnode.machine.delay.clear()
        vma.dead.add(dead_agent)
        hnode.machine.lose(gone)
        hnode.machine.desktops[starting].running = True  # it came up after the crash
        await hnode.run(hnode.set_runtime, zombie, vm_state=VmState.ZOMBIE, vm_step="reap", last_error="old")
        d2 = hnode.daemon(vma)
        await d2.startup()
        for vm, why in ((dead_agent, "agent did not answer"), (gone, "no longer running"),
                        (starting, "while the desktop was starting (step 'launch')"), (zombie, "old")):
            rt = await hnode.wait_state(vm, VmState.STOPPED)
            assert why in rt.last_error, (vm, rt.last_error)
            assert rt.host_id is None
        assert hnode.machine.desktops == {}
        assert ("start", starting) in hnode.machine.calls

    arun(hnode, scenario)


def test_orphans_are_removed_at_start(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        hnode.machine.add_orphan(spec(999))
        hnode.machine.add_orphan(spec(vm, "10.231.0.100"), running=False)  # leftovers of a stopped VM
        d = hnode.daemon()
        await d.startup()
        assert hnode.machine.desktops == {}
        assert hnode.runtime(vm).vm_state == VmState.STOPPED

    arun(hnode, scenario)


def test_graceful_stop_stops_every_desktop_and_returns_pending_starts(hnode: Node) -> None:
    a, b, pending = hnode.add_vm("a"), hnode.add_vm("b"), hnode.add_vm("p")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d = hnode.daemon(vma)
        await d.startup()
        for vm in (a, b):
            await hnode.run(hnode.start, vm)
            await hnode.wait_state(vm, VmState.RUNNING)
        d.accepting = False  # a start command that will not be claimed any more
        await hnode.run(hnode.command, pending, VmCmd.START, d._store().host_id)
        assert await d.shutdown() == 0
        for vm in (a, b):
            rt = hnode.runtime(vm)
            assert rt.vm_state == VmState.STOPPED and rt.host_id is None
            assert "poweroff" in vma.methods_for(vm)
        rt = hnode.runtime(pending)
        assert rt.vm_cmd is None and rt.host_id is None and "stopped before starting" in rt.last_error
        assert hnode.machine.desktops == {}
        assert host_rt(hnode).state == HostState.STOPPED

    arun(hnode, scenario)


def test_stop_is_forced_after_the_stopping_timeout(hnode: Node) -> None:
    hnode.reconfigure(internal__hkd__stopping__vms__timeout=0.5, internal__hkd__lxc__timeout__on_state__shutdown=30)
    vm = hnode.add_vm("a")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d = hnode.daemon(vma)
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        hnode.machine.guest_poweroff = lambda vm_id, after=0.0: None  # type: ignore[method-assign]
        assert await d.shutdown() == 0
        rt = hnode.runtime(vm)
        assert rt.vm_state == VmState.STOPPED and "forced stop" in rt.last_error
        assert hnode.machine.desktops == {}

    arun(hnode, scenario)


def test_host_stop_command_stops_the_daemon(hnode: Node) -> None:
    vm = hnode.add_vm("a")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        set_host(hnode, cmd=HostCmd.STOP)
        assert await asyncio.wait_for(d.run_until_stopped(), 10) == 0
        assert host_rt(hnode).state == HostState.STOPPED and host_rt(hnode).cmd is None
        assert hnode.runtime(vm).vm_state == VmState.STOPPED

    arun(hnode, scenario)


def test_expiration(hnode: Node) -> None:
    soft, hard = hnode.add_vm("soft"), hnode.add_vm("hard")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d = hnode.daemon(vma)
        await d.startup()
        for vm in (soft, hard):
            await hnode.run(hnode.start, vm)
            await hnode.wait_state(vm, VmState.RUNNING)
        past, future = utcnow() - dt.timedelta(minutes=1), utcnow() + dt.timedelta(hours=1)
        await hnode.run(hnode.set_runtime, soft, expiration_soft=past, expiration_hard=future)
        await hnode.run(hnode.set_runtime, hard, expiration_soft=past, expiration_hard=past)
        await d.check_expirations()
        [params] = [p for v, m, p in vma.calls if v == soft and m == "expire"]
        assert params == {"vm.expiration.soft": past.isoformat(), "vm.expiration.hard": future.isoformat()}
        rt = await hnode.wait_state(hard, VmState.STOPPED)
        assert rt.expiration_hard is None and rt.expiration_soft is None
        assert hnode.runtime(soft).vm_state == VmState.RUNNING
        assert "expire" not in vma.methods_for(hard)

    arun(hnode, scenario)


def test_self_fencing_when_the_heartbeat_cannot_be_written(hnode: Node) -> None:
    vm = hnode.add_vm("a")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        store = d._store()
        real = store.heartbeat

        def broken(*a: object, **k: object) -> bool:
            raise OperationalError("UPDATE host_runtimes", {}, Exception("database is unreachable"))

        store.heartbeat = broken  # type: ignore[method-assign]
        await hnode.wait_for("fencing", lambda: hnode.machine.desktops == {}, timeout=5)
        assert d.fenced and d.handlers == {}
        assert hnode.runtime(vm).vm_state == VmState.RUNNING  # nothing written without a database
        store.heartbeat = real  # type: ignore[method-assign]
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert "self-fencing" in rt.last_error
        await hnode.wait_for("unfenced", lambda: not d.fenced)
        await hnode.run(hnode.start, vm)  # the node works normally again
        await hnode.wait_state(vm, VmState.RUNNING)

    arun(hnode, scenario)


def test_a_node_declared_lost_fences_and_rejoins(hnode: Node) -> None:
    vm = hnode.add_vm("a")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        # What a peer's cluster monitor does: host lost, its VMs reset for a restart elsewhere.
        set_host(hnode, state=HostState.LOST)
        await hnode.run(hnode.set_runtime, vm, vm_state=VmState.STOPPED, host_id=None, vm_address=None)
        await hnode.wait_for("fencing", lambda: hnode.machine.desktops == {}, timeout=5)
        await hnode.wait_for("rejoined", lambda: host_rt(hnode).state == HostState.RUNNING)
        assert hnode.runtime(vm).vm_state == VmState.STOPPED

    arun(hnode, scenario)


def test_row_taken_away_removes_the_local_desktop(hnode: Node) -> None:
    vm = hnode.add_vm("a")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        # A peer reset the VM (this node looked dead to it): never run it twice.
        await hnode.run(hnode.set_runtime, vm, vm_state=VmState.STOPPED, host_id=None)
        await hnode.wait_for("local removal", lambda: hnode.machine.desktops == {}, timeout=5)
        rt = hnode.runtime(vm)
        assert rt.vm_state == VmState.STOPPED and rt.host_id is None  # left as the peer wrote it
        assert not d.fenced

    arun(hnode, scenario)


def test_host_state_after_a_crash_during_start(hnode: Node) -> None:
    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await crash(d)
        set_host(hnode, state=HostState.STARTING)
        d2 = hnode.daemon()
        await d2.startup()
        assert host_rt(hnode).state == HostState.RUNNING

    arun(hnode, scenario)
