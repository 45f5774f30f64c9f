"""The cluster monitor on SQLite and PostgreSQL: the store's compare-and-swap that declares
a silent peer ``lost`` (with its desktops and connections), and node daemons (fake
backend, one database, one root each) declaring each other lost, restarting a dead
node's desktop elsewhere, and a lost node fencing and rejoining without it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from qvd.backends.fake import FakeBackend
from qvd.core.config import Config, Paths
from qvd.core.states import HostState, UserCmd, UserState, VmCmd, VmState
from qvd.db.models import AuditEntry, Di, DiTag, Host, HostRuntime, Osf, Tenant, User, Vm, VmRuntime, utcnow
from qvd.hkd import notify
from qvd.hkd.daemon import NodeDaemon
from qvd.hkd.store import HkdStore, LostHost
from qvd.services.base import SYSTEM
from qvd.services.hosts import stop_vms_of_host
from qvd.services.vms import start_vm
from tests.conftest import NodeFx
from tests.unit.hkd.hkd_fakes import FAST, FakeVma, crash

OLD = dt.timedelta(hours=1)


# --- database content ---------------------------------------------------------------------------


def _host(node: NodeFx, name: str, state: HostState, *, age: dt.timedelta | None = dt.timedelta(0)) -> int:
    with node.factory() as s, s.begin():
        h = Host(name=name, address=f"10.0.0.{s.query(Host).count() + 1}")
        h.runtime = HostRuntime(state=state, ok_ts=None if age is None else utcnow() - age, usable_ram=8192,
                                usable_cpu=2.0)
        s.add(h)
        s.flush()
        return h.id


def _vm(node: NodeFx, name: str, **runtime: Any) -> int:
    with node.factory() as s, s.begin():
        t = s.scalars(select(Tenant).where(Tenant.name == "default")).one()
        u = s.scalars(select(User).where(User.login == "u")).one_or_none()
        o = s.scalars(select(Osf).where(Osf.name == "o")).one_or_none()
        if u is None or o is None:
            u, o = User(tenant_id=t.id, login="u"), Osf(tenant_id=t.id, name="o", memory=64)
            s.add_all([u, o])
            s.flush()
            di = Di(osf_id=o.id, path="1-x.tar", version="v1")
            s.add(di)
            s.flush()
            s.add(DiTag(osf_id=o.id, di_id=di.id, tag="default"))
        n = s.query(Vm).count()
        vm = Vm(name=name, user_id=u.id, osf_id=o.id, ip=f"10.231.0.{100 + n}")
        vm.runtime = VmRuntime(**runtime)
        s.add(vm)
        s.flush()
        return vm.id


def _store(node: NodeFx, host_id: int, name: str) -> HkdStore:
    st = HkdStore(node.factory, node.cfg, node.paths, name)
    st.host_id = host_id
    return st


def _rt(node: NodeFx, vm_id: int) -> VmRuntime:
    with node.factory() as s:
        rt = s.get(VmRuntime, vm_id)
        assert rt is not None
        s.expunge(rt)
        return rt


def _host_rt(node: NodeFx, host_id: int) -> HostRuntime:
    with node.factory() as s:
        rt = s.get(HostRuntime, host_id)
        assert rt is not None
        s.expunge(rt)
        return rt


def _host_id(node: NodeFx, name: str) -> int:
    with node.factory() as s:
        return int(s.scalars(select(Host.id).where(Host.name == name)).one())


def _lost_audit(node: NodeFx) -> list[AuditEntry]:
    with node.factory() as s:
        rows = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "host.lost").order_by(AuditEntry.id)))
        for r in rows:
            s.expunge(r)
        return rows


def _running_on(host_id: int, **extra: Any) -> dict[str, Any]:
    return {"host_id": host_id, "vm_state": VmState.RUNNING, "vm_step": "monitor", "vm_address": "10.231.0.9",
            "vm_vma_port": 3030, "vm_x_port": 4100, "vma_ok_ts": utcnow(), "expiration_soft": utcnow() + OLD,
            "expiration_hard": utcnow() + OLD, **extra}


# --- the store ----------------------------------------------------------------------------------


def test_a_silent_peer_is_declared_lost_with_its_desktops_and_connections(node: NodeFx) -> None:
    me = _host(node, "n1", HostState.RUNNING)
    dead = _host(node, "n2", HostState.RUNNING, age=OLD)
    alive = _host(node, "n3", HostState.RUNNING)
    seed = _vm(node, "seed")  # creates the OSF/DI the others use
    with node.factory() as s:
        di_id = s.scalars(select(Di.id)).one()
    tunnel = _vm(node, "tunnel", **_running_on(dead, current_di_id=di_id), user_state=UserState.CONNECTED,
                 l7r_host_id=alive, l7r_pid=11, l7r_conn="c-alive")
    starting = _vm(node, "starting", host_id=dead, vm_state=VmState.STARTING, vm_step="launch",
                   user_state=UserState.CONNECTING, l7r_host_id=dead, l7r_pid=12, l7r_conn="c-dead")
    pending = _vm(node, "pending", host_id=dead, vm_state=VmState.STOPPED, vm_cmd=VmCmd.START)
    stopping = _vm(node, "stopping", host_id=dead, vm_state=VmState.STOPPING, vm_step="poweroff", vm_cmd=None)
    elsewhere = _vm(node, "elsewhere", **_running_on(alive), user_state=UserState.CONNECTED, l7r_host_id=dead,
                    l7r_pid=13, l7r_conn="c-through-dead")
    mine = _vm(node, "mine", **_running_on(me))

    lost = _store(node, me, "n1").declare_lost_peers(10.0)

    assert [(h.id, h.name) for h in lost] == [(dead, "n2")]
    h = lost[0]
    assert h.silence is not None and h.silence > 3000
    assert h.vms == {tunnel: "tunnel", starting: "starting", pending: "pending", stopping: "stopping"}
    assert h.disconnected == sorted([starting, elsewhere])
    assert h.aborted == {alive: [tunnel]}
    assert _host_rt(node, dead).state == HostState.LOST
    assert _host_rt(node, me).state == HostState.RUNNING and _host_rt(node, alive).state == HostState.RUNNING

    for vm in (tunnel, starting, pending, stopping):
        rt = _rt(node, vm)
        assert rt.vm_state == VmState.STOPPED and rt.vm_cmd is None and rt.vm_step == ""
        assert (rt.host_id, rt.vm_address, rt.vm_vma_port, rt.vm_x_port, rt.current_di_id, rt.vma_ok_ts,
                rt.expiration_soft, rt.expiration_hard) == (None,) * 8
        assert "node 'n2' was lost" in rt.last_error and "declared by node 'n1'" in rt.last_error
        assert rt.last_error_ts is not None
    # A surviving L7R's tunnel to a desktop of the lost node: told to close.
    rt = _rt(node, tunnel)
    assert (rt.user_state, rt.user_cmd, rt.l7r_host_id, rt.l7r_conn) == (
        UserState.CONNECTED, UserCmd.ABORT, alive, "c-alive")
    # Connections through the lost node's L7R: reset, whatever node the desktop is on.
    for vm in (starting, elsewhere):
        rt = _rt(node, vm)
        assert (rt.user_state, rt.user_cmd, rt.l7r_host_id, rt.l7r_pid, rt.l7r_conn) == (
            UserState.DISCONNECTED, None, None, None, None)
    rt = _rt(node, elsewhere)
    assert (rt.vm_state, rt.host_id, rt.last_error) == (VmState.RUNNING, alive, "")
    rt = _rt(node, mine)
    assert (rt.vm_state, rt.host_id) == (VmState.RUNNING, me)
    assert _rt(node, seed).vm_state == VmState.STOPPED and _rt(node, seed).last_error == ""

    [audit] = _lost_audit(node)
    assert (audit.object_type, audit.object_id, audit.object_name, audit.admin_name, audit.status) == (
        "host", dead, "n2", "hkd:n1", "ok")
    assert "node 'n1' declared host 'n2' lost" in audit.message and "4 desktop(s) stopped" in audit.message
    assert audit.after is not None and audit.after["stopped_vms"] == sorted([tunnel, starting, pending, stopping])
    assert audit.after["aborted_vms"] == [tunnel] and audit.after["declared_by"] == "n1"

    # Declared once: the next rounds find nothing to do.
    assert _store(node, me, "n1").declare_lost_peers(10.0) == []
    assert _store(node, alive, "n3").declare_lost_peers(10.0) == []
    assert len(_lost_audit(node)) == 1

    # The next connection starts the desktop on a surviving node.
    start_vm(node.factory, SYSTEM, node.cfg, tunnel)
    rt = _rt(node, tunnel)
    assert rt.vm_cmd == VmCmd.START and rt.host_id in (me, alive) and rt.last_error == ""


def test_fresh_stopped_starting_lost_and_own_hosts_are_never_declared(node: NodeFx) -> None:
    me = _host(node, "n1", HostState.RUNNING, age=OLD)  # even with an old heartbeat of its own
    ids = [
        _host(node, "fresh", HostState.RUNNING, age=dt.timedelta(seconds=2)),
        _host(node, "fresh-stopping", HostState.STOPPING, age=dt.timedelta(seconds=2)),
        _host(node, "stopped", HostState.STOPPED, age=OLD),
        _host(node, "starting", HostState.STARTING, age=OLD),
        _host(node, "lost", HostState.LOST, age=OLD),
        _host(node, "never-ran", HostState.STOPPED, age=None),
    ]
    vms = [_vm(node, f"v{i}", **_running_on(h)) for i, h in enumerate([me, *ids])]
    assert _store(node, me, "n1").declare_lost_peers(10.0) == []
    states = [_host_rt(node, h).state for h in [me, *ids]]
    assert states == [HostState.RUNNING, HostState.RUNNING, HostState.STOPPING, HostState.STOPPED,
                      HostState.STARTING, HostState.LOST, HostState.STOPPED]
    assert all(_rt(node, v).vm_state == VmState.RUNNING for v in vms)
    assert _lost_audit(node) == []


def test_stopping_and_silent_from_the_start_are_lost_too(node: NodeFx) -> None:
    me = _host(node, "n1", HostState.RUNNING)
    stopping = _host(node, "stopping", HostState.STOPPING, age=OLD)
    silent = _host(node, "silent", HostState.RUNNING, age=None)
    lost = _store(node, me, "n1").declare_lost_peers(10.0)
    assert {(h.id, h.silence is None) for h in lost} == {(stopping, False), (silent, True)}
    assert _host_rt(node, stopping).state == HostState.LOST and _host_rt(node, silent).state == HostState.LOST
    assert len(_lost_audit(node)) == 2


def test_racing_monitors_declare_a_node_once(node: NodeFx) -> None:
    monitors = [_host(node, f"m{i}", HostState.RUNNING) for i in range(6)]
    dead = _host(node, "dead", HostState.RUNNING, age=OLD)
    vms = [_vm(node, f"v{i}", **_running_on(dead)) for i in range(3)]
    barrier = threading.Barrier(len(monitors))
    results: list[list[LostHost]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def monitor(host_id: int, name: str) -> None:
        st = _store(node, host_id, name)
        try:
            barrier.wait(10)
            got = st.declare_lost_peers(10.0)
        except BaseException as e:  # reported below, with the others' results
            with lock:
                errors.append(e)
            return
        with lock:
            results.append(got)

    threads = [threading.Thread(target=monitor, args=(h, f"m{i}")) for i, h in enumerate(monitors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    winners = [r for r in results if r]
    assert len(results) == len(monitors) and len(winners) == 1
    [[lost]] = winners
    assert lost.id == dead and sorted(lost.vms) == vms
    [audit] = _lost_audit(node)
    assert audit.object_id == dead
    assert all(_rt(node, v).vm_state == VmState.STOPPED for v in vms)


def test_surviving_l7r_is_notified(node: NodeFx) -> None:
    if node.engine.dialect.name != "postgresql":
        pytest.skip("NOTIFY is PostgreSQL only (SQLite relies on the L7R's poll)")
    me = _host(node, "n1", HostState.RUNNING)
    dead = _host(node, "n2", HostState.RUNNING, age=OLD)
    l7r = _host(node, "n3", HostState.RUNNING)
    _vm(node, "t", **_running_on(dead), user_state=UserState.CONNECTED, l7r_host_id=l7r, l7r_pid=1, l7r_conn="c")

    async def scenario() -> None:
        wake = asyncio.Event()
        task = asyncio.create_task(notify.listen(node.engine.url, [f"qvd_cmd_for_user_on_host{l7r}"], wake))
        try:
            async with asyncio.timeout(10):
                await wake.wait()  # set once listening
            wake.clear()
            lost = await asyncio.to_thread(_store(node, me, "n1").declare_lost_peers, 10.0)
            assert [h.id for h in lost] == [dead]
            async with asyncio.timeout(10):
                await wake.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


# --- node daemons sharing one database ------------------------------------------------------------


@dataclass
class Cluster:
    """Node daemons n1, n2, ... each with a root of its own (its own fake machine), one database."""

    node: NodeFx
    tmp: Path
    cfg: Config
    roots: dict[str, Path] = field(default_factory=dict)
    daemons: list[NodeDaemon] = field(default_factory=list)

    def daemon(self, name: str) -> NodeDaemon:
        root = self.roots.get(name)
        if root is None:
            root = self.roots[name] = self.tmp / f"root-{name}"
            (root / "etc").mkdir(parents=True)
        backend = FakeBackend(root, self.cfg)
        address = f"127.0.0.{list(self.roots).index(name) + 1}"
        d = NodeDaemon(Paths(root), self.cfg, name, address, backend=backend, vma=FakeVma(backend.machine))
        self.daemons.append(d)
        return d

    def machine(self, name: str) -> set[int]:
        return set(FakeBackend(self.roots[name], self.cfg).machine.desktops)

    async def wait_for(self, what: str, pred: Any, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await asyncio.to_thread(pred):
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)

    def run(self, scenario: Any, timeout: float = 120.0) -> None:
        async def bounded() -> None:
            try:
                await asyncio.wait_for(scenario(), timeout)
            finally:
                for d in self.daemons:
                    if d._lock_fd is not None:
                        with contextlib.suppress(Exception):  # the others must still stop
                            await d.shutdown()

        asyncio.run(bounded())


@pytest.fixture
def cluster(node: NodeFx, tmp_path: Path) -> Iterator[Cluster]:
    cfg = node.cfg.overlay({**FAST, "database.url": node.url, "internal.hkd.cluster.node.timeout": 2.0,
                            "internal.hkd.agent.cluster_monitor.delay": 0.2}, source="node file")
    c = Cluster(node, tmp_path, cfg)
    try:
        yield c
    finally:
        for root in c.roots.values():
            FakeBackend.forget(root)


def test_dead_node_desktop_restarts_elsewhere_and_the_node_returns_without_it(cluster: Cluster) -> None:
    node = cluster.node
    vm = _vm(node, "desk")

    async def scenario() -> None:
        a = cluster.daemon("n1")
        await a.startup()
        await asyncio.to_thread(start_vm, node.factory, SYSTEM, cluster.cfg, vm)  # only n1 runs: placed there
        await cluster.wait_for("desk running", lambda: _rt(node, vm).vm_state == VmState.RUNNING)
        n1 = _host_id(node, "n1")
        assert _rt(node, vm).host_id == n1
        b = cluster.daemon("n2")
        await b.startup()
        n2 = _host_id(node, "n2")

        await crash(a)  # SIGKILL: the desktop keeps running on n1's machine, nothing is written
        assert cluster.machine("n1") == {vm}
        await cluster.wait_for("n1 declared lost", lambda: _host_rt(node, n1).state == HostState.LOST)
        rt = _rt(node, vm)
        assert rt.vm_state == VmState.STOPPED and rt.host_id is None
        assert "node 'n1' was lost" in rt.last_error and "declared by node 'n2'" in rt.last_error
        [audit] = _lost_audit(node)
        assert (audit.object_name, audit.admin_name) == ("n1", "hkd:n2")
        assert _host_rt(node, n2).state == HostState.RUNNING

        # The user's next connection: the desktop starts on the surviving node.
        await asyncio.to_thread(start_vm, node.factory, SYSTEM, cluster.cfg, vm)
        await cluster.wait_for("desk running on n2", lambda: _rt(node, vm).vm_state == VmState.RUNNING)
        assert _rt(node, vm).host_id == n2 and cluster.machine("n2") == {vm}

        # n1 comes back: it removes the desktop the database moved away, and does not take it back.
        a2 = cluster.daemon("n1")
        await a2.startup()
        assert cluster.machine("n1") == set()
        assert _host_rt(node, n1).state == HostState.RUNNING
        rt = _rt(node, vm)
        assert (rt.vm_state, rt.host_id) == (VmState.RUNNING, n2) and cluster.machine("n2") == {vm}
        assert len(_lost_audit(node)) == 1

    cluster.run(scenario)


def test_a_live_node_declared_lost_fences_and_rejoins_without_the_moved_desktop(cluster: Cluster) -> None:
    node = cluster.node
    vm = _vm(node, "desk")

    async def scenario() -> None:
        a = cluster.daemon("n1")
        await a.startup()
        await asyncio.to_thread(start_vm, node.factory, SYSTEM, cluster.cfg, vm)
        await cluster.wait_for("desk running", lambda: _rt(node, vm).vm_state == VmState.RUNNING)
        b = cluster.daemon("n2")
        await b.startup()
        n1, n2 = _host_id(node, "n1"), _host_id(node, "n2")

        # n1 stalls (its heartbeat stops, as in a long pause) while its desktop and loops go on.
        hb = a._loops.pop("heartbeat")
        hb.cancel()
        await asyncio.gather(hb, return_exceptions=True)
        await cluster.wait_for("n1 declared lost", lambda: _host_rt(node, n1).state == HostState.LOST)
        await asyncio.to_thread(start_vm, node.factory, SYSTEM, cluster.cfg, vm)
        await cluster.wait_for("desk running on n2", lambda: _rt(node, vm).host_id == n2
                               and _rt(node, vm).vm_state == VmState.RUNNING)

        # n1's heartbeat resumes: refused (lost) -> fence -> rejoin through 'starting'.
        a._loops["heartbeat"] = asyncio.create_task(a._heartbeat_loop(), name="heartbeat")
        await cluster.wait_for("n1 rejoined", lambda: _host_rt(node, n1).state == HostState.RUNNING
                               and not a.fenced)
        assert cluster.machine("n1") == set() and vm not in a.handlers
        rt = _rt(node, vm)
        assert (rt.vm_state, rt.host_id) == (VmState.RUNNING, n2) and cluster.machine("n2") == {vm}
        assert _host_rt(node, n2).state == HostState.RUNNING
        [audit] = _lost_audit(node)
        assert (audit.object_name, audit.admin_name) == ("n1", "hkd:n2")

    cluster.run(scenario)


def test_rejoin_removes_a_desktop_the_database_moved_away_instead_of_adopting_it(cluster: Cluster) -> None:
    """The reconciliation of a rejoin on its own (without the fencing before it): a desktop
    still running here whose row a peer reset is removed, not adopted."""
    node = cluster.node
    vm = _vm(node, "desk")
    peer = _host(node, "peer", HostState.RUNNING)

    async def scenario() -> None:
        a = cluster.daemon("n1")
        await a.startup()
        await asyncio.to_thread(start_vm, node.factory, SYSTEM, cluster.cfg, vm)
        await cluster.wait_for("desk running", lambda: _rt(node, vm).vm_state == VmState.RUNNING)
        n1 = _host_id(node, "n1")
        hb = a._loops.pop("heartbeat")
        hb.cancel()
        await asyncio.gather(hb, return_exceptions=True)
        await a._cancel_handlers()  # nobody here watches the desktop any more; it keeps running
        assert cluster.machine("n1") == {vm}
        with node.factory() as s, s.begin():
            s.execute(update(HostRuntime).where(HostRuntime.host_id == n1).values(ok_ts=utcnow() - OLD))
        [lost] = await asyncio.to_thread(_store(node, peer, "peer").declare_lost_peers, 10.0)
        assert lost.id == n1 and list(lost.vms) == [vm]

        await a._rejoin()
        assert _host_rt(node, n1).state == HostState.RUNNING
        assert cluster.machine("n1") == set() and vm not in a.handlers
        rt = _rt(node, vm)
        assert (rt.vm_state, rt.host_id) == (VmState.STOPPED, None) and "node 'n1' was lost" in rt.last_error

    cluster.run(scenario)


def test_the_monitor_waits_while_fenced_and_for_one_timeout_after(cluster: Cluster) -> None:
    node = cluster.node
    dead = _host(node, "dead", HostState.RUNNING, age=OLD)
    vm = _vm(node, "v", **_running_on(dead))

    async def scenario() -> None:
        # The loop is left out of this test: check_cluster() is what each round runs.
        d = cluster.daemon("n1")
        await d.startup()
        loop = d._loops.pop("cluster")
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        d._judging_since = None
        d.fenced = True
        assert await d.check_cluster() == []
        d.fenced = False
        assert await d.check_cluster() == []  # just back: give the peers one timeout
        assert _host_rt(node, dead).state == HostState.RUNNING and _rt(node, vm).vm_state == VmState.RUNNING
        found: list[LostHost] = []

        async def declared() -> bool:
            found.extend(await d.check_cluster())
            return bool(found)

        deadline = asyncio.get_running_loop().time() + 30
        while not await declared():
            assert asyncio.get_running_loop().time() < deadline, "the monitor never declared the dead host"
            await asyncio.sleep(0.1)
        assert [h.id for h in found] == [dead] and list(found[0].vms) == [vm]
        assert _host_rt(node, dead).state == HostState.LOST and _rt(node, vm).vm_state == VmState.STOPPED

    cluster.run(scenario)


def test_host_stop_vms_reaches_the_node_by_notify(cluster: Cluster) -> None:
    """Admin "stop every VM of this host": with a useless poll period, only NOTIFY can be quick."""
    node = cluster.node
    if node.engine.dialect.name != "postgresql":
        pytest.skip("NOTIFY is PostgreSQL only (SQLite relies on the poll)")
    cluster.cfg = cluster.cfg.overlay({"internal.hkd.agent.command_handler.delay": 60.0}, source="node file")
    vm = _vm(node, "desk")

    async def scenario() -> None:
        d = cluster.daemon("n1")
        await d.startup()
        await asyncio.sleep(0.5)  # the listener is up
        await asyncio.to_thread(start_vm, node.factory, SYSTEM, cluster.cfg, vm)
        await cluster.wait_for("desk running", lambda: _rt(node, vm).vm_state == VmState.RUNNING, timeout=20)
        await asyncio.to_thread(stop_vms_of_host, node.factory, SYSTEM, _host_id(node, "n1"))
        await cluster.wait_for("desk stopped", lambda: _rt(node, vm).vm_state == VmState.STOPPED, timeout=20)

    cluster.run(scenario)
