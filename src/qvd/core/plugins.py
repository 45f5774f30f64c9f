"""Finding plugin classes by name: Python entry points, then the ones shipped built in."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from qvd.core.errors import ConfigError


def known_names(group: str, builtin: Mapping[str, str]) -> list[str]:
    return sorted({*builtin, *(ep.name for ep in entry_points(group=group))})


def load_plugin(group: str, name: str, builtin: Mapping[str, str], base: type[Any], *, kind: str,
                where: str) -> type[Any]:
    """The class registered as ``name`` in entry point ``group`` (or built in), checked to derive from
    ``base`` (the caller narrows the type).

    Raises :class:`ConfigError` naming the ``kind`` of plugin and ``where`` it was configured.
    """
    found = entry_points(group=group).select(name=name)
    target = next(iter(found)).value if found else builtin.get(name)
    if target is None:
        raise ConfigError(f"unknown {kind} plugin '{name}' in {where}; known: {', '.join(known_names(group, builtin))}")
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{kind} plugin '{name}' ({target}) cannot be loaded: {e}") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{kind} plugin '{name}' ({target}) is not a {base.__name__} subclass")
    return obj
