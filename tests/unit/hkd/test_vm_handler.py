"""The VM handler state machine on the fake backend: start, stop, failures, monitoring."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from qvd.core.states import VmCmd, VmState
from qvd.db.models import AuditEntry
from tests.unit.hkd.hkd_fakes import FakeVma, Node, arun


def audit_rows(node: Node, vm_id: int, action: str = "vm.start") -> list[AuditEntry]:
    with node.factory() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.object_id == vm_id, AuditEntry.action == action,
                                                       AuditEntry.admin_name.like("hkd:%"))))


def test_start_then_stop(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d = hnode.daemon(vma)
        await d.startup()
        await hnode.run(hnode.start, vm)
        rt = await hnode.wait_state(vm, VmState.RUNNING)
        assert rt.host_id == d._store().host_id
        assert (rt.vm_address, rt.vm_vma_port, rt.vm_x_port) == ("10.231.0.100", 3030, 4100)
        assert rt.current_di_id == hnode.di_id and rt.vm_step == "monitor"
        assert (rt.run_attempts, rt.run_ok, rt.last_error) == (1, 1, "")
        assert rt.vma_ok_ts is not None
        assert hnode.machine.running_ids() == {vm}
        spec = hnode.machine.desktops[vm].spec
        assert (spec.mac, spec.prefix_len, spec.gateway, spec.home_key) == ("54:52:00:e7:00:64", 16,
                                                                             "10.231.0.1", f"vm-{vm}")
        await hnode.run(hnode.stop, vm)
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert rt.host_id is None and rt.vm_address is None and rt.vm_x_port is None
        assert rt.current_di_id is None and rt.vm_step == "" and rt.vm_cmd is None and rt.last_error == ""
        assert "poweroff" in vma.methods_for(vm)  # graceful first
        assert vm not in hnode.machine.desktops  # cleaned up
        assert audit_rows(hnode, vm) == []

    arun(hnode, scenario)


@pytest.mark.parametrize("step", ["prepare", "start"])
def test_backend_failure_ends_stopped_with_error_and_audit(hnode: Node, step: str) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        hnode.machine.fail_at(step, vm)
        await hnode.run(hnode.start, vm)
        await hnode.wait_for("run attempt", lambda: hnode.runtime(vm).run_attempts == 1)
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert f"fake {step} failure" in rt.last_error
        assert rt.last_error.startswith(f"start failed at step '{'launch' if step == 'start' else step}'")
        assert rt.last_error_ts is not None and rt.host_id is None and rt.run_ok == 0
        assert vm not in hnode.machine.desktops
        [row] = audit_rows(hnode, vm)
        assert row.status == "start-failed" and row.message == rt.last_error and row.admin_name == "hkd:node1"

    arun(hnode, scenario)


def test_blocked_di_is_never_started(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        # The DI gets blocked after the start command was accepted, before the node claims it.
        await hnode.run(hnode.block_di)
        await hnode.run(hnode.command, vm, VmCmd.START, d._store().host_id)
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        await hnode.wait_for("error", lambda: hnode.runtime(vm).last_error != "")
        rt = hnode.runtime(vm)
        assert "blocked" in rt.last_error and rt.vm_cmd is None and rt.host_id is None
        assert ("prepare", vm) not in hnode.machine.calls and ("start", vm) not in hnode.machine.calls
        [row] = audit_rows(hnode, vm)
        assert row.status == "start-failed" and "blocked" in row.message

    arun(hnode, scenario)


def test_missing_tag_fails_the_start(hnode: Node) -> None:
    vm = hnode.add_vm("desk1", tag="nope")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.command, vm, VmCmd.START, d._store().host_id)
        await hnode.wait_for("error", lambda: hnode.runtime(vm).last_error != "")
        rt = hnode.runtime(vm)
        assert rt.vm_state == VmState.STOPPED and "no disk image tagged 'nope'" in rt.last_error

    arun(hnode, scenario)


def test_agent_that_never_answers_fails_the_start(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        vma.dead.add(vm)
        d = hnode.daemon(vma)
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_for("wait_vma", lambda: hnode.runtime(vm).vm_step == "wait_vma")
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert "did not answer within 1 s of starting" in rt.last_error
        assert vm not in hnode.machine.desktops
        assert len(audit_rows(hnode, vm)) == 1

    arun(hnode, scenario)


def test_agent_dying_while_running_stops_the_desktop(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d = hnode.daemon(vma)
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        vma.dead.add(vm)
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert "stopped answering" in rt.last_error
        assert vm not in hnode.machine.desktops
        assert audit_rows(hnode, vm) == []  # not a failed start

    arun(hnode, scenario)


def test_debug_mode_keeps_a_dead_desktop_and_resumes(hnode: Node) -> None:
    hnode.reconfigure(internal__vm__debug__enable=True)
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        vma = FakeVma(hnode.machine)
        d = hnode.daemon(vma)
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        vma.dead.add(vm)
        rt = await hnode.wait_state(vm, VmState.DEBUGGING)
        assert "stopped answering" in rt.last_error and hnode.machine.running_ids() == {vm}
        vma.dead.discard(vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        await hnode.run(hnode.stop, vm)
        await hnode.wait_state(vm, VmState.STOPPED)

    arun(hnode, scenario)


def test_desktop_that_exits_is_cleaned_up(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        hnode.machine.lose(vm)
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert "stopped by itself" in rt.last_error
        assert vm not in hnode.machine.desktops

    arun(hnode, scenario)


def test_failed_stop_becomes_zombie_then_is_reaped(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_state(vm, VmState.RUNNING)
        hnode.machine.fail_at("cleanup", vm, times=3)
        await hnode.run(hnode.stop, vm)
        rt = await hnode.wait_state(vm, VmState.ZOMBIE)
        assert "stopping failed at step 'cleanup'" in rt.last_error and rt.vm_step == "reap"
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert "stopping failed" in rt.last_error  # the reason stays for the operator
        assert vm not in hnode.machine.desktops and rt.host_id is None

    arun(hnode, scenario)


def test_stop_during_start_is_taken_at_the_next_step(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        hnode.machine.delay["prepare"] = 0.5
        d = hnode.daemon()
        await d.startup()
        await hnode.run(hnode.start, vm)
        await hnode.wait_for("prepare", lambda: hnode.runtime(vm).vm_step == "prepare")
        await hnode.run(hnode.stop, vm)
        rt = await hnode.wait_state(vm, VmState.STOPPED)
        assert rt.last_error == "" and vm not in hnode.machine.desktops
        assert ("start", vm) not in hnode.machine.calls

    arun(hnode, scenario)


def test_heavy_semaphore_bounds_parallel_boots(hnode: Node) -> None:
    hnode.reconfigure(internal__hkd__max_heavy=2)
    vms = [hnode.add_vm(f"desk{i}") for i in range(5)]

    async def scenario() -> None:
        hnode.machine.delay["start"] = 0.3
        d = hnode.daemon()
        await d.startup()
        for vm in vms:
            await hnode.run(hnode.start, vm)
        for vm in vms:
            await hnode.wait_state(vm, VmState.RUNNING)
        assert hnode.machine.peak["start"] == 2
        assert d.ctx is not None and d.ctx.heavy._value == 2  # every permit came back
        hnode.machine.delay["stop"] = 0.2
        for vm in vms:
            await hnode.run(hnode.stop, vm)
        for vm in vms:
            await hnode.wait_state(vm, VmState.STOPPED)
        assert hnode.machine.peak["stop"] <= 2
        assert d.ctx.heavy._value == 2

    arun(hnode, scenario)


def test_restart_after_stop_reuses_the_vm(hnode: Node) -> None:
    vm = hnode.add_vm("desk1")

    async def scenario() -> None:
        d = hnode.daemon()
        await d.startup()
        for attempt in (1, 2):
            await hnode.run(hnode.start, vm)
            rt = await hnode.wait_state(vm, VmState.RUNNING)
            assert rt.run_attempts == attempt and rt.run_ok == attempt
            await hnode.run(hnode.stop, vm)
            await hnode.wait_state(vm, VmState.STOPPED)
        await asyncio.sleep(0.1)
        assert d.handlers == {}

    arun(hnode, scenario)
