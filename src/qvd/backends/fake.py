"""An in-memory backend for unit tests of the node daemon.  Never for real desktops.

It keeps its "machine" in a module-level table keyed by the node root, so a second
:class:`FakeBackend` on the same root (a restarted HKD) sees the desktops the first
one left, exactly as a restarted daemon finds real containers.  Tests steer it
through :meth:`FakeBackend.machine`:

* ``fail_at(step, vm_id=None, times=1)``: the next call(s) of ``step`` (``check``,
  ``prepare``, ``start``, ``stop``, ``cleanup``) raise :class:`BackendError`;
* ``delay[step] = seconds``: every call of ``step`` sleeps first (to overlap work);
* ``lose(vm_id)``: the desktop's processes vanish (leftovers stay until cleanup);
* ``guest_poweroff(vm_id)``: what the agent does on ``poweroff`` (the desktop exits);
* ``active``/``peak``: how many calls of each step run at this moment / at most.

It follows the lifecycle contract of :mod:`qvd.backends.base` so that the HKD's use
of the contract is what gets tested.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from qvd.backends.base import Backend, DesktopInfo, DesktopSpec, Endpoint, register
from qvd.core.config import Config
from qvd.core.errors import BackendError


@dataclass
class FakeDesktop:
    spec: DesktopSpec
    prepared: bool = True
    running: bool = False
    pid: int | None = None


@dataclass
class FakeMachine:
    """What a node "really runs", shared by every FakeBackend of one root."""

    desktops: dict[int, FakeDesktop] = field(default_factory=dict)
    failures: dict[tuple[str, int | None], int] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[str, int | None]] = field(default_factory=list)
    active: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    next_pid: int = 1000

    def fail_at(self, step: str, vm_id: int | None = None, times: int = 1) -> None:
        """Make the next ``times`` calls of ``step`` (for ``vm_id``, or any VM) fail."""
        self.failures[(step, vm_id)] = times

    def lose(self, vm_id: int) -> None:
        """The desktop's processes die (OOM, crash); mounts/veths stay until cleanup."""
        d = self.desktops.get(vm_id)
        if d is not None:
            d.running = False
            d.pid = None

    def guest_poweroff(self, vm_id: int, after: float = 0.05) -> None:
        """The guest shuts itself down shortly (the agent answers first)."""
        loop = asyncio.get_running_loop()
        loop.call_later(after, self.lose, vm_id)

    def add_orphan(self, spec: DesktopSpec, running: bool = True) -> None:
        """A desktop left on the node that the database does not know about."""
        self.desktops[spec.vm_id] = FakeDesktop(spec, running=running, pid=self._pid() if running else None)

    def running_ids(self) -> set[int]:
        return {i for i, d in self.desktops.items() if d.running}

    def _pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def _take_failure(self, step: str, vm_id: int | None) -> bool:
        for k in ((step, vm_id), (step, None)):
            n = self.failures.get(k, 0)
            if n:
                self.failures[k] = n - 1
                return True
        return False


_MACHINES: dict[Path, FakeMachine] = {}


@register("fake")
class FakeBackend(Backend):
    """In-memory desktops (unit tests only)."""

    name: ClassVar[str] = "fake"

    def __init__(self, root: Path, cfg: Config | None = None) -> None:
        self.root = root
        self.cfg = cfg or Config()
        self.machine = _MACHINES.setdefault(root.resolve(), FakeMachine())

    @classmethod
    def forget(cls, root: Path) -> None:
        """Drop the machine of ``root`` (test teardown)."""
        _MACHINES.pop(root.resolve(), None)

    @classmethod
    def supported(cls) -> tuple[bool, str]:
        return True, ""

    async def _enter(self, step: str, vm_id: int | None) -> None:
        m = self.machine
        m.calls.append((step, vm_id))
        m.active[step] += 1
        m.peak[step] = max(m.peak[step], m.active[step])
        try:
            if m.delay.get(step):
                await asyncio.sleep(m.delay[step])
            if m._take_failure(step, vm_id):
                raise BackendError(f"VM {vm_id}: fake {step} failure" if vm_id else f"fake {step} failure")
        except BaseException:
            m.active[step] -= 1
            raise

    def _leave(self, step: str) -> None:
        self.machine.active[step] -= 1

    async def check(self) -> None:
        await self._enter("check", None)
        self._leave("check")

    async def list_desktops(self) -> list[DesktopInfo]:
        return [DesktopInfo(vm_id=i, running=d.running, pid=d.pid) for i, d in sorted(self.machine.desktops.items())]

    async def prepare(self, spec: DesktopSpec) -> None:
        await self._enter("prepare", spec.vm_id)
        try:
            d = self.machine.desktops.get(spec.vm_id)
            if d is None:
                self.machine.desktops[spec.vm_id] = FakeDesktop(spec)
            elif not d.running:
                d.spec, d.prepared = spec, True
        finally:
            self._leave("prepare")

    async def start(self, spec: DesktopSpec) -> None:
        await self._enter("start", spec.vm_id)
        try:
            d = self.machine.desktops.get(spec.vm_id)
            if d is None or not d.prepared:
                raise BackendError(f"VM {spec.vm_id}: start() before prepare()")
            if not d.running:
                d.running, d.pid = True, self.machine._pid()
        finally:
            self._leave("start")

    async def is_running(self, vm_id: int) -> bool:
        d = self.machine.desktops.get(vm_id)
        return d is not None and d.running

    def endpoint_vma(self, spec: DesktopSpec) -> Endpoint:
        return Endpoint(spec.address, spec.vma_port)

    def endpoint_nx(self, spec: DesktopSpec) -> Endpoint:
        return Endpoint(spec.address, spec.nx_port)

    async def stop(self, vm_id: int) -> None:
        await self._enter("stop", vm_id)
        try:
            self.machine.lose(vm_id)
        finally:
            self._leave("stop")

    async def cleanup(self, vm_id: int) -> None:
        await self._enter("cleanup", vm_id)
        try:
            self.machine.lose(vm_id)
            self.machine.desktops.pop(vm_id, None)
        finally:
            self._leave("cleanup")
