"""``qvd-hkd``: the node daemon that runs desktops."""

from __future__ import annotations

import sys

from qvd.cli.common import base_parser, not_yet


def main(argv: list[str] | None = None) -> int:
    p = base_parser("qvd-hkd", "Node daemon (HKD). Not implemented yet: it arrives with the desktop issue (#3).")
    p.parse_args(argv)
    return not_yet("qvd-hkd", "issue #3, desktops on a node")


if __name__ == "__main__":
    sys.exit(main())
