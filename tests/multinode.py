"""A QVD cluster on one machine, built from real parts, for ``tests/cluster`` and ``bench/failover.py``.

:class:`Cluster` is a context manager.  Entering it builds, in network namespaces of its own
(names ``qvdmn<8 hex>-<role>``; nothing of it lives in the machine's own network namespace)::

    <id>-sw   the "switch": bridge ``brmgmt`` (management network 10.250.0.0/24) and bridge ``brdesk``
              (desktop network: the nodes' uplinks)
    <id>-db   PostgreSQL (the newest installed), a throwaway cluster (initdb into the work dir, fsync off) on
              10.250.0.2:5432; its unix socket is in the work dir, so this process queries it directly
    <id>-n1.. one namespace per node: ``mgmt`` (10.250.0.1N) to ``brmgmt``; the desktop bridge
              ``vm.network.bridge`` with the veth ``uplink`` to ``brdesk`` enslaved; its own QVD_ROOT with
              node.toml; the real ``qvd-hkd`` (LXC desktops) and ``qvd-l7r`` (TLS, port 8443)
    <id>-cl   the clients: one long-lived agent speaking QVD/1.0 (``connect_to_vm`` -> 101 -> NX bytes
              from nxagent, see :func:`agent_main`), and the real ``qvd-client`` with Debian's nxproxy
              on an Xvfb started in that namespace

The database gets the schema (``qvd.db.schema.upgrade``), then an OSF, the real minimal desktop image
imported as DI into the images directory every node shares (``path.storage.images``; the homes are
shared the same way, as NFS would), users and one VM each, all through ``qvd.services``.

``ip netns exec`` remounts /sys for the namespace, which hides the cgroup hierarchies LXC needs: the
node daemons (and ``lxc-attach``) run under a ``sh -c`` that mounts them again in that private mount
namespace (:func:`cgroup_mount_script`).  LXC's control sockets are abstract unix sockets, scoped by
network namespace: every ``lxc-*`` call runs inside the node's namespace.

Helpers: the running containers of a node (:meth:`Cluster.containers`), a poller that records every
moment a VM runs on two nodes at once (:class:`DoubleRunWatch`), kill a node (SIGKILL of its daemons by
pid, then its veths down), partition a node from the database only (iptables DROP inside its
namespace) and heal it, restart a node's daemons, run a command in a desktop as its user.

Leaving the context (also on an exception or Ctrl-C) removes everything: client processes, the node
daemons (SIGTERM, then SIGKILL, by pid), every container (``lxc-stop -k`` inside the node's namespace),
what is left in the namespaces (processes the daemons started, found by namespace), the namespaces with
their links, PostgreSQL, the work dir.  A run that crashed without cleaning leaves an ``owner`` file
naming a dead process: :func:`sweep_leftovers` (run at every start) removes its namespaces and dir.

Traffic goes only to loopback and between the namespaces created here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREFIX = "qvdmn"
WORK_PARENT = Path("/var/tmp")


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's server binaries (Debian 12: 15), or ``$QVD_TEST_PG_BIN``."""
    if os.environ.get("QVD_TEST_PG_BIN"):
        return Path(os.environ["QVD_TEST_PG_BIN"])
    versions = sorted((d for d in Path("/usr/lib/postgresql").glob("*") if (d / "bin" / "postgres").exists()),
                      key=lambda d: [int(x) for x in re.findall(r"\d+", d.name)] or [0])
    return versions[-1] / "bin" if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MGMT = "10.250.0"  # management network /24, only inside the namespaces created here
DB_IP = f"{MGMT}.2"
CLIENT_IP = f"{MGMT}.100"
DB_PORT = 5432
L7R_PORT = 8443
DESK_NET = "10.231.0"  # vm.network.* defaults: 10.231.0.0/16, desktops from .100, nodes .11 .12 ...
BRIDGE = "qvdnet"
TOOLS = ("ip", "iptables", "nft", "ss", "setpriv", "lxc-start", "lxc-stop", "lxc-ls", "lxc-attach", "lxc-info",
         "tar", "zstd", "Xvfb", "xwininfo", "nxproxy")
GEOMETRY = "1024x768"
NX_HELLO = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "
_NS_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{8}})-([a-z0-9]+)$")
_MONITOR_RE = re.compile(r"^\[lxc monitor\] (\S+) (\S+)$")


def bin_dir() -> Path:
    """The virtualenv's bin directory (qvd-hkd, qvd-l7r, qvd-client)."""
    here = Path(sys.executable).parent
    return here if (here / "qvd-hkd").exists() else REPO / ".venv" / "bin"


def missing_requirements() -> list[str]:
    """What this machine lacks to build a cluster (empty when it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (network namespaces, privileged LXC containers)")
    out += [t for t in TOOLS if shutil.which(t, path=PATH_ENV) is None]
    out += [str(PG_BIN / b) for b in ("initdb", "postgres") if not (PG_BIN / b).exists()]
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        out.append("the 'postgres' system user")
    if not out:
        from qvd.backends.lxc import LxcBackend

        ok, why = LxcBackend.supported()
        if not ok:
            out.append(why)
    return out


class ClusterError(Exception):
    """The cluster could not be built or driven; the message says why (with log tails)."""


# --- processes ----------------------------------------------------------------------------------


def proc_start(pid: int) -> int | None:
    from qvd.vma.procs import proc_start_time

    return proc_start_time(pid)


def run(argv: list[str], *, timeout: float = 60.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                             stdin=subprocess.DEVNULL, env=env or {"PATH": PATH_ENV, "LANG": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{shlex.join(argv)}: no answer after {timeout:g} s") from None
    if check and res.returncode != 0:
        detail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
        raise ClusterError(f"{shlex.join(argv)} failed (exit status {res.returncode}): {' | '.join(detail)}")
    return res


def ns_run(ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], **kw)


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f"\n--- last lines of {path} ---\n" + "\n".join(lines[-n:])


@dataclass
class Proc:
    """A process this harness started, known by pid and start time (a recycled pid is never signalled)."""

    what: str
    popen: subprocess.Popen[bytes]
    log: Path | None
    start_time: int | None = None

    def __post_init__(self) -> None:
        self.start_time = proc_start(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive() and proc_start(self.pid) == self.start_time:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0, first: int = signal.SIGTERM) -> None:
        for sig in (first, signal.SIGKILL):
            if not self.alive():
                break
            self.send(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def spawn(what: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
          stdin: int | None = subprocess.DEVNULL, stdout: int | None = None) -> Proc:
    fh = log.open("ab")
    try:
        p = subprocess.Popen(argv, stdin=stdin, stdout=stdout if stdout is not None else fh, stderr=fh,
                             env=env or {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": "/root"}, cwd=cwd,
                             start_new_session=True)
    finally:
        fh.close()
    return Proc(what, p, log)


def kill_pid(pid: int, start: int | None, sig: int) -> None:
    if start is not None and proc_start(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# --- namespaces, cgroups ------------------------------------------------------------------------


def list_namespaces() -> list[str]:
    res = run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()]


def ns_pids(ns: str) -> list[int]:
    res = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def cgroup_mount_script() -> str:
    """Shell commands re-creating this machine's /sys/fs/cgroup layout after ``ip netns exec``'s /sys remount."""
    cmds: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mp = _unescape(left.split()[4])
        if mp != "/sys/fs/cgroup" and not mp.startswith("/sys/fs/cgroup/"):
            continue
        fstype, _source, sopts = [*right.split(), "", "", ""][:3]
        q = shlex.quote(mp)
        if fstype == "tmpfs":
            cmds.append(f"mount -t tmpfs -o mode=755 cgroup_root {q}")
        elif fstype == "cgroup":
            opts = ",".join(o for o in sopts.split(",") if o not in ("rw", "ro") and not o.startswith("release_agent"))
            cmds.append(f"mkdir -p {q} && mount -t cgroup -o {shlex.quote(opts)} cgroup {q}")
        elif fstype == "cgroup2":
            cmds.append(f"mkdir -p {q} && mount -t cgroup2 cgroup2 {q}")
    cg = Path("/sys/fs/cgroup")
    if cg.is_dir():
        for p in sorted(cg.iterdir()):
            if p.is_symlink():
                cmds.append(f"ln -sfn {shlex.quote(os.readlink(p))} {shlex.quote(str(p))}")
    return " && ".join(cmds) or "true"


def in_ns_with_cgroups(ns: str, argv: list[str]) -> list[str]:
    """argv run in namespace ``ns`` with the cgroup hierarchies mounted (LXC needs them)."""
    return ["ip", "netns", "exec", ns, "/bin/sh", "-c", cgroup_mount_script() + ' && exec "$@"', "qvdmn-exec", *argv]


def lxc_monitors(ns: str) -> list[tuple[int, str, str]]:
    """(pid, lxcpath, name) of the LXC monitors running in namespace ``ns``."""
    out = []
    for pid in ns_pids(ns):
        m = _MONITOR_RE.match(_cmdline(pid))
        if m:
            out.append((pid, m.group(1), m.group(2)))
    return out


def purge_namespace(ns: str, lxcpaths: list[Path] | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Stop the containers and processes of one of our namespaces, then delete it.  Returns problems."""
    problems: list[str] = []
    if ns not in list_namespaces():
        return problems
    containers = {(lp, name) for _pid, lp, name in lxc_monitors(ns)}
    for path in lxcpaths or []:
        if path.is_dir():
            containers |= {(str(path), d.name) for d in path.iterdir() if d.is_dir() and d.name.startswith("qvd-")}
    for lxcpath, name in sorted(containers):
        ns_run(ns, ["lxc-stop", "-k", "-P", lxcpath, "-n", name], timeout=40, check=False)
    for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        pids = [(p, proc_start(p)) for p in ns_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid, st in pids:
            kill_pid(pid, st, sig)
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and any(proc_start(p) == st for p, st in pids):
            time.sleep(0.05)
    left = [p for p in ns_pids(ns) if p != os.getpid()]
    if left:
        problems.append(f"namespace {ns}: processes left: {left}")
    res = run(["ip", "netns", "del", ns], check=False)
    if res.returncode != 0 and ns in list_namespaces():
        problems.append(f"cannot delete namespace {ns}: {res.stderr.strip()}")
    return problems


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = _unescape(line.split()[4])
        if mp == prefix or mp.startswith(prefix + "/"):
            found.append(mp)
    return sorted(set(found), key=len, reverse=True)


def remove_workdir(work: Path) -> list[str]:
    problems = []
    for mp in mounts_under(work):
        if run(["umount", mp], check=False).returncode != 0:
            run(["umount", "-l", mp], check=False)
    left = mounts_under(work)
    if left:
        return [f"mounts left under {work}: {left}"]  # never delete through a mount
    shutil.rmtree(work, ignore_errors=True)
    if work.exists():
        problems.append(f"cannot remove {work}")
    return problems


def _owner_alive(work: Path) -> bool:
    try:
        pid_s, start_s = (work / "owner").read_text().split()[:2]
        return proc_start(int(pid_s)) == int(start_s)
    except (OSError, ValueError):
        # no owner file: a run that died before writing it, unless it is being created right now
        try:
            return time.time() - work.stat().st_mtime < 60
        except OSError:
            return False


def sweep_leftovers(say: Callable[[str], None] = print) -> list[str]:
    """Remove namespaces and work dirs of earlier runs whose owner process is dead."""
    runs: dict[str, list[str]] = {}
    for ns in list_namespaces():
        m = _NS_RE.match(ns)
        if m:
            runs.setdefault(m.group(1), []).append(ns)
    for d in WORK_PARENT.glob(f"{PREFIX}-*"):
        m = re.fullmatch(rf"{PREFIX}-([0-9a-f]{{8}})", d.name)
        if m:
            runs.setdefault(m.group(1), [])
    problems: list[str] = []
    for rid, namespaces in sorted(runs.items()):
        work = WORK_PARENT / f"{PREFIX}-{rid}"
        if work.exists() and _owner_alive(work):
            continue
        if not namespaces and (work / "kept").exists():
            continue  # cleaned, its logs kept on purpose (keep_workdir)
        say(f"removing leftovers of an earlier cluster run {rid}: {', '.join(namespaces) or 'work dir'}")
        lxcpaths = sorted(work.glob("nodes/*/root/run/lxc")) if work.exists() else []
        # nodes first (containers, daemons), then the database and the rest
        for ns in sorted(namespaces, key=lambda n: (not re.search(r"-n\d+$", n), n)):
            problems += purge_namespace(ns, lxcpaths, say)
        if work.exists():
            problems += remove_workdir(work)
    return problems


# --- the cluster --------------------------------------------------------------------------------


@dataclass
class Node:
    index: int
    name: str  # nodename
    ns: str
    address: str  # management address: node.address, the L7R
    desk_address: str  # on the desktop network (vm.network.host.address)
    root: Path
    logs: Path
    hkd: Proc | None = None
    l7r: Proc | None = None
    killed: bool = False
    partitioned: bool = False
    host_id: int = 0

    @property
    def lxcpath(self) -> Path:
        return self.root / "run" / "lxc"


@dataclass
class User:
    login: str
    password: str
    vm_id: int
    vm_name: str


@dataclass
class Violation:
    at: float
    vm_id: int
    nodes: list[str]


class DoubleRunWatch:
    """Polls every node's running containers and records each VM seen on two nodes in one poll."""

    def __init__(self, cluster: Cluster, period: float = 0.5) -> None:
        self.cluster = cluster
        self.period = period
        self.violations: list[Violation] = []
        self.polls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="double-run-watch", daemon=True)

    def start(self) -> DoubleRunWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                seen: dict[int, list[str]] = {}
                for n in self.cluster.nodes:
                    for vm in self.cluster.containers(n):
                        seen.setdefault(vm, []).append(n.name)
                self.polls += 1
                for vm, where in seen.items():
                    if len(where) > 1:
                        self.violations.append(Violation(time.monotonic(), vm, where))
            except Exception as e:  # keep watching; reported at the end
                self.errors.append(f"{type(e).__name__}: {e}")
            self._stop.wait(self.period)


class Cluster:
    """Three (``nodes``) QVD nodes sharing one PostgreSQL, in network namespaces; see the module docstring."""

    def __init__(self, image: Path, *, nodes: int = 3, users: int = 6, memory_mb: int = 256,
                 settings: dict[str, object] | None = None, say: Callable[[str], None] | None = None,
                 keep_workdir: bool = False, xvfb: bool = True) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("nodes: 1 to 9")
        self.image = image
        self.n_nodes = nodes
        self.n_users = users
        self.memory_mb = memory_mb
        self.extra_settings = settings or {}
        self.say = say or (lambda msg: print(f"[multinode] {msg}", file=sys.stderr, flush=True))
        self.keep_workdir = keep_workdir
        self.want_xvfb = xvfb
        self.id = secrets.token_hex(4)
        self.work = WORK_PARENT / f"{PREFIX}-{self.id}"
        self.logs = self.work / "logs"
        self.shared = self.work / "shared"
        self.ns_switch = f"{PREFIX}{self.id}-sw"
        self.ns_db = f"{PREFIX}{self.id}-db"
        self.ns_client = f"{PREFIX}{self.id}-cl"
        self.nodes: list[Node] = []
        self.users: list[User] = []
        self.procs: list[Proc] = []
        self.pg: Proc | None = None
        self.agent: ClientAgent | None = None
        self.xvfb: Proc | None = None
        self.display = ""
        self.engine: Any = None
        self.factory: Any = None
        self.cfg: Any = None
        self.admin_url = ""
        self.node_url = f"postgresql+psycopg://postgres@{DB_IP}:{DB_PORT}/qvd"
        self.watch: DoubleRunWatch | None = None
        self._closed = False

    # --- context -----------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.dump_logs()
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and exc[0] is not GeneratorExit:
            self.dump_logs()
        problems = self.close()
        if problems and exc[0] is None:
            raise ClusterError("cleanup incomplete: " + "; ".join(problems))

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        missing = missing_requirements()
        if missing:
            raise ClusterError(f"cannot build a cluster here: missing {', '.join(missing)}")
        for p in sweep_leftovers(self.say):
            self.say(f"warning: {p}")
        self.work.mkdir(mode=0o755)
        me = os.getpid()
        (self.work / "owner").write_text(f"{me} {proc_start(me)}\n")
        self.logs.mkdir()
        for d in ("images", "homes"):
            (self.shared / d).mkdir(parents=True)
        self.say(f"cluster {self.id}: work dir {self.work}")
        t0 = time.monotonic()
        self._network()
        self._postgres()
        self._objects()
        for n in self.nodes:
            self._write_node_file(n)
        for n in self.nodes:
            self.start_node(n, wait=False)
        for n in self.nodes:
            self.wait_node_ready(n)
        self._client_side()
        self.watch = DoubleRunWatch(self).start()
        self.say(f"cluster {self.id} ready in {time.monotonic() - t0:.1f} s: "
                 + ", ".join(f"{n.name} ({n.address}, host {n.host_id})" for n in self.nodes))

    def _network(self) -> None:
        ip = ["ip"]
        sw = self.ns_switch
        for ns in (sw, self.ns_db, self.ns_client):
            run([*ip, "netns", "add", ns])
            run([*ip, "-n", ns, "link", "set", "lo", "up"])
        for br in ("brmgmt", "brdesk"):
            run([*ip, "-n", sw, "link", "add", "name", br, "type", "bridge"])
            run([*ip, "-n", sw, "link", "set", br, "up"])

        def plug(ns: str, inner: str, outer: str, bridge: str) -> None:
            run([*ip, "-n", ns, "link", "add", "name", inner, "type", "veth", "peer", "name", outer, "netns", sw])
            run([*ip, "-n", sw, "link", "set", outer, "master", bridge, "up"])
            run([*ip, "-n", ns, "link", "set", inner, "up"])

        plug(self.ns_db, "mgmt", "db", "brmgmt")
        run([*ip, "-n", self.ns_db, "addr", "add", f"{DB_IP}/24", "dev", "mgmt"])
        plug(self.ns_client, "mgmt", "cl", "brmgmt")
        run([*ip, "-n", self.ns_client, "addr", "add", f"{CLIENT_IP}/24", "dev", "mgmt"])
        for i in range(1, self.n_nodes + 1):
            ns = f"{PREFIX}{self.id}-n{i}"
            run([*ip, "netns", "add", ns])
            run([*ip, "-n", ns, "link", "set", "lo", "up"])
            node = Node(i, f"node{i}", ns, f"{MGMT}.{10 + i}", f"{DESK_NET}.{10 + i}",
                        self.work / "nodes" / f"node{i}" / "root", self.logs)
            self.nodes.append(node)
            plug(ns, "mgmt", f"n{i}m", "brmgmt")
            run([*ip, "-n", ns, "addr", "add", f"{node.address}/24", "dev", "mgmt"])
            # The desktop bridge with the uplink enslaved; the node daemon adds its address and firewall.
            plug(ns, "uplink", f"n{i}d", "brdesk")
            run([*ip, "-n", ns, "link", "add", "name", BRIDGE, "type", "bridge"])
            run([*ip, "-n", ns, "link", "set", "uplink", "master", BRIDGE])
            run([*ip, "-n", ns, "link", "set", BRIDGE, "up"])

    def _postgres(self) -> None:
        import pwd

        pw = pwd.getpwnam("postgres")
        data, sock = self.work / "pg", self.work / "pgsock"
        for d in (data, sock):
            d.mkdir(mode=0o700)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        as_pg = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        env = {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": str(self.work)}
        res = subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                              "-E", "UTF8", "--no-sync", "--no-instructions"], capture_output=True, text=True,
                             timeout=120, check=False, env=env, cwd=self.work)
        if res.returncode != 0:
            raise ClusterError(f"initdb failed: {res.stderr.strip()[-2000:]}")
        with (data / "pg_hba.conf").open("a") as fh:
            fh.write(f"host all all {MGMT}.0/24 trust\n")
        settings = {
            "listen_addresses": DB_IP, "port": str(DB_PORT), "unix_socket_directories": str(sock),
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300",
            "shared_buffers": "64MB", "log_min_messages": "warning", "log_line_prefix": "%m [%p] ",
            # Server keep-alives stay at PostgreSQL's defaults (2 h): that the daemons' sessions of a
            # partitioned node do not hold their locks that long is the product's job
            # (idle_in_transaction_session_timeout, see qvd.db.engine), and the partition test checks it.
        }
        argv = ["ip", "netns", "exec", self.ns_db, *as_pg, str(PG_BIN / "postgres"), "-D", str(data)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        self.pg = spawn("postgres", argv, self.logs / "postgres.log", env=env, cwd=self.work)
        self.procs.append(self.pg)
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if not self.pg.alive():
                raise ClusterError("postgres exited" + tail(self.logs / "postgres.log"))
            try:
                with psycopg.connect(host=str(sock), port=DB_PORT, dbname="postgres", user="postgres",
                                     autocommit=True, connect_timeout=3) as conn:
                    conn.execute("CREATE DATABASE qvd")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ClusterError("postgres did not accept connections"
                                       + tail(self.logs / "postgres.log")) from None
                time.sleep(0.2)
        self.admin_url = f"postgresql+psycopg://postgres@/qvd?host={sock}&port={DB_PORT}"
        self.say(f"PostgreSQL on {DB_IP}:{DB_PORT} (namespace {self.ns_db}), socket {sock}")

    def _objects(self) -> None:
        from qvd.cli.common import open_node
        from qvd.db import schema
        from qvd.services.base import SYSTEM
        from qvd.services.images import create_di, create_osf
        from qvd.services.tenancy import seed
        from qvd.services.users import create_user
        from qvd.services.vms import create_vm

        admin = self.work / "admin"
        (admin / "etc").mkdir(parents=True)
        (admin / "etc" / "node.toml").write_text(
            "# the test's own view of the cluster: the database through its unix socket\n"
            + toml_line("database.url", self.admin_url)
            + toml_line("path.storage.images", str(self.shared / "images"))
            + toml_line("path.storage.homes", str(self.shared / "homes")))
        node = open_node(str(admin))
        self.engine, self.factory, self.cfg = node.engine, node.factory, node.cfg
        schema.upgrade(self.engine)
        with self.factory() as s, s.begin():
            seed(s)
            # VM ids (container and cgroup names are machine-wide) far from other QVD roots on this machine
            s.execute(_text(f"SELECT setval(pg_get_serial_sequence('vms', 'id'), "
                            f"{secrets.randbelow(9000) * 100 + 900000})"))
        create_osf(self.factory, SYSTEM, self.cfg, {"name": "desktop", "memory": self.memory_mb})
        t0 = time.monotonic()
        create_di(self.factory, SYSTEM, node.paths.images, {"osf": "desktop", "disk_image": str(self.image)})
        self.say(f"DI imported into {node.paths.images} in {time.monotonic() - t0:.1f} s")
        for i in range(1, self.n_users + 1):
            login, pw = f"user{i}", secrets.token_hex(8)
            create_user(self.factory, SYSTEM, self.cfg, {"name": login, "password": pw})
            vm = create_vm(self.factory, SYSTEM, self.cfg, {"name": f"desk{i}", "user": login, "osf": "desktop"})
            self.users.append(User(login, pw, int(vm["id"]), f"desk{i}"))

    def _write_node_file(self, n: Node) -> None:
        (n.root / "etc").mkdir(parents=True, exist_ok=True)
        settings: dict[str, object] = {
            "nodename": n.name, "node.address": n.address, "database.url": self.node_url,
            "l7r.address": n.address, "l7r.port": L7R_PORT, "l7r.use_ssl": True,
            "path.storage.images": str(self.shared / "images"), "path.storage.homes": str(self.shared / "homes"),
            "vm.network.bridge": BRIDGE, "vm.network.host.address": n.desk_address, "log.level": "INFO",
            # at shutdown (the end of the test) desktops may be forced sooner than the default 60 s
            "internal.hkd.stopping.vms.timeout": 20.0,
            # The raw clients stop after nxagent's first answer: their sessions must stay attached (the VMA
            # would end them after 30 s) so that only the cluster can close their tunnels.
            "internal.nxagent.timeout.listening": 900.0,
        }
        settings.update(self.extra_settings)
        (n.root / "etc" / "node.toml").write_text(
            "# written by tests/multinode.py\n" + "".join(toml_line(k, v) for k, v in settings.items()))

    def _client_side(self) -> None:
        self.agent = ClientAgent(self)
        if self.want_xvfb:
            self.display, self.xvfb = start_xvfb(self.ns_client, self.logs / "xvfb.log")
            self.procs.append(self.xvfb)

    # --- nodes -------------------------------------------------------------------------------

    def start_node(self, n: Node, *, wait: bool = True) -> None:
        b = bin_dir()
        env = {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": str(n.root), "QVD_ROOT": str(n.root)}
        if n.hkd is None or not n.hkd.alive():
            n.hkd = spawn(f"qvd-hkd {n.name}", in_ns_with_cgroups(n.ns, [
                str(b / "qvd-hkd"), "--root", str(n.root), "--name", n.name, "--address", n.address]),
                self.logs / f"{n.name}-hkd.log", env=env)
            self.procs.append(n.hkd)
        if n.l7r is None or not n.l7r.alive():
            n.l7r = spawn(f"qvd-l7r {n.name}", ["ip", "netns", "exec", n.ns, str(b / "qvd-l7r"), "--root", str(n.root)],
                          self.logs / f"{n.name}-l7r.log", env=env)
            self.procs.append(n.l7r)
        n.killed = False
        if wait:
            self.wait_node_ready(n)

    def wait_node_ready(self, n: Node, timeout: float = 120.0) -> None:
        def ready() -> bool:
            for p in (n.hkd, n.l7r):
                if p is None or not p.alive():
                    raise ClusterError(f"{p.what if p else 'a daemon'} exited" + tail(n.logs / f"{n.name}-hkd.log")
                                       + tail(n.logs / f"{n.name}-l7r.log"))
            return self.host_state(n) == "running" and self.l7r_listening(n)

        wait_for(f"{n.name} to run (HKD running, L7R listening)", ready, timeout)
        n.host_id = self.host_id(n)
        time.sleep(1.2)  # the L7R re-reads its node's state every second: until then it answers "stopped"

    def l7r_listening(self, n: Node) -> bool:
        res = ns_run(n.ns, ["ss", "-Hltn", f"sport = :{L7R_PORT}"], check=False, timeout=10)
        return res.returncode == 0 and bool(res.stdout.strip())

    def kill_node(self, n: Node) -> None:
        """SIGKILL the node's HKD and L7R (by pid), then cut its links (veths down)."""
        for p in (n.hkd, n.l7r):
            if p is not None:
                p.send(signal.SIGKILL)
        for p in (n.hkd, n.l7r):
            if p is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(10)
        for link in ("mgmt", "uplink"):
            run(["ip", "-n", n.ns, "link", "set", link, "down"])
        n.killed = True

    def revive_node(self, n: Node) -> None:
        """Links up again and fresh daemons (the node rejoins after being declared lost)."""
        for link in ("mgmt", "uplink"):
            run(["ip", "-n", n.ns, "link", "set", link, "up"])
        self.start_node(n)

    def partition(self, n: Node) -> None:
        """Cut the node from the database only: DROP both ways inside its namespace."""
        for rule in (["OUTPUT", "-d", DB_IP], ["INPUT", "-s", DB_IP]):
            ns_run(n.ns, ["iptables", "-w", "-I", rule[0], *rule[1:], "-j", "DROP"])
        n.partitioned = True

    def heal(self, n: Node) -> None:
        for rule in (["OUTPUT", "-d", DB_IP], ["INPUT", "-s", DB_IP]):
            while ns_run(n.ns, ["iptables", "-w", "-C", rule[0], *rule[1:], "-j", "DROP"], check=False).returncode == 0:
                ns_run(n.ns, ["iptables", "-w", "-D", rule[0], *rule[1:], "-j", "DROP"])
        n.partitioned = False

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def node_by_host(self, host_id: int | None) -> Node | None:
        return next((n for n in self.nodes if n.host_id == host_id), None)

    # --- what runs where ---------------------------------------------------------------------

    def containers(self, n: Node) -> set[int]:
        """VM ids of the containers running on node ``n`` (lxc-ls inside its namespace)."""
        if not n.lxcpath.is_dir():
            return set()
        res = ns_run(n.ns, ["lxc-ls", "-P", str(n.lxcpath), "--running", "-1"], check=False, timeout=20)
        if res.returncode != 0:
            raise ClusterError(f"lxc-ls on {n.name} failed: {res.stderr.strip()}")
        return {int(m.group(1)) for m in re.finditer(r"^qvd-(\d+)$", res.stdout, re.M)}

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as c:
            return [tuple(r) for r in c.execute(_text(sql), params).all()]

    def host_state(self, n: Node) -> str:
        rows = self.query("SELECT r.state FROM host_runtimes r JOIN hosts h ON h.id = r.host_id WHERE h.name = :n",
                          n=n.name)
        return str(rows[0][0]) if rows else ""

    def host_id(self, n: Node) -> int:
        rows = self.query("SELECT id FROM hosts WHERE name = :n", n=n.name)
        if not rows:
            raise ClusterError(f"host {n.name} is not registered")
        return int(rows[0][0])

    def vm_rows(self) -> dict[int, dict[str, Any]]:
        rows = self.query("SELECT vm_id, vm_state, host_id, vm_address, user_state, last_error FROM vm_runtimes")
        return {int(r[0]): {"state": str(r[1]), "host_id": r[2], "address": r[3], "user_state": str(r[4]),
                            "last_error": r[5]} for r in rows}

    def placement(self) -> dict[str, set[int]]:
        """VM ids the database places on each node (vm_runtimes.host_id), for VMs not stopped."""
        out: dict[str, set[int]] = {n.name: set() for n in self.nodes}
        for vm_id, r in self.vm_rows().items():
            n = self.node_by_host(r["host_id"])
            if n is not None and r["state"] != "stopped":
                out[n.name].add(vm_id)
        return out

    def user_of(self, vm_id: int) -> User:
        return next(u for u in self.users if u.vm_id == vm_id)

    # --- inside desktops ---------------------------------------------------------------------

    def in_desktop(self, n: Node, vm_id: int, script: str, *args: str, timeout: float = 60) -> str:
        """Run a python3 snippet in the desktop (lxc-attach inside the node's namespace); its stdout."""
        argv = in_ns_with_cgroups(n.ns, ["lxc-attach", "-P", str(n.lxcpath), "-n", f"qvd-{vm_id}", "--clear-env",
                                         "--", "/usr/bin/python3", "-c", script, *args])
        res = run(argv, timeout=timeout, check=False)
        if res.returncode != 0:
            raise ClusterError(f"in desktop {vm_id} on {n.name}: exit status {res.returncode}: "
                               f"{(res.stderr.strip() or res.stdout.strip())[-800:]}")
        return res.stdout

    def write_marker(self, n: Node, user: User, text: str) -> None:
        """As the user, in the desktop: write ``text`` into ~/qvd-marker."""
        self.in_desktop(n, user.vm_id, _AS_USER_WRITE, user.login, text)

    def read_marker(self, n: Node, user: User) -> str:
        return self.in_desktop(n, user.vm_id, _AS_USER_READ, user.login)

    # --- clients -----------------------------------------------------------------------------

    def qvd_client(self, user: User, n: Node, log: Path) -> Proc:
        """The real qvd-client (TLS, --insecure on first use) with Debian's nxproxy on the Xvfb."""
        home = self.work / "client-home" / user.login
        home.mkdir(parents=True, exist_ok=True)
        env = {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": str(home), "DISPLAY": self.display,
               "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
        p = spawn(f"qvd-client {user.login}", ["ip", "netns", "exec", self.ns_client, str(bin_dir() / "qvd-client"),
                                               "--host", n.address, "--port", str(L7R_PORT), "--user", user.login,
                                               f"--password={user.password}", "--insecure", "--vm", str(user.vm_id),
                                               "--geometry", GEOMETRY], log, env=env)
        self.procs.append(p)
        return p

    def x_windows(self) -> str:
        res = ns_run(self.ns_client, ["xwininfo", "-root", "-children", "-display", self.display], check=False,
                     timeout=20)
        return res.stdout

    # --- diagnostics, cleanup ----------------------------------------------------------------

    def log_tails(self, n: int = 30) -> str:
        """The last ``n`` lines of every log of the cluster (daemons, guards, clients, PostgreSQL)."""
        text = ""
        files = sorted(self.logs.glob("*.log")) if self.logs.is_dir() else []
        files += sorted(self.work.glob("nodes/*/root/log/hkd-guard.log"))
        for f in files:
            text += tail(f, n)
        return text

    def dump_logs(self, n: int = 30) -> None:
        text = self.log_tails(n)
        if text:
            sys.stderr.write(f"--- cluster {self.id} logs (tails) ---{text}\n")

    def log_text(self, n: Node, what: str = "hkd") -> str:
        try:
            return (self.logs / f"{n.name}-{what}.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> list[str]:
        """Remove everything this cluster created; returns what could not be removed."""
        if self._closed:
            return []
        self._closed = True
        with _signals_deferred(self.say):
            return self._close()

    def _close(self) -> list[str]:
        problems: list[str] = []
        self.say(f"cluster {self.id}: cleaning up")
        if self.watch is not None:
            self.watch.stop()
        if self.agent is not None:
            self.agent.close()
        for p in self.procs:
            if p.what.startswith("qvd-client"):
                p.stop(10)
        # the daemons: SIGTERM to all at once (the HKDs stop their desktops), then SIGKILL
        daemons = [p for n in self.nodes for p in (n.l7r, n.hkd) if p is not None and p.alive()]
        for p in daemons:
            p.send(signal.SIGTERM)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(p.alive() for p in daemons):
            time.sleep(0.1)
        for p in daemons:
            p.stop(5, first=signal.SIGKILL)
        for n in self.nodes:
            problems += purge_namespace(n.ns, [n.lxcpath], self.say)
        for p in self.procs:
            if p is not self.pg:
                p.stop(5)
        if self.engine is not None:
            self.engine.dispose()
        if self.pg is not None:
            self.pg.stop(20, first=signal.SIGINT)  # fast shutdown
        mine = [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}{self.id}-")]
        for ns in sorted(mine, key=lambda n: n in (self.ns_db, self.ns_switch)):  # e.g. a node half created
            problems += purge_namespace(ns, None, self.say)
        left_ns = [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}{self.id}-")]
        if left_ns:
            problems.append(f"namespaces left: {left_ns}")
        for u in self.users:
            for ctl in ("memory", "pids"):
                cg = Path(f"/sys/fs/cgroup/{ctl}/lxc.payload.qvd-{u.vm_id}")
                if cg.exists():
                    problems.append(f"cgroup {cg} left")
        if self.keep_workdir and self.work.exists():
            self.say(f"work dir kept: {self.work}")
            (self.work / "owner").unlink(missing_ok=True)
            (self.work / "kept").write_text("logs kept for reading; remove this directory by hand\n")
        elif self.work.exists():
            problems += remove_workdir(self.work)
        for problem in problems:
            self.say(f"cleanup problem: {problem}")
        self.say(f"cluster {self.id}: cleanup {'incomplete' if problems else 'complete'}")
        return problems


def _text(sql: str) -> Any:
    from sqlalchemy import text

    return text(sql)


def toml_line(key: str, value: object) -> str:
    return f"{json.dumps(key)} = {json.dumps(value)}\n"


def wait_for(what: str, pred: Callable[[], Any], timeout: float, poll: float = 0.3) -> Any:
    """Poll ``pred`` until truthy (returned); ClusterError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


@contextlib.contextmanager
def _signals_deferred(say: Callable[[str], None]) -> Iterator[None]:
    """While cleaning up, Ctrl-C/SIGTERM only print a note (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def note(signum: int, _frame: object) -> None:
        say(f"{signal.Signals(signum).name} ignored: cleaning up, please wait")

    for s in old:
        signal.signal(s, note)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def start_xvfb(ns: str, log: Path) -> tuple[str, Proc]:
    """Xvfb on a free display, inside namespace ``ns`` (its socket file is in /tmp/.X11-unix)."""
    for d in range(400, 500):
        if Path(f"/tmp/.X{d}-lock").exists() or Path(f"/tmp/.X11-unix/X{d}").exists():
            continue
        p = spawn(f"Xvfb :{d}", ["ip", "netns", "exec", ns, "Xvfb", f":{d}", "-nolisten", "tcp", "-screen", "0",
                                 f"{GEOMETRY}x24", "-noreset"], log)
        deadline = time.monotonic() + 15
        while p.alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if Path(f"/tmp/.X11-unix/X{d}").exists() and int(Path(f"/tmp/.X{d}-lock").read_text()) == p.pid:
                    return f":{d}", p
            time.sleep(0.05)
        p.stop(5)  # lost the display to somebody else: next one
    raise ClusterError("no free X display from :400")


_AS_USER = """
import os, pwd, sys
p = pwd.getpwnam(sys.argv[1])
os.setgroups([]); os.setgid(p.pw_gid); os.setuid(p.pw_uid)
path = os.path.join(p.pw_dir, "qvd-marker")
"""
_AS_USER_WRITE = _AS_USER + "open(path, 'w').write(sys.argv[2]); print(path)\n"
_AS_USER_READ = _AS_USER + "print(open(path).read(), end='')\n"


# --- the client agent ---------------------------------------------------------------------------


@dataclass
class Session:
    """What the agent reported for one connect request."""

    key: str
    user: str
    node: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] == kind), None)

    @property
    def done(self) -> bool:
        return any(e["event"] in ("error", "closed", "finished") for e in self.events)


class ClientAgent:
    """One process in the client namespace that connects users (QVD/1.0 over TLS) on request.

    ``connect`` returns a key at once; the agent retries until ``retry_for`` seconds passed, reports
    ``101`` and then ``nx`` (the first bytes nxagent sent through the tunnel), and with ``hold`` keeps the
    tunnel open until the server closes it (``closed``).
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.sessions: dict[str, Session] = {}
        self._cond = threading.Condition()
        self._seq = 0
        env = {"PATH": PATH_ENV, "LANG": "C.UTF-8", "HOME": str(cluster.work), "PYTHONPATH": str(REPO)}
        self.proc = spawn("client agent", ["ip", "netns", "exec", cluster.ns_client, sys.executable, "-m",
                                           "tests.multinode", "agent"], cluster.logs / "client-agent.log", env=env,
                          cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        cluster.procs.append(self.proc)
        self._reader = threading.Thread(target=self._read, name="client-agent-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        out = self.proc.popen.stdout
        assert out is not None
        for raw in out:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            ev["at"] = time.monotonic()
            with self._cond:
                s = self.sessions.get(ev.get("key", ""))
                if s is not None:
                    s.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _send(self, msg: dict[str, Any]) -> None:
        inp = self.proc.popen.stdin
        if inp is None or not self.proc.alive():
            raise ClusterError("the client agent is not running" + tail(self.cluster.logs / "client-agent.log"))
        inp.write((json.dumps(msg) + "\n").encode())
        inp.flush()

    def connect(self, user: User, n: Node, *, hold: bool = False, retry_for: float = 0.0,
                timeout: float = 240.0) -> Session:
        self._seq += 1
        key = f"{user.login}-{self._seq}"
        s = Session(key, user.login, n.name)
        with self._cond:
            self.sessions[key] = s
        self._send({"op": "connect", "key": key, "host": n.address, "port": L7R_PORT, "user": user.login,
                    "password": user.password, "vm": user.vm_id, "hold": hold, "retry_for": retry_for,
                    "timeout": timeout})
        return s

    def wait(self, s: Session, kinds: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """The first event of one of ``kinds``; ClusterError on 'error' or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in s.events:
                    if e["event"] in kinds:
                        return e
                    if e["event"] == "error" and "error" not in kinds:
                        raise ClusterError(f"{s.user} through {s.node}: {e.get('message')}"
                                           + self._attempts(s))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterError(f"{s.user} through {s.node}: no {'/'.join(kinds)} after {timeout:g} s"
                                       + self._attempts(s))
                if not self.proc.alive():
                    raise ClusterError("the client agent died" + tail(self.cluster.logs / "client-agent.log"))
                self._cond.wait(min(left, 1.0))

    @staticmethod
    def _attempts(s: Session) -> str:
        retries = [e.get("message", "") for e in s.events if e["event"] == "retry"]
        return f" (after {len(retries)} failed attempt(s), last: {retries[-1]})" if retries else ""

    def disconnect(self, s: Session) -> None:
        self._send({"op": "close", "key": s.key})

    def close(self) -> None:
        with contextlib.suppress(ClusterError, OSError):
            self._send({"op": "quit"})
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.popen.wait(5)
        self.proc.stop(5)


async def _agent_session(msg: dict[str, Any], emit: Callable[..., None]) -> None:
    from qvd.client.protocol import ClientError, L7rConnection, basic_auth

    key = msg["key"]
    t0 = time.monotonic()
    retry_until = t0 + float(msg.get("retry_for", 0))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificates, inside its namespaces
    params = {"qvd.client.os": "linux", "qvd.client.link": "adsl", "qvd.client.geometry": GEOMETRY,
              "qvd.client.fullscreen": "", "qvd.client.keyboard": "pc105/us"}
    attempt = 0
    while True:
        attempt += 1
        conn = None
        try:
            conn = await L7rConnection.open(msg["host"], int(msg["port"]), basic_auth(msg["user"], msg["password"]),
                                            ctx, timeout=10)
            await asyncio.wait_for(conn.list_of_vm(), 30)
            sw = await asyncio.wait_for(conn.connect_to_vm(int(msg["vm"]), params), float(msg["timeout"]))
            emit(key, "101", attempt=attempt, seconds=round(time.monotonic() - t0, 3), infos=list(sw.infos))
            # nxagent answers once the client's proxy spoke: what Debian's nxproxy -S sends first
            conn.writer.write(NX_HELLO)
            await conn.writer.drain()
            data = sw.trailing
            while not data:
                chunk = await asyncio.wait_for(conn.reader.read(65536), 30)
                if not chunk:
                    raise ClientError("the tunnel closed before nxagent sent anything")
                data += chunk
            emit(key, "nx", attempt=attempt, seconds=round(time.monotonic() - t0, 3), bytes=len(data),
                 head=data[:40].decode("latin-1"))
            break
        except (ClientError, OSError, TimeoutError, ssl.SSLError) as e:
            if conn is not None:
                await conn.close()
            why = getattr(e, "message", None) or str(e) or type(e).__name__
            if time.monotonic() < retry_until:
                emit(key, "retry", attempt=attempt, message=why)
                await asyncio.sleep(1.0)
                continue
            emit(key, "error", attempt=attempt, message=why)
            return
    try:
        if msg.get("hold"):
            with contextlib.suppress(OSError, ssl.SSLError):
                while await conn.reader.read(65536):
                    pass
            emit(key, "closed", seconds=round(time.monotonic() - t0, 3))
        else:
            emit(key, "finished")
    finally:
        await conn.close()


async def _agent() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: dict[str, asyncio.Task[None]] = {}

    def emit(key: str, event: str, **kw: Any) -> None:
        sys.stdout.write(json.dumps({"key": key, "event": event, **kw}) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        msg = json.loads(line)
        if msg["op"] == "connect":
            tasks[msg["key"]] = asyncio.create_task(_agent_session(msg, emit))
        elif msg["op"] == "close" and msg["key"] in tasks:
            tasks[msg["key"]].cancel()
        elif msg["op"] == "quit":
            break
    for t in tasks.values():
        t.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


def agent_main() -> None:
    """``python -m tests.multinode agent``: the client agent (JSON lines on stdin/stdout)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops it
    asyncio.run(_agent())


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        agent_main()
    else:
        print("usage: python -m tests.multinode agent", file=sys.stderr)
        sys.exit(2)
