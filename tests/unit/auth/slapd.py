"""A real OpenLDAP server for tests: Debian's ``slapd`` with its own directory under a temporary path.

Listens on 127.0.0.1 only: ``ldap://`` (StartTLS offered) and ``ldaps://``, with a
certificate signed by a throw-away CA (``ca_file``).  Started in the foreground
(``-d 0``) so that the test owns the process and ends it by its PID.

The directory (``dc=example,dc=test``):

* ``ou=people``: lara (uidNumber 20001, member of the group ``qvdusers``), otto
  (not a member; listed by ``memberUid`` in the posix group ``posix``), nina (a member;
  unknown to QVD's database in the tests: auto-provisioned);
* ``ou=staff``: sam, readable only by the service account (and himself), so a search
  finds him only when bound as ``cn=svc``;
* ``cn=svc,dc=example,dc=test``: the service account (password ``svcpw``).

Passwords are ``<uid>pw`` (``larapw``...).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
STAFF = f"ou=staff,{SUFFIX}"
GROUP = f"cn=qvdusers,ou=groups,{SUFFIX}"
POSIX_GROUP = f"cn=posix,ou=groups,{SUFFIX}"
SERVICE_DN = f"cn=svc,{SUFFIX}"
SERVICE_PW = "svcpw"

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"


def available() -> str | None:
    """Why slapd cannot run here, or None."""
    for tool in (SLAPD, SLAPADD):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (Debian packages slapd and ldap-utils)"
    if not Path("/etc/ldap/schema/nis.schema").exists():
        return "the OpenLDAP schemas are missing (/etc/ldap/schema)"
    return None


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _person(uid: str, ou: str, number: int, *, home: str | None = None) -> str:
    return (f"dn: uid={uid},{ou}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\nuid: {uid}\n"
            f"cn: {uid.title()}\nsn: {uid.title()}\nuidNumber: {number}\ngidNumber: {number}\n"
            f"homeDirectory: {home or '/home/' + uid}\nuserPassword: {ssha(uid + 'pw')}\n")


def directory_ldif() -> str:
    parts = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {STAFF}\nobjectClass: organizationalUnit\nou: staff\n",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: svc\n"
        f"userPassword: {ssha(SERVICE_PW)}\n",
        _person("lara", PEOPLE, 20001),
        _person("otto", PEOPLE, 20002),
        _person("nina", PEOPLE, 20003, home="/home/users/nina"),
        _person("sam", STAFF, 20004),
        f"dn: {GROUP}\nobjectClass: groupOfNames\ncn: qvdusers\nmember: uid=lara,{PEOPLE}\n"
        f"member: uid=nina,{PEOPLE}\nmember: uid=sam,{STAFF}\n",
        f"dn: {POSIX_GROUP}\nobjectClass: posixGroup\ncn: posix\ngidNumber: 30000\nmemberUid: otto\n",
    ]
    return "\n".join(parts)


def make_certificates(where: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "QVD test LDAP CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            # Only the address: connecting as "localhost" must fail the host name check.
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = where / "ca.pem", where / "cert.pem", where / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


@dataclass
class Slapd:
    where: Path
    port: int = 0
    tls_port: int = 0
    ca_file: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def start(self) -> Slapd:
        self.where.mkdir(parents=True, exist_ok=True)
        data = self.where / "data"
        data.mkdir()
        self.ca_file, cert, key = make_certificates(self.where)
        conf = self.where / "slapd.conf"
        conf.write_text(f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {self.where}/slapd.pid
argsfile {self.where}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {self.ca_file}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "cn=admin,{SUFFIX}"
rootpw {ssha("adminpw")}
directory {data}
access to attrs=userPassword by self read by anonymous auth by * none
access to dn.subtree="{STAFF}" by dn.exact="{SERVICE_DN}" read by self read by * none
access to * by * read
""")
        ldif = self.where / "data.ldif"
        ldif.write_text(directory_ldif())
        subprocess.run([SLAPADD, "-f", str(conf), "-l", str(ldif)], check=True, capture_output=True, timeout=60)
        self.port, self.tls_port = free_port(), free_port()
        log = (self.where / "slapd.log").open("wb")
        self.proc = subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(conf), "-h", f"{self.url}/ {self.ldaps_url}/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.where / 'slapd.log').read_text()[-2000:]}")
            if all(self._listening(p) for p in (self.port, self.tls_port)):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not start listening within 20 s")

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.where, ignore_errors=True)
