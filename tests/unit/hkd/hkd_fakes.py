"""A node for HKD unit tests: SQLite in tmp_path, the fake backend, a fake VMA, fast timers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from qvd.backends.base import Endpoint
from qvd.backends.fake import FakeBackend, FakeMachine
from qvd.core.config import Config, Paths, load_node_config
from qvd.core.errors import Unavailable
from qvd.core.states import VmCmd, VmState
from qvd.db.engine import make_engine, make_sessionmaker
from qvd.db.models import Di, DiTag, Osf, Tenant, User, Vm, VmRuntime
from qvd.db.schema import upgrade
from qvd.hkd.daemon import NodeDaemon
from qvd.services.base import SYSTEM
from qvd.services.tenancy import seed
from qvd.services.vms import start_vm, stop_vm

T = TypeVar("T")

FAST: dict[str, object] = {
    "vm.hypervisor": "fake",
    "internal.hkd.agent.ticker.delay": 0.2,
    "internal.hkd.agent.ticker.timeout": 2.0,
    "internal.hkd.agent.command_handler.delay": 0.1,
    "internal.hkd.agent.expiration_monitor.delay": 1.0,
    "internal.hkd.agent.rpc.timeout": 0.2,
    "internal.hkd.agent.rpc.retry.count": 1,
    "internal.hkd.agent.rpc.retry.delay": 0.05,
    "internal.hkd.vmhandler.vma.failed.max_time.on.starting": 1.0,
    "internal.hkd.vmhandler.vma.failed.max_count.on.running": 2,
    "internal.hkd.vmhandler.vma.failed.max_time.on.running": 1.0,
    "internal.hkd.vmhandler.vma_monitor.delay.after.ok": 0.1,
    "internal.hkd.vmhandler.vma_monitor.delay.after.error": 0.1,
    "internal.hkd.lxc.timeout.on_state.shutdown": 0.5,
    "internal.hkd.lxc.timeout.on_state.stop": 1.0,
    "internal.hkd.zombie.retry.delay": 0.2,
    "internal.hkd.stopping.vms.timeout": 3.0,
}


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class FakeVma:
    """The agents of the fake desktops: alive while their desktop runs, unless made dead."""

    def __init__(self, machine: FakeMachine) -> None:
        self.machine = machine
        self.dead: set[int] = set()
        self.calls: list[tuple[int, str, dict[str, str]]] = []

    def _vm_at(self, ep: Endpoint) -> int | None:
        for vm_id, d in self.machine.desktops.items():
            if d.spec.address == ep.host and d.spec.vma_port == ep.port and d.running:
                return vm_id
        return None

    async def call(self, endpoint: Endpoint, method: str, params: Mapping[str, str] | None = None, *,
                   timeout: float) -> object:
        vm_id = self._vm_at(endpoint)
        if vm_id is None or vm_id in self.dead:
            await asyncio.sleep(0)  # a refused connection still yields
            raise Unavailable(f"connection refused by {endpoint.host}:{endpoint.port}")
        self.calls.append((vm_id, method, dict(params or {})))
        if method == "poweroff":
            self.machine.guest_poweroff(vm_id)
            return "ok"
        if method == "ping":
            return "pong"
        return "ok"

    async def aclose(self) -> None:
        return None

    def methods_for(self, vm_id: int) -> list[str]:
        return [m for v, m, _ in self.calls if v == vm_id]


@dataclass
class Node:
    root: Path
    paths: Paths
    cfg: Config
    engine: Engine
    factory: sessionmaker[Session]
    name: str = "node1"
    osf_id: int = 0
    di_id: int = 0
    daemons: list[NodeDaemon] = field(default_factory=list)

    @property
    def backend(self) -> FakeBackend:
        return FakeBackend(self.root, self.cfg)

    @property
    def machine(self) -> FakeMachine:
        return self.backend.machine

    def daemon(self, vma: FakeVma | None = None, name: str | None = None, address: str = "127.0.0.1") -> NodeDaemon:
        d = NodeDaemon(self.paths, self.cfg, name or self.name, address, backend=self.backend,
                       vma=vma or FakeVma(self.machine))
        self.daemons.append(d)
        return d

    def reconfigure(self, **overrides: object) -> None:
        """Rewrite the node file with FAST + overrides (keys with '__' for '.')."""
        values = dict(FAST)
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        self.paths.node_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        self.cfg = load_node_config(self.root)

    # --- database helpers (blocking; call through `run`) ---------------------------------------

    def add_vm(self, name: str, *, tag: str = "default") -> int:
        with self.factory() as s, s.begin():
            t = s.scalars(select(Tenant).where(Tenant.name == "default")).one()
            u = s.scalars(select(User).where(User.login == "alice")).one_or_none()
            if u is None:
                u = User(tenant_id=t.id, login="alice")
                s.add(u)
                s.flush()
            n = s.query(Vm).count()
            vm = Vm(name=name, user_id=u.id, osf_id=self.osf_id, di_tag=tag, ip=f"10.231.0.{100 + n}")
            vm.runtime = VmRuntime()
            s.add(vm)
            s.flush()
            return vm.id

    def start(self, vm_id: int) -> None:
        start_vm(self.factory, SYSTEM, self.cfg, vm_id)

    def stop(self, vm_id: int) -> None:
        stop_vm(self.factory, SYSTEM, self.cfg, vm_id)

    def command(self, vm_id: int, cmd: VmCmd, host_id: int) -> None:
        """Write a command directly (as a writer racing the checks of the services would)."""
        with self.factory() as s, s.begin():
            s.execute(update(VmRuntime).where(VmRuntime.vm_id == vm_id).values(vm_cmd=cmd, host_id=host_id))

    def runtime(self, vm_id: int) -> VmRuntime:
        with self.factory() as s:
            rt = s.get(VmRuntime, vm_id)
            assert rt is not None
            s.expunge(rt)
            return rt

    def set_runtime(self, vm_id: int, **values: Any) -> None:
        with self.factory() as s, s.begin():
            s.execute(update(VmRuntime).where(VmRuntime.vm_id == vm_id).values(**values))

    def block_di(self, blocked: bool = True) -> None:
        with self.factory() as s, s.begin():
            s.get(Di, self.di_id).blocked = blocked  # type: ignore[union-attr]

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def wait_for(self, what: str, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        t0 = time.monotonic()
        while not await asyncio.to_thread(pred):
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_state(self, vm_id: int, state: VmState, timeout: float = 10.0) -> VmRuntime:
        await self.wait_for(f"VM {vm_id} {state.value}", lambda: self.runtime(vm_id).vm_state == state, timeout)
        return self.runtime(vm_id)


def make_node(tmp_path: Path, **overrides: object) -> Node:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    engine = make_engine(f"sqlite:///{root / 'qvd.db'}")
    upgrade(engine)
    factory = make_sessionmaker(engine)
    node = Node(root, Paths(root), Config(), engine, factory)
    node.reconfigure(**overrides)
    with factory() as s, s.begin():
        seed(s)
        t = s.scalars(select(Tenant).where(Tenant.name == "default")).one()
        osf = Osf(tenant_id=t.id, name="desktop", memory=128)
        s.add(osf)
        s.flush()
        di = Di(osf_id=osf.id, path="1-test.tar.zst", version="v1")
        s.add(di)
        s.flush()
        for tag in ("v1", "head", "default"):
            s.add(DiTag(osf_id=osf.id, di_id=di.id, tag=tag, fixed=tag == "v1"))
        node.osf_id, node.di_id = osf.id, di.id
    return node


async def crash(d: NodeDaemon) -> None:
    """What SIGKILL does to a daemon: everything stops, nothing is cleaned or written."""
    for t in list(d._loops.values()) + [h.task for h in d.handlers.values() if h.task is not None]:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    d._loops.clear()
    d.handlers.clear()
    if d._lock_fd is not None:
        os.close(d._lock_fd)
        d._lock_fd = None
    d.db.close()
    if d.engine is not None:
        d.engine.dispose()


async def shutdown_all(node: Node) -> None:
    for d in node.daemons:
        if d._lock_fd is not None:
            with contextlib.suppress(Exception):
                await d.shutdown()


def arun(node: Node, scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60.0) -> None:
    """Run one async scenario with a bound (a hang fails the test), then stop its daemons."""
    async def bounded() -> None:
        try:
            await asyncio.wait_for(scenario(), timeout)
        finally:
            await shutdown_all(node)

    asyncio.run(bounded())
