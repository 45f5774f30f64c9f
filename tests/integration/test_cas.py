"""State writes are compare-and-swap: a writer that read an old state loses, never overwrites."""

from __future__ import annotations

import threading

import pytest

from qvd.core.errors import IllegalTransition
from qvd.core.states import HostState, UserState, VmState
from qvd.db.models import Host, HostRuntime, Osf, Tenant, User, Vm, VmRuntime
from qvd.db.queries import cas_host_state, cas_user_state, cas_vm_state
from tests.conftest import NodeFx


def _vm(node: NodeFx) -> int:
    with node.factory() as s, s.begin():
        t = s.query(Tenant).filter_by(name="default").one()
        u = User(tenant_id=t.id, login="u")
        o = Osf(tenant_id=t.id, name="o")
        s.add_all([u, o])
        s.flush()
        vm = Vm(name="v", user_id=u.id, osf_id=o.id, ip="10.231.0.100")
        vm.runtime = VmRuntime()
        s.add(vm)
        s.flush()
        return vm.id


def test_vm_cas(node: NodeFx) -> None:
    vm_id = _vm(node)
    with node.factory() as s, s.begin():
        assert cas_vm_state(s, vm_id, VmState.STOPPED, VmState.STARTING)
    with node.factory() as s, s.begin():
        # a second writer still believing "stopped" matches nothing
        assert not cas_vm_state(s, vm_id, VmState.STOPPED, VmState.STARTING)
        with pytest.raises(IllegalTransition):
            cas_vm_state(s, vm_id, VmState.STARTING, VmState.STARTING)
    with node.factory() as s, s.begin():
        assert not cas_vm_state(s, vm_id, VmState.STARTING, VmState.RUNNING, host_id=999)  # not my VM
        assert cas_vm_state(s, vm_id, VmState.STARTING, VmState.RUNNING, vm_address="10.231.0.100")
    with node.factory() as s:
        rt = s.get(VmRuntime, vm_id)
        assert rt is not None and rt.vm_state == VmState.RUNNING and rt.vm_address == "10.231.0.100"


def test_concurrent_writers_exactly_one_wins(node: NodeFx) -> None:
    vm_id = _vm(node)
    barrier = threading.Barrier(8)
    wins: list[bool] = []
    lock = threading.Lock()

    def writer() -> None:
        barrier.wait()
        with node.factory() as s, s.begin():
            ok = cas_user_state(s, vm_id, UserState.DISCONNECTED, UserState.CONNECTING)
        with lock:
            wins.append(ok)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(wins) == [False] * 7 + [True]


def test_host_cas(node: NodeFx) -> None:
    with node.factory() as s, s.begin():
        h = Host(name="n1", address="10.231.0.1")
        h.runtime = HostRuntime()
        s.add(h)
        s.flush()
        hid = h.id
    with node.factory() as s, s.begin():
        assert cas_host_state(s, hid, HostState.STOPPED, HostState.STARTING)
        assert not cas_host_state(s, hid, HostState.STOPPED, HostState.STARTING)
        with pytest.raises(IllegalTransition):
            cas_host_state(s, hid, HostState.STARTING, HostState.STARTING)
