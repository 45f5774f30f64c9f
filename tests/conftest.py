"""Shared fixtures: a node root with an upgraded database on SQLite and on PostgreSQL,
and the real admin API served by uvicorn on a free loopback port."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from qvd.api.app import create_app
from qvd.core.config import Config, Paths, load_node_config
from qvd.db.engine import make_engine, make_sessionmaker
from qvd.db.schema import upgrade
from qvd.services.tenancy import seed

PG_ADMIN_URL = os.environ.get("QVD_TEST_PG_ADMIN", "postgresql+psycopg:///postgres?host=/var/run/postgresql")


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect("dbname=postgres host=/var/run/postgresql", connect_timeout=3):
            return None
    except Exception as e:  # any failure means "no server for this run"
        return str(e)


@pytest.fixture(scope="session")
def pg_server() -> None:
    why = _pg_available()
    if why is not None:
        if os.environ.get("QVD_TEST_REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL is required (make test starts it) but unreachable: {why}")
        pytest.skip(f"PostgreSQL not reachable: {why}")


def create_pg_database() -> str:
    import psycopg

    name = f"qvd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("dbname=postgres host=/var/run/postgresql", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect("dbname=postgres host=/var/run/postgresql", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        request.getfixturevalue("pg_server")
    return str(request.param)


@dataclass
class NodeFx:
    paths: Paths
    cfg: Config
    url: str
    engine: Engine
    factory: sessionmaker[Session]
    admin_password: str


@pytest.fixture
def node(tmp_path: Path, db_kind: str) -> Iterator[NodeFx]:
    """A fresh node root whose database (SQLite or PostgreSQL) is upgraded and seeded."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    pg_name = None
    if db_kind == "postgres":
        pg_name = create_pg_database()
        url = f"postgresql+psycopg:///{pg_name}?host=/var/run/postgresql"
        (root / "etc" / "node.toml").write_text(f'database.url = "{url}"\n')
    else:
        url = f"sqlite:///{root / 'qvd.db'}"
    cfg = load_node_config(root)
    engine = make_engine(url)
    upgrade(engine)
    factory = make_sessionmaker(engine)
    with factory() as s, s.begin():
        password = seed(s)
    assert password is not None
    try:
        yield NodeFx(Paths(root), cfg, url, engine, factory, password)
    finally:
        engine.dispose()
        if pg_name:
            drop_pg_database(pg_name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningApi:
    url: str
    node: NodeFx

    def client(self, login: str = "admin", password: str | None = None, tenant: str | None = None) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=30)
        r = c.post("/api/v1/login", json={"login": login, "password": password or self.node.admin_password,
                                          "tenant": tenant})
        r.raise_for_status()
        c.headers["Authorization"] = f"Bearer {r.json()['token']}"
        return c


@pytest.fixture
def api(node: NodeFx) -> Iterator[RunningApi]:
    """The real admin API on uvicorn, on a free loopback port, for this test's node."""
    app = create_app(node.factory, node.cfg, node.paths)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield RunningApi(f"http://127.0.0.1:{port}", node)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def minimal_image() -> Path:
    """The real minimal desktop image (built once, cached by its inputs)."""
    from tests.images import build_minimal_image

    return build_minimal_image()


def make_fake_di(path: Path, *, version_note: str = "test") -> Path:
    """A tiny tarball shaped like a QVD desktop image (enough for import checks,
    not for running: real desktops use the image built by `qvd image build`)."""
    with tarfile.open(path, "w:gz") as tar:
        for d in ("sbin", "usr", "usr/bin", "etc", "etc/qvd"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        meta = (f'format = "qvd-di-1"\nprofile = "test"\npackages = []\nbuilt_at = "2026-01-01T00:00:00Z"\n'
                f'source_hash = "{version_note}"\n').encode()
        info = tarfile.TarInfo("etc/qvd/image.toml")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return path
