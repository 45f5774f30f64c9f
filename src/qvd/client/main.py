"""``qvd-client``: log in, pick a desktop and show it."""

from __future__ import annotations

import sys

from qvd.cli.common import base_parser, not_yet


def main(argv: list[str] | None = None) -> int:
    p = base_parser("qvd-client", "QVD client. Not implemented yet: it arrives with the broker issue (#4).")
    p.parse_args(argv)
    return not_yet("qvd-client", "issue #4, broker and client")


if __name__ == "__main__":
    sys.exit(main())
