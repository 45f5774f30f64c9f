"""The VMA runs on the desktop image's python3 without third-party packages."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import qvd.vma

ALLOWED_QVD = {"qvd", "qvd.core.config", "qvd.core.errors"}


def test_vma_imports_only_the_standard_library() -> None:
    offenders = []
    for path in Path(qvd.vma.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "qvd":
                    if name not in ALLOWED_QVD and not name.startswith("qvd.vma"):
                        offenders.append(f"{path.name}: {name}")
                elif top not in sys.stdlib_module_names and top != "__future__":
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_core_modules_used_are_stdlib_only_too() -> None:
    import qvd.core.config
    import qvd.core.errors

    for mod in (qvd.core.config, qvd.core.errors):
        tree = ast.parse(Path(str(mod.__file__)).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qvd"):
                assert node.module in ALLOWED_QVD
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name.split(".")[0] in sys.stdlib_module_names
