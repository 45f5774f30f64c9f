"""Listing: the filter tree, ordering and pagination, compiled to SQL.

A resource is described by a :class:`ResourceView`: a base ``SELECT`` (with its
joins) and the fields it exposes, each a SQL expression with a type.  The same
fields serve output, filtering and ordering, so whatever a list shows can be
filtered and sorted, derived fields included.

Filter tree (the JSON form of the ``qa`` grammar, see docs/api.md)::

    {"name": "desk1"}                        equality (None = IS NULL)
    {"state": ["running", "starting"]}       IN
    {"id": {"between": [1, 20]}}             range
    {"user_name": {"~": "%ali%"}}            LIKE
    {"memory": {">=": 512}}                  = != < > <= >=
    {"-and": [...]}, {"-or": [...]}, {"-not": {...}}
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, false, func, not_, or_, true
from sqlalchemy.orm import Session

from qvd.core.errors import FilterError


@dataclass(frozen=True)
class Field:
    expr: ColumnElement[Any]
    type: str  # int | float | str | bool | datetime
    filterable: bool = True
    sortable: bool = True


@dataclass(frozen=True)
class ResourceView:
    name: str
    base: Callable[[], Select[Any]]  # SELECT ... FROM ... JOIN ... (columns are replaced)
    fields: Mapping[str, Field]
    id_field: str = "id"
    default_order: tuple[str, ...] = ("id",)
    extra_fields: tuple[str, ...] = ()  # computed after the query (properties, tags, ...)
    scope: Callable[[Any], ColumnElement[bool] | None] = field(default=lambda actor: None)


_OPS = {"=", "!=", "<", ">", "<=", ">=", "~", "between", "in"}


def _coerce(view: ResourceView, name: str, f: Field, value: Any) -> Any:
    if value is None:
        return None
    try:
        if f.type == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if f.type == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if f.type == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if f.type == "datetime":
            if isinstance(value, dt.datetime):
                return value
            parsed = dt.datetime.fromisoformat(str(value))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        if isinstance(value, dict | list):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise FilterError(f"invalid value {value!r} for field '{name}' of {view.name}: expected {f.type}") from None


def _field(view: ResourceView, name: str) -> Field:
    f = view.fields.get(name)
    if f is None or not f.filterable:
        allowed = ", ".join(sorted(n for n, x in view.fields.items() if x.filterable))
        raise FilterError(f"unknown filter field '{name}' for {view.name}; allowed: {allowed}")
    return f


def _compare(view: ResourceView, name: str, op: str, value: Any) -> ColumnElement[bool]:
    f = _field(view, name)
    col = f.expr
    if op not in _OPS:
        raise FilterError(f"unknown operator '{op}' on '{name}'; allowed: = != < > <= >= ~ between in")
    if op in ("in",) or (op == "=" and isinstance(value, list)):
        if not isinstance(value, list):
            raise FilterError(f"operator 'in' on '{name}' needs a list")
        values = [_coerce(view, name, f, v) for v in value]
        return col.in_(values) if values else false()
    if op == "between":
        if not isinstance(value, list) or len(value) != 2:
            raise FilterError(f"range on '{name}' needs exactly two values [low, high]")
        lo, hi = (_coerce(view, name, f, v) for v in value)
        return col.between(lo, hi)
    v = _coerce(view, name, f, value)
    if op == "~":
        if f.type != "str":
            raise FilterError(f"operator '~' (LIKE) only applies to text fields, not '{name}'")
        return col.like(v)
    if v is None:
        if op == "=":
            return col.is_(None)
        if op == "!=":
            return col.is_not(None)
        raise FilterError(f"operator '{op}' on '{name}' needs a value")
    cmp: ColumnElement[bool]
    if op == "=":
        cmp = col == v
    elif op == "!=":
        cmp = or_(col != v, col.is_(None))
    elif op == "<":
        cmp = col < v
    elif op == ">":
        cmp = col > v
    elif op == "<=":
        cmp = col <= v
    else:
        cmp = col >= v
    return cmp


def compile_filter(view: ResourceView, tree: Any) -> ColumnElement[bool]:
    """Compile a filter tree; raises :class:`FilterError` naming the offending part."""
    if tree is None:
        return true()
    if isinstance(tree, list):
        # A list at the top or inside -and/-or: each element is a tree.
        return and_(true(), *(compile_filter(view, t) for t in tree))
    if not isinstance(tree, dict):
        raise FilterError(f"a filter must be an object, got {tree!r}")
    parts: list[ColumnElement[bool]] = []
    for key, value in tree.items():
        if key in ("-and", "-or"):
            if not isinstance(value, list):
                raise FilterError(f"'{key}' needs a list of filters")
            subs = [compile_filter(view, v) for v in value]
            parts.append(and_(true(), *subs) if key == "-and" else or_(false(), *subs))
        elif key == "-not":
            parts.append(not_(compile_filter(view, value)))
        elif isinstance(value, dict):
            if not value:
                raise FilterError(f"empty condition on '{key}'")
            for op, v in value.items():
                parts.append(_compare(view, key, op, v))
        elif isinstance(value, list):
            parts.append(_compare(view, key, "in", value))
        else:
            parts.append(_compare(view, key, "=", value))
    return and_(true(), *parts)


def parse_order(view: ResourceView, order_by: str | Sequence[str] | None) -> list[ColumnElement[Any]]:
    items = order_by.split(",") if isinstance(order_by, str) else list(order_by or view.default_order)
    out: list[ColumnElement[Any]] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        desc = name.startswith("-")
        name = name.lstrip("-+")
        f = view.fields.get(name)
        if f is None or not f.sortable:
            allowed = ", ".join(sorted(n for n, x in view.fields.items() if x.sortable))
            raise FilterError(f"cannot order {view.name} by '{name}'; allowed: {allowed}")
        out.append(f.expr.desc() if desc else f.expr.asc())
    # Stable pagination needs a unique tie-breaker.
    out.append(view.fields[view.id_field].expr.asc())
    return out


@dataclass
class Page:
    total: int
    offset: int
    limit: int
    items: list[dict[str, Any]]


def list_rows(
    session: Session,
    view: ResourceView,
    actor: Any,
    *,
    filters: Any = None,
    order_by: str | Sequence[str] | None = None,
    offset: int = 0,
    limit: int = 100,
    max_limit: int = 1000,
    fields: Sequence[str] | None = None,
    extra: ColumnElement[bool] | None = None,
) -> Page:
    if offset < 0:
        raise FilterError("offset must be >= 0")
    if limit < 1 or limit > max_limit:
        raise FilterError(f"limit must be between 1 and {max_limit}")
    names = list(view.fields)
    if fields:
        unknown = [f for f in fields if f not in view.fields and f not in view.extra_fields]
        if unknown:
            allowed = ", ".join([*names, *view.extra_fields])
            raise FilterError(f"unknown field(s) {', '.join(unknown)} for {view.name}; allowed: {allowed}")
        names = [view.id_field, *[f for f in fields if f != view.id_field and f in view.fields]]
    cond = compile_filter(view, filters)
    scope = view.scope(actor)
    if scope is not None:
        cond = and_(cond, scope)
    if extra is not None:
        cond = and_(cond, extra)
    base = view.base().where(cond)
    total = session.execute(
        base.with_only_columns(func.count(view.fields[view.id_field].expr.distinct()))
    ).scalar_one()
    stmt = base.with_only_columns(*(view.fields[n].expr.label(n) for n in names))
    stmt = stmt.order_by(*parse_order(view, order_by)).offset(offset).limit(limit)
    items = [dict(row._mapping) for row in session.execute(stmt)]
    return Page(total=total, offset=offset, limit=limit, items=items)


def get_row(session: Session, view: ResourceView, actor: Any, obj_id: int) -> dict[str, Any] | None:
    page = list_rows(session, view, actor, filters={view.id_field: obj_id}, limit=1)
    return page.items[0] if page.items else None
