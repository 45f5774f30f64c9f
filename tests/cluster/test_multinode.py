"""Many nodes, real parts only: three nodes (``qvd-hkd`` + ``qvd-l7r`` each, LXC desktops from the real
minimal image) in network namespaces of their own, one PostgreSQL, a flat desktop network and shared
image/home directories; users connect over QVD/1.0 through any node's L7R (:mod:`tests.multinode`).

The tests run in order on one cluster (module fixture ``cluster``):

1. six users connect through the three L7Rs (one with the real ``qvd-client`` and nxproxy, the others
   with a raw QVD/1.0 client that checks the 101 and nxagent's first bytes): the load balancer spreads
   the desktops over the nodes, each node runs exactly the desktops ``vm_runtimes.host_id`` gives it,
   and each user writes a marker in their home;
2. a node holding desktops dies (SIGKILL of its daemons, links cut): it is declared ``lost``, its VMs
   ``stopped``, its containers stopped by its fence guard, the tunnels other L7Rs held to its desktops
   closed, and its users reconnect through another L7R to a desktop started elsewhere that still has
   their home; restarted, the node rejoins;
3. a node loses the database only (iptables DROP in its namespace) but keeps running: it fences itself
   (its containers stop), its peers declare it lost, its users get their desktops elsewhere; healed, it
   rejoins (``running``) without running anything twice.

Right after each failure the affected users start reconnecting, again and again (all but one, which
waits to see its VM ``stopped`` and, after the kill, its tunnel closed by the cluster): desktops restart
elsewhere as early as the cluster lets anybody.  All along, a poller lists every node's running
containers twice a second and records any VM found on two nodes at once; no test may end with such a
record.  Deadlines are generous (the defaults detect a
dead node in ``internal.hkd.cluster.node.timeout`` = 10 s); nothing asserts on timings.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.multinode import Cluster, ClusterError, Node, Proc, Session, User, tail, wait_for

pytestmark = [pytest.mark.lxc, pytest.mark.nx, pytest.mark.slow]

CONNECT = 300.0  # first start of a desktop on a busy 2-core machine (the node unpacks the image)
DETECT = 90.0  # lost / stopped / fenced: the defaults take 6-12 s
RECONNECT = 240.0


@dataclass
class World:
    """What the tests carry from one to the next."""

    entry: dict[str, Node] = field(default_factory=dict)  # login -> the L7R the user last came through
    sessions: dict[str, Session] = field(default_factory=dict)  # login -> raw session (held open)
    markers: dict[str, str] = field(default_factory=dict)  # login -> text in ~/qvd-marker
    real_user: str = ""
    real_client: Proc | None = None


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def until(what: str, pred: Callable[[], Any], timeout: float, poll: float = 0.5) -> Any:
    """Wait (a failure shows the cluster's log tails: tests/cluster/conftest.py)."""
    return wait_for(what, pred, timeout, poll)


def no_double_runs(c: Cluster) -> None:
    assert c.watch is not None
    assert not c.watch.errors, f"the container poller failed: {c.watch.errors[-3:]}"
    assert not c.watch.violations, "VMs ran on two nodes at once: " + "; ".join(
        f"VM {v.vm_id} on {', '.join(v.nodes)}" for v in c.watch.violations[:10])


def desktop_node(c: Cluster, vm_id: int) -> Node:
    row = c.vm_rows()[vm_id]
    n = c.node_by_host(row["host_id"])
    assert n is not None and row["state"] == "running", f"VM {vm_id} is not running on a node: {row}"
    return n


def connect_raw(c: Cluster, w: World, users: list[User], nodes: list[Node], *, retry_for: float = 0.0,
                timeout: float = CONNECT) -> None:
    """Connect ``users`` through ``nodes`` (round robin) at once; wait for 101 and nxagent's bytes."""
    assert c.agent is not None
    for i, u in enumerate(users):
        n = nodes[i % len(nodes)]
        w.entry[u.login] = n
        w.sessions[u.login] = c.agent.connect(u, n, hold=True, retry_for=retry_for, timeout=timeout)
    for u in users:
        s = w.sessions[u.login]
        ev = c.agent.wait(s, ("nx",), timeout + retry_for + 60)
        assert ev["head"].startswith("NXPROXY-"), ev  # nxagent's answer to the NX client's hello


def real_connect(c: Cluster, w: World, u: User, n: Node) -> None:
    """The real qvd-client with nxproxy on the Xvfb, through node ``n``; waits for the connected session."""
    if w.real_client is not None:
        w.real_client.stop(15)
    log = c.logs / f"qvd-client-{u.login}-{n.name}-{secrets.token_hex(2)}.log"
    w.real_client = c.qvd_client(u, n, log)
    w.entry[u.login] = n
    proc = w.real_client

    def connected() -> bool:
        if not proc.alive():
            raise ClusterError(f"qvd-client exited with {proc.popen.returncode}" + tail(log, 40))
        text = log.read_text(errors="replace")
        row = c.vm_rows()[u.vm_id]
        return "Connected; starting nxproxy" in text and row["user_state"] == "connected"

    until(f"{u.login}'s qvd-client session through {n.name}", connected, CONNECT)
    # nxproxy shows the desktop: nxagent's window ("QVD", class NXAgent) appears on the client's X screen
    until("the desktop's window on the client's screen",
          lambda: proc.alive() and '"NXAgent"' in c.x_windows(), 120)


def check_placement(c: Cluster) -> dict[str, set[int]]:
    """Every node runs exactly the desktops the database places on it."""
    placed = c.placement()
    running = {n.name: c.containers(n) for n in c.nodes}
    assert running == placed, f"containers {running} != vm_runtimes.host_id {placed}"
    return placed


def check_markers(c: Cluster, w: World, users: list[User]) -> None:
    for u in users:
        n = desktop_node(c, u.vm_id)
        assert c.read_marker(n, u) == w.markers[u.login], f"{u.login}'s home on {n.name} lost its marker"


def test_users_spread_over_the_nodes(cluster: Cluster, world: World) -> None:
    c, w = cluster, world
    real, raw = c.users[0], c.users[1:]
    w.real_user = real.login
    # user2 -> node2, user3 -> node3, user4 -> node1, ...: every L7R serves users
    connect_raw(c, w, raw, c.nodes[1:] + c.nodes[:1])
    real_connect(c, w, real, c.nodes[0])

    rows = c.vm_rows()
    assert all(r["state"] == "running" for r in rows.values()), rows
    placed = check_placement(c)
    c.say("placement: " + ", ".join(f"{k}: {sorted(v)}" for k, v in placed.items()))
    assert all(placed[n.name] for n in c.nodes), f"the load balancer left a node empty: {placed}"
    assert sum(len(v) for v in placed.values()) == len(c.users)

    for u in c.users:
        n = desktop_node(c, u.vm_id)
        w.markers[u.login] = f"{u.login} was on {n.name} ({secrets.token_hex(4)})"
        c.write_marker(n, u, w.markers[u.login])
        # the home is on the storage every node shares
        assert (c.shared / "homes" / f"vm-{u.vm_id}" / u.login / "qvd-marker").read_text() == w.markers[u.login]
    no_double_runs(c)


class Recovery:
    """Users reconnecting right after a failure, again and again, until each works on a desktop outside
    ``bad`` (what people clicking "reconnect" do).  Early attempts may reach a desktop that is about to be
    fenced, or wait on a node not yet declared lost: the tunnel is dropped and the user tries again.  So
    the cluster restarts desktops elsewhere as early as it lets anybody, and the container poller would
    see a desktop running twice."""

    def __init__(self, c: Cluster, w: World, users: list[User], via: list[Node], bad: Node,
                 timeout: float = RECONNECT) -> None:
        self.c, self.w, self.via, self.bad = c, w, via, bad
        self.deadline = time.monotonic() + timeout
        self.pending = {u.login: u for u in users}
        self.tries = {u.login: 0 for u in users}
        for i, u in enumerate(users):
            self._connect(u, via[i % len(via)])

    def _connect(self, u: User, n: Node) -> None:
        assert self.c.agent is not None
        self.tries[u.login] += 1
        self.w.entry[u.login] = n
        self.w.sessions[u.login] = self.c.agent.connect(
            u, n, hold=True, retry_for=max(0.0, self.deadline - time.monotonic()), timeout=CONNECT)

    def poll(self) -> bool:
        """One look at every pending user; True once all are done."""
        assert self.c.agent is not None
        for login, u in list(self.pending.items()):
            s = self.w.sessions[login]
            if s.last("error") is not None:
                raise ClusterError(f"{login} could not reconnect through {s.node}: {s.last('error')}")
            if s.last("nx") is None:
                continue
            row = self.c.vm_rows()[u.vm_id]
            if s.done or row["host_id"] == self.bad.host_id or row["state"] != "running":
                # an old desktop on the failed node (or the tunnel already gone): try again
                self.c.agent.disconnect(s)
                if time.monotonic() > self.deadline:
                    raise ClusterError(f"{login} never got a desktop outside {self.bad.name} ({self.tries[login]} "
                                       "tries)")
                time.sleep(0.5)
                self._connect(u, self.via[self.tries[login] % len(self.via)])
                continue
            del self.pending[login]
        return not self.pending


def fail_over(c: Cluster, w: World, victim: Node, affected: list[User], patient: list[User], *,
              observe: Callable[[float], None], done: Callable[[], bool]) -> float:
    """After ``victim`` failed: its raw users but ``patient`` reconnect at once (:class:`Recovery`)
    while ``observe`` records what the cluster does; ``patient`` wait until ``done`` (so that their VMs
    are seen ``stopped`` and their own tunnels closed by the cluster, not taken over), then reconnect
    too, and so does the real client if its desktop was there.  Returns the seconds until all are back."""
    t0 = time.monotonic()
    others = [n for n in c.nodes if n is not victim and not n.killed and not n.partitioned]
    eager = [u for u in affected if u.login != w.real_user and u not in patient]
    rec = Recovery(c, w, eager, others, victim)
    deadline = t0 + RECONNECT + DETECT
    while not (rec.poll() and done()):
        observe(time.monotonic() - t0)
        if time.monotonic() > deadline:
            raise ClusterError(f"no recovery from the failure of {victim.name} after {RECONNECT + DETECT:g} s: "
                               f"users still waiting {sorted(rec.pending)}")
        time.sleep(0.3)
    for u in patient:
        row = c.vm_rows()[u.vm_id]
        assert row["state"] == "stopped" and row["host_id"] is None, f"{u.login}'s VM after the failover: {row}"
    late = Recovery(c, w, patient, others, victim)
    wait_for("the last user to reconnect", late.poll, RECONNECT + 60)
    if any(u.login == w.real_user for u in affected):
        real_connect(c, w, c.users[0], others[0])
    for u in affected:
        assert desktop_node(c, u.vm_id) in others
    return time.monotonic() - t0


def test_killed_node_is_replaced(cluster: Cluster, world: World) -> None:
    c, w = cluster, world
    assert w.markers, "needs test_users_spread_over_the_nodes"
    placed = c.placement()
    victim = max(c.nodes, key=lambda n: (len(placed[n.name]), -n.index))
    survivors = [n for n in c.nodes if n is not victim]
    affected = [c.user_of(vm) for vm in sorted(placed[victim.name])]
    assert affected
    # The cluster monitor aborts the tunnels other L7Rs hold to the victim's desktops: one such user
    # (the "patient" one) waits for that instead of reconnecting at once.
    raw = [u for u in affected if u.login != w.real_user]
    assert raw, f"{victim.name} runs only the real client's desktop"
    patient = next((u for u in raw if w.entry[u.login] is not victim), None)
    if patient is None:  # make one: a user of the victim comes back through a survivor (take-over)
        patient = raw[-1]
        connect_raw(c, w, [patient], survivors[:1])
    held = {patient.login: w.sessions[patient.login]}
    assert not held[patient.login].done, f"{patient.login}'s session ended before the kill: {held}"
    came_through_victim = [u for u in c.users if w.entry[u.login] is victim and u not in affected]
    c.say(f"killing {victim.name} (desktops of {', '.join(u.login for u in affected)}); tunnels to them held by "
          f"other L7Rs: {', '.join(held) or 'none'}")
    seen: dict[str, float] = {}

    def observe(t: float) -> None:
        if "lost" not in seen and c.host_state(victim) == "lost":
            seen["lost"] = t
        if "guard" not in seen and not c.containers(victim):
            seen["guard"] = t
        if "aborted" not in seen and all(s.done for s in held.values()):
            seen["aborted"] = t

    c.kill_node(victim)
    took = fail_over(c, w, victim, affected, [patient], observe=observe, done=lambda: len(seen) == 3)
    c.say(f"{victim.name} killed: lost after {seen['lost']:.1f} s, containers stopped by its guard after "
          f"{seen['guard']:.1f} s, tunnels held elsewhere closed after {seen['aborted']:.1f} s, its users back after "
          f"{took:.1f} s")
    for login, s in held.items():
        assert s.last("closed") is not None, f"{login}'s tunnel through {s.node} was not closed: {s.events}"
    assert c.host_state(victim) == "lost"
    assert not c.containers(victim)
    # the users whose L7R died come back through another one (their desktops ran on)
    connect_raw(c, w, [u for u in came_through_victim if u.login != w.real_user], survivors, retry_for=RECONNECT)
    if w.real_user in {u.login for u in came_through_victim}:
        real_connect(c, w, c.users[0], survivors[0])
    check_markers(c, w, affected)
    check_placement(c)
    no_double_runs(c)

    # Restarted (links up, new daemons), the node rejoins: running, and nothing of before runs there.
    c.revive_node(victim)
    assert c.host_state(victim) == "running"
    assert not c.containers(victim)
    check_placement(c)
    no_double_runs(c)


def test_partitioned_node_fences_and_rejoins(cluster: Cluster, world: World) -> None:
    c, w = cluster, world
    assert w.markers, "needs test_users_spread_over_the_nodes"
    placed = c.placement()
    victim = max(c.nodes, key=lambda n: (len(placed[n.name]), -n.index))
    affected = [c.user_of(vm) for vm in sorted(placed[victim.name])]
    assert affected, placed
    assert victim.hkd is not None
    hkd_pid = victim.hkd.pid
    c.say(f"cutting {victim.name} from the database (desktops of {', '.join(u.login for u in affected)})")
    seen: dict[str, float] = {}

    def observe(t: float) -> None:
        if "fenced" not in seen and not c.containers(victim):
            seen["fenced"] = t
        if "lost" not in seen and c.host_state(victim) == "lost":
            seen["lost"] = t

    raw = [u for u in affected if u.login != w.real_user]
    c.partition(victim)
    took = fail_over(c, w, victim, affected, raw[-1:], observe=observe, done=lambda: len(seen) == 2)
    c.say(f"{victim.name} cut from the database: fenced after {seen['fenced']:.1f} s, declared lost after "
          f"{seen['lost']:.1f} s, its users back after {took:.1f} s")
    assert victim.hkd.alive(), "the node daemon died instead of fencing" + tail(c.logs / f"{victim.name}-hkd.log")
    assert not c.containers(victim)
    check_markers(c, w, affected)
    no_double_runs(c)

    c.heal(victim)
    t0 = time.monotonic()
    until(f"{victim.name} to rejoin", lambda: c.host_state(victim) == "running", DETECT)
    c.say(f"{victim.name} rejoined {time.monotonic() - t0:.1f} s after healing")
    assert victim.hkd.alive() and victim.hkd.pid == hkd_pid, "the node daemon was restarted, not rejoined"
    assert not c.containers(victim), "the rejoined node runs desktops the cluster moved away"
    check_placement(c)
    # it serves users again: a user whose desktop runs elsewhere connects through its L7R
    u = next(u for u in c.users if u.login != w.real_user)
    time.sleep(1.2)  # the L7R re-reads its node's state every second
    connect_raw(c, w, [u], [victim], retry_for=60)
    check_placement(c)
    no_double_runs(c)
    assert c.watch is not None and c.watch.polls > 20


def test_no_desktop_ever_ran_twice(cluster: Cluster) -> None:
    no_double_runs(cluster)
    for n in cluster.nodes:
        assert n.hkd is not None and n.hkd.alive(), f"{n.name}'s node daemon died" + tail(
            cluster.logs / f"{n.name}-hkd.log")
