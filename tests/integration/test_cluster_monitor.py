"""A node dies while a user works on one of its desktops, seen from the broker.

The real L7R (TLS off, in a thread: :mod:`tests.unit.l7r.harness`) runs on the
frontend-only node ``node1``; the node daemons of ``node2`` and ``node3`` are played
by threads writing the database like qvd-hkd (FakeHkd), the desktop agent by FakeVma
and nxagent by an echo server.  The cluster monitor is the real one
(:meth:`qvd.hkd.store.HkdStore.declare_lost_peers`, what every running qvd-hkd calls),
run as ``node3``'s.  On PostgreSQL the L7R learns of the abort by NOTIFY, on SQLite by
its poll.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import update

from qvd.core.states import HostState, UserState, VmState
from qvd.db.models import Host, HostRuntime, utcnow
from qvd.hkd.store import HkdStore
from qvd.services.hosts import register_host
from tests.conftest import NodeFx
from tests.unit.l7r.harness import (
    EchoAgent,
    FakeHkd,
    FakeVma,
    L7rThread,
    RawClient,
    World,
    basic,
    host_id_of,
    populate,
    runtime,
    set_vm,
    wait_until,
)


@dataclass
class Site:
    node: NodeFx
    world: World
    l7r: L7rThread
    vma: FakeVma
    agent: EchoAgent
    hosts: dict[str, int]

    def hkd(self, name: str) -> FakeHkd:
        return FakeHkd(self.node, self.hosts[name], vma_port=self.vma.port, x_port=self.agent.port).start()

    def monitor(self, name: str) -> HkdStore:
        st = HkdStore(self.node.factory, self.node.cfg, self.node.paths, name)
        st.host_id = self.hosts[name]
        return st

    def silence(self, name: str) -> None:
        """The node's last heartbeat is an hour old (what a dead node leaves behind)."""
        with self.node.factory() as s, s.begin():
            s.execute(update(HostRuntime).where(HostRuntime.host_id == self.hosts[name])
                      .values(ok_ts=utcnow() - dt.timedelta(hours=1)))

    def host_state(self, name: str) -> HostState:
        with self.node.factory() as s:
            rt = s.get(HostRuntime, self.hosts[name])
            assert rt is not None
            return rt.state


@pytest.fixture
def site(node: NodeFx) -> Iterator[Site]:
    world = populate(node)
    vma = FakeVma().start()
    agent = EchoAgent().start()
    l7r = L7rThread(node, **{"node.backend": False}).start()  # frontend only: desktops go elsewhere
    hosts = {"node1": host_id_of(node, "node1")}
    with node.factory() as s, s.begin():
        for n, name in enumerate(("node2", "node3"), 2):
            hosts[name] = register_host(s, name, f"127.0.0.{n}").id
    try:
        yield Site(node, world, l7r, vma, agent, hosts)
    finally:
        l7r.stop()
        vma.stop()
        agent.stop()


def connect(c: RawClient, vm_id: int, login: str = "alice") -> tuple[list[str], int, bytes]:
    c.request(f"/qvd/connect_to_vm?id={vm_id}&qvd.client.os=linux", basic(login), upgrade=True)
    infos, _head, status, _headers, body = c.read_until_final()
    return infos, status, body


def echo(c: RawClient) -> None:
    data = bytes(range(256)) * 64
    c.send(data)
    assert c.recv_exact(len(data)) == data


def test_lost_node_ends_the_tunnel_and_the_desktop_starts_elsewhere(site: Site,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qvd.l7r")
    vm, other = site.world.vms["alice-1"], site.world.vms["alice-2"]
    node2 = site.hkd("node2")  # node3 is not running yet: the desktop goes to node2
    try:
        c = RawClient(site.l7r.port)
        assert connect(c, vm)[1] == 101
        echo(c)
        assert runtime(site.node, vm).host_id == site.hosts["node2"]
    finally:
        node2.stop()  # node2 dies: no more heartbeats
    site.silence("node2")

    # Before a peer declares it lost: a desktop of the silent node is refused at once.
    set_vm(site.node, other, vm_state=VmState.RUNNING, host_id=site.hosts["node2"], vm_address="127.0.0.1",
           vm_vma_port=site.vma.port, vm_x_port=site.agent.port)
    c2 = RawClient(site.l7r.port)
    _, status, body = connect(c2, other)
    assert status == 503
    assert b"the desktop's node 'node2' has not answered for" in body
    assert body.endswith(b"retry in a few seconds.\r\n")
    c2.close()
    assert runtime(site.node, other).user_state is UserState.DISCONNECTED

    # node3's cluster monitor declares node2 lost: the tunnel closes, with the reason.
    node3 = site.hkd("node3")
    try:
        [lost] = site.monitor("node3").declare_lost_peers(10.0)
        assert lost.name == "node2" and set(lost.vms) == {vm, other}
        assert lost.aborted == {site.hosts["node1"]: [vm]}
        assert c.closed_within(10)
        wait_until(lambda: runtime(site.node, vm).user_state is UserState.DISCONNECTED, what="VM given back")
        rt = runtime(site.node, vm)
        assert (rt.vm_state, rt.host_id, rt.user_cmd) == (VmState.STOPPED, None, None)
        assert "node 'node2' was lost" in rt.last_error
        closing = [r.getMessage() for r in caplog.records if f"vm {vm}: closing the session" in r.getMessage()]
        assert closing and "the desktop's node 'node2' was lost" in closing[0]
        ended = [r.getMessage() for r in caplog.records if f"vm {vm}: tunnel of" in r.getMessage()]
        assert ended and "closed by the broker: the desktop's node 'node2' was lost" in ended[0]

        # The user reconnects: the desktop starts on the surviving node.
        c3 = RawClient(site.l7r.port)
        infos, status, _ = connect(c3, vm)
        assert status == 101, infos
        assert "Starting virtual machine" in infos
        echo(c3)
        rt = runtime(site.node, vm)
        assert (rt.vm_state, rt.host_id, rt.user_state) == (VmState.RUNNING, site.hosts["node3"],
                                                            UserState.CONNECTED)
        c3.close()
    finally:
        node3.stop()


def test_a_desktop_on_a_lost_node_is_refused_at_once(site: Site) -> None:
    """A row still pointing at a lost node (only a writer racing the monitor leaves one)."""
    vm = site.world.vms["bob-1"]
    with site.node.factory() as s, s.begin():
        s.execute(update(HostRuntime).where(HostRuntime.host_id == site.hosts["node2"])
                  .values(state=HostState.LOST))
    set_vm(site.node, vm, vm_state=VmState.RUNNING, host_id=site.hosts["node2"], vm_address="127.0.0.1",
           vm_vma_port=site.vma.port, vm_x_port=site.agent.port)
    c = RawClient(site.l7r.port)
    _, status, body = connect(c, vm, "bob")
    assert status == 503
    assert b"the desktop's node 'node2' was lost" in body and body.endswith(b"retry in a few seconds.\r\n")
    c.close()


def test_connections_through_a_lost_l7r_node_are_reset_and_closed(site: Site,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The L7R's own node is declared lost: the monitor resets its connections, the L7R closes them."""
    caplog.set_level(logging.INFO, logger="qvd.l7r")
    vm = site.world.vms["alice-1"]
    node3 = site.hkd("node3")
    try:
        c = RawClient(site.l7r.port)
        assert connect(c, vm)[1] == 101
        echo(c)
        # node1 turns out to be a backend with a node daemon too, which then died.
        with site.node.factory() as s, s.begin():
            s.execute(update(Host).where(Host.id == site.hosts["node1"]).values(backend=True))
            s.execute(update(HostRuntime).where(HostRuntime.host_id == site.hosts["node1"])
                      .values(state=HostState.RUNNING, ok_ts=utcnow() - dt.timedelta(hours=1)))
        [lost] = site.monitor("node3").declare_lost_peers(10.0)
        assert lost.name == "node1" and lost.vms == {} and lost.disconnected == [vm]
        rt = runtime(site.node, vm)
        assert (rt.user_state, rt.user_cmd, rt.l7r_host_id) == (UserState.DISCONNECTED, None, None)
        assert rt.vm_state is VmState.RUNNING  # the desktop itself is on node3, alive
        assert c.closed_within(10)
        assert any("this node was declared lost" in r.getMessage() for r in caplog.records)
        assert site.host_state("node1") is HostState.LOST
        # ... and refuses new connections while its node is lost.
        c2 = RawClient(site.l7r.port)
        _, status, body = connect(c2, vm)
        assert (status, body) == (503, b"Server is lost\r\n")
        c2.close()
    finally:
        node3.stop()
