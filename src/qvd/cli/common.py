"""What every command shares: --root, logging, opening the node's database."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import qvd
from qvd.core.config import Config, Paths, load_node_config, resolve_root
from qvd.core.errors import QvdError
from qvd.db.engine import database_url, make_engine, make_sessionmaker


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--version", action="version", version=f"{prog} {qvd.__version__}")
    p.add_argument("--root", help="node state directory (default: $QVD_ROOT or /var/lib/qvd)")
    return p


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


@dataclass
class Node:
    paths: Paths
    cfg: Config
    url: str
    engine: Engine
    factory: sessionmaker[Session]


def open_node(root_arg: str | None, extra: dict[str, object] | None = None, *,
              idle_in_transaction_timeout: float | None = None) -> Node:
    root = resolve_root(root_arg)
    cfg = load_node_config(root, extra)
    paths = Paths.for_node(root, cfg)
    url = database_url(cfg, paths)
    engine = make_engine(url, idle_in_transaction_timeout=idle_in_transaction_timeout)
    return Node(paths, cfg, url, engine, make_sessionmaker(engine))


def fail(prog: str, err: QvdError | str, code: int = 1) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return code
