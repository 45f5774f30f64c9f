"""The desktop network's address plan and firewall, without touching the machine.

The rules themselves are loaded into a real kernel by
tests/integration/test_desktop_network_cluster.py; here: the node's address, the
ranges, the nftables text and the order and content of the commands.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from pathlib import Path

import pytest

from qvd.backends import lxc, netsetup
from qvd.backends.lxc import LxcBackend, bridge_address, desktop_network
from qvd.core.config import Config
from qvd.core.errors import BackendError

NET = ipaddress.IPv4Network("10.9.0.0/24")
FIRST = ipaddress.IPv4Address("10.9.0.100")


def cfg(**values: str) -> Config:
    base = {"vm.network.ip.start": "10.9.0.100", "vm.network.netmask": "255.255.255.0"}
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return Config().overlay(base, source="node file")


def test_one_node_keeps_the_gateway() -> None:
    assert bridge_address(cfg()) == ipaddress.IPv4Interface("10.9.0.1/24")
    assert bridge_address(cfg(vm__network__gateway="10.9.0.7")) == ipaddress.IPv4Interface("10.9.0.7/24")
    assert desktop_network(cfg()) == (NET, FIRST)


@pytest.mark.parametrize("host", ["10.9.0.1", "10.9.0.2", "10.9.0.99", " 10.9.0.50 "])
def test_host_address_in_the_nodes_range(host: str) -> None:
    got = bridge_address(cfg(vm__network__host__address=host, vm__network__gateway="10.9.0.1"))
    assert got == ipaddress.IPv4Interface(f"{host.strip()}/24")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("node-a", "invalid vm.network.host.address 'node-a': expected an IPv4 address"),
        ("10.9.0.300", "invalid vm.network.host.address"),
        ("fd00::1", "invalid vm.network.host.address"),
        ("10.9.1.5", "vm.network.host.address 10.9.1.5 is outside the desktop network 10.9.0.0/24"),
        ("10.9.0.0", "must be from 10.9.0.1 to 10.9.0.99"),
        ("10.9.0.100", "must be from 10.9.0.1 to 10.9.0.99 (desktops start at vm.network.ip.start = 10.9.0.100)"),
        ("10.9.0.200", "vm.network.host.address 10.9.0.200 is not in the nodes' range"),
        ("10.9.0.255", "vm.network.host.address 10.9.0.255 is not in the nodes' range"),
    ],
)
def test_host_address_refused(host: str, message: str) -> None:
    with pytest.raises(BackendError) as e:
        bridge_address(cfg(vm__network__host__address=host))
    assert message in e.value.message


def test_a_bad_gateway_is_still_refused_with_a_host_address() -> None:
    with pytest.raises(BackendError, match=re.escape("vm.network.gateway 10.8.0.1 is outside")):
        bridge_address(cfg(vm__network__host__address="10.9.0.2", vm__network__gateway="10.8.0.1"))


def test_address_ranges() -> None:
    assert netsetup.address_ranges(NET, FIRST) == ("10.9.0.1-10.9.0.99", "10.9.0.100-10.9.0.254")
    assert netsetup.address_ranges(NET, ipaddress.IPv4Address("10.9.0.2")) == ("10.9.0.1", "10.9.0.2-10.9.0.254")
    assert netsetup.address_ranges(NET, ipaddress.IPv4Address("10.9.0.1")) == (None, "10.9.0.1-10.9.0.254")
    assert netsetup.address_ranges(NET, ipaddress.IPv4Address("10.9.0.255")) == ("10.9.0.1-10.9.0.254", None)
    with pytest.raises(BackendError, match=re.escape("outside 10.9.0.0/24")):
        netsetup.address_ranges(NET, ipaddress.IPv4Address("10.9.1.100"))


def test_bridge_ruleset() -> None:
    text = netsetup.bridge_ruleset("qvdnet", NET, FIRST, "qvd")
    body = [ln.strip() for ln in text.splitlines() if not ln.startswith("#")]
    assert body == [
        # declare + delete + define in one nft transaction: an atomic replace
        "table bridge qvd_qvdnet", "delete table bridge qvd_qvdnet", "table bridge qvd_qvdnet {",
        "chain forward {",
        "type filter hook forward priority filter; policy accept;",
        'iifname "qvd*" jump from_desktop',
        'oifname "qvd*" jump to_desktop',
        "}",
        "chain from_desktop {",
        "ether type arp arp saddr ip 10.9.0.100-10.9.0.254 accept",
        "ip saddr 10.9.0.100-10.9.0.254 ip daddr 10.9.0.1-10.9.0.99 accept",
        "drop",
        "}",
        "chain to_desktop {",
        "ether type arp accept",
        "ip saddr 10.9.0.1-10.9.0.99 ip daddr 10.9.0.100-10.9.0.254 accept",
        "drop",
        "}",
        "}",
    ]


def test_bridge_ruleset_without_room_for_nodes_lets_no_ip_through() -> None:
    text = netsetup.bridge_ruleset("br-x.1", NET, ipaddress.IPv4Address("10.9.0.1"), "qvd")
    assert "table bridge qvd_br-x.1 {" in text
    assert " ip saddr" not in text and "ip daddr" not in text
    assert text.count("\t\tdrop\n") == 2


@pytest.mark.parametrize(("bridge", "prefix"), [("qvd net", "qvd"), ("qvdnet", "qvd*"), ("a" * 16, "qvd")])
def test_bridge_ruleset_refuses_odd_names(bridge: str, prefix: str) -> None:
    with pytest.raises(BackendError, match="invalid network interface name"):
        netsetup.bridge_ruleset(bridge, NET, FIRST, prefix)


class Recorder:
    """Stands in for netsetup.run: records argv and stdin, answers like a fresh node."""

    def __init__(self, existing: dict[str, list[str]] | None = None) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.existing = existing or {}

    async def __call__(self, argv: list[str], *, timeout: float = 30.0, check: bool = True,
                       input_text: str | None = None) -> netsetup.CommandResult:
        self.calls.append((tuple(argv), input_text))
        rc, out = 0, ""
        if argv[2:3] == ["-S"]:
            chain = argv[3]
            rc, out = (0, "\n".join(self.existing[chain]) + "\n") if chain in self.existing else (1, "")
        elif argv[2:3] in (["-C"], ["-L"], ["-n"]):
            rc = 1
        return netsetup.CommandResult(tuple(argv), rc, out, "")


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    present = {"iptables": True, "ip6tables": False, "nft": True}
    monkeypatch.setattr(netsetup.shutil, "which", lambda t: f"/usr/sbin/{t}" if present.get(t) else None)
    return present


@pytest.mark.parametrize("brnf", [True, False])
def test_ensure_firewall_loads_the_bridge_table_first(monkeypatch: pytest.MonkeyPatch, tools: dict[str, bool],
                                                      brnf: bool) -> None:
    rec = Recorder()
    monkeypatch.setattr(netsetup, "run", rec)
    monkeypatch.setattr(netsetup, "br_netfilter_active", lambda: brnf)
    asyncio.run(netsetup.ensure_firewall("qvdnet", NET, FIRST, "qvd"))
    assert rec.calls[0] == (("nft", "-f", "-"), netsetup.bridge_ruleset("qvdnet", NET, FIRST, "qvd"))
    appended = [argv[4:] for argv, _ in rec.calls if argv[2:4] == ("-A", "QVD-FWD-qvdnet")]
    physdev = ("-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT")
    assert appended == ([physdev] if brnf else []) + [("-j", "DROP")]
    inserted = [argv[4:] for argv, _ in rec.calls if argv[2] == "-I"]
    assert inserted == [("-i", "qvdnet", "-j", "QVD-IN-qvdnet"), ("-i", "qvdnet", "-j", "QVD-FWD-qvdnet"),
                        ("-o", "qvdnet", "-j", "QVD-FWD-qvdnet")]


def test_ensure_firewall_leaves_right_chains_alone(monkeypatch: pytest.MonkeyPatch, tools: dict[str, bool]) -> None:
    rec = Recorder({
        "QVD-IN-qvdnet": ["-N QVD-IN-qvdnet", "-A QVD-IN-qvdnet -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                          "-A QVD-IN-qvdnet -j DROP"],
        "QVD-FWD-qvdnet": ["-N QVD-FWD-qvdnet", "-A QVD-FWD-qvdnet -j DROP"],  # from before br_netfilter
    })
    monkeypatch.setattr(netsetup, "run", rec)
    monkeypatch.setattr(netsetup, "br_netfilter_active", lambda: True)
    asyncio.run(netsetup.ensure_firewall("qvdnet", NET, FIRST, "qvd"))
    flushed = [argv[3] for argv, _ in rec.calls if argv[2] == "-F"]
    assert flushed == ["QVD-FWD-qvdnet"]  # the input chain was right; the forward chain lacked the physdev rule


@pytest.mark.parametrize("missing", ["iptables", "nft"])
def test_ensure_firewall_needs_its_tools(monkeypatch: pytest.MonkeyPatch, tools: dict[str, bool],
                                        missing: str) -> None:
    tools[missing] = False
    rec = Recorder()
    monkeypatch.setattr(netsetup, "run", rec)
    with pytest.raises(BackendError, match=f"{missing} is not installed"):
        asyncio.run(netsetup.ensure_firewall("qvdnet", NET, FIRST, "qvd"))
    assert rec.calls == []


def test_remove_firewall_deletes_the_bridge_table(monkeypatch: pytest.MonkeyPatch, tools: dict[str, bool]) -> None:
    rec = Recorder()
    monkeypatch.setattr(netsetup, "run", rec)
    asyncio.run(netsetup.remove_firewall("qvdnet"))
    assert rec.calls[-1] == (("nft", "-f", "-"), "table bridge qvd_qvdnet\ndelete table bridge qvd_qvdnet\n")
    tools["nft"] = False
    rec.calls.clear()
    asyncio.run(netsetup.remove_firewall("qvdnet"))
    assert all(argv[0] != "nft" for argv, _ in rec.calls)


def test_run_feeds_stdin() -> None:
    res = asyncio.run(netsetup.run(["cat"], input_text="rules\n"))
    assert res.stdout == "rules\n"


@pytest.mark.parametrize(("ports", "bad"), [(["uplink0", "qvd12", "qvd7"], None), (["eth1"], None),
                                            (["qvd12", "qvd-uplink"], "qvd-uplink"), (["qvdx"], "qvdx")])
def test_check_refuses_an_uplink_named_like_a_desktop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      ports: list[str], bad: str | None) -> None:
    backend = LxcBackend(tmp_path, cfg())
    monkeypatch.setattr(lxc.netsetup, "bridge_ports", lambda bridge: ports)
    if bad is None:
        backend._check_bridge_ports()
    else:
        with pytest.raises(BackendError, match=f"port named {bad}: names starting with 'qvd' are reserved"):
            backend._check_bridge_ports()


def test_check_needs_nft_when_the_firewall_is_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(LxcBackend, "supported", classmethod(lambda cls: (True, "")))
    monkeypatch.setattr(lxc.shutil, "which", lambda t: None if t == "nft" else f"/usr/sbin/{t}")
    with pytest.raises(BackendError, match="nft missing: needed to isolate desktops"):
        asyncio.run(LxcBackend(tmp_path, cfg()).check())
    assert not (tmp_path / "storage").exists()  # refused before touching anything
