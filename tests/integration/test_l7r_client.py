"""A real ``qvd-l7r`` process (TLS, self-signed certificate generated at start) and the
real ``qvd-client`` CLI, on loopback, against SQLite and PostgreSQL.

Around them: the node daemon is played by the test (FakeHkd), the desktop agent
by FakeVma, nxagent by an echo server, and nxproxy by a small script given to
the client with ``--nxproxy``: it connects where the client tells it, sends
random bytes and checks they come back through L7R and "nxagent".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from qvd.db.models import Host
from tests.conftest import NodeFx, free_port
from tests.unit.l7r.harness import EchoAgent, FakeHkd, FakeVma, World, populate

FAKE_NXPROXY = r'''#!{python}
import os, socket, sys
spec = sys.argv[2]                                   # nx/nx,connect=127.0.0.1,port=P:D
assert sys.argv[1] == "-S", sys.argv
opts = dict(kv.split("=") for kv in spec.split(":")[0].split(",")[1:])
assert opts["connect"] == "127.0.0.1", opts
assert os.environ.get("NX_CLIENT") == "/bin/false"
s = socket.create_connection(("127.0.0.1", int(opts["port"])), timeout=20)
payload = os.urandom(400_000)
s.sendall(payload)
got = b""
while len(got) < len(payload):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
ok = got == payload
result = f"{{'OK' if ok else 'BAD'}} {{len(got)}} {{os.environ.get('DISPLAY')}}\n"
open(os.environ["FAKE_NXPROXY_RESULT"], "w").write(result)
s.close()
sys.exit(0 if ok else 1)
'''


@dataclass
class Live:
    node: NodeFx
    world: World
    port: int
    metrics_port: int
    proc: subprocess.Popen[bytes]
    home: Path
    log: Path
    nxproxy: Path
    result: Path

    def client(self, *args: str, password: str = "secret", display: str | None = ":77",
               timeout: float = 90) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QVD_PASSWORD")}
        env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"),
                   XDG_CACHE_HOME=str(self.home / ".cache"), FAKE_NXPROXY_RESULT=str(self.result))
        if display:
            env["DISPLAY"] = display
        argv = [sys.executable, "-m", "qvd.client.main", "--host", "127.0.0.1", "--port", str(self.port),
                "--user", "alice", f"--password={password}", "--nxproxy", str(self.nxproxy), *args]
        return subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qvd-l7r exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"qvd-l7r did not listen:\n{log.read_text()}")


@pytest.fixture
def live(node: NodeFx, tmp_path: Path) -> Iterator[Live]:
    world = populate(node)
    vma = FakeVma().start()
    agent = EchoAgent().start()
    port, mport = free_port(), free_port()
    settings = {
        "nodename": '"node1"', "node.address": '"127.0.0.1"', "l7r.address": '"127.0.0.1"', "l7r.port": port,
        "l7r.metrics.port": mport, "internal.l7r.poll_time.vm": 0.05, "internal.l7r.poll_time.x": 0.05,
        "internal.l7r.timeout.shutdown": 1.0, "log.level": '"DEBUG"',
    }
    with node.paths.node_file.open("a") as fh:
        for k, v in settings.items():
            fh.write(f"{k} = {v}\n")
    log = tmp_path / "l7r.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qvd.l7r.main", "--root", str(node.paths.root)],
                                stdout=out, stderr=subprocess.STDOUT)
    hkd = None
    try:
        _wait_port(port, proc, log)
        with node.factory() as s:
            host_id = s.scalars(select(Host.id).where(Host.name == "node1")).one()
        hkd = FakeHkd(node, host_id, vma_port=vma.port, x_port=agent.port).start()
        nxproxy = tmp_path / "fake-nxproxy"
        nxproxy.write_text(FAKE_NXPROXY.format(python=sys.executable))
        nxproxy.chmod(0o755)
        home = tmp_path / "home"
        home.mkdir()
        time.sleep(1.2)  # the L7R re-reads the node status every second
        yield Live(node, world, port, mport, proc, home, log, nxproxy, tmp_path / "nxproxy-result")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if hkd:
            hkd.stop()
        vma.stop()
        agent.stop()


def test_certificate_generated_with_safe_key(live: Live) -> None:
    etc = live.node.paths.l7r_dir
    key_mode = stat.S_IMODE((etc / "key.pem").stat().st_mode)
    assert key_mode == 0o600
    cert = x509.load_pem_x509_certificate((etc / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node1" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_versions(live: Live, version: ssl.TLSVersion) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="node1") as s:
        assert s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        s.sendall(b"GET /qvd/ping HTTP/1.1\r\n\r\n")
        data = b""
        while not data.endswith(b"I am alive!\r\n"):
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")


def test_list_pin_connect_and_metrics(live: Live) -> None:
    # First use without --insecure and without a terminal: refused, nothing pinned.
    r = live.client("--list")
    assert r.returncode == 8, r.stderr
    assert "SHA-256" in r.stderr and "--insecure" in r.stderr
    known = live.home / ".config" / "qvd" / "known_hosts.json"
    assert not known.exists()

    r = live.client("--list", "--insecure")
    assert r.returncode == 0, r.stderr
    assert "alice-1" in r.stdout and "alice-2" in r.stdout and "bob-1" not in r.stdout
    pins = json.loads(known.read_text())["hosts"]
    assert list(pins) == [f"127.0.0.1:{live.port}"]
    assert stat.S_IMODE(known.stat().st_mode) == 0o600

    r = live.client("--vm", str(live.world.vms["alice-1"]), "--geometry", "1280x800", "--link", "modem")
    assert r.returncode == 0, r.stderr + live.log.read_text()[-3000:]
    assert live.result.read_text().startswith("OK 400000 :77"), live.result.read_text()
    for line in ("Session acquired for VM_ID", "Starting virtual machine", "Connection established"):
        assert line in r.stderr
    assert "Session ended" in r.stderr

    with urllib.request.urlopen(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "qvd_l7r_session_starts_total 1.0" in metrics
    assert "qvd_l7r_tunnel_bytes_in_total 400000.0" in metrics
    assert "qvd_l7r_connect_seconds_count 1.0" in metrics

    # Another certificate for the same host:port is refused loudly.
    pins[f"127.0.0.1:{live.port}"]["sha256"] = "00" * 32
    known.write_text(json.dumps({"version": 1, "hosts": pins}))
    r = live.client("--list", "--insecure")
    assert r.returncode == 8
    assert "CHANGED" in r.stderr and str(known) in r.stderr


def test_client_errors(live: Live) -> None:
    assert live.client("--list", "--insecure").returncode == 0
    r = live.client("--list", password="wrong")
    assert r.returncode == 3 and "login refused" in r.stderr
    r = live.client("--vm", "99999")
    assert r.returncode == 5 and "does not exist" in r.stderr
    r = live.client("--vm", str(live.world.vms["alice-blocked"]))
    assert r.returncode == 4 and "maintenance" in r.stderr
    r = live.client("--vm", str(live.world.vms["alice-1"]), display=None)
    assert r.returncode == 2 and "DISPLAY" in r.stderr
    r = live.client()  # alice has two desktops and no terminal to ask in
    assert r.returncode == 2 and "--vm" in r.stderr


def test_sigterm_stops_the_broker(live: Live) -> None:
    live.proc.send_signal(signal.SIGTERM)
    assert live.proc.wait(30) == 0
    assert "stopped" in live.log.read_text()
