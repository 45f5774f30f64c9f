"""Failover time of a QVD cluster: from a node's death to every user of its desktops working again.

Run as root from the repository root::

    .venv/bin/python -m bench.failover [--runs 3] [--users 6] [--nodes 3] [--set KEY=VALUE ...]
                                       [--json [FILE]] [--keep-workdir]

Set-up (``tests/multinode.py``, the cluster the tests use): ``--nodes`` nodes in network namespaces of
their own, each with the real ``qvd-hkd`` (LXC desktops from the real minimal image) and ``qvd-l7r``
(TLS), one throwaway PostgreSQL, a flat desktop network and shared image/home directories; ``--users``
users with one VM each, created through ``qvd.services``.  Node files use the defaults (detection:
``internal.hkd.cluster.node.timeout`` = 10 s, self-fencing ``internal.hkd.agent.ticker.timeout`` = 6 s),
except what ``--set`` gives.  Users connect with a raw QVD/1.0 client (``connect_to_vm`` -> ``101``, then
the NX hello and nxagent's answer), all from one process in a client namespace.

Each run:

1. every user connects through the L7Rs in turn (round robin) until all have a session;
2. the node running the most desktops dies: SIGKILL of its ``qvd-hkd`` and ``qvd-l7r`` (by pid), then
   its links go down.  At once, each of its users starts reconnecting through another node's L7R,
   retrying every second (what a person clicking "reconnect" does);
3. measured from the kill: the node declared ``lost`` (database, polled every 0.1 s), its containers
   gone from its own container list (its fence guard), and each affected user's ``101`` + NX bytes
   from a desktop started on a surviving node; the run's figure is the last user's;
4. the node is brought back (links up, fresh daemons) and rejoins before the next run.

Reported: each run, the median, and the median against ``internal.hkd.cluster.node.timeout`` (a ratio
near 1 means the detection is the whole cost; the rest is the restart of the desktops elsewhere).
A poller lists the running containers of every node twice a second all along; any VM seen on two
nodes at once is reported (it must never happen).

Everything (namespaces, processes by pid, containers, PostgreSQL, the work dir) is removed at the end,
also on error and on SIGINT/SIGTERM/SIGHUP.  Traffic stays inside the namespaces created here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/failover.py): make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # tests.multinode

from bench._common import (  # noqa: E402
    BenchError,
    Janitor,
    add_common_args,
    fmt_ratio,
    machine_line,
    median,
    ratio,
    run_bench,
    say,
)

IMAGE_CACHE = Path("/var/cache/qvd/images")
CONNECT_TIMEOUT = 300.0
RECOVERY_TIMEOUT = 300.0


def parse_sets(items: list[str]) -> dict[str, object]:
    from qvd.core.config import parse_value
    from qvd.core.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise BenchError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[k.strip()] = parse_value(k.strip(), v.strip())
        except ConfigError as e:
            raise BenchError(f"--set {item!r}: {e}") from None
    return out


def connect_all(c: Any, users: list[Any], nodes: list[Any], retry_for: float = 0.0) -> dict[str, Any]:
    sessions = {u.login: c.agent.connect(u, nodes[i % len(nodes)], hold=True, retry_for=retry_for,
                                         timeout=CONNECT_TIMEOUT) for i, u in enumerate(users)}
    for s in sessions.values():
        c.agent.wait(s, ("nx",), CONNECT_TIMEOUT + retry_for + 60)
    return sessions


def one_run(c: Any, index: int) -> dict[str, Any]:
    from tests.multinode import ClusterError

    placed = c.placement()
    victim = max(c.nodes, key=lambda n: (len(placed[n.name]), -n.index))
    survivors = [n for n in c.nodes if n is not victim]
    affected = [c.user_of(vm) for vm in sorted(placed[victim.name])]
    if not affected:
        raise BenchError(f"run {index}: no node runs a desktop ({placed})")
    say(f"run {index}: killing {victim.name}, which runs the desktops of {', '.join(u.login for u in affected)}")
    t0 = time.monotonic()
    c.kill_node(victim)
    sessions = {u.login: c.agent.connect(u, survivors[i % len(survivors)], hold=True, retry_for=RECOVERY_TIMEOUT,
                                         timeout=CONNECT_TIMEOUT) for i, u in enumerate(affected)}
    lost_at = gone_at = None
    back: dict[str, float] = {}
    attempts: dict[str, int] = {}
    deadline = t0 + RECOVERY_TIMEOUT + 60
    while len(back) < len(affected) or lost_at is None or gone_at is None:
        now = time.monotonic()
        if now > deadline:
            raise BenchError(f"run {index}: not recovered after {RECOVERY_TIMEOUT:g} s: lost {lost_at}, containers "
                             f"gone {gone_at}, users back {sorted(back)}")
        if lost_at is None and c.host_state(victim) == "lost":
            lost_at = now - t0
        if gone_at is None and not c.containers(victim):
            gone_at = now - t0
        for login, s in sessions.items():
            if login in back:
                continue
            nx = s.last("nx")
            if nx is not None:
                back[login] = nx["at"] - t0
                attempts[login] = int(nx["attempt"])
            elif s.last("error") is not None:
                raise BenchError(f"run {index}: {login} could not reconnect: {s.last('error')}")
        time.sleep(0.1)
    for u in affected:
        row = c.vm_rows()[u.vm_id]
        n = c.node_by_host(row["host_id"])
        if n is None or n is victim or row["state"] != "running":
            raise BenchError(f"run {index}: {u.login}'s VM is not running on a survivor: {row}")
    total = max(back.values())
    say(f"run {index}: lost after {lost_at:.2f} s, containers gone after {gone_at:.2f} s, all {len(affected)} "
        f"user(s) back after {total:.2f} s")
    say(f"run {index}: bringing {victim.name} back")
    try:
        c.revive_node(victim)
    except ClusterError as e:
        raise BenchError(f"run {index}: {victim.name} did not rejoin: {e}") from None
    return {"victim": victim.name, "users": len(affected), "seconds": round(total, 3),
            "lost_s": round(lost_at, 3), "containers_gone_s": round(gone_at, 3),
            "per_user_s": {k: round(v, 3) for k, v in sorted(back.items())}, "attempts": attempts}


def body(args: argparse.Namespace, janitor: Janitor, work: Path) -> dict[str, Any]:
    from tests.multinode import Cluster, ClusterError, missing_requirements

    from qvd.images.build import build_image

    missing = missing_requirements()
    if missing:
        raise BenchError(f"a cluster on this machine needs {', '.join(missing)}")
    settings = parse_sets(args.set)
    say("desktop image: build_image('minimal') (a cache hit or a re-pack)")
    src = build_image("minimal", cache_dir=IMAGE_CACHE, progress=lambda _line: None)
    image = work / src.name
    shutil.copyfile(src, image)  # other builds prune the cache while we run
    c = Cluster(image, nodes=args.nodes, users=args.users, settings=settings, say=say, keep_workdir=args.keep_workdir,
                xvfb=False)
    janitor.push(f"remove cluster {c.id}", lambda: _close(c))
    try:
        c.start()
        nodes_cfg = c.cfg.overlay(settings, source="node file")  # what the node files say (--set)
        detect = nodes_cfg.get_float("internal.hkd.cluster.node.timeout")
        fence = nodes_cfg.get_float("internal.hkd.agent.ticker.timeout")
        say(f"connecting {len(c.users)} users through {len(c.nodes)} L7Rs")
        t0 = time.monotonic()
        connect_all(c, c.users, c.nodes)
        say(f"all connected in {time.monotonic() - t0:.1f} s; placement: "
            + ", ".join(f"{k} {len(v)}" for k, v in c.placement().items()))
        runs = []
        for i in range(1, args.runs + 1):
            runs.append(one_run(c, i))
            # users whose session died with the killed L7R come back too, for the next run
            connect_all(c, [u for u in c.users if not _has_session(c, u)], c.nodes, retry_for=60)
        assert c.watch is not None
        double = [f"VM {v.vm_id} on {', '.join(v.nodes)}" for v in c.watch.violations]
    except ClusterError as e:
        c.dump_logs()
        raise BenchError(str(e)) from None
    secs = [r["seconds"] for r in runs]
    return {"machine": machine_line(), "nodes": args.nodes, "users": args.users, "runs": runs,
            "median_s": median(secs), "min_s": min(secs), "max_s": max(secs),
            "node_timeout_s": detect, "ticker_timeout_s": fence, "settings": {k: str(v) for k, v in settings.items()},
            "ratio_to_node_timeout": ratio(median(secs), detect),
            "lost_median_s": median([r["lost_s"] for r in runs]),
            "double_runs": double, "watch_polls": c.watch.polls}


def _has_session(c: Any, u: Any) -> bool:
    row = c.vm_rows()[u.vm_id]
    return bool(row["state"] == "running" and row["user_state"] == "connected")


def _close(c: Any) -> None:
    problems = c.close()
    if problems:
        raise BenchError("; ".join(problems))


def report(r: dict[str, Any]) -> str:
    lines = [f"QVD failover benchmark: {r['nodes']} nodes, {r['users']} users, {len(r['runs'])} runs",
             f"machine: {r['machine']}"]
    for k, v in r["settings"].items():
        lines.append(f"setting: {k} = {v}")
    lines.append("")
    for i, run in enumerate(r["runs"], 1):
        lines.append(f"run {i}: {run['victim']} killed with {run['users']} desktop(s): declared lost after "
                     f"{run['lost_s']:.2f} s, its containers gone after {run['containers_gone_s']:.2f} s, every user "
                     f"working again after {run['seconds']:.2f} s")
        lines.append("    per user: " + ", ".join(f"{k} {v:.2f} s ({run['attempts'][k]} attempt(s))"
                                                  for k, v in run["per_user_s"].items()))
    lines.append("")
    lines.append(f"kill -> every affected user working again: median {r['median_s']:.2f} s  "
                 f"[min {r['min_s']:.2f}, max {r['max_s']:.2f}]  runs "
                 + ", ".join(f"{x['seconds']:.2f}" for x in r["runs"]))
    lines.append(f"detection timeout internal.hkd.cluster.node.timeout = {r['node_timeout_s']:g} s "
                 f"(self-fencing internal.hkd.agent.ticker.timeout = {r['ticker_timeout_s']:g} s); "
                 f"declared lost after a median {r['lost_median_s']:.2f} s")
    lines.append(f"ratio median failover / node timeout: {fmt_ratio(r['ratio_to_node_timeout'])}")
    lines.append(f"VMs seen running on two nodes at once ({r['watch_polls']} polls): "
                 + ("; ".join(r["double_runs"]) if r["double_runs"] else "none"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="node kills measured; the median counts (default 3)")
    p.add_argument("--users", type=int, default=6, help="users with one desktop each (default 6)")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the cluster (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a node file setting for every node, e.g. internal.hkd.cluster.node.timeout=20")
    add_common_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20:
        p.error("--runs must be from 1 to 20")
    if not 2 <= args.nodes <= 9:
        p.error("--nodes must be from 2 to 9")
    if not 1 <= args.users <= 60:
        p.error("--users must be from 1 to 60")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("failover", args, lambda j, w: body(args, j, w), report)


if __name__ == "__main__":
    sys.exit(main())
