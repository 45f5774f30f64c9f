"""``qvd-hkd``: the node daemon that runs this node's desktops.

    qvd-hkd [--root R] [--name N] [--address A]

Node name: ``--name``, else ``nodename`` in the node file, else the machine's host
name.  Address: ``--address``, else ``node.address``.  Exit status: 0 after a clean
stop, 1 when the start failed (one line on stderr says which step and why) or
desktops were left behind, 2 for a bad command line or node file.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from qvd.cli.common import base_parser, fail, setup_logging
from qvd.core.config import Paths, load_node_config, resolve_root
from qvd.core.errors import QvdError
from qvd.hkd.daemon import NodeDaemon

PROG = "qvd-hkd"
log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(PROG, "Node daemon (HKD): starts, stops and watches this node's desktops, "
                          "and keeps the node's heartbeat.  Stops them all on SIGTERM/SIGINT.")
    p.add_argument("--name", help="node name (default: 'nodename' of the node file, else the host name)")
    p.add_argument("--address", help="address of this node for the others (default: 'node.address')")
    args = p.parse_args(argv)
    root = resolve_root(args.root)
    try:
        cfg = load_node_config(root)
        paths = Paths.for_node(root, cfg)
    except QvdError as e:
        return fail(PROG, e, 2)
    name = args.name or cfg.get_str("nodename") or socket.gethostname()
    address = args.address or cfg.get_str("node.address")
    setup_logging(cfg.get_str("log.level"))
    # One line per agent ping would drown the daemon's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log.info("%s starting: node '%s' (%s), root %s", PROG, name, address, paths.root)
    daemon = NodeDaemon(paths, cfg, name, address)
    try:
        return asyncio.run(daemon.run(install_signals=True))
    except QvdError as e:
        return fail(PROG, e, 1)


if __name__ == "__main__":
    sys.exit(main())
