"""The L7R end to end over loopback, against SQLite and PostgreSQL.

The test plays the node daemon (FakeHkd writes vm_state/vm_address like qvd-hkd),
the desktop agent (FakeVma) and nxagent (EchoAgent).  Requests are written and
answers read byte by byte, the way QVD clients do.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

import pytest
from sqlalchemy import select, update

from qvd.core.states import HostState, UserCmd, UserState, VmState
from qvd.db.models import DiTag, HostRuntime, ObjectType, Property, Tenant, UserToken, Vm, utcnow
from qvd.services.base import SYSTEM
from qvd.services.vms import disconnect_vm
from tests.unit.l7r.harness import RawClient, Rig, basic, expired, runtime, set_vm, wait_until

SLAVE_101 = re.compile(rb"^HTTP/1\.1 101 Switching Protocols\r\nX-QVD-Slave-Key: ([A-Za-z0-9]{64})\r\n\r\n$")
COLD_START = [
    "Session acquired for VM_ID: {id}",
    "Assigning VM {id} to host",
    "Starting virtual machine",
    "Waiting for VM to reach state 'running'",
    "Starting X session at VM {id}",
    "Waiting for X session to come up on VM {id}",
    "Connecting X session for VM_ID: {id}",
    "Connection established",
]


def connect(c: RawClient, vm_id: int, login: str = "alice", *, query: str = "", eol: bytes = b"\r\n",
            password: str = "secret") -> tuple[list[str], bytes, int, dict[str, str], bytes]:
    c.request(f"/qvd/connect_to_vm?id={vm_id}&qvd.client.os=linux&qvd.client.link=adsl{query}",
              basic(login, password), upgrade=True, eol=eol)
    return c.read_until_final()


def echo_ok(c: RawClient, size: int = 256 * 1024) -> None:
    data = os.urandom(size)
    c.send(data)
    assert c.recv_exact(len(data)) == data


def refresh(rig: Rig) -> None:
    rig.l7r.call(rig.l7r.broker.refresh())


# --- ping and plain HTTP behaviour ---------------------------------------------------------------


def test_ping_bytes(rig: Rig) -> None:
    c = rig.client()
    c.send(b"GET /qvd/ping HTTP/1.1\r\n\r\n")
    head, _status, _, body = c.read_response()
    assert head + body == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
                           b"I am alive!\r\n")


def test_node_blocked_or_not_running_is_503_everywhere(rig: Rig) -> None:
    with rig.node.factory() as s, s.begin():
        s.execute(update(HostRuntime).values(blocked=True))
    refresh(rig)
    c = rig.client()
    for target in ("/qvd/ping", "/qvd/list_of_vm"):
        c.request(target, basic("alice"))
        _, status, _, body = c.read_response()
        assert (status, body) == (503, b"Server is blocked\r\n")
    _, _, status, _, body = connect(c, rig.world.vms["alice-1"])
    assert (status, body) == (503, b"Server is blocked\r\n")
    with rig.node.factory() as s, s.begin():
        s.execute(update(HostRuntime).values(blocked=False))
    rig.hkd.stop()
    rig.hkd.heartbeat(HostState.STOPPED)
    refresh(rig)
    c.request("/qvd/ping")
    _, status, _, body = c.read_response()
    assert (status, body) == (503, b"Server is stopped\r\n")


def test_protocol_errors(rig: Rig) -> None:
    c = rig.client()
    c.send(b"GET /qvd/ping HTTP/1.0\r\n\r\n")
    head, status, headers, body = c.read_response()
    assert status == 505 and head.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n") and body
    assert c.closed_within(3)

    c = rig.client()
    c.request("/qvd/nothing_here", basic("alice"))
    _, status, _, body = c.read_response()
    assert status == 404 and body
    c.send(b"POST /qvd/list_of_vm HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    _, status, headers, _ = c.read_response()
    assert status == 405 and headers["allow"] == "GET"
    c.send(b"this is not http\r\n\r\n")
    _, status, _, body = c.read_response()
    assert status == 400 and body
    assert c.closed_within(3)


# --- authentication --------------------------------------------------------------------------------


def test_list_of_vm_without_host_and_with_bare_lf(rig: Rig) -> None:
    c = rig.client()
    c.request("/qvd/list_of_vm?", basic("alice"), eol=b"\n")
    _head, status, headers, body = c.read_response()
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    vms = json.loads(body)
    assert [v["name"] for v in vms] == ["alice-1", "alice-2", "alice-blocked"]
    assert vms[0] == {"id": rig.world.vms["alice-1"], "name": "alice-1", "state": "stopped", "blocked": 0,
                      "is_application": 0}
    assert vms[2]["blocked"] == 1
    c.request("/qvd/list_of_applications", basic("alice"))
    _, status, _, body = c.read_response()
    assert [v["name"] for v in json.loads(body)] == ["alice-app"]
    assert json.loads(body)[0]["is_application"] == 1


def test_wrong_password_missing_auth_blocked_user(rig: Rig) -> None:
    c = rig.client()
    for auth in (basic("alice", "wrong"), None, basic("mallory"), basic("nobody"), "Basic %%%", "Negotiate x",
                 basic("carol")):  # carol is in tenant acme, not default
        c.request("/qvd/list_of_vm", auth)
        _, status, headers, body = c.read_response()
        assert status == 401, auth
        assert headers["www-authenticate"] == 'Basic realm="QVD"'
        assert body.strip()


def test_tenant_separators_and_case(rig: Rig) -> None:
    c = rig.client()
    for login in ("carol@acme", "carol#acme", "CAROL@ACME"):
        c.request("/qvd/list_of_vm", basic(login))
        _, status, _, body = c.read_response()
        assert status == 200, login
        assert [v["name"] for v in json.loads(body)] == ["carol-1"]


def test_blocked_tenant(rig: Rig) -> None:
    with rig.node.factory() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.name == "acme").values(blocked=True))
    c = rig.client()
    c.request("/qvd/list_of_vm", basic("carol@acme"))
    assert c.read_response()[1] == 401


def test_lockout_after_repeated_failures(rig: Rig) -> None:
    c = rig.client()
    for _ in range(5):
        c.request("/qvd/list_of_vm", basic("bob", "nope"))
        assert c.read_response()[1] == 401
    c.request("/qvd/list_of_vm", basic("bob"))
    assert c.read_response()[1] == 401
    c.request("/qvd/list_of_vm", basic("alice"))
    assert c.read_response()[1] == 200


def test_bearer_tokens(rig: Rig) -> None:
    c = rig.client()
    c.request("/qvd/create_auth_token", basic("alice"))
    _, status, _, body = c.read_response()
    assert status == 200
    answer = json.loads(body)
    assert answer["auth_params_id"] == 0 and answer["auth_token"].endswith("\n")
    bearer = "Bearer " + answer["auth_token"].strip()
    raw = base64.b64decode(answer["auth_token"]).decode()
    with rig.node.factory() as s:
        row = s.scalars(select(UserToken)).one()
        assert row.token_hash != raw and not row.multi_use  # stored hashed, single use
        assert row.auth_params == {"qvd.vm.user.name": "alice"}

    c2 = rig.client()
    for _ in range(2):  # cached on the connection: one use
        c2.request("/qvd/list_of_vm", bearer)
        _, status, _, body = c2.read_response()
        assert status == 200 and len(json.loads(body)) == 3
    c2.request("/qvd/create_auth_token", bearer)
    assert c2.read_response()[1] == 403
    c3 = rig.client()
    c3.request("/qvd/list_of_vm", bearer)
    assert c3.read_response()[1] == 401  # already used

    c.request("/qvd/create_auth_token?multi_use=1", basic("alice"))
    multi = "Bearer " + json.loads(c.read_response()[3])["auth_token"].strip()
    for _ in range(2):
        cx = rig.client()
        cx.request("/qvd/authenticate_user", multi)
        _, status, _, body = cx.read_response()
        assert (status, json.loads(body)) == (200, {})


def test_expired_token_is_refused_and_removed(rig: Rig) -> None:
    from qvd.core.security import token_hash

    with rig.node.factory() as s, s.begin():
        s.add(UserToken(token_hash=token_hash("old"), user_id=rig.world.users["alice"], expires_at=expired(-5),
                        multi_use=True))
    c = rig.client()
    c.request("/qvd/list_of_vm", "Bearer " + base64.b64encode(b"old").decode())
    assert c.read_response()[1] == 401
    with rig.node.factory() as s:
        assert s.scalars(select(UserToken)).first() is None


def test_token_bound_to_a_vm(rig: Rig) -> None:
    from qvd.core.security import token_hash

    vm = rig.world.vms["alice-2"]
    with rig.node.factory() as s, s.begin():
        s.add(UserToken(token_hash=token_hash("bound"), user_id=rig.world.users["alice"], vm_id=vm,
                        expires_at=expired(600), multi_use=True))
    c = rig.client()
    auth = "Bearer " + base64.b64encode(b"bound").decode()
    c.request("/qvd/list_of_vm", auth)
    assert [v["id"] for v in json.loads(c.read_response()[3])] == [vm]
    c.request(f"/qvd/connect_to_vm?id={rig.world.vms['alice-1']}", auth, upgrade=True)
    assert c.read_until_final()[2] == 404


# --- connect_to_vm ---------------------------------------------------------------------------------


def test_cold_connect_sequence_101_and_exact_splice(rig: Rig) -> None:
    vm = rig.world.vms["alice-1"]
    with rig.node.factory() as s, s.begin():
        row = s.get(Vm, vm)
        assert row is not None
        di = s.scalars(select(DiTag.di_id).where(DiTag.osf_id == row.osf_id)).one()
        for obj, oid, key, value in ((ObjectType.OSF, row.osf_id, "p.layer", "osf"),
                                     (ObjectType.OSF, row.osf_id, "p.osf", "o"),
                                     (ObjectType.DI, di, "p.layer", "di"),
                                     (ObjectType.DI, di, "p.di", "d"),
                                     (ObjectType.USER, rig.world.users["alice"], "p.layer", "user"),
                                     (ObjectType.VM, vm, "p.layer", "vm"),
                                     (ObjectType.USER, rig.world.users["alice"], "p.user", "u")):
            s.add(Property(object_type=obj, object_id=oid, key=key, value=value))
    c = rig.client()
    c.request("/qvd/list_of_vm?", basic("alice"))
    assert c.read_response()[1] == 200
    t0 = time.monotonic()
    infos, head, status, _, _ = connect(c, vm, query="&qvd.client.geometry=1024x768&qvd.client.keyboard=pc105%2Fes"
                                        "&qvd.client.nxagent.extra_args=listen%3D1&custom.colour=blue")
    assert status == 101, infos
    m = SLAVE_101.match(head)
    assert m, head
    # The interim lines, in order; the "waiting" line repeats while the node boots the VM.
    expected = [i.format(id=vm) for i in COLD_START]
    dedup = [x for i, x in enumerate(infos) if i == 0 or x != infos[i - 1]]
    assert dedup == expected
    assert time.monotonic() - t0 < 30
    for size in (1, 1000, 300_000):
        echo_ok(c, size)

    [params] = rig.vma.x_starts()
    assert params["qvd.slave.key"] == m.group(1).decode()
    assert params["qvd.vm.user.name"] == "alice"
    assert params["qvd.client.geometry"] == "1024x768"
    assert params["qvd.client.keyboard"] == "pc105/es"
    assert params["custom.colour"] == "blue"
    assert params["p.layer"] == "vm"  # OSF < DI < user < VM
    assert (params["p.osf"], params["p.di"], params["p.user"]) == ("o", "d", "u")
    assert "qvd.client.nxagent.extra_args" not in params
    rt = runtime(rig.node, vm)
    assert rt.user_state is UserState.CONNECTED and rt.l7r_host_id == rig.world.host_id
    assert rt.l7r_pid == os.getpid() and rt.real_user_id == rig.world.users["alice"]

    c.close()
    wait_until(lambda: runtime(rig.node, vm).user_state is UserState.DISCONNECTED, what="release at tunnel end")
    rt = runtime(rig.node, vm)
    assert (rt.l7r_host_id, rt.l7r_pid, rt.l7r_conn, rt.user_cmd) == (None, None, None, None)
    refresh(rig)
    with rig.node.factory() as s:
        hr = s.get(HostRuntime, rig.world.host_id)
        assert hr is not None
        assert hr.http_requests >= 2 and hr.auth_attempts == 1 and hr.auth_ok == 1
        assert (hr.nx_attempts, hr.nx_ok, hr.short_sessions) == (1, 1, 1)


def test_connect_pipelined_bare_lf_without_host(rig: Rig) -> None:
    vm = rig.world.vms["alice-2"]
    c = rig.client()
    auth = basic("alice")
    c.send(f"GET /qvd/list_of_vm? HTTP/1.1\nAuthorization: {auth}\n\n"
           f"GET /qvd/connect_to_vm?id={vm}&qvd.client.type=Qt&qvd.client.timezone=Europe/Madrid HTTP/1.1\n"
           f"Authorization: {auth}\nConnection: Upgrade\nUpgrade: QVD/1.0\n\n".encode())
    _, status, _, body = c.read_response()
    assert status == 200 and json.loads(body)
    infos, head, status, _, _ = c.read_until_final()
    assert status == 101 and SLAVE_101.match(head) and infos[-1] == "Connection established"
    echo_ok(c)


def test_connect_refusals(rig: Rig) -> None:
    vms = rig.world.vms
    c = rig.client()
    auth = basic("alice")
    c.request(f"/qvd/connect_to_vm?id={vms['alice-1']}", auth)  # no upgrade headers
    _, status, headers, body = c.read_response()
    assert status == 426 and headers["upgrade"] == "QVD/1.0" and body
    cases = [
        ("", 422, b"parameter id is missing\r\n"),
        ("id=abc", 422, None),
        (f"id={vms['alice-1']}&foo=1&bar=2", 403, b"Invalid parameters foo bar\r\n"),
        (f"id={vms['alice-1']}&qvd.client.geometry=1x1", 422, None),
        ("id=99999", 404, b"The requested virtual machine does not exist\r\n"),
        (f"id={vms['bob-1']}", 404, b"The requested virtual machine does not exist\r\n"),
        (f"id={vms['alice-blocked']}", 403, b"The requested virtual machine is offline for maintenance\r\n"),
    ]
    for query, want, text in cases:
        c.request(f"/qvd/connect_to_vm?{query}", auth, upgrade=True)
        infos, _, status, _, body = c.read_until_final()
        assert (status, infos) == (want, []), query
        assert body.strip()
        if text is not None:
            assert body == text
    # The connection is still usable after all those refusals.
    c.request("/qvd/ping")
    assert c.read_response()[1] == 200
    # Nothing was started or taken.
    assert rig.hkd.starts == 0
    assert runtime(rig.node, vms["bob-1"]).user_state is UserState.DISCONNECTED


def test_vm_start_failure_is_503_with_the_reason(rig: Rig) -> None:
    rig.hkd.fail_start = "lxc-start failed: out of memory"
    vm = rig.world.vms["alice-1"]
    c = rig.client()
    infos, _, status, _headers, body = connect(c, vm)
    assert status == 503
    assert "Starting virtual machine" in infos
    assert body == (f"The requested virtual machine is not available: Failed to start virtual machine {vm}: "
                    f"lxc-start failed: out of memory, retry later.\r\n").encode()
    assert runtime(rig.node, vm).user_state is UserState.DISCONNECTED
    c.request("/qvd/ping")
    assert c.read_response()[1] == 200


def test_no_host_available_is_503(rig: Rig) -> None:
    rig.hkd.stop()
    with rig.node.factory() as s, s.begin():
        s.execute(update(HostRuntime).values(usable_ram=16))  # too small for the OSF
    c = rig.client()
    infos, _, status, _, body = connect(c, rig.world.vms["alice-1"])
    assert status == 503 and infos[:2] == [f"Session acquired for VM_ID: {rig.world.vms['alice-1']}",
                                           f"Assigning VM {rig.world.vms['alice-1']} to host"]
    assert body.startswith(b"The requested virtual machine is not available: Unable to assign vm to host: no host")


def test_x_start_retried_while_the_agent_suspends(rig: Rig) -> None:
    rig.vma.busy = 2
    c = rig.client()
    _infos, _, status, _, _ = connect(c, rig.world.vms["alice-1"])
    assert status == 101
    assert len(rig.vma.x_starts()) == 3
    echo_ok(c)


def test_x_start_refused_is_503(rig: Rig) -> None:
    rig.vma.refuse = "invalid value 'xx' for qvd.client.link: expected one of modem, isdn, adsl, wan, lan"
    c = rig.client()
    _, _, status, _, body = connect(c, rig.world.vms["alice-1"])
    assert status == 503
    assert b"could not start the X session: invalid value" in body
    assert len(rig.vma.x_starts()) == 1  # not worth retrying


def test_client_gone_during_102s_gives_the_vm_back(rig: Rig) -> None:
    rig.hkd.delay = 1.0
    vm = rig.world.vms["alice-1"]
    c = rig.client()
    c.request(f"/qvd/connect_to_vm?id={vm}", basic("alice"), upgrade=True)
    _, status, _ = c.read_head()
    assert status == 102
    c.close()
    wait_until(lambda: runtime(rig.node, vm).user_state is UserState.DISCONNECTED
               and runtime(rig.node, vm).l7r_conn is None, timeout=15, what="VM given back")


def test_take_over_second_connection_wins(rig: Rig) -> None:
    vm = rig.world.vms["alice-1"]
    first = rig.client()
    assert connect(first, vm)[2] == 101
    echo_ok(first)
    conn1 = runtime(rig.node, vm).l7r_conn

    second = rig.client()
    infos, _, status, _, _ = connect(second, vm)
    assert status == 101
    assert f"Aborting contending session for VM_ID: {vm}" in infos
    assert infos[infos.index(f"Aborting contending session for VM_ID: {vm}") + 1] == f"Session acquired for VM_ID: {vm}"
    assert first.closed_within(5)
    echo_ok(second)
    rt = runtime(rig.node, vm)
    assert rt.user_state is UserState.CONNECTED and rt.l7r_conn not in (None, conn1) and rt.user_cmd is None
    # The VM was started once; the second connection resumed it.
    assert rig.hkd.starts == 1


def test_admin_disconnect_closes_the_tunnel_quickly(rig: Rig) -> None:
    vm = rig.world.vms["alice-2"]
    c = rig.client()
    assert connect(c, vm)[2] == 101
    echo_ok(c)
    disconnect_vm(rig.node.factory, SYSTEM, rig.l7r.cfg, vm)
    assert runtime(rig.node, vm).user_cmd is UserCmd.ABORT
    assert c.closed_within(2.0)
    wait_until(lambda: runtime(rig.node, vm).user_state is UserState.DISCONNECTED, what="row released")
    assert runtime(rig.node, vm).user_cmd is None


def test_stale_holder_of_this_node_is_replaced(rig: Rig) -> None:
    """A row left 'connected' by a dead L7R process of this node does not block the user."""
    vm = rig.world.vms["alice-1"]
    set_vm(rig.node, vm, user_state=UserState.CONNECTED, l7r_host_id=rig.world.host_id, l7r_pid=2**22 + 12345,
           l7r_conn="dead-1")
    c = rig.client()
    assert connect(c, vm)[2] == 101


def test_stop_vm(rig: Rig) -> None:
    vm = rig.world.vms["alice-1"]
    c = rig.client()
    c.request(f"/qvd/stop_vm?id={vm}", basic("alice"))
    _head, status, _, body = c.read_response()
    assert (status, body) == (200, b"Machine stopped\r\n")  # already stopped: no 102 at all
    assert connect(c, vm)[2] == 101
    c.close()
    wait_until(lambda: runtime(rig.node, vm).user_state is UserState.DISCONNECTED)
    assert runtime(rig.node, vm).vm_state is VmState.RUNNING
    c = rig.client()
    c.request(f"/qvd/stop_vm?id={vm}", basic("alice"), upgrade=True)  # the GUI sends the upgrade headers too
    infos, _, status, _, body = c.read_until_final()
    assert (status, body) == (200, b"Machine stopped\r\n")
    assert infos and infos[0] == "Stopping virtual machine"
    assert runtime(rig.node, vm).vm_state is VmState.STOPPED
    c.request(f"/qvd/stop_vm?id={rig.world.vms['bob-1']}", basic("alice"))
    assert c.read_until_final()[2] == 404
    c.request("/qvd/stop_vm", basic("alice"))
    assert c.read_until_final()[2] == 422


def test_stop_vm_in_an_unstoppable_state(rig: Rig) -> None:
    vm = rig.world.vms["alice-1"]
    set_vm(rig.node, vm, vm_state=VmState.ZOMBIE, vm_state_ts=utcnow())
    c = rig.client()
    c.request(f"/qvd/stop_vm?id={vm}", basic("alice"))
    _, status, _, body = c.read_response()
    assert (status, body) == (503, b"The requested virtual machine is in an unstoppable state (zombie)\r\n")


def test_notify_wakes_the_abort_watcher(rig: Rig, db_kind: str) -> None:
    if db_kind != "postgres":
        pytest.skip("LISTEN/NOTIFY exists on PostgreSQL only (SQLite relies on the poll)")
    vm = rig.world.vms["alice-1"]
    c = rig.client()
    assert connect(c, vm)[2] == 101
    rig.l7r.broker.abort_poll = 120  # from the next round on, only a NOTIFY can wake the watcher
    time.sleep(0.8)
    disconnect_vm(rig.node.factory, SYSTEM, rig.l7r.cfg, vm)
    assert c.closed_within(2.0)


def test_shutdown_closes_tunnels_and_gives_vms_back(rig: Rig) -> None:
    vm = rig.world.vms["alice-1"]
    c = rig.client()
    assert connect(c, vm)[2] == 101
    echo_ok(c)
    idle = rig.client()
    idle.request("/qvd/list_of_vm", basic("bob"))
    assert idle.read_response()[1] == 200
    rig.l7r.call(rig.l7r.service.stop())
    assert c.closed_within(5)
    assert idle.closed_within(5)
    rt = runtime(rig.node, vm)
    assert rt.user_state is UserState.DISCONNECTED and rt.l7r_conn is None
