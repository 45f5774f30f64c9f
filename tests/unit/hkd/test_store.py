"""Command claiming and state writes of the HKD, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy import select, update

from qvd.core.errors import Blocked, Conflict
from qvd.core.states import HostState, VmCmd, VmState
from qvd.db.models import Di, DiTag, Host, HostRuntime, Osf, Tenant, User, Vm, VmRuntime
from qvd.hkd import notify
from qvd.hkd.store import HkdStore
from qvd.hkd.sysinfo import Capacity
from qvd.services.base import notify as pg_notify
from tests.conftest import NodeFx


def _setup(node: NodeFx, n_vms: int) -> tuple[int, list[int]]:
    with node.factory() as s, s.begin():
        t = s.scalars(select(Tenant).where(Tenant.name == "default")).one()
        u = User(tenant_id=t.id, login="u")
        o = Osf(tenant_id=t.id, name="o", memory=64)
        h = Host(name="n", address="10.0.0.1")
        h.runtime = HostRuntime(state=HostState.RUNNING)
        s.add_all([u, o, h])
        s.flush()
        di = Di(osf_id=o.id, path="1-x.tar", version="v1")
        s.add(di)
        s.flush()
        s.add(DiTag(osf_id=o.id, di_id=di.id, tag="default"))
        ids = []
        for i in range(n_vms):
            vm = Vm(name=f"v{i}", user_id=u.id, osf_id=o.id, ip=f"10.231.0.{100 + i}")
            vm.runtime = VmRuntime(vm_cmd=VmCmd.START, host_id=h.id)
            s.add(vm)
            s.flush()
            ids.append(vm.id)
        return h.id, ids


def _store(node: NodeFx, host_id: int) -> HkdStore:
    st = HkdStore(node.factory, node.cfg, node.paths, "n")
    st.host_id = host_id
    return st


def test_concurrent_claimers_never_share_a_command(node: NodeFx) -> None:
    host_id, vms = _setup(node, 10)
    claimers = 6
    barrier = threading.Barrier(claimers)
    got: list[list[int]] = []
    lock = threading.Lock()

    def claim() -> None:
        st = _store(node, host_id)
        barrier.wait()
        mine = st.claim_start_commands()
        with lock:
            got.append(mine)

    threads = [threading.Thread(target=claim) for _ in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    flat = [v for g in got for v in g]
    assert sorted(flat) == vms  # every command claimed exactly once
    with node.factory() as s:
        rows = s.scalars(select(VmRuntime)).all()
        assert {(r.vm_state, r.vm_cmd, r.vm_step) for r in rows} == {(VmState.STARTING, None, "db")}
    assert _store(node, host_id).claim_start_commands() == []


def test_other_hosts_commands_are_not_claimed(node: NodeFx) -> None:
    host_id, vms = _setup(node, 2)
    assert _store(node, host_id + 100).claim_start_commands() == []
    assert _store(node, host_id + 100).claim_stop_commands() == []
    assert sorted(_store(node, host_id).claim_start_commands()) == vms


def test_begin_start_resolves_the_tag_and_writes_the_runtime(node: NodeFx) -> None:
    host_id, [vm] = _setup(node, 1)
    st = _store(node, host_id)
    assert st.claim_start_commands() == [vm]
    got = st.begin_start(vm)
    assert got is not None
    spec, _cfg = got
    assert (spec.address, spec.vma_port, spec.nx_port, spec.memory_mb) == ("10.231.0.100", 3030, 4100, 64)
    assert spec.image == node.paths.images / "1-x.tar"
    with node.factory() as s:
        rt = s.get(VmRuntime, vm)
        assert rt is not None
        assert (rt.vm_address, rt.vm_x_port, rt.run_attempts, rt.current_di_id) == ("10.231.0.100", 4100, 1,
                                                                                   spec.di_id)
    # another node cannot run the db step of our desktop
    assert _store(node, host_id + 1).begin_start(vm) is None


def test_begin_start_refuses_a_blocked_di(node: NodeFx) -> None:
    host_id, [vm] = _setup(node, 1)
    with node.factory() as s, s.begin():
        s.execute(update(Di).values(blocked=True))
    st = _store(node, host_id)
    st.claim_start_commands()
    with pytest.raises(Blocked, match="is blocked"):
        st.begin_start(vm)
    assert st.to_stopped(vm, VmState.STARTING, error="cannot start: blocked", failed_start=True)
    with node.factory() as s:
        rt = s.get(VmRuntime, vm)
        assert rt is not None and rt.vm_state == VmState.STOPPED and rt.host_id is None
        assert rt.last_error == "cannot start: blocked" and rt.last_error_ts is not None


def test_begin_start_refuses_a_missing_tag(node: NodeFx) -> None:
    host_id, [vm] = _setup(node, 1)
    with node.factory() as s, s.begin():
        s.execute(update(Vm).values(di_tag="gone"))
    st = _store(node, host_id)
    st.claim_start_commands()
    with pytest.raises(Conflict, match="no disk image tagged 'gone'"):
        st.begin_start(vm)


def test_state_writes_are_compare_and_swap_on_this_node(node: NodeFx) -> None:
    host_id, [vm] = _setup(node, 1)
    st, other = _store(node, host_id), _store(node, host_id + 1)
    st.claim_start_commands()
    assert not other.to_running(vm, VmState.STARTING)  # not its desktop
    assert not st.to_running(vm, VmState.DEBUGGING)  # wrong expected state
    assert st.to_running(vm, VmState.STARTING)
    assert not st.to_running(vm, VmState.STARTING)  # a second writer with the old state loses
    assert st.vma_ok(vm, VmState.RUNNING) and not other.vma_ok(vm, VmState.RUNNING)
    assert st.to_stopping(vm, VmState.RUNNING, "poweroff")
    assert st.to_zombie(vm, VmState.STOPPING, "boom")
    assert st.to_stopped(vm, VmState.ZOMBIE)
    with node.factory() as s:
        rt = s.get(VmRuntime, vm)
        assert rt is not None and rt.vm_state == VmState.STOPPED and rt.last_error == "boom" and rt.run_ok == 1


def test_host_moves(node: NodeFx) -> None:
    host_id, _ = _setup(node, 0)
    st = _store(node, host_id)
    assert st.host_to_starting(123) == HostState.RUNNING
    assert st.host().state == HostState.STARTING
    assert st.host_to_starting(124) == HostState.STARTING  # a run that died while starting
    assert st.move_host(HostState.RUNNING) and st.move_host(HostState.STOPPING) and st.move_host(HostState.STOPPED)
    with node.factory() as s, s.begin():
        s.execute(update(HostRuntime).values(state=HostState.LOST))
    assert not st.move_host(HostState.STOPPED)  # lost -> stopped is not a transition
    assert not st.heartbeat(1, Capacity(1, 1.0, 0.0))  # a lost node is told by its heartbeat


def test_notify_wakes_the_listener(node: NodeFx) -> None:
    if node.engine.dialect.name != "postgresql":
        pytest.skip("NOTIFY is PostgreSQL only (SQLite relies on polling)")

    async def scenario() -> None:
        wake = asyncio.Event()
        task = asyncio.create_task(notify.listen(node.engine.url, ["qvd_cmd_for_vm_on_host7"], wake))
        try:
            async with asyncio.timeout(10):
                await wake.wait()  # set once listening
            wake.clear()
            t0 = time.monotonic()

            def send() -> None:
                with node.factory() as s, s.begin():
                    pg_notify(s, "qvd_cmd_for_vm_on_host7")

            await asyncio.to_thread(send)
            async with asyncio.timeout(5):
                await wake.wait()
            assert time.monotonic() - t0 < 5
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_libpq_conninfo() -> None:
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import make_url

    url = make_url("postgresql+psycopg://qvd:s3cret@db.example:5433/qvd?host=/run/pg")
    got = conninfo_to_dict(notify.libpq_conninfo(url))
    assert got == {"user": "qvd", "password": "s3cret", "host": "/run/pg", "port": "5433", "dbname": "qvd"}
