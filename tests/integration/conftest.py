"""Integration fixtures: ``minimal_image`` comes from tests/conftest.py (tests/images.py); ``qa_run`` runs
the real ``qa`` against the real admin API of the ``api`` fixture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qvd.cli import qa
from tests.conftest import RunningApi
from tests.images import IMAGE_CACHE, build_minimal_image

__all__ = ["IMAGE_CACHE", "QaRun", "build_minimal_image"]

#: ``qa_run(*words, fmt="json") -> (exit status, stdout, stderr)``
QaRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def qa_run(api: RunningApi, capsys: pytest.CaptureFixture[str], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> QaRun:
    """``qa`` logged in as the first administrator, with no qa.toml of the machine in the way."""
    monkeypatch.setenv("QVD_ROOT", str(tmp_path / "empty-root"))
    monkeypatch.setenv("HOME", str(tmp_path))

    def _run(*words: str, fmt: str = "json") -> tuple[int, str, str]:
        code = qa.main(["--url", api.url, "--login", "admin", f"--password={api.node.admin_password}",
                        "--format", fmt, *words])
        out, err = capsys.readouterr()
        return code, out, err

    return _run
