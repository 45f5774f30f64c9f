"""Secrets at rest: the cluster key file and AES-GCM sealed values."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from qvd.core.config import Paths
from qvd.core.errors import ConfigError
from qvd.core.secretbox import SecretBox, SecretError, key_id, key_path


def test_first_seal_creates_a_private_key_file_and_values_round_trip(tmp_path: Path) -> None:
    box = SecretBox.for_paths(Paths(tmp_path))
    path = key_path(Paths(tmp_path))
    assert not path.exists()
    sealed = box.seal(b"JBSWY3DPEHPK3PXP", "qvd:totp:user:1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    assert "JBSWY3DPEHPK3PXP" not in sealed and sealed.startswith("qvd-gcm1:")
    # Another process (a fresh box) with the same file opens it.
    assert SecretBox(path).open(sealed, "qvd:totp:user:1") == b"JBSWY3DPEHPK3PXP"
    # Same plaintext, new nonce: never the same ciphertext twice.
    assert box.seal(b"JBSWY3DPEHPK3PXP", "qvd:totp:user:1") != sealed


def test_a_value_is_bound_to_its_purpose(tmp_path: Path) -> None:
    box = SecretBox(tmp_path / "k")
    sealed = box.seal(b"s", "qvd:totp:user:1")
    with pytest.raises(SecretError, match="another purpose"):
        box.open(sealed, "qvd:totp:user:2")


def test_a_node_with_another_key_names_both_keys(tmp_path: Path) -> None:
    a, b = SecretBox(tmp_path / "a.key"), SecretBox(tmp_path / "b.key")
    sealed = a.seal(b"s", "p")
    b.seal(b"x", "p")
    with pytest.raises(SecretError) as e:
        b.open(sealed, "p")
    assert a.check() in e.value.message and b.check() in e.value.message and "copy" in e.value.message


def test_no_key_file_on_open_is_a_config_error_and_nothing_is_created(tmp_path: Path) -> None:
    sealed = SecretBox(tmp_path / "a.key").seal(b"s", "p")
    other = SecretBox(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="does not exist"):
        other.open(sealed, "p")
    assert not (tmp_path / "missing.key").exists()
    # Once the operator copies the file, the same process picks it up.
    (tmp_path / "missing.key").write_bytes((tmp_path / "a.key").read_bytes())
    (tmp_path / "missing.key").chmod(0o600)
    assert other.open(sealed, "p") == b"s"


def test_unsafe_or_broken_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    SecretBox(path).seal(b"s", "p")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SecretBox(path).check()
    path.write_text("not hex\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="hex digits"):
        SecretBox(path).check()
    path.write_text("abcd\n")
    with pytest.raises(ConfigError, match="hex digits"):
        SecretBox(path).check()


@pytest.mark.parametrize("damage", ["", "qvd-gcm1:", "other:1234:abc", "qvd-gcm1:{kid}:%%%", "qvd-gcm1:{kid}:AAAA",
                                    "flip"])
def test_damaged_values_do_not_open(tmp_path: Path, damage: str) -> None:
    box = SecretBox(tmp_path / "k")
    sealed = box.seal(b"secret", "p")
    kid = box.check()
    if damage == "flip":
        value = sealed[:-4] + ("A" if sealed[-4] != "A" else "B") + sealed[-3:]
    else:
        value = damage.format(kid=kid)
    with pytest.raises(SecretError):
        box.open(value, "p")


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "secret.key"
    boxes = [SecretBox(path) for _ in range(8)]
    sealed: list[str] = []
    lock = threading.Lock()

    def work(box: SecretBox) -> None:
        value = box.seal(b"v", "p")
        with lock:
            sealed.append(value)

    threads = [threading.Thread(target=work, args=(b,)) for b in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = SecretBox(path)
    assert {reader.open(v, "p") for v in sealed} == {b"v"}
    assert {v.split(":")[1] for v in sealed} == {key_id(bytes.fromhex(path.read_text().strip()))}
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary files left
