"""``qa user ... totp enable|disable`` and ``qa user ... unlock``: grammar and requests (fake API)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from qvd.cli import qa
from qvd.cli.qa_grammar import ACTION_VERBS, Command, GrammarError, parse_line, verbs_for
from tests.unit.cli.test_qa_cli import FakeApi

URI = "otpauth://totp/QVD:alice%40default?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=QVD"


def test_grammar() -> None:
    assert {"totp", "unlock"} <= set(verbs_for("user")) and {"totp", "unlock"} <= ACTION_VERBS
    assert "totp" not in verbs_for("vm")
    assert parse_line("user alice totp enable") == Command("user", {"name": "alice"}, "totp", {"totp": "enable"})
    assert parse_line("user id=3 totp DISABLE").args == {"totp": "disable"}
    assert parse_line("user alice unlock") == Command("user", {"name": "alice"}, "unlock")
    for bad, why in (("user alice totp", "expected enable or disable"), ("user alice totp on", "enable or disable"),
                     ("user alice totp enable now", "takes no arguments"), ("user alice unlock x", "no arguments"),
                     ("vm desk totp enable", "expected a verb")):
        with pytest.raises(GrammarError, match=why):
            parse_line(bad)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("QVD_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("QVD_ADMIN_PASSWORD", "secret")
    api = FakeApi()
    api.collections["/users"] = [{"id": 7, "name": "alice"}]
    return api


def run(fake: FakeApi, capsys: pytest.CaptureFixture[str], *words: str) -> tuple[int, str, str]:
    code = qa.main(list(words), transport=fake.transport())
    out, err = capsys.readouterr()
    return code, out, err


def enabled(_r: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"user": {"id": 7, "name": "alice"}, "secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
                                     "uri": URI, "digits": 6, "interval": 30, "enforced": True})


def test_totp_enable_prints_secret_uri_qr_and_png(fake: FakeApi, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    fake.routes[("POST", "/users/7/totp")] = enabled
    png = tmp_path / "qr.png"
    code, out, err = run(fake, capsys, "user", "alice", "totp", "enable", "--qr-png", str(png))
    assert code == 0, err
    assert ("POST", "/users/7/totp") in fake.calls
    assert "TOTP enabled for user 7 (alice)" in out
    assert "secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" in out and f"uri:    {URI}" in out
    assert "▀" in out or "▄" in out or "█" in out
    assert png.read_bytes().startswith(b"\x89PNG") and (png.stat().st_mode & 0o077) == 0
    assert err == ""

    png.unlink()
    code, out, _ = run(fake, capsys, "-f", "json", "user", "alice", "totp", "enable", "--qr-png", str(png))
    assert code == 0 and json.loads(out)[0]["uri"] == URI  # JSON: the answer as is, no drawing
    assert png.read_bytes().startswith(b"\x89PNG")


def test_totp_enable_without_segno_still_gives_the_secret(fake: FakeApi, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake.routes[("POST", "/users/7/totp")] = enabled
    real_import = builtins.__import__

    def no_segno(name: str, *a: Any, **kw: Any) -> Any:
        if name == "segno":
            raise ImportError("no segno")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_segno)
    code, out, err = run(fake, capsys, "user", "alice", "totp", "enable")
    assert code == 0 and "secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" in out and "'segno' is not installed" in err


def test_totp_disable_and_unlock_requests(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    fake.routes[("DELETE", "/users/7/totp")] = httpx.Response(200, json={"id": 7, "name": "alice",
                                                                         "totp_enabled": False})
    fake.routes[("POST", "/users/7/unlock")] = httpx.Response(200, json={"id": 7, "name": "alice", "unlocked": True})
    code, out, _ = run(fake, capsys, "user", "alice", "totp", "disable")
    assert code == 0 and "TOTP disabled for user 7 (alice)" in out and "secret" not in out
    code, out, _ = run(fake, capsys, "user", "alice", "unlock")
    assert code == 0 and "unlocked user 7 (alice)" in out
    assert fake.calls[-1] == ("POST", "/users/7/unlock")
    code, _, err = run(fake, capsys, "user", "totp", "enable")
    assert code == 2 and "--force" in err
