"""The load balancer: hard rules of the framework, the default plugin, plugins by name (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest
from sqlalchemy import select

from qvd.core.config import Config
from qvd.core.errors import ConfigError
from qvd.core.states import HostState, VmState
from qvd.db.models import ConfigRow, Host, utcnow
from qvd.services import placement
from qvd.services.base import SYSTEM
from qvd.services.configs import set_config
from qvd.services.hosts import register_host
from tests.conftest import NodeFx


def add_host(node: NodeFx, name: str, *, ram: int = 4096, cpu: float = 2.0, state: HostState = HostState.RUNNING,
             blocked: bool = False, age: float = 0.0, backend: bool = True) -> int:
    with node.factory() as s, s.begin():
        h = register_host(s, name, f"10.0.0.{len(name) + 10}-{name}", backend=backend)
        rt = h.runtime
        rt.state, rt.blocked, rt.usable_ram, rt.usable_cpu = state, blocked, ram, cpu
        rt.ok_ts = utcnow() - dt.timedelta(seconds=age)
        return h.id


def pick(node: NodeFx, memory: int, cfg: Config | None = None) -> str | None:
    with node.factory() as s:
        h = placement.choose_host(s, cfg or node.cfg, memory)
        return h.name if h else None


def test_only_running_unblocked_fresh_backends_that_fit(node: NodeFx) -> None:
    add_host(node, "stale", ram=64000, age=60)
    add_host(node, "blocked", ram=64000, blocked=True)
    add_host(node, "lost", ram=64000, state=HostState.LOST)
    add_host(node, "stopping", ram=64000, state=HostState.STOPPING)
    add_host(node, "frontend-only", ram=64000, backend=False)
    add_host(node, "small", ram=300)
    assert pick(node, 512) is None  # no suitable node: the small one cannot fit 512 MB
    add_host(node, "good", ram=2048)
    for _ in range(20):
        assert pick(node, 512) == "good"
    assert pick(node, 4096) is None  # "good" cannot fit it either: never chosen


def test_default_prefers_room_and_spreads(node: NodeFx) -> None:
    add_host(node, "big", ram=16000, cpu=2.0)
    add_host(node, "tiny", ram=1100, cpu=2.0)
    picks = {pick(node, 512) for _ in range(30)}
    assert picks == {"big"}
    with node.factory() as s:
        found = placement.candidates(s, node.cfg, 512)
    assert {c.name for c in found} == {"big", "tiny"}


def test_memory_promised_to_starting_desktops_counts(node: NodeFx) -> None:
    from qvd.db.models import Osf, User, Vm, VmRuntime

    hid = add_host(node, "only", ram=1000)
    with node.factory() as s, s.begin():
        tenant_id = s.scalars(select(User.tenant_id)).first()
        osf = Osf(name="big", memory=800, tenant_id=tenant_id or 1)
        s.add(osf)
        s.flush()
        user = s.scalars(select(User)).first()
        if user is None:
            user = User(login="u1", tenant_id=osf.tenant_id)
            s.add(user)
            s.flush()
        vm = Vm(name="v1", user_id=user.id, osf_id=osf.id, di_tag="default", ip="10.231.0.200")
        vm.runtime = VmRuntime(vm_state=VmState.STARTING, host_id=hid)
        s.add(vm)
    assert pick(node, 512) is None  # 1000 MB free - 800 MB promised < 512 MB


class FirstByName(placement.LoadBalancer):
    name = "first-by-name"

    def choose(self, candidates: Sequence[placement.Candidate], need: placement.Need) -> placement.Candidate | None:
        return min(candidates, key=lambda c: c.name)


class Rogue(placement.LoadBalancer):
    name = "rogue"

    def choose(self, candidates: Sequence[placement.Candidate], need: placement.Need) -> placement.Candidate | None:
        return placement.Candidate(999, "nowhere", 10**6, 64.0, 0.0, 0)


def test_plugins_by_name(node: NodeFx, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "BUILTIN_PLUGINS", {
        **placement.BUILTIN_PLUGINS,
        "first-by-name": f"{__name__}:FirstByName", "rogue": f"{__name__}:Rogue", "notaplugin": f"{__name__}:pick",
    })
    add_host(node, "zulu", ram=64000)
    add_host(node, "alpha", ram=1024)
    cfg = node.cfg.overlay({"l7r.loadbalancer.plugin": "first-by-name"}, source="test")
    assert pick(node, 512, cfg) == "alpha"
    with pytest.raises(ConfigError, match="not one of the suitable candidates"):
        pick(node, 512, node.cfg.overlay({"l7r.loadbalancer.plugin": "rogue"}, source="test"))
    with pytest.raises(ConfigError, match="not a LoadBalancer subclass"):
        placement.check_plugin(node.cfg.overlay({"l7r.loadbalancer.plugin": "notaplugin"}, source="test"))
    with pytest.raises(ConfigError, match="unknown load balancer plugin"):
        placement.check_plugin(node.cfg.overlay({"l7r.loadbalancer.plugin": "nosuch"}, source="test"))
    placement.check_plugin(node.cfg)  # the default is fine


def test_setting_an_unknown_plugin_is_refused_and_changes_nothing(node: NodeFx) -> None:
    with pytest.raises(ConfigError, match="unknown load balancer plugin"):
        set_config(node.factory, SYSTEM, node.cfg, "l7r.loadbalancer.plugin", "nosuch")
    with node.factory() as s:
        assert s.scalars(select(ConfigRow).where(ConfigRow.key == "l7r.loadbalancer.plugin")).first() is None
        assert s.scalars(select(Host)).first() is None
