"""Reading the audit log (it is written by every audited service call)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from qvd.services.base import Actor, reading
from qvd.services.query import Page, list_rows
from qvd.services.views import AUDIT


def list_audit(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("audit.see")
    if not q.get("order_by"):
        q["order_by"] = "-id"
    with reading(factory) as s:
        return list_rows(s, AUDIT, actor, **q)
