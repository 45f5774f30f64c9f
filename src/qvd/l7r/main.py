"""``qvd-l7r``: the broker users connect to (QVD/1.0 over TLS)."""

from __future__ import annotations

import sys

from qvd.cli.common import base_parser, not_yet


def main(argv: list[str] | None = None) -> int:
    p = base_parser("qvd-l7r", "QVD/1.0 broker (L7R). Not implemented yet: it arrives with the broker issue (#4).")
    p.parse_args(argv)
    return not_yet("qvd-l7r", "issue #4, broker and client")


if __name__ == "__main__":
    sys.exit(main())
