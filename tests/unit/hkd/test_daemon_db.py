"""The daemon on both databases; on PostgreSQL a command is picked up by NOTIFY long
before the (here very long) poll period."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from qvd.backends.fake import FakeBackend
from qvd.core.states import VmState
from qvd.db.models import Di, DiTag, Osf, Tenant, User, Vm, VmRuntime
from qvd.hkd.daemon import NodeDaemon
from qvd.services.base import SYSTEM
from qvd.services.vms import start_vm, stop_vm
from tests.conftest import NodeFx
from tests.unit.hkd.hkd_fakes import FAST, FakeVma


def _vm(node: NodeFx) -> int:
    with node.factory() as s, s.begin():
        t = s.scalars(select(Tenant).where(Tenant.name == "default")).one()
        u, o = User(tenant_id=t.id, login="u"), Osf(tenant_id=t.id, name="o", memory=64)
        s.add_all([u, o])
        s.flush()
        di = Di(osf_id=o.id, path="1-x.tar", version="v1")
        s.add(di)
        s.flush()
        s.add(DiTag(osf_id=o.id, di_id=di.id, tag="default"))
        vm = Vm(name="v", user_id=u.id, osf_id=o.id, ip="10.231.0.100")
        vm.runtime = VmRuntime()
        s.add(vm)
        s.flush()
        return vm.id


def _state(node: NodeFx, vm: int) -> VmState:
    with node.factory() as s:
        rt = s.get(VmRuntime, vm)
        assert rt is not None
        return rt.vm_state


def test_start_and_stop(node: NodeFx) -> None:
    pg = node.engine.dialect.name == "postgresql"
    # On PostgreSQL the poll is made useless on purpose: only NOTIFY can be fast.
    cfg = node.cfg.overlay({**FAST, "internal.hkd.agent.command_handler.delay": 60.0 if pg else 0.1},
                           source="node file")
    vm = _vm(node)
    backend = FakeBackend(node.paths.root, cfg)

    async def wait(state: VmState, limit: float) -> float:
        t0 = time.monotonic()
        while await asyncio.to_thread(_state, node, vm) != state:
            assert time.monotonic() - t0 < limit, f"not {state.value} after {limit} s"
            await asyncio.sleep(0.02)
        return time.monotonic() - t0

    async def scenario() -> None:
        d = NodeDaemon(node.paths, cfg, "n1", "127.0.0.1", backend=backend, vma=FakeVma(backend.machine))
        await d.startup()
        try:
            await asyncio.sleep(0.5)  # the listener is up (or the first poll has passed)
            await asyncio.to_thread(start_vm, node.factory, SYSTEM, node.cfg, vm)
            await wait(VmState.RUNNING, 10)
            await asyncio.to_thread(stop_vm, node.factory, SYSTEM, node.cfg, vm)
            await wait(VmState.STOPPED, 10)
        finally:
            assert await d.shutdown() == 0

    try:
        asyncio.run(scenario())
    finally:
        FakeBackend.forget(node.paths.root)
