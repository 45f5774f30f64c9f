"""The L7R's tunnel: bulk throughput against a plain socat relay, and memory per idle open tunnel.

Run as root (or any user: nothing here needs root) from the repository root::

    .venv/bin/python -m bench.tunnel [--mib 256] [--repeat 3] [--tunnels 1000] [--skip-memory]
                                     [--json [FILE]] [--keep-workdir]

Set-up: a temporary node root (SQLite) with one user, ``--tunnels`` + a few VMs created in the database,
and a real ``qvd-l7r`` process.  The node daemon is played by this script: every VM row is set running at
127.0.0.1 with the ports of a stand-in desktop, a separate process (``--serve-agent``) that answers the
VMA's ``x_start``/``x_state`` like an agent whose X session listens, and plays nxagent with a sink/source:
after ``U`` + 8-byte length it swallows that many bytes and answers ``K``; after ``D`` + length it sends
that many bytes.  Nothing but loopback.

1. Throughput, per direction (client -> desktop "up", desktop -> client "down"), ``--mib`` MiB per
   transfer, median of ``--repeat``; every path in the same run, against the same stand-in desktop:
   * ``direct``: the client straight to the stand-in (what client + desktop can do at all);
   * ``socat``: ``socat -b 65536 TCP-LISTEN:p,bind=127.0.0.1,fork,reuseaddr TCP:127.0.0.1:<desktop>``;
   * ``l7r-http``: through qvd-l7r with ``l7r.use_ssl = false``: ``connect_to_vm``, ``101``, then the bytes;
   * ``l7r-tls``: the same with TLS (the client decrypts/encrypts too, in this process).
   The clock runs from the first byte of the transfer to its end (the ``101`` exchange is not in it).
   CPU seconds of the relay process during the transfers are reported per GiB.
2. Memory per idle tunnel, once with plain HTTP and once with TLS (a fresh qvd-l7r each time): RSS and
   PSS of the qvd-l7r process after 20 warm-up tunnels were opened and closed, then with ``--tunnels``
   idle tunnels open (``connect_to_vm`` -> ``101``, nothing sent), divided by their number; and again once
   they are all closed.  The client side authenticates with a multi-use bearer token (one Basic login
   first), so that ``--tunnels`` argon2 password checks do not blur the L7R's memory.

Everything started is stopped by pid at the end, also on error and on SIGINT/SIGTERM/SIGHUP, and the
temporary directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/tunnel.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    MIB,
    PATH_ENV,
    BenchError,
    Janitor,
    ProcRef,
    TempNode,
    add_common_args,
    basic_auth,
    connect_request,
    fd_count,
    fmt_ratio,
    free_port,
    machine_line,
    median,
    port_free,
    pss_kib,
    raise_nofile,
    ratio,
    read_until_101,
    rss_kib,
    run_bench,
    say,
    tail,
    wait_until,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUF = 1024 * 1024
WARM_UP_TUNNELS = 20
OPEN_CONCURRENCY = 16
SETTLE = 3.0


# --- the stand-in desktop (a separate process) -------------------------------------------------------


def serve_agent(agent_port: int, vma_port: int, ready_file: Path) -> int:
    """Sink/source 'nxagent' on ``agent_port`` and a SimpleRPC 'VMA' on ``vma_port`` (loopback)."""
    payload = bytes(BUF)

    def conn_thread(c: socket.socket) -> None:
        buf = bytearray(BUF)
        view = memoryview(buf)
        try:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = b""
                while len(head) < 9:
                    chunk = c.recv(9 - len(head))
                    if not chunk:
                        return
                    head += chunk
                op, n = head[:1], struct.unpack(">Q", head[1:])[0]
                if op == b"U":
                    while n > 0:
                        got = c.recv_into(view, min(n, BUF))
                        if not got:
                            return
                        n -= got
                    c.sendall(b"K")
                elif op == b"D":
                    mv = memoryview(payload)
                    while n > 0:
                        k = min(n, BUF)
                        c.sendall(mv[:k])
                        n -= k
                else:
                    return
        except OSError:
            return
        finally:
            c.close()

    def accept_loop(srv: socket.socket) -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=conn_thread, args=(c,), daemon=True).start()

    class Vma(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        answers = {"ping": b'"pong"\r\n', "x_state": b'"listening"\r\n', "x_start": b'"starting"\r\n'}

        def do_GET(self) -> None:
            method = self.path.split("?", 1)[0].removeprefix("/vma/")
            body = self.answers.get(method)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json-simplerpc")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", agent_port))
    srv.listen(4096)
    http = ThreadingHTTPServer(("127.0.0.1", vma_port), Vma)
    http.daemon_threads = True
    http.request_queue_size = 1024
    threading.Thread(target=accept_loop, args=(srv,), daemon=True).start()
    ready_file.write_text("ready\n")
    http.serve_forever()
    return 0


# --- clients ---------------------------------------------------------------------------------------


def cpu_of(pid: int, *, with_children: bool = False) -> float:
    """CPU seconds of a live process; with_children adds its reaped children (socat's forks)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    f = raw[raw.rfind(b")") + 2:].split()
    total = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if with_children else 0)
    return total / CLK_TCK


def memory_of(pid: int) -> dict[str, int]:
    """RSS and PSS (KiB) and open file descriptors of a live process."""
    rss, pss = rss_kib(pid), pss_kib(pid)
    if rss is None or pss is None:
        raise BenchError(f"cannot read the memory of process {pid} (did it exit?)")
    return {"rss_kib": rss, "pss_kib": pss, "fds": fd_count(pid)}


@dataclass
class Route:
    name: str
    port: int
    l7r: bool = False
    tls: bool = False
    relay_pid: int | None = None
    relay_children: bool = False


class Bench:
    def __init__(self, args: argparse.Namespace, janitor: Janitor, work: Path) -> None:
        self.args = args
        self.j = janitor
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self.login = "tunnelbench"
        self.password = secrets.token_hex(8)
        self.token = ""
        self.vm_ids: list[int] = []
        self.next_vm = 0
        self.node: TempNode | None = None

    # the stand-in desktop
    def start_agent(self) -> None:
        self.agent_port, self.vma_port = free_port(), free_port()
        ready = self.work / "agent.ready"
        self.agent = self.j.spawn([sys.executable, "-m", "bench.tunnel", "--serve-agent", str(self.agent_port),
                                   str(self.vma_port), str(ready)],
                                  env={"PATH": PATH_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                                  log=self.logs / "agent.log", what="stand-in desktop (sink/source + VMA)")

        def up() -> bool:
            if not self.agent.alive():
                raise BenchError("the stand-in desktop exited" + tail(self.logs / "agent.log"))
            return ready.exists()

        wait_until("the stand-in desktop", up, 20)

    def make_node(self) -> TempNode:
        node = TempNode(self.j, self.work / "root", {"nodename": "bench-tunnel", "node.address": "127.0.0.1",
                                                      "l7r.use_ssl": False})
        uid = node.add_user(self.login, self.password)
        osf = node.add_osf("tunnel")
        n = self.args.tunnels + WARM_UP_TUNNELS + 2 * (self.args.repeat + 1) + 10
        say(f"creating {n} VM rows")
        self.vm_ids = node.add_vms_bulk("t", n, uid, osf)
        self.node = node
        return node

    def start_l7r(self, tls: bool) -> ProcRef:
        assert self.node is not None
        ref = self.node.start_l7r(tls=tls, log=self.logs / f"l7r-{'tls' if tls else 'http'}.log")
        self.next_vm = 0  # a fresh L7R: every VM is free again (it frees what an earlier L7R process held)
        self.node.set_host_running()
        self.node.set_vm_running(self.vm_ids, "127.0.0.1", self.vma_port, self.agent_port)
        self.node.wait_serving()
        if not self.token:
            self.token = self.get_token()
        return ref

    def get_token(self) -> str:
        """One Basic login: a multi-use bearer token for every tunnel after it."""
        assert self.node is not None
        sock = self.raw_connect(self.node.l7r_port, self.node.l7r_tls)
        try:
            sock.sendall((f"GET /qvd/create_auth_token?multi_use=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: {basic_auth(self.login, self.password)}\r\nConnection: close\r\n\r\n")
                         .encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"create_auth_token failed: {data[:300]!r}")
        return "Bearer " + str(json.loads(body)["auth_token"]).strip()

    def take_vm(self) -> int:
        if self.next_vm >= len(self.vm_ids):
            raise BenchError("out of VM rows (a bug of this script)")
        vm = self.vm_ids[self.next_vm]
        self.next_vm += 1
        return vm

    @staticmethod
    def raw_connect(port: int, tls: bool) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not tls:
            return raw
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def open_data_connection(self, path: Route) -> socket.socket:
        sock = self.raw_connect(path.port, path.tls)
        if path.l7r:
            sock.sendall(connect_request(self.take_vm(), self.token, {"qvd.client.link": "lan"}))
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise BenchError(f"the L7R closed the connection: {buf[:300]!r}")
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                status = head.split(b" ", 2)[1]
                if status == b"101":
                    break
                if status != b"102":
                    raise BenchError(f"connect_to_vm failed: {head[:300]!r}")
            if buf:
                raise BenchError("unexpected bytes after 101")
        return sock

    # --- throughput ----------------------------------------------------------------------------

    def transfer(self, path: Route, op: bytes, n: int) -> tuple[float, float]:
        """Seconds for one transfer of ``n`` bytes, and CPU seconds of the relay process meanwhile."""
        sock = self.open_data_connection(path)
        try:
            cpu0 = cpu_of(path.relay_pid, with_children=path.relay_children) if path.relay_pid else 0.0
            t0 = time.perf_counter()
            sock.sendall(op + struct.pack(">Q", n))
            if op == b"U":
                mv = memoryview(bytes(BUF))
                left = n
                while left > 0:
                    k = min(left, BUF)
                    sock.sendall(mv[:k])
                    left -= k
                if sock.recv(1) != b"K":
                    raise BenchError(f"{path.name}: no acknowledgement after the upload")
            else:
                buf = bytearray(BUF)
                view = memoryview(buf)
                left = n
                while left > 0:
                    got = sock.recv_into(view, min(left, BUF))
                    if not got:
                        raise BenchError(f"{path.name}: connection closed with {left} bytes to go")
                    left -= got
            seconds = time.perf_counter() - t0
        finally:
            sock.close()
        if path.relay_children:
            time.sleep(0.2)  # socat's fork must exit and be reaped for its CPU time to count
        cpu1 = cpu_of(path.relay_pid, with_children=path.relay_children) if path.relay_pid else 0.0
        return seconds, cpu1 - cpu0

    def throughput_phase(self, routes: list[Route], samples: dict[str, dict[str, list[tuple[float, float]]]],
                         phase: str) -> None:
        """Every route, both directions, ``--repeat`` rounds interleaved (load from elsewhere on the machine
        then hits every route alike); one small unmeasured transfer per route and direction first."""
        n = self.args.mib * MIB
        for route in routes:
            for op in (b"U", b"D"):
                self.transfer(route, op, min(n, 16 * MIB))
        for _ in range(self.args.repeat):
            for route in routes:
                for op, direction in ((b"U", "up"), (b"D", "down")):
                    secs, cpu = self.transfer(route, op, n)
                    samples.setdefault(f"{route.name}@{phase}", {}).setdefault(direction, []).append(
                        (n / MIB / secs, cpu / (n / (1024 * MIB))))
        for route in routes:
            got = samples[f"{route.name}@{phase}"]
            say(f"  {route.name:<9} up {median([r for r, _ in got['up']]):5.0f} MiB/s, down "
                f"{median([r for r, _ in got['down']]):5.0f} MiB/s")

    def start_socat(self) -> Route:
        port = free_port()
        ref = self.j.spawn(["socat", "-b", "65536", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                            f"TCP:127.0.0.1:{self.agent_port}"], env={"PATH": PATH_ENV}, log=self.logs / "socat.log",
                           what="socat relay")
        wait_until("socat to listen", lambda: not port_free(port) or not ref.alive(), 10)
        if not ref.alive():
            raise BenchError("socat exited" + tail(self.logs / "socat.log"))
        return Route("socat", port, relay_pid=ref.pid, relay_children=True)

    # --- memory per idle tunnel ---------------------------------------------------------------

    async def open_tunnels(self, count: int, tls: bool) -> tuple[list[asyncio.StreamWriter], float]:
        assert self.node is not None
        port = self.node.l7r_port
        ctx = self.node.client_context() if tls else None
        sem = asyncio.Semaphore(OPEN_CONCURRENCY)
        writers: list[asyncio.StreamWriter] = []
        vms = [self.take_vm() for _ in range(count)]

        async def one(vm: int) -> None:
            async with sem:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                               server_hostname="127.0.0.1" if ctx else None)
                writers.append(writer)
                writer.write(connect_request(vm, self.token, {"qvd.client.link": "adsl"}))
                await writer.drain()
                await asyncio.wait_for(read_until_101(reader), 60)

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(vm) for vm in vms), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close_tunnels(writers)
            raise BenchError(f"{len(errors)} of {count} tunnels failed to open; first: "
                             f"{type(errors[0]).__name__}: {errors[0]}")
        return writers, time.monotonic() - t0

    @staticmethod
    async def close_tunnels(writers: list[asyncio.StreamWriter]) -> None:
        for w in writers:
            w.transport.abort()
        await asyncio.sleep(0)

    def memory(self, tls: bool) -> dict[str, Any]:
        assert self.node is not None
        ref = self.start_l7r(tls)
        pid = ref.pid
        log = ref.log or Path("/nonexistent")

        def closed_tunnels() -> int:
            # qvd-l7r logs "vm N: tunnel of <user> closed after ..." once a tunnel has been given back.
            return sum(1 for ln in log.read_text(errors="replace").splitlines() if " closed after " in ln)

        c0 = closed_tunnels()  # the throughput phase appended to the same log
        loop = asyncio.new_event_loop()
        try:
            say(f"  warm-up: {WARM_UP_TUNNELS} tunnels opened and closed")
            writers, _ = loop.run_until_complete(self.open_tunnels(WARM_UP_TUNNELS, tls))
            loop.run_until_complete(self.close_tunnels(writers))
            wait_until("the warm-up tunnels to close", lambda: closed_tunnels() - c0 >= WARM_UP_TUNNELS, 60, poll=0.2)
            time.sleep(SETTLE)
            before = memory_of(pid)
            say(f"  opening {self.args.tunnels} idle tunnels")
            writers, took = loop.run_until_complete(self.open_tunnels(self.args.tunnels, tls))
            time.sleep(SETTLE)
            if not ref.alive():
                raise BenchError("qvd-l7r died with the tunnels open" + tail(log))
            during = memory_of(pid)
            say(f"  {self.args.tunnels} tunnels open after {took:.1f} s; closing them")
            loop.run_until_complete(self.close_tunnels(writers))
            wait_until("the tunnels to close", lambda: closed_tunnels() - c0 >= WARM_UP_TUNNELS + self.args.tunnels,
                       120, poll=0.2)
            time.sleep(SETTLE)
            after = memory_of(pid)
        finally:
            loop.close()
            self.node.stop_l7r()
        n = self.args.tunnels
        per = {k: (during[k] - before[k]) / n for k in ("rss_kib", "pss_kib")}
        return {"tls": tls, "tunnels": n, "open_seconds": took, "opened_per_s": n / took, "before": before,
                "with_tunnels": during, "after_close": after, "per_tunnel_kib": per,
                "fds_per_tunnel": (during["fds"] - before["fds"]) / n}


def body(args: argparse.Namespace, janitor: Janitor, work: Path) -> dict[str, Any]:
    if shutil.which("socat", path=PATH_ENV) is None:
        raise BenchError("socat is not installed (apt-get install socat)")
    limit = raise_nofile(3 * args.tunnels + 1024)
    if limit < 2 * args.tunnels + 256:
        raise BenchError(f"open files limit {limit} is too low for {args.tunnels} tunnels")
    b = Bench(args, janitor, work)
    b.start_agent()
    node = b.make_node()
    result: dict[str, Any] = {"machine": machine_line(), "mib": args.mib, "repeat": args.repeat,
                              "open_files_limit": limit}

    say(f"throughput: {args.mib} MiB per transfer, {args.repeat} rounds, each direction")
    direct, socat = Route("direct", b.agent_port), b.start_socat()
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for tls in (False, True):
        phase = "tls" if tls else "http"
        ref = b.start_l7r(tls)
        l7r = Route(f"l7r-{phase}", node.l7r_port, l7r=True, tls=tls, relay_pid=ref.pid)
        say(f"phase {phase}: direct, socat and {l7r.name}, interleaved")
        b.throughput_phase([direct, socat, l7r], samples, phase)
        node.stop_l7r()

    def summary(name: str, phases: tuple[str, ...], relay: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"path": name}
        for d in ("up", "down"):
            got = [s for ph in phases for s in samples.get(f"{name}@{ph}", {}).get(d, [])]
            out[d] = {"mib_s": median([r for r, _ in got]), "runs_mib_s": [round(r, 1) for r, _ in got],
                      "relay_cpu_s_per_gib": median([c for _, c in got]) if relay else None}
        return out

    result["throughput"] = [summary("direct", ("http", "tls"), False), summary("socat", ("http", "tls"), True),
                            summary("l7r-http", ("http",), True), summary("l7r-tls", ("tls",), True)]

    def same_phase(phase: str, d: str) -> float | None:
        ours = median([r for r, _ in samples[f"l7r-{phase}@{phase}"][d]])
        theirs = median([r for r, _ in samples[f"socat@{phase}"][d]])
        return ratio(ours, theirs)

    result["throughput_ratios"] = {f"l7r-{ph} / socat ({d})": same_phase(ph, d)
                                   for ph in ("http", "tls") for d in ("up", "down")}

    if not args.skip_memory:
        mem = []
        for tls in (False, True):
            say(f"memory: {args.tunnels} idle tunnels, {'TLS' if tls else 'plain HTTP'}")
            mem.append(b.memory(tls))
        result["memory"] = mem
        if len(mem) == 2:
            result["memory_ratio_tls_over_http_pss"] = ratio(mem[1]["per_tunnel_kib"].get("pss_kib"),
                                                             mem[0]["per_tunnel_kib"].get("pss_kib"))
    return result


def report(r: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    add("QVD L7R tunnel benchmark")
    add(f"machine: {r['machine']}")
    add("")
    add(f"Bulk throughput, {r['mib']} MiB per transfer, median of {r['repeat']} rounds (direct and socat: of "
        f"{2 * r['repeat']}, they ran in both phases) in MiB/s; CPU s of the relay process per GiB moved")
    add(f"  {'path':<10} {'up MiB/s':>9} {'down MiB/s':>11}   {'CPU s/GiB up':>12} {'down':>6}")
    for t in r["throughput"]:
        def cpu(d: dict[str, Any]) -> str:
            return "-" if d["relay_cpu_s_per_gib"] is None else f"{d['relay_cpu_s_per_gib']:.2f}"

        add(f"  {t['path']:<10} {t['up']['mib_s']:9.0f} {t['down']['mib_s']:11.0f}   {cpu(t['up']):>12} "
            f"{cpu(t['down']):>6}")
    add("  (direct = no relay; socat -b 65536 with fork; l7r-* = qvd-l7r after connect_to_vm/101, TLS decrypted "
        "and encrypted by the client in this process)")
    add("  ratios (against socat measured in the same phase, interleaved):")
    for k, v in r["throughput_ratios"].items():
        add(f"    {k:<28} {fmt_ratio(v)}")
    if "memory" in r:
        add("")
        add("Memory of the qvd-l7r process per idle open tunnel (after 20 warm-up tunnels; KiB)")
        add(f"  {'mode':<6} {'tunnels':>7} {'RSS before':>10} {'RSS with':>10} {'PSS before':>10} {'PSS with':>10} "
            f"{'RSS/tunnel':>10} {'PSS/tunnel':>10} {'fds/tunnel':>10} {'RSS after close':>15} {'opened/s':>8}")
        for m in r["memory"]:
            b, d, a, per = m["before"], m["with_tunnels"], m["after_close"], m["per_tunnel_kib"]
            add(f"  {'TLS' if m['tls'] else 'HTTP':<6} {m['tunnels']:>7} {b['rss_kib']:>10} {d['rss_kib']:>10} "
                f"{b['pss_kib']:>10} {d['pss_kib']:>10} {per.get('rss_kib', 0):>10.1f} {per.get('pss_kib', 0):>10.1f} "
                f"{m['fds_per_tunnel']:>10.2f} {a['rss_kib']:>15} {m['opened_per_s']:>8.0f}")
        if r.get("memory_ratio_tls_over_http_pss") is not None:
            add(f"  ratio TLS / HTTP (PSS per tunnel): {fmt_ratio(r['memory_ratio_tls_over_http_pss'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.tunnel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="MiB per transfer (default 256)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of transfers per path and direction; the median counts (default 3)")
    p.add_argument("--tunnels", type=int, default=1000, help="idle tunnels for the memory figure (default 1000)")
    p.add_argument("--skip-memory", action="store_true", help="only the throughput part")
    p.add_argument("--serve-agent", nargs=3, metavar=("AGENT_PORT", "VMA_PORT", "READY_FILE"),
                   help=argparse.SUPPRESS)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.serve_agent is None and (not 1 <= args.mib <= 65536 or not 1 <= args.repeat <= 50
                                     or not 1 <= args.tunnels <= 5000):
        p.error("--mib 1-65536, --repeat 1-50, --tunnels 1-5000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_agent:
        raise_nofile(16384)
        a, v, ready = args.serve_agent
        with contextlib.suppress(KeyboardInterrupt):
            return serve_agent(int(a), int(v), Path(ready))
        return 0
    return run_bench("tunnel", args, lambda j, w: body(args, j, w), report)


if __name__ == "__main__":
    sys.exit(main())
