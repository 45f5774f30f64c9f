"""The L7R's TLS: certificate generation at first start and the server context.

TLS 1.2 and 1.3 (QVD clients in the field speak 1.2; the reference server was
1.2 only, §10.2.17), nothing older.  Without ``l7r.ssl.cert``/``l7r.ssl.key``
the files are ``$QVD_ROOT/etc/l7r/{cert,key}.pem``, created self-signed on the
first start (RSA 2048, SHA-256, subject alternative names = node name and
address); clients pin the certificate's fingerprint on first use.  The key must
not be readable by group or others: the L7R refuses to start otherwise (the
reference checked the certificate's mode by mistake).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from qvd.core.config import Config, Paths
from qvd.core.errors import ConfigError

log = logging.getLogger(__name__)

#: OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are fixed by OpenSSL and all strong).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:ECDHE+AES:!aNULL:!MD5:!RC4:!3DES:!DES:!SHA1:!EXPORT"


def cert_paths(cfg: Config, paths: Paths) -> tuple[Path, Path]:
    cert = cfg.get_str("l7r.ssl.cert") or str(paths.l7r_dir / "cert.pem")
    key = cfg.get_str("l7r.ssl.key") or str(paths.l7r_dir / "key.pem")
    return Path(cert), Path(key)


def _san(name: str, address: str) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for v in (name, address, "localhost"):
        if not v or v in seen:
            continue
        seen.add(v)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(v)))
        except ValueError:
            out.append(x509.DNSName(v))
    return out


def generate_self_signed(cert_path: Path, key_path: Path, name: str, address: str, *, days: int = 3650) -> None:
    """Write a new key (mode 0600) and a self-signed certificate for ``name``/``address``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, (name or address or "qvd")[:64]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "QVD-py node"),
    ])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(name, address)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    # O_EXCL + 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(cert_path)
    log.info("generated a self-signed certificate %s (SHA-256 %s)", cert_path, fingerprint(cert_path))


def fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def ensure_certificate(cfg: Config, paths: Paths, name: str, address: str) -> tuple[Path, Path]:
    """The certificate and key files, generated if both are absent.  Raises :class:`ConfigError`."""
    cert, key = cert_paths(cfg, paths)
    if not cert.exists() and not key.exists():
        generate_self_signed(cert, key, name, address)
    for p, what in ((cert, "certificate"), (key, "key")):
        if not p.is_file():
            raise ConfigError(f"L7R TLS {what} {p} is missing (set l7r.ssl.cert and l7r.ssl.key, or remove "
                              "both files to have a self-signed pair generated)")
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"L7R TLS key {key} is readable by others (mode {mode:o}): run chmod 600 {key}")
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the L7R certificate {cert} / key {key}: {e}") from None
    return ctx
