"""``qvd image build``: build a desktop image and register it as a DI of an OSF."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qvd.cli.common import Node
from qvd.core.errors import NotFound
from qvd.db.models import Osf, Tenant
from qvd.services.base import Actor
from qvd.services.images import create_di, create_osf

CLI_ACTOR = Actor(admin_id=None, name="qvd-cli", tenant_id=None, permissions=frozenset({"*"}), source="CLI")


def image_cache_dir(node: Node) -> Path:
    return Path(node.cfg.get_str("image.cache") or "/var/cache/qvd/images")


def build(node: Node, profile: str, packages: list[str] | None) -> Path:
    from qvd.images.build import build_image

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    return build_image(
        profile=profile,
        packages=packages,
        suite=node.cfg.get_str("image.suite"),
        mirror=node.cfg.get_str("image.mirror"),
        cache_dir=image_cache_dir(node),
        progress=progress,
    )


def ensure_osf(node: Node, name: str, tenant: str = "default", memory: int | None = None) -> int:
    with node.factory() as s:
        osf = s.scalars(
            select(Osf).join(Tenant, Tenant.id == Osf.tenant_id).where(Osf.name == name, Tenant.name == tenant)
        ).one_or_none()
        if osf is not None:
            return osf.id
    data: dict[str, Any] = {"name": name, "tenant": tenant}
    if memory:
        data["memory"] = memory
    row = create_osf(node.factory, CLI_ACTOR, node.cfg, data)
    return int(row["id"])


def register(node: Node, tarball: Path, osf_id: int, tags: list[str], version: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"osf_id": osf_id, "disk_image": str(tarball), "tags": tags}
    if version:
        data["version"] = version
    return create_di(node.factory, CLI_ACTOR, node.paths.images, data)


def cmd_build(node: Node, profile: str, packages: str | None, osf: str, tenant: str, tags: list[str],
              version: str | None, create_osf_if_missing: bool) -> int:
    pkgs = [p.strip() for p in packages.split(",") if p.strip()] if packages else None
    try:
        osf_id = ensure_osf(node, osf, tenant) if create_osf_if_missing else _osf_id(node, osf, tenant)
    except NotFound as e:
        print(f"qvd: error: {e} (use --create-osf to create it)", file=sys.stderr)
        return 1
    print(f"building the {profile if not pkgs else 'custom'} desktop image...", file=sys.stderr)
    tarball = build(node, profile, pkgs)
    print(f"image ready: {tarball}", file=sys.stderr)
    row = register(node, tarball, osf_id, tags, version)
    print(f"registered DI {row['id']} of OSF '{osf}': version {row['version']}, tags {', '.join(row['tags'])}")
    return 0


def _osf_id(node: Node, name: str, tenant: str) -> int:
    with node.factory() as s:
        osf = s.scalars(
            select(Osf).join(Tenant, Tenant.id == Osf.tenant_id).where(Osf.name == name, Tenant.name == tenant)
        ).one_or_none()
        if osf is None:
            raise NotFound(f"OSF '{name}' does not exist in tenant '{tenant}'")
        return osf.id
