"""Test rig for the L7R: the real broker in a background event loop, and fakes of
everything around it - the node daemon (played by a thread writing the database),
the desktop agent (a SimpleRPC HTTP server) and nxagent (a TCP echo server).
All traffic stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import select, update

from qvd.core.config import Config
from qvd.core.security import hash_password
from qvd.core.states import HostState, VmCmd, VmState
from qvd.db.models import Di, DiTag, Host, HostRuntime, Osf, Tenant, User, Vm, VmRuntime, utcnow
from qvd.l7r.main import L7rService
from tests.conftest import NodeFx, free_port

FAST = {
    "nodename": "node1",
    "node.address": "127.0.0.1",
    "l7r.address": "127.0.0.1",
    "l7r.use_ssl": False,
    "l7r.metrics.port": 0,
    "internal.l7r.timeout.vm_start": 15,
    "internal.l7r.timeout.vm_stop": 15,
    "internal.l7r.timeout.takeover": 10,
    "internal.l7r.timeout.x_start": 5,
    "internal.l7r.timeout.vma": 2,
    "internal.l7r.poll_time.vm": 0.05,
    "internal.l7r.poll_time.x": 0.05,
    "internal.l7r.timeout.shutdown": 0.5,
}


# --- the broker in a thread ------------------------------------------------------------------


class L7rThread:
    """An :class:`L7rService` running in its own event loop thread."""

    def __init__(self, node: NodeFx, **overrides: Any) -> None:
        values = {**FAST, "l7r.port": free_port(), **overrides}
        self.cfg: Config = node.cfg.overlay(values, source="node file")
        self.service = L7rService(self.cfg, node.paths, node.factory, node.url)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="l7r-test-loop")

    def start(self) -> L7rThread:
        self.thread.start()
        self.call(self.service.start(), timeout=60)
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def broker(self) -> Any:
        return self.service.broker

    def stop(self) -> None:
        try:
            self.call(self.service.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# --- database content -------------------------------------------------------------------------


@dataclass
class World:
    """Users and VMs of a test, by name."""

    users: dict[str, int] = field(default_factory=dict)
    vms: dict[str, int] = field(default_factory=dict)
    host_id: int | None = None


def populate(node: NodeFx, *, password: str = "secret") -> World:
    """alice (2 VMs + 1 application), bob (1 VM), carol@acme (1 VM), a blocked user, a blocked VM."""
    w = World()
    pw = hash_password(password)
    with node.factory() as s, s.begin():
        default = s.scalars(select(Tenant).where(Tenant.name == "default")).one()
        acme = Tenant(name="acme")
        s.add(acme)
        s.flush()
        osfs = {}
        for tenant in (default, acme):
            for app in (False, True):
                o = Osf(tenant_id=tenant.id, name="apps" if app else "desktop", memory=128, is_application=app)
                s.add(o)
                s.flush()
                di = Di(osf_id=o.id, path="fake.tar", version="1")
                s.add(di)
                s.flush()
                s.add(DiTag(osf_id=o.id, di_id=di.id, tag="default"))
                osfs[(tenant.name, app)] = o.id
        users = [("alice", default), ("bob", default), ("carol", acme), ("mallory", default)]
        for login, tenant in users:
            u = User(tenant_id=tenant.id, login=login, password_hash=pw, blocked=(login == "mallory"))
            s.add(u)
            s.flush()
            w.users[login] = u.id
        n = 100
        for vname, login, tenant, app, blocked in (
            ("alice-1", "alice", "default", False, False),
            ("alice-2", "alice", "default", False, False),
            ("alice-app", "alice", "default", True, False),
            ("bob-1", "bob", "default", False, False),
            ("carol-1", "carol", "acme", False, False),
            ("alice-blocked", "alice", "default", False, True),
        ):
            n += 1
            vm = Vm(name=vname, user_id=w.users[login], osf_id=osfs[(tenant, app)], ip=f"10.231.0.{n}")
            vm.runtime = VmRuntime(blocked=blocked)
            s.add(vm)
            s.flush()
            w.vms[vname] = vm.id
    return w


# --- the node daemon, played by the test --------------------------------------------------------


class FakeHkd:
    """Carries out start/stop commands of one host by writing the database, like the node daemon.

    ``fail_start`` set: a start ends in ``stopped`` with that ``last_error``.
    """

    def __init__(self, node: NodeFx, host_id: int, *, vma_port: int, x_port: int, delay: float = 0.1) -> None:
        self.factory = node.factory
        self.host_id = host_id
        self.vma_port = vma_port
        self.x_port = x_port
        self.delay = delay
        self.fail_start: str | None = None
        self.starts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-hkd")

    def start(self) -> FakeHkd:
        self.heartbeat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def heartbeat(self, state: HostState = HostState.RUNNING) -> None:
        with self.factory() as s, s.begin():
            s.execute(update(HostRuntime).where(HostRuntime.host_id == self.host_id).values(
                state=state, ok_ts=utcnow(), usable_ram=8192, usable_cpu=2.0))

    def _run(self) -> None:
        last_beat = 0.0
        while not self._stop.wait(0.03):
            if time.monotonic() - last_beat > 1:
                self.heartbeat_keep()
                last_beat = time.monotonic()
            with self.factory() as s, s.begin():
                rows = list(s.scalars(select(VmRuntime).where(VmRuntime.host_id == self.host_id)))
                todo = [(r.vm_id, r.vm_state, r.vm_cmd) for r in rows]
            for vm_id, state, cmd in todo:
                self._step(vm_id, state, cmd)

    def heartbeat_keep(self) -> None:
        with self.factory() as s, s.begin():
            s.execute(update(HostRuntime).where(HostRuntime.host_id == self.host_id).values(ok_ts=utcnow()))

    def _set(self, vm_id: int, expected: VmState, **values: Any) -> None:
        with self.factory() as s, s.begin():
            s.execute(update(VmRuntime).where(VmRuntime.vm_id == vm_id, VmRuntime.vm_state == expected)
                      .values(vm_state_ts=utcnow(), **values))

    def _step(self, vm_id: int, state: VmState, cmd: VmCmd | None) -> None:
        if state is VmState.STOPPED and cmd is VmCmd.START:
            self.starts += 1
            self._set(vm_id, VmState.STOPPED, vm_state=VmState.STARTING, vm_cmd=None)
            time.sleep(self.delay)
            if self.fail_start:
                self._set(vm_id, VmState.STARTING, vm_state=VmState.STOPPED, last_error=self.fail_start,
                          host_id=None)
                return
            self._set(vm_id, VmState.STARTING, vm_state=VmState.RUNNING, vm_address="127.0.0.1",
                      vm_vma_port=self.vma_port, vm_x_port=self.x_port)
        elif cmd is VmCmd.STOP and state in (VmState.RUNNING, VmState.STARTING):
            self._set(vm_id, state, vm_state=VmState.STOPPING, vm_cmd=None)
            time.sleep(self.delay)
            self._set(vm_id, VmState.STOPPING, vm_state=VmState.STOPPED, host_id=None, vm_address=None)


def host_id_of(node: NodeFx, name: str = "node1") -> int:
    with node.factory() as s:
        return int(s.scalars(select(Host.id).where(Host.name == name)).one())


def set_vm(node: NodeFx, vm_id: int, **values: Any) -> None:
    with node.factory() as s, s.begin():
        s.execute(update(VmRuntime).where(VmRuntime.vm_id == vm_id).values(**values))


def runtime(node: NodeFx, vm_id: int) -> VmRuntime:
    with node.factory() as s:
        rt = s.get(VmRuntime, vm_id)
        assert rt is not None
        s.expunge(rt)
        return rt


def wait_until(pred: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- the desktop agent ------------------------------------------------------------------------


class FakeVma:
    """SimpleRPC over HTTP like the VMA.  ``busy`` = how many x_start calls answer "retry later"."""

    def __init__(self) -> None:
        self.state = "stopped"
        self.busy = 0
        self.refuse: str | None = None
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        vma = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                method = parts.path.removeprefix("/vma/")
                params = dict(parse_qsl(parts.query, keep_blank_values=True))
                body = vma.handle(method, params)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json-simplerpc")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-vma")

    def handle(self, method: str, params: dict[str, str]) -> bytes | None:
        with self.lock:
            self.calls.append((method, params))
            if method == "ping":
                return b'"pong"\r\n'
            if method == "x_state":
                return json.dumps(self.state).encode() + b"\r\n"
            if method == "x_start":
                if self.refuse:
                    return b'"",' + json.dumps(self.refuse).encode() + b"\r\n"
                if self.busy > 0:
                    self.busy -= 1
                    msg = "Can't connect to X session in state connected, suspending it, retry later"
                    return b'"",' + json.dumps(msg).encode() + b"\r\n"
                self.state = "listening"
                return b'"starting"\r\n'
            return None

    def x_starts(self) -> list[dict[str, str]]:
        with self.lock:
            return [p for m, p in self.calls if m == "x_start"]

    def start(self) -> FakeVma:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- nxagent ----------------------------------------------------------------------------------


class EchoAgent:
    """TCP server standing in for nxagent: echoes every byte; counts connections; can cut them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.closed = 0
        self.lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True, name="echo-agent")

    def start(self) -> EchoAgent:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(c)
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.closed += 1
            c.close()

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
        with self.lock:
            for c in self.connections:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)


# --- a raw client -------------------------------------------------------------------------------


def basic(login: str, password: str = "secret") -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


class RawClient:
    """A byte-level HTTP client (plain or TLS) reading responses the way QVD clients do."""

    def __init__(self, port: int, *, tls: bool = False) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        else:
            self.sock = raw
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, target: str, auth: str | None = None, *, upgrade: bool = False, eol: bytes = b"\r\n",
                extra: list[str] | None = None) -> None:
        lines = [f"GET {target} HTTP/1.1"]
        if auth:
            lines.append(f"Authorization: {auth}")
        if upgrade:
            lines += ["Connection: Upgrade", "Upgrade: QVD/1.0"]
        lines += extra or []
        lines.append("User-Agent: QVD::HTTPC/0.01 (linux)")
        self.send(eol.join(x.encode() for x in lines) + eol + eol)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data

    def read_head(self) -> tuple[bytes, int, dict[str, str]]:
        """(raw head incl. the final CRLFCRLF, status, headers lower-cased)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:i], self.buf[i:]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for ln in lines[1:]:
            if ln:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
        return head, status, headers

    def read_response(self) -> tuple[bytes, int, dict[str, str], bytes]:
        """The next final response (raw head, status, headers, body); 102s are returned too."""
        head, status, headers = self.read_head()
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return head, status, headers, body

    def read_until_final(self) -> tuple[list[str], bytes, int, dict[str, str], bytes]:
        """Skip (and collect) 102 infos; returns (infos, head, status, headers, body)."""
        infos: list[str] = []
        while True:
            head, status, headers = self.read_head()
            if status == 102:
                infos.append(headers.get("x-qvd-vm-info", ""))
                continue
            if status == 101:
                return infos, head, status, headers, b""
            n = int(headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
            return infos, head, status, headers, body

    def recv_exact(self, n: int, timeout: float = 20) -> bytes:
        self.sock.settimeout(timeout)
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def closed_within(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` (data read meanwhile is kept)."""
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return True
            if not data:
                return True
            self.buf += data
        return False

    def close(self) -> None:
        self.sock.close()


@dataclass
class Rig:
    node: NodeFx
    world: World
    l7r: L7rThread
    hkd: FakeHkd
    vma: FakeVma
    agent: EchoAgent

    def client(self, *, tls: bool = False) -> RawClient:
        return RawClient(self.l7r.port, tls=tls)


def make_rig(node: NodeFx, **overrides: Any) -> Iterator[Rig]:
    world = populate(node)
    vma = FakeVma().start()
    agent = EchoAgent().start()
    l7r = L7rThread(node, **overrides).start()
    host_id = host_id_of(node)
    world.host_id = host_id
    hkd = FakeHkd(node, host_id, vma_port=vma.port, x_port=agent.port).start()
    l7r.call(l7r.broker.refresh())
    try:
        yield Rig(node, world, l7r, hkd, vma, agent)
    finally:
        l7r.stop()
        hkd.stop()
        vma.stop()
        agent.stop()


def expired(delta: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=delta)
