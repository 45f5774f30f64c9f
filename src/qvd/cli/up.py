"""``qvd up``: a complete single node in the foreground.

Order: schema (and first administrator), default OSF and a desktop DI (built if
missing), a demo user with one VM on the first run, then the node daemon (HKD),
the broker (L7R) and the admin API as child processes.  Ctrl-C (or SIGTERM) stops
them in reverse order — API, L7R, then the HKD, which stops the desktops — and
waits for each; a child that dies on its own stops the whole node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from sqlalchemy import select

from qvd.cli.common import Node
from qvd.cli.images import CLI_ACTOR, build, ensure_osf, register
from qvd.core.security import random_password
from qvd.db.models import Di, User
from qvd.services.users import create_user
from qvd.services.vms import create_vm

DEMO_MARKER = "demo-created"


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def ensure_desktop_image(node: Node, osf_id: int) -> None:
    with node.factory() as s:
        if s.scalars(select(Di).where(Di.osf_id == osf_id)).first() is not None:
            return
    print("qvd up: no desktop image yet; building the minimal desktop (about a minute the first time)",
          file=sys.stderr, flush=True)
    tarball = build(node, "minimal", None)
    row = register(node, tarball, osf_id, [], None)
    print(f"qvd up: registered desktop image {row['version']}", file=sys.stderr, flush=True)


def ensure_demo(node: Node) -> str | None:
    """On the first run, a demo user with one VM; returns the command to connect."""
    marker = node.paths.etc / DEMO_MARKER
    if marker.exists():
        return None
    password = random_password(9)
    with node.factory() as s:
        exists = s.scalars(select(User).where(User.login == "demo")).first() is not None
    if not exists:
        create_user(node.factory, CLI_ACTOR, node.cfg, {"name": "demo", "password": password})
        create_vm(node.factory, CLI_ACTOR, node.cfg, {"name": "demo-desktop", "user": "demo", "osf": "desktop"})
    marker.write_text("demo user created\n")
    if exists:
        return None
    port = node.cfg.get_int("l7r.port")
    return (f"DISPLAY=:0 {_bin('qvd-client')} --host 127.0.0.1 --port {port} --user demo "
            f"--password {password} --insecure")


class Supervisor:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> None:
        # Own session: a Ctrl-C in the terminal reaches only us, and we stop children in order.
        proc = subprocess.Popen(argv, start_new_session=True, env=dict(os.environ, QVD_ROOT=str(self.root)))
        self.children.append((name, proc))
        print(f"qvd up: started {name} (pid {proc.pid})", file=sys.stderr, flush=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        code = 0
        while not self.stopping:
            for name, proc in self.children:
                rc = proc.poll()
                if rc is not None:
                    print(f"qvd up: {name} exited with status {rc}; stopping the node", file=sys.stderr)
                    code = 1
                    self.stopping = True
                    break
            time.sleep(0.3)
        self.stop_all()
        return code

    def stop_all(self, timeout: float = 90.0) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                print(f"qvd up: stopping {name}", file=sys.stderr, flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"qvd up: {name} did not stop in {timeout:.0f} s; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
        print("qvd up: stopped", file=sys.stderr)


def up(node: Node) -> int:
    osf_id = ensure_osf(node, "desktop")
    ensure_desktop_image(node, osf_id)
    hint = ensure_demo(node)
    sup = Supervisor(node.paths.root)
    root = ["--root", str(node.paths.root)]
    try:
        sup.start("qvd-hkd", [_bin("qvd-hkd"), *root])
        sup.start("qvd-l7r", [_bin("qvd-l7r"), *root])
        sup.start("qvd-api", [_bin("qvd-api"), *root])
    except OSError as e:
        print(f"qvd up: cannot start a component: {e}", file=sys.stderr)
        sup.stop_all()
        return 1
    api = f"http://{node.cfg.get_str('api.address')}:{node.cfg.get_int('api.port')}"
    print(f"\nQVD node running. Admin API: {api}/api/v1/docs (qa reads {node.paths.qa_file}).", flush=True)
    if hint:
        print(f"Connect to the demo desktop from an X display with:\n\n    {hint}\n", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    return sup.run()
