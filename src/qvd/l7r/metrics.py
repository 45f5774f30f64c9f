"""Prometheus metrics of one L7R process, and the node counters it adds to ``host_runtimes``.

Metrics live in a registry of their own (so tests can run several brokers in
one process) and are served on a loopback port (``l7r.metrics.address`` /
``l7r.metrics.port``), never on the users' port.

The ``host_runtimes`` counters (reference §2.2: ``http_requests``,
``auth_attempts``, ``auth_ok``, ``nx_attempts``, ``nx_ok``, ``short_sessions``)
are accumulated in memory and added to the row about once a second in one
UPDATE, instead of one write transaction per request.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from qvd.l7r.store import COUNTERS


class NodeCounters:
    """Increments waiting to be written to this node's ``host_runtimes`` row."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = dict.fromkeys(COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._pending[name] += n

    def take(self) -> dict[str, int]:
        """The pending increments, reset to zero (give them back with :meth:`restore` if the write fails)."""
        with self._lock:
            out, self._pending = self._pending, dict.fromkeys(COUNTERS, 0)
        return out

    def restore(self, deltas: dict[str, int]) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._pending[k] += v


class L7rMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge("qvd_l7r_connections_open", "client connections open now", registry=r)
        self.connections = Counter("qvd_l7r_connections", "client connections accepted", registry=r)
        self.requests = Counter("qvd_l7r_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.auth_attempts = Counter("qvd_l7r_auth_attempts", "authentications tried", ["method"], registry=r)
        self.auth_failures = Counter("qvd_l7r_auth_failures", "authentications refused", ["method"], registry=r)
        self.session_starts = Counter("qvd_l7r_session_starts", "tunnels opened (101 sent)", registry=r)
        self.session_failures = Counter("qvd_l7r_session_failures", "connect_to_vm requests that failed after "
                                        "the 102 stream began", registry=r)
        self.vm_starts = Counter("qvd_l7r_vm_starts", "VMs started by user connections", registry=r)
        self.takeovers = Counter("qvd_l7r_takeovers", "sessions taken over from another connection", registry=r)
        self.tunnels_open = Gauge("qvd_l7r_tunnels_open", "tunnels open now", registry=r)
        self.bytes_in = Counter("qvd_l7r_tunnel_bytes_in", "bytes from clients into desktops", registry=r)
        self.bytes_out = Counter("qvd_l7r_tunnel_bytes_out", "bytes from desktops to clients", registry=r)
        self.connect_seconds = Histogram(
            "qvd_l7r_connect_seconds", "time from connect_to_vm to the 101 answer",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 300), registry=r,
        )

    def serve(self, address: str, port: int) -> tuple[Any, threading.Thread]:
        """Start the metrics HTTP endpoint in a thread; returns (server, thread)."""
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        return server, thread
