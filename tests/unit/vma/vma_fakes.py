"""Fakes for the VMA unit tests: a clock, nxagent handles, a runtime and hooks (imported by the tests)."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qvd.core.config import Config
from qvd.vma.hooks import Params
from qvd.vma.provision import Account
from qvd.vma.session import SessionManager, SessionRequest, Timeouts, parse_request
from qvd.vma.statedir import StateDir

SIGNAMES: dict[int, str] = {signal.SIGHUP: "HUP", signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeProc:
    pid: int
    start_time: int | None = 4242
    running: bool = True
    signals: list[str] = field(default_factory=list)
    group_signals: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.running

    def send(self, sig: int) -> None:
        self.signals.append(SIGNAMES.get(sig, str(sig)))

    def send_group(self, sig: int) -> None:
        self.group_signals.append(SIGNAMES.get(sig, str(sig)))


class FakeRuntime:
    def __init__(self, state_dir: StateDir) -> None:
        self.dir = state_dir
        self.agents: list[FakeProc] = []
        self.desktops: list[FakeProc] = []
        self.refreshes = 0
        self.provision_error: Exception | None = None
        self.adoptable: dict[int, FakeProc] = {}
        self.prepared: list[int] = []

    def provision(self, request: SessionRequest) -> Account:
        if self.provision_error:
            raise self.provision_error
        return Account(name=request.user.name, uid=1234, gid=1234, home=request.user.home, shell="/bin/sh",
                       groups=(1234,))

    def prepare_display(self, display: int) -> None:
        self.prepared.append(display)

    def start_nxagent(self, account: Account, request: SessionRequest, display: int) -> FakeProc:
        self.dir.nxagent_log.write_text("")
        p = FakeProc(pid=5000 + len(self.agents))
        self.agents.append(p)
        return p

    def start_desktop(self, account: Account, request: SessionRequest, display: int) -> FakeProc:
        p = FakeProc(pid=7000 + len(self.desktops))
        self.desktops.append(p)
        return p

    def refresh(self, account: Account, request: SessionRequest, display: int) -> None:
        self.refreshes += 1

    def adopt(self, pid: int, start_time: int | None, *, name: str | None) -> FakeProc | None:
        p = self.adoptable.get(pid)
        return p if p is not None and p.running else None


class FakeHooks:
    def __init__(self) -> None:
        self.actions: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        self.states: list[str] = []
        self.fail: set[str] = set()

    def run_action(self, action: str, params: Params, state: str, *, secrets: Mapping[str, str] | None = None,
                   extra: Params = ()) -> None:
        self.actions.append((action, state, tuple(extra)))
        if action in self.fail:
            from qvd.core.errors import BackendError

            raise BackendError(f"action hook '{action}' failed (exit code 1)")

    def fire_state(self, state: str, params: Params, *, secrets: Mapping[str, str] | None = None) -> None:
        self.states.append(state)


@dataclass
class Rig:
    manager: SessionManager
    runtime: FakeRuntime
    hooks: FakeHooks
    clock: FakeClock
    dir: StateDir
    cfg: Config

    def request(self, **params: str) -> SessionRequest:
        base = {"qvd.vm.user.name": "alice", "qvd.client.geometry": "1024x768"}
        base.update(params)
        return parse_request(base, self.cfg)

    def emit(self, *lines: str) -> None:
        with self.dir.nxagent_log.open("a") as fh:
            for line in lines:
                fh.write(line + "\n")
        self.manager.tick()  # the monitor thread reads the log about every 0.2 s

    def state(self) -> str:
        return str(self.manager.x_state())

    @property
    def agent(self) -> FakeProc:
        return self.runtime.agents[-1]


TIMEOUTS = Timeouts(listening=30.0, suspending=20.0, stopping=20.0)


def make_rig(tmp_path: Path, **kw: object) -> Rig:
    sd = StateDir(tmp_path / "state")
    sd.ensure()
    cfg = Config()
    runtime = FakeRuntime(sd)
    hooks = FakeHooks()
    clock = FakeClock()
    manager = SessionManager(display=100, timeouts=TIMEOUTS, runtime=runtime, hooks=hooks, state_dir=sd,
                             clock=clock, wall=lambda: 1_700_000_000.0 + clock.now, threaded=False)
    return Rig(manager, runtime, hooks, clock, sd, cfg)
