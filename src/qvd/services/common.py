"""Input checking shared by the domain services: typed arguments, names, properties."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from qvd.core.errors import InputError, MissingArgument, NotFound
from qvd.db.models import ObjectType, Property
from qvd.services.base import Actor
from qvd.services.query import Page, ResourceView, get_row

NAME_RE = re.compile(r"^[\w][\w.+-]{0,63}$")
TAG_RE = re.compile(r"^[\w][\w.:+-]{0,127}$")
PROP_KEY_RE = re.compile(r"^[\w][\w.:-]{0,255}$")


class Args:
    """The arguments of one call, checked against what the call accepts.

    Unknown keys are refused (naming what is allowed), so that a typo never
    silently does nothing.
    """

    def __init__(self, what: str, data: Mapping[str, Any] | None, allowed: set[str]) -> None:
        self.what = what
        self.data = dict(data or {})
        unknown = sorted(set(self.data) - allowed)
        if unknown:
            raise InputError(
                f"unknown field(s) {', '.join(repr(u) for u in unknown)} for {what}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )

    def has(self, key: str) -> bool:
        return key in self.data

    def _missing(self, key: str) -> MissingArgument:
        return MissingArgument(f"{self.what} needs the field '{key}'")

    def text(self, key: str, *, required: bool = False, default: str | None = None,
            pattern: re.Pattern[str] | None = None, max_len: int = 4096) -> str | None:
        if key not in self.data or self.data[key] is None:
            if required:
                raise self._missing(key)
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise InputError(f"invalid value {v!r} for '{key}' of {self.what}: expected text")
        s = str(v).strip()
        if required and not s:
            raise self._missing(key)
        if len(s) > max_len:
            raise InputError(f"value of '{key}' of {self.what} is too long (max {max_len})")
        if pattern is not None and s and not pattern.match(s):
            raise InputError(
                f"invalid value {s!r} for '{key}' of {self.what}: use letters, digits, '.', '_', '+', '-'"
                " (starting with a letter or digit)"
            )
        return s

    def req_text(self, key: str, **kw: Any) -> str:
        v = self.text(key, required=True, **kw)
        if v is None:  # pragma: no cover - required
            raise self._missing(key)
        return v

    def integer(self, key: str, *, required: bool = False, default: int | None = None,
            minimum: int | None = None, maximum: int | None = None) -> int | None:
        if key not in self.data or self.data[key] is None or self.data[key] == "":
            if required:
                raise self._missing(key)
            return default
        v = self.data[key]
        try:
            if isinstance(v, bool | float):
                raise ValueError
            n = int(v)
        except (TypeError, ValueError):
            raise InputError(f"invalid value {v!r} for '{key}' of {self.what}: expected an integer") from None
        if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
            rng = f"from {minimum}" + (f" to {maximum}" if maximum is not None else "")
            raise InputError(f"invalid value {n} for '{key}' of {self.what}: expected an integer {rng}")
        return n

    def flag(self, key: str, *, default: bool | None = None) -> bool | None:
        if key not in self.data or self.data[key] is None:
            return default
        v = self.data[key]
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise InputError(f"invalid value {v!r} for '{key}' of {self.what}: expected true/false or 1/0")

    def datetime(self, key: str) -> tuple[bool, dt.datetime | None]:
        """(given, value): an ISO date, or null/"" to clear."""
        if key not in self.data:
            return False, None
        v = self.data[key]
        if v in (None, ""):
            return True, None
        try:
            parsed = dt.datetime.fromisoformat(str(v))
        except ValueError:
            raise InputError(
                f"invalid value {v!r} for '{key}' of {self.what}: expected a date like 2027-01-31 10:00"
            ) from None
        return True, parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)

    def str_list(self, key: str) -> list[str] | None:
        if key not in self.data or self.data[key] is None:
            return None
        v = self.data[key]
        if isinstance(v, str):
            v = [p for p in (x.strip() for x in v.split(",")) if p]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise InputError(f"invalid value {v!r} for '{key}' of {self.what}: expected a list of names")
        return [x.strip() for x in v]

    def props(self, key: str = "properties") -> dict[str, str]:
        v = self.data.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise InputError(f"'{key}' of {self.what} must be an object of key: value")
        out: dict[str, str] = {}
        for k, val in v.items():
            check_prop_key(k)
            out[k] = "" if val is None else str(val)
        return out


def check_prop_key(key: Any) -> str:
    if not isinstance(key, str) or not PROP_KEY_RE.match(key):
        raise InputError(f"invalid property name {key!r}: use letters, digits, '.', '_', ':', '-'")
    return key


def properties_of(session: Session, obj_type: ObjectType, ids: list[int]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {i: {} for i in ids}
    if not ids:
        return out
    rows = session.execute(
        select(Property.object_id, Property.key, Property.value).where(
            Property.object_type == obj_type, Property.object_id.in_(ids)
        )
    )
    for oid, k, v in rows:
        out[oid][k] = v
    return out


def set_properties(session: Session, obj_type: ObjectType, obj_id: int, props: Mapping[str, str]) -> None:
    for k, v in props.items():
        row = session.scalars(
            select(Property).where(
                Property.object_type == obj_type, Property.object_id == obj_id, Property.key == k
            )
        ).one_or_none()
        if row is None:
            session.add(Property(object_type=obj_type, object_id=obj_id, key=k, value=v))
        else:
            row.value = v
    session.flush()


def delete_property(session: Session, obj_type: ObjectType, obj_id: int, key: str) -> None:
    n = session.execute(
        delete(Property).where(Property.object_type == obj_type, Property.object_id == obj_id, Property.key == key)
    )
    if getattr(n, "rowcount", 0) == 0:
        raise NotFound(f"{obj_type.value} {obj_id} has no property '{key}'")


def delete_all_properties(session: Session, obj_type: ObjectType, obj_id: int) -> None:
    session.execute(delete(Property).where(Property.object_type == obj_type, Property.object_id == obj_id))


def with_properties(s: Session, page: Page, obj_type: ObjectType) -> Page:
    """Add each listed object's custom properties (one query for the page)."""
    props = properties_of(s, obj_type, [i["id"] for i in page.items])
    for i in page.items:
        i["properties"] = props[i["id"]]
    return page


def view_row(
    session: Session, view: ResourceView, actor: Actor, obj_id: int, obj_type: ObjectType | None = None
) -> dict[str, Any]:
    row = get_row(session, view, actor, obj_id)
    if row is None:
        raise NotFound(f"{view.name} {obj_id} does not exist")
    if obj_type is not None:
        row["properties"] = properties_of(session, obj_type, [obj_id])[obj_id]
    return row


def normalize_login(name: str, case_sensitive: bool) -> str:
    return name if case_sensitive else name.lower()
