"""``qvd``: the umbrella command of a node (database, configuration, images, all-in-one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qvd.cli.common import Node, base_parser, fail, open_node, setup_logging
from qvd.core.config import describe
from qvd.core.errors import QvdError
from qvd.db import schema
from qvd.services.tenancy import seed


def write_secret(path: Path, text: str) -> None:
    """Write a file only root can read, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def db_upgrade(node: Node) -> int:
    if node.url.startswith("sqlite"):
        node.paths.root.mkdir(parents=True, exist_ok=True)
    before, after = schema.upgrade(node.engine)
    with node.factory() as s, s.begin():
        password = seed(s)
    if before == after:
        print(f"database schema is up to date (revision {after}) at {node.url.split('@')[-1]}")
    else:
        print(f"database schema upgraded from {before or 'empty'} to revision {after} at {node.url.split('@')[-1]}")
    if password is not None:
        write_secret(node.paths.admin_password_file, password + "\n")
        url = f"http://{node.cfg.get_str('api.address')}:{node.cfg.get_int('api.port')}"
        if not node.paths.qa_file.exists():
            write_secret(node.paths.qa_file, f'url = "{url}"\nlogin = "admin"\npassword = "{password}"\n')
        print("created the first administrator:")
        print("  login:    admin")
        print(f"  password: {password}")
        print(f"  (kept in {node.paths.admin_password_file}, mode 0600; qa reads {node.paths.qa_file})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = base_parser("qvd", "QVD-py node command: database, configuration, images and the all-in-one node.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="dbcmd", metavar="ACTION")
    dbsub.add_parser("upgrade", help="create or upgrade the schema; creates the first administrator")
    dbsub.add_parser("status", help="show the schema revision")
    cfg = sub.add_parser("config", help="configuration")
    cfgsub = cfg.add_subparsers(dest="cfgcmd", metavar="ACTION")
    cfgsub.add_parser("keys", help="list every configuration key with its default")
    cfgsub.add_parser("check", help="validate $QVD_ROOT/etc/node.toml")
    img = sub.add_parser("image", help="desktop images")
    imgsub = img.add_subparsers(dest="imgcmd", metavar="ACTION")
    b = imgsub.add_parser("build", help="build a desktop image (cached by its inputs) and register it as a DI")
    b.add_argument("--profile", choices=("minimal", "xfce"), default="minimal")
    b.add_argument("--packages", help="comma-separated Debian packages to add to the profile")
    b.add_argument("--osf", required=True, help="OSF the new DI belongs to")
    b.add_argument("--tenant", default="default", help="tenant of the OSF (default: default)")
    b.add_argument("--create-osf", action="store_true", help="create the OSF if it does not exist")
    b.add_argument("--tag", action="append", default=[], help="extra tag for the DI (repeatable)")
    b.add_argument("--version", dest="di_version", help="DI version (default: YYYY-MM-DD-NNN)")
    sub.add_parser("up", help="run a complete single node (HKD, L7R, API) in the foreground")
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return 2
    try:
        if args.cmd == "config" and args.cfgcmd == "keys":
            for k in describe():
                where = "node file" if k.node_only else ("node file, database, tenant" if k.tenant
                                                          else "node file, database")
                print(f"{k.name} = {k.default!r}\n    {k.help} [{k.kind}; {where}]")
            return 0
        node = open_node(args.root)
        setup_logging(node.cfg.get_str("log.level"))
        if args.cmd == "config" and args.cfgcmd == "check":
            print(f"{node.paths.node_file}: OK")
            return 0
        if args.cmd == "db" and args.dbcmd == "upgrade":
            return db_upgrade(node)
        if args.cmd == "image" and args.imgcmd == "build":
            from qvd.cli.images import cmd_build
            from qvd.db.schema import require_current

            require_current(node.engine)
            return cmd_build(node, args.profile, args.packages, args.osf, args.tenant, args.tag, args.di_version,
                             args.create_osf)
        if args.cmd == "up":
            from qvd.cli.up import up

            db_upgrade(node)
            return up(node)
        if args.cmd == "db" and args.dbcmd == "status":
            cur, head = schema.current_revision(node.engine), schema.head_revision()
            print(f"schema revision: {cur or 'none'} (this version needs {head})")
            return 0 if cur == head else 1
    except QvdError as e:
        return fail("qvd", e)
    p.print_help()
    return 2




if __name__ == "__main__":
    sys.exit(main())
