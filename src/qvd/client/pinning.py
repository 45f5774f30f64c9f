"""Trust on first use for L7R certificates.

QVD nodes usually run with the self-signed certificate generated at their first
start, so the client pins what it saw: the SHA-256 of the certificate (DER),
per ``host:port``, in ``$XDG_CONFIG_HOME/qvd/known_hosts.json`` (default
``~/.config/qvd/known_hosts.json``).  A different certificate later is refused
until the user removes the entry, like SSH's known_hosts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class PinResult(StrEnum):
    MATCH = "match"
    UNKNOWN = "unknown"
    MISMATCH = "mismatch"


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qvd" / "known_hosts.json"


def sha256_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pretty(fingerprint: str) -> str:
    """``AB:CD:...`` as browsers and ``openssl x509 -fingerprint -sha256`` show it."""
    up = fingerprint.upper()
    return ":".join(up[i : i + 2] for i in range(0, len(up), 2))


@dataclass
class PinStore:
    path: Path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read {self.path}: {e}") from None
        hosts = data.get("hosts", {}) if isinstance(data, dict) else {}
        return {str(k): v for k, v in hosts.items() if isinstance(v, dict)}

    def check(self, host: str, port: int, fingerprint: str) -> tuple[PinResult, str | None]:
        """(result, the pinned fingerprint if any)."""
        entry = self._load().get(f"{host}:{port}")
        if entry is None:
            return PinResult.UNKNOWN, None
        pinned = str(entry.get("sha256", "")).lower()
        return (PinResult.MATCH if pinned == fingerprint.lower() else PinResult.MISMATCH), pinned

    def remember(self, host: str, port: int, fingerprint: str) -> None:
        hosts = self._load()
        hosts[f"{host}:{port}"] = {"sha256": fingerprint.lower(),
                                   "first_seen": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "hosts": hosts}, fh, indent=2, sort_keys=True)
            fh.write("\n")
        tmp.replace(self.path)
