"""`qvd db upgrade` on SQLite and PostgreSQL, through the real command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from qvd.db.engine import make_engine
from qvd.db.models import Base
from qvd.db.schema import upgrade
from tests.conftest import create_pg_database, drop_pg_database


def run_qvd(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QVD_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "qvd.cli.qvd", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def root_and_url(tmp_path: Path, db_kind: str):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    if db_kind == "postgres":
        name = create_pg_database()
        (root / "etc").mkdir(parents=True)
        url = f"postgresql+psycopg:///{name}?host=/var/run/postgresql"
        (root / "etc" / "node.toml").write_text(f'database.url = "{url}"\n')
        yield root, url
        drop_pg_database(name)
    else:
        yield root, f"sqlite:///{root / 'qvd.db'}"


def test_db_upgrade_creates_schema_and_first_admin(root_and_url) -> None:  # type: ignore[no-untyped-def]
    root, _url = root_and_url
    r = run_qvd(root, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    assert "upgraded from empty" in r.stdout and "login:    admin" in r.stdout
    pw_file = root / "etc" / "admin-password"
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    password = pw_file.read_text().strip()
    assert password in r.stdout
    assert stat.S_IMODE((root / "etc" / "qa.toml").stat().st_mode) == 0o600
    # again: nothing changes, the password is not printed twice
    r2 = run_qvd(root, "db", "upgrade")
    assert r2.returncode == 0 and "up to date" in r2.stdout and password not in r2.stdout
    assert run_qvd(root, "db", "status").returncode == 0


def test_migrations_match_models(root_and_url) -> None:  # type: ignore[no-untyped-def]
    _root, url = root_and_url
    if url.startswith("sqlite"):
        _root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_bad_config_is_refused_with_key_value_and_allowed(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "node.toml").write_text("l7r.port = 99999\n")
    r = run_qvd(tmp_path, "db", "upgrade")
    assert r.returncode == 1
    assert "l7r.port" in r.stderr and "99999" in r.stderr and "from 1 to 65535" in r.stderr
    assert not (tmp_path / "qvd.db").exists()
    (tmp_path / "etc" / "node.toml").write_text('database.url = "mysql://x"\n')
    r = run_qvd(tmp_path, "db", "upgrade")
    assert r.returncode == 1 and "database.url" in r.stderr


@pytest.mark.parametrize("cmd", ["qvd", "qa", "qvd-api", "qvd-l7r", "qvd-hkd", "qvd-vma", "qvd-client"])
def test_every_command_answers_help_and_version(cmd: str) -> None:
    exe = Path(sys.executable).parent / cmd
    for flag in ("--help", "--version"):
        r = subprocess.run([str(exe), flag], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, (cmd, flag, r.stderr)
        assert r.stdout.strip()
