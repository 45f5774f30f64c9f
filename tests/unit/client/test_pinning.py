"""Trust-on-first-use certificate pins."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qvd.client.pinning import PinResult, PinStore, default_path, pretty, sha256_fingerprint


def test_unknown_remember_match_mismatch(tmp_path: Path) -> None:
    store = PinStore(tmp_path / "cfg" / "qvd" / "known_hosts.json")
    fp = sha256_fingerprint(b"certificate one")
    assert store.check("node", 8443, fp) == (PinResult.UNKNOWN, None)
    store.remember("node", 8443, fp)
    assert store.check("node", 8443, fp) == (PinResult.MATCH, fp)
    assert store.check("node", 8443, fp.upper())[0] is PinResult.MATCH
    other = sha256_fingerprint(b"certificate two")
    assert store.check("node", 8443, other) == (PinResult.MISMATCH, fp)
    assert store.check("node", 9443, other)[0] is PinResult.UNKNOWN  # pins are per host:port
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700


def test_corrupt_file_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    p = tmp_path / "known_hosts.json"
    p.write_text("{not json")
    with pytest.raises(OSError, match="cannot read"):
        PinStore(p).check("node", 1, "ab")


def test_pretty_and_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert pretty("ab01ff") == "AB:01:FF"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_path() == tmp_path / "qvd" / "known_hosts.json"
