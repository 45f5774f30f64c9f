"""qvd-client's option checks and VM choice."""

from __future__ import annotations

import pytest

from qvd.client.main import UsageError, check_options, choose_vm, parser
from qvd.client.protocol import ClientError, VmEntry


def args(*extra: str) -> object:
    return parser().parse_args(["--host", "h", "--user", "u", *extra])


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", ":0")
    check_options(args("--geometry", "1280x800", "--keyboard", "pc105/de(nodeadkeys)"))
    for bad in (["--geometry", "big"], ["--keyboard", "us,listen=1"], ["--port", "0"]):
        with pytest.raises(UsageError):
            check_options(args(*bad))
    monkeypatch.delenv("DISPLAY")
    with pytest.raises(UsageError, match="DISPLAY"):
        check_options(args())
    check_options(args("--list"))  # listing needs no X server


def test_nxproxy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVD_CLIENT_NXPROXY", "/opt/test/nxproxy")
    assert parser().parse_args(["--host", "h", "--user", "u"]).nxproxy == "/opt/test/nxproxy"


def test_choose_vm() -> None:
    one = [VmEntry(3, "a", "stopped", False)]
    two = [*one, VmEntry(4, "b", "running", False)]
    assert choose_vm(one, None) == 3
    assert choose_vm(two, 4) == 4
    with pytest.raises(ClientError):
        choose_vm([], None)
    with pytest.raises(UsageError, match="--vm"):
        choose_vm(two, None)  # pytest's stdin is not a terminal
