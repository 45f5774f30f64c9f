"""OS flavours (OSFs), disk images (DIs) and DI tags.

Tag rules:

* a new DI gets a *fixed* tag equal to its version, and the tag ``head`` moves to it;
* it gets ``default`` only if no DI of its OSF has it yet (VMs follow ``default``
  unless they name another tag);
* a tag lives on one DI of an OSF at a time (unique per OSF in the database), so
  adding a tag to a DI moves it from wherever it was; fixed tags never move;
* ``head``, ``default`` and fixed tags cannot be removed; deleting a DI hands its
  ``head``/``default`` to the newest remaining DI of the OSF.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config
from qvd.core.errors import AlreadyExists, Conflict, FixedTag, HasDependents, InputError, NotFound
from qvd.core.states import VmState
from qvd.db.models import Di, DiState, DiTag, ObjectType, Osf, Vm, VmRuntime
from qvd.services.base import Actor, Change, audited, reading
from qvd.services.common import (
    NAME_RE,
    TAG_RE,
    Args,
    delete_all_properties,
    set_properties,
    view_row,
    with_properties,
)
from qvd.services.lookup import get_di, get_osf, osf_by_ref, tenant_for_create
from qvd.services.query import Page, list_rows
from qvd.services.views import DI, OSF

AUTO_TAGS = ("head", "default")
VERSION_RE = re.compile(r"^[\w][\w.:+-]{0,63}$")


# --- OSFs -----------------------------------------------------------------------------------------


def list_osfs(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("osf.see")
    with reading(factory) as s:
        return with_properties(s, list_rows(s, OSF, actor, **q), ObjectType.OSF)


def get_osf_row(factory: sessionmaker[Session], actor: Actor, oid: int) -> dict[str, Any]:
    actor.require("osf.see")
    with reading(factory) as s:
        return view_row(s, OSF, actor, oid, ObjectType.OSF)


def create_osf(factory: sessionmaker[Session], actor: Actor, node: Config, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("osf.create")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        a = Args("OSF", data, {"name", "tenant", "memory", "overlay", "user_storage", "is_application",
                               "description", "properties"})
        tenant = tenant_for_create(s, actor, a.text("tenant"))
        name = a.req_text("name", pattern=NAME_RE)
        ch.object_name, ch.tenant_id = name, tenant.id
        if s.scalars(select(Osf).where(Osf.tenant_id == tenant.id, Osf.name == name)).one_or_none():
            raise AlreadyExists(f"OSF '{name}' already exists in tenant '{tenant.name}'")
        o = Osf(
            tenant_id=tenant.id, name=name,
            memory=a.integer("memory", default=node.get_int("osf.default.memory"), minimum=16, maximum=1 << 20),
            use_overlay=a.flag("overlay", default=node.get_bool("osf.default.overlay")),
            user_storage=a.integer("user_storage", default=0, minimum=0),
            is_application=bool(a.flag("is_application")),
            description=a.text("description") or "",
        )
        props = a.props()
        s.add(o)
        s.flush()
        ch.object_id = o.id
        set_properties(s, ObjectType.OSF, o.id, props)
        ch.after = view_row(s, OSF, actor, o.id, ObjectType.OSF)
        return ch.after

    return audited(factory, actor, "osf.create", "osf", work, arguments=data)


def update_osf(factory: sessionmaker[Session], actor: Actor, oid: int, data: dict[str, Any]) -> dict[str, Any]:
    actor.require("osf.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        o = get_osf(s, actor, oid)
        ch.object_id, ch.object_name, ch.tenant_id = o.id, o.name, o.tenant_id
        ch.before = view_row(s, OSF, actor, o.id, ObjectType.OSF)
        a = Args("OSF", data, {"name", "memory", "overlay", "user_storage", "is_application", "description",
                               "properties"})
        if a.has("name"):
            name = a.req_text("name", pattern=NAME_RE)
            if name != o.name and s.scalars(
                select(Osf).where(Osf.tenant_id == o.tenant_id, Osf.name == name)
            ).one_or_none():
                raise AlreadyExists(f"OSF '{name}' already exists")
            o.name = name
        if a.has("memory"):
            o.memory = a.integer("memory", minimum=16, maximum=1 << 20) or o.memory
        if a.has("overlay"):
            o.use_overlay = bool(a.flag("overlay"))
        if a.has("user_storage"):
            o.user_storage = a.integer("user_storage", minimum=0) or 0
        if a.has("is_application"):
            o.is_application = bool(a.flag("is_application"))
        if a.has("description"):
            o.description = a.text("description") or ""
        set_properties(s, ObjectType.OSF, o.id, a.props())
        s.flush()
        ch.after = view_row(s, OSF, actor, o.id, ObjectType.OSF)
        return ch.after

    return audited(factory, actor, "osf.update", "osf", work, arguments=data)


def delete_osf(factory: sessionmaker[Session], actor: Actor, oid: int) -> None:
    actor.require("osf.delete")

    def work(s: Session, ch: Change) -> None:
        o = get_osf(s, actor, oid)
        ch.object_id, ch.object_name, ch.tenant_id = o.id, o.name, o.tenant_id
        ch.before = view_row(s, OSF, actor, o.id, ObjectType.OSF)
        if s.scalar(select(exists().where(Vm.osf_id == o.id))):
            raise HasDependents(f"OSF '{o.name}' still has VMs; delete them first")
        if s.scalar(select(exists().where(Di.osf_id == o.id))):
            raise HasDependents(f"OSF '{o.name}' still has disk images; delete them first")
        delete_all_properties(s, ObjectType.OSF, o.id)
        s.delete(o)

    audited(factory, actor, "osf.delete", "osf", work)


# --- DIs ------------------------------------------------------------------------------------------


def _tags_of(s: Session, ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        for di_id, tag in s.execute(select(DiTag.di_id, DiTag.tag).where(DiTag.di_id.in_(ids)).order_by(DiTag.tag)):
            out[di_id].append(tag)
    return out


def _di_row(s: Session, actor: Actor, di_id: int) -> dict[str, Any]:
    row = view_row(s, DI, actor, di_id, ObjectType.DI)
    row["tags"] = _tags_of(s, [di_id])[di_id]
    return row


def list_dis(factory: sessionmaker[Session], actor: Actor, **q: Any) -> Page:
    actor.require("di.see")
    with reading(factory) as s:
        page = with_properties(s, list_rows(s, DI, actor, **q), ObjectType.DI)
        tags = _tags_of(s, [i["id"] for i in page.items])
        for i in page.items:
            i["tags"] = tags[i["id"]]
        return page


def get_di_row(factory: sessionmaker[Session], actor: Actor, di_id: int) -> dict[str, Any]:
    actor.require("di.see")
    with reading(factory) as s:
        return _di_row(s, actor, di_id)


def _next_version(s: Session, osf_id: int) -> str:
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    used = set(s.scalars(select(Di.version).where(Di.osf_id == osf_id, Di.version.like(f"{today}-%"))))
    n = 0
    while f"{today}-{n:03d}" in used:
        n += 1
    return f"{today}-{n:03d}"


def _put_tag(s: Session, di: Di, tag: str, *, fixed: bool = False) -> None:
    """Give ``tag`` to ``di``, moving it from another DI of the OSF unless it is fixed there."""
    if not TAG_RE.match(tag):
        raise InputError(f"invalid tag {tag!r}: use letters, digits, '.', '_', ':', '+', '-'")
    cur = s.scalars(select(DiTag).where(DiTag.osf_id == di.osf_id, DiTag.tag == tag)).one_or_none()
    if cur is None:
        s.add(DiTag(osf_id=di.osf_id, di_id=di.id, tag=tag, fixed=fixed))
    elif cur.di_id != di.id:
        if cur.fixed:
            other = s.get(Di, cur.di_id)
            raise FixedTag(f"tag '{tag}' is fixed to DI {cur.di_id} (version {other.version if other else '?'}) "
                           "and cannot move")
        cur.di_id = di.id
    s.flush()


def _import_file(src: str, images: Path, di_id: int) -> tuple[str, int, str]:
    """Copy (or adopt) the tarball into the images directory as ``<id>-<name>``.

    Returns (file name, size, sha256).  The copy goes to a temporary name first, so
    a failed import leaves no file behind under a real name.
    """
    from qvd.images.validate import inspect_di_tarball  # heavy; only needed on import

    path = Path(src)
    if not path.is_absolute():
        path = images / src
    if not path.is_file():
        raise InputError(f"disk image file '{src}' does not exist (give an absolute path or a file in {images})")
    inspect_di_tarball(path)
    images.mkdir(parents=True, exist_ok=True)
    final = images / f"{di_id}-{path.name}"
    tmp = images / f".import-{di_id}-{os.getpid()}-{path.name}"
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(1 << 20):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        tmp.rename(final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot import disk image '{src}': {e.strerror}") from None
    return final.name, final.stat().st_size, digest.hexdigest()


def create_di(factory: sessionmaker[Session], actor: Actor, images: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Register a DI, importing its tarball; nothing stays half-registered on failure."""
    actor.require("di.create")
    imported: list[Path] = []

    def work(s: Session, ch: Change) -> dict[str, Any]:
        a = Args("DI", data, {"osf", "osf_id", "osf_name", "disk_image", "file", "version", "tags", "blocked",
                              "description", "properties"})
        ref = data.get("osf_id") if a.has("osf_id") else (data.get("osf") or data.get("osf_name"))
        if ref is None:
            raise InputError("DI needs the field 'osf' (name) or 'osf_id'")
        if isinstance(ref, str) and ref.isdigit() and a.has("osf_id"):
            ref = int(ref)
        osf = osf_by_ref(s, actor, ref, None)
        src = a.text("disk_image") or a.text("file")
        if not src:
            raise InputError("DI needs the field 'disk_image' (path of the image tarball)")
        version = a.text("version", pattern=VERSION_RE) or _next_version(s, osf.id)
        ch.object_name, ch.tenant_id = f"{osf.name}/{version}", osf.tenant_id
        if s.scalars(select(Di).where(Di.osf_id == osf.id, Di.version == version)).one_or_none():
            raise AlreadyExists(f"OSF '{osf.name}' already has a DI with version '{version}'")
        if s.scalars(select(DiTag).where(DiTag.osf_id == osf.id, DiTag.tag == version)).one_or_none():
            raise AlreadyExists(f"tag '{version}' is already used in OSF '{osf.name}'")
        extra_tags = a.str_list("tags") or []
        props = a.props()
        di = Di(osf_id=osf.id, path="", version=version, blocked=bool(a.flag("blocked")),
                description=a.text("description") or "", state=DiState.VERIFYING)
        s.add(di)
        s.flush()
        ch.object_id = di.id
        name, size, sha = _import_file(src, images, di.id)
        imported.append(images / name)
        di.path, di.size, di.sha256, di.state = name, size, sha, DiState.READY
        _put_tag(s, di, version, fixed=True)
        _put_tag(s, di, "head")
        if not s.scalars(select(DiTag).where(DiTag.osf_id == osf.id, DiTag.tag == "default")).one_or_none():
            _put_tag(s, di, "default")
        for t in extra_tags:
            _put_tag(s, di, t)
        set_properties(s, ObjectType.DI, di.id, props)
        s.flush()
        ch.after = _di_row(s, actor, di.id)
        return ch.after

    try:
        return audited(factory, actor, "di.create", "di", work, arguments=data)
    except Exception:
        for p in imported:
            p.unlink(missing_ok=True)
        raise


def update_di(factory: sessionmaker[Session], actor: Actor, di_id: int, data: dict[str, Any],
              action: str = "di.update") -> dict[str, Any]:
    actor.require("di.block" if action in ("di.block", "di.unblock") else "di.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        di = get_di(s, actor, di_id)
        ch.object_id, ch.object_name, ch.tenant_id = di.id, f"{di.osf.name}/{di.version}", di.osf.tenant_id
        ch.before = _di_row(s, actor, di.id)
        a = Args("DI", data, {"blocked", "description", "properties"})
        if a.has("blocked"):
            di.blocked = bool(a.flag("blocked"))
        if a.has("description"):
            di.description = a.text("description") or ""
        set_properties(s, ObjectType.DI, di.id, a.props())
        s.flush()
        ch.after = _di_row(s, actor, di.id)
        return ch.after

    return audited(factory, actor, action, "di", work, arguments=data)


def tag_di(factory: sessionmaker[Session], actor: Actor, di_id: int, tags: list[str]) -> dict[str, Any]:
    actor.require("di.tag")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        di = get_di(s, actor, di_id)
        ch.object_id, ch.object_name, ch.tenant_id = di.id, f"{di.osf.name}/{di.version}", di.osf.tenant_id
        if not tags:
            raise InputError("give at least one tag")
        ch.before = _di_row(s, actor, di.id)
        for t in tags:
            _put_tag(s, di, t.strip())
        ch.after = _di_row(s, actor, di.id)
        return ch.after

    return audited(factory, actor, "di.tag", "di", work, arguments={"tags": tags})


def untag_di(factory: sessionmaker[Session], actor: Actor, di_id: int, tag: str) -> dict[str, Any]:
    actor.require("di.tag")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        di = get_di(s, actor, di_id)
        ch.object_id, ch.object_name, ch.tenant_id = di.id, f"{di.osf.name}/{di.version}", di.osf.tenant_id
        row = s.scalars(select(DiTag).where(DiTag.di_id == di.id, DiTag.tag == tag)).one_or_none()
        if row is None:
            raise NotFound(f"DI {di.id} has no tag '{tag}'")
        if row.fixed or tag in AUTO_TAGS:
            raise FixedTag(f"tag '{tag}' cannot be removed (head, default and version tags stay; move them instead)")
        ch.before = _di_row(s, actor, di.id)
        s.delete(row)
        s.flush()
        ch.after = _di_row(s, actor, di.id)
        return ch.after

    return audited(factory, actor, "di.untag", "di", work, arguments={"tag": tag})


def delete_di(factory: sessionmaker[Session], actor: Actor, images: Path, di_id: int) -> None:
    actor.require("di.delete")
    removed: list[str] = []

    def work(s: Session, ch: Change) -> None:
        di = get_di(s, actor, di_id)
        ch.object_id, ch.object_name, ch.tenant_id = di.id, f"{di.osf.name}/{di.version}", di.osf.tenant_id
        ch.before = _di_row(s, actor, di.id)
        in_use = s.scalar(select(func.count(VmRuntime.vm_id)).where(
            VmRuntime.current_di_id == di.id, VmRuntime.vm_state != VmState.STOPPED))
        if in_use:
            raise Conflict(f"DI {di.id} is in use by {in_use} running VM(s); stop them first")
        moving = [t.tag for t in di.tags if t.tag in AUTO_TAGS]
        osf_id = di.osf_id
        removed.append(di.path)
        delete_all_properties(s, ObjectType.DI, di.id)
        s.delete(di)
        s.flush()
        newest = s.scalars(select(Di).where(Di.osf_id == osf_id).order_by(Di.created_at.desc(), Di.id.desc())).first()
        if newest is not None:
            for t in moving:
                _put_tag(s, newest, t)

    audited(factory, actor, "di.delete", "di", work)
    for name in removed:
        if name:
            (images / name).unlink(missing_ok=True)
