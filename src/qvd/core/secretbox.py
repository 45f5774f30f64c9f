"""Secrets at rest: AES-256-GCM with one key per cluster, in ``$QVD_ROOT/etc/secret.key``.

What is sealed here must be readable again (a TOTP secret is needed in clear
to compute codes), so it cannot be hashed like passwords and tokens.  The key
file holds 32 random bytes, mode 0600; it is created on the first
:meth:`SecretBox.seal` of a node that has none.  **Every node of a cluster
needs the same file**: copy it from the node that created it (usually the one
running ``qvd-api``) to the others, keeping mode 0600.  A node with another key
cannot open the sealed values, and says so naming both key ids.

Sealed format (ASCII, fits a text column)::

    qvd-gcm1:<key id, 8 hex>:<urlsafe base64 of nonce (12 bytes) + ciphertext + tag>

The key id (first 4 bytes of SHA-256 of the key) is there for that error
message.  Each value is bound to its purpose with GCM's associated data (e.g.
``qvd:totp:user:42``), so a sealed value copied into another user's row does
not open.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qvd.core.config import Paths
from qvd.core.errors import ConfigError, QvdError

log = logging.getLogger(__name__)

PREFIX = "qvd-gcm1"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE_NAME = "secret.key"


class SecretError(QvdError):
    """A sealed value that cannot be opened (wrong key, damaged, bound to something else)."""

    code = "secret-invalid"


def key_path(paths: Paths) -> Path:
    return paths.etc / KEY_FILE_NAME


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def _read_key(path: Path) -> bytes:
    """The key in ``path``.  Raises :class:`ConfigError` (missing, unsafe mode, wrong size)."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"secret key {path} does not exist: copy it from the node where it was created "
                          "(every node of a cluster needs the same file, mode 0600)") from None
    except OSError as e:
        raise ConfigError(f"cannot read the secret key {path}: {e.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"secret key {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"run: chmod 600 {path}")
    key = raw.strip()
    # Stored as hex text so that it survives being copied around with editors and terminals.
    try:
        decoded = bytes.fromhex(key.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"secret key {path} is not {KEY_BYTES * 2} hex digits") from None
    if len(decoded) != KEY_BYTES:
        raise ConfigError(f"secret key {path} is not {KEY_BYTES * 2} hex digits")
    return decoded


def _create_key(path: Path) -> bytes:
    """Write a new key atomically; if another process won the race, use its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            # link() fails if the name exists: two processes creating the key at once agree on one.
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    log.warning("created the secret key %s (key id %s); copy it to every other node of the cluster (mode 0600)",
                path, key_id(key))
    return key


class SecretBox:
    """Seals and opens small secrets with the node's key file.  Thread-safe; the key is read once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_paths(cls, paths: Paths) -> SecretBox:
        return cls(key_path(paths))

    def _get_key(self, *, create: bool) -> bytes:
        with self._lock:
            if self._key is None:
                if create and not self.path.exists():
                    self._key = _create_key(self.path)
                else:
                    self._key = _read_key(self.path)
            return self._key

    def check(self) -> str:
        """Load the key (without creating it); returns its id.  Raises :class:`ConfigError`."""
        return key_id(self._get_key(create=False))

    def seal(self, plaintext: bytes, purpose: str) -> str:
        """Encrypt ``plaintext`` bound to ``purpose``; creates the key file if this node has none."""
        key = self._get_key(create=True)
        kid = key_id(key)
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = AESGCM(key).encrypt(nonce, plaintext, self._aad(purpose, kid))
        return f"{PREFIX}:{kid}:{base64.urlsafe_b64encode(nonce + ct).decode('ascii')}"

    def open(self, sealed: str, purpose: str) -> bytes:
        """Decrypt a value made by :meth:`seal` with the same ``purpose``.

        Raises :class:`SecretError` (wrong key, damaged value) or :class:`ConfigError` (no key file).
        """
        prefix, kid, body = [*sealed.split(":", 2), "", ""][:3]
        if prefix != PREFIX or not kid or not body:
            raise SecretError("not a sealed value")
        key = self._get_key(create=False)
        mine = key_id(key)
        if kid != mine:
            raise SecretError(f"the value was sealed with key {kid}, but {self.path} is key {mine}: "
                              "copy the secret key of the cluster to this node")
        try:
            raw = base64.urlsafe_b64decode(body.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise SecretError("damaged sealed value (not base64)") from None
        if len(raw) < NONCE_BYTES + 16:
            raise SecretError("damaged sealed value (too short)")
        try:
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad(purpose, kid))
        except InvalidTag:
            raise SecretError("sealed value does not open: damaged, or sealed for another purpose") from None

    @staticmethod
    def _aad(purpose: str, kid: str) -> bytes:
        return f"{PREFIX}:{kid}:{purpose}".encode()


_boxes: dict[Path, SecretBox] = {}
_boxes_lock = threading.Lock()


def box_for(paths: Paths) -> SecretBox:
    """One shared :class:`SecretBox` per key file in this process."""
    path = key_path(paths)
    with _boxes_lock:
        box = _boxes.get(path)
        if box is None:
            box = _boxes[path] = SecretBox(path)
        return box
