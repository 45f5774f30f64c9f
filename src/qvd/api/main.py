"""``qvd-api``: serve the admin REST API of a node with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from qvd.api.app import create_app
from qvd.cli.common import base_parser, fail, open_node, setup_logging
from qvd.core.errors import QvdError
from qvd.db.schema import require_current


def main(argv: list[str] | None = None) -> int:
    p = base_parser("qvd-api", "Admin REST API of QVD-py (docs at /api/v1/docs, OpenAPI at /api/v1/openapi.json).")
    p.add_argument("--address", help="listen address (default: api.address)")
    p.add_argument("--port", type=int, help="listen port (default: api.port)")
    args = p.parse_args(argv)
    try:
        node = open_node(args.root)
        setup_logging(node.cfg.get_str("log.level"))
        require_current(node.engine)
    except QvdError as e:
        return fail("qvd-api", e)
    app = create_app(node.factory, node.cfg, node.paths)
    uvicorn.run(app, host=args.address or node.cfg.get_str("api.address"),
                port=args.port or node.cfg.get_int("api.port"), log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
