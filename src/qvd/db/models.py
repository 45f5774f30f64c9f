"""SQLAlchemy 2 models: the whole schema of QVD-py.

The same models serve SQLite (single node) and PostgreSQL (clusters).  Schema
changes go through Alembic migrations in ``qvd/db/migrations``; a test checks that
the migrations produce exactly these models.

Conventions:

* states and commands are Enums from :mod:`qvd.core.states`, stored as strings
  with a CHECK constraint (no native enums, so both databases behave the same);
* every timestamp is an aware UTC ``datetime`` (:class:`UtcDateTime`);
* secrets are never stored in clear: passwords are argon2id hashes, tokens are
  stored as their SHA-256;
* ``*_runtimes`` rows are the "blackboard" the daemons coordinate on; they are
  created together with their object and always exist.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SaEnum
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from qvd.core.states import HostCmd, HostState, UserCmd, UserState, VmCmd, VmState


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both SQLite (which drops the zone) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _enum(e: type[enum.Enum], name: str) -> SaEnum:
    return SaEnum(
        e,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda cls: [m.value for m in cls],
        validate_strings=True,
    )


class DiState(enum.StrEnum):
    """Life of a disk image: imported files are verified before they are usable."""

    NEW = "new"
    UPLOADING = "uploading"
    VERIFYING = "verifying"
    READY = "ready"
    FAILED = "failed"


class ObjectType(enum.StrEnum):
    """Objects that carry custom properties (and appear in the audit log)."""

    USER = "user"
    VM = "vm"
    HOST = "host"
    OSF = "osf"
    DI = "di"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UtcDateTime, dict[str, Any]: JSON}


def _null_unique(name: str, table: str, *cols: str, where: str) -> Index:
    """A unique index that applies only where ``where`` holds (both dialects support it)."""
    return Index(name, *cols, unique=True, sqlite_where=text(where), postgresql_where=text(where))


# --- tenancy and administration -------------------------------------------------------------------


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Administrator(Base):
    """An operator.  ``tenant_id`` NULL = platform administrator (every tenant)."""

    __tablename__ = "administrators"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        _null_unique("uq_administrators_platform_name", "administrators", "name", where="tenant_id IS NULL"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(256))
    description: Mapped[str] = mapped_column(Text, default="")
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    roles: Mapped[list[Role]] = relationship(secondary="admin_roles", lazy="selectin")


class Role(Base):
    """A named set of ACLs; roles inherit other roles.  ``tenant_id`` NULL = global role."""

    __tablename__ = "roles"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        _null_unique("uq_roles_global_name", "roles", "name", where="tenant_id IS NULL"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    fixed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Acl(Base):
    __tablename__ = "acls"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")


class RoleAcl(Base):
    __tablename__ = "role_acls"
    role_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)
    acl_id: Mapped[int] = mapped_column(ForeignKey("acls.id", ondelete="CASCADE"), primary_key=True)
    positive: Mapped[bool] = mapped_column(Boolean, default=True)


class RoleInheritance(Base):
    __tablename__ = "role_inheritance"
    inheritor_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)
    inherited_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)


class AdminRole(Base):
    __tablename__ = "admin_roles"
    admin_id: Mapped[int] = mapped_column(ForeignKey("administrators.id", ondelete="CASCADE"), primary_key=True)
    role_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)


class AdminToken(Base):
    """A bearer token of the admin API (stored as its SHA-256)."""

    __tablename__ = "admin_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("administrators.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    source: Mapped[str] = mapped_column(String(64), default="")


# --- users, images, VMs -------------------------------------------------------------------------


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "login"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    login: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str | None] = mapped_column(String(256))
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # TOTP second factor: the secret sealed with AES-GCM (qvd.core.secretbox), never in clear; and the
    # last time step accepted, so that a code cannot be replayed (not even on another L7R node).
    totp_secret: Mapped[str | None] = mapped_column(Text)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Osf(Base):
    """OS flavour: what every desktop of the OSF gets (memory, home size, overlay)."""

    __tablename__ = "osfs"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    memory: Mapped[int] = mapped_column(Integer, default=256)  # MB
    use_overlay: Mapped[bool] = mapped_column(Boolean, default=True)
    user_storage: Mapped[int] = mapped_column(Integer, default=0)  # MB, 0 = no size limit set
    is_application: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Di(Base):
    """Disk image: one version of an OSF's root filesystem (a tarball under storage/images)."""

    __tablename__ = "dis"
    __table_args__ = (UniqueConstraint("osf_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    osf_id: Mapped[int] = mapped_column(ForeignKey("osfs.id", ondelete="RESTRICT"), index=True)
    path: Mapped[str] = mapped_column(String(512))
    version: Mapped[str] = mapped_column(String(64))
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[DiState] = mapped_column(_enum(DiState, "di_state"), default=DiState.READY)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    osf: Mapped[Osf] = relationship(lazy="joined")
    tags: Mapped[list[DiTag]] = relationship(lazy="selectin", back_populates="di", cascade="all, delete-orphan")


class DiTag(Base):
    """A tag names one DI of an OSF at a time (unique per OSF); fixed tags never move."""

    __tablename__ = "di_tags"
    __table_args__ = (UniqueConstraint("osf_id", "tag"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    osf_id: Mapped[int] = mapped_column(ForeignKey("osfs.id", ondelete="CASCADE"), index=True)
    di_id: Mapped[int] = mapped_column(ForeignKey("dis.id", ondelete="CASCADE"), index=True)
    tag: Mapped[str] = mapped_column(String(128))
    fixed: Mapped[bool] = mapped_column(Boolean, default=False)
    di: Mapped[Di] = relationship(back_populates="tags")


class Vm(Base):
    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("user_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    osf_id: Mapped[int] = mapped_column(ForeignKey("osfs.id", ondelete="RESTRICT"), index=True)
    di_tag: Mapped[str] = mapped_column(String(128), default="default")
    ip: Mapped[str] = mapped_column(String(15), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    user: Mapped[User] = relationship(lazy="joined")
    osf: Mapped[Osf] = relationship(lazy="joined")
    runtime: Mapped[VmRuntime] = relationship(
        lazy="joined", uselist=False, back_populates="vm", cascade="all, delete-orphan"
    )


class VmRuntime(Base):
    """Runtime blackboard of one VM: desired commands and observed states."""

    __tablename__ = "vm_runtimes"
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    current_di_id: Mapped[int | None] = mapped_column(ForeignKey("dis.id", ondelete="SET NULL"))
    vm_state: Mapped[VmState] = mapped_column(_enum(VmState, "vm_state"), default=VmState.STOPPED)
    vm_state_ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    vm_cmd: Mapped[VmCmd | None] = mapped_column(_enum(VmCmd, "vm_cmd"))
    vm_step: Mapped[str] = mapped_column(String(32), default="")  # resumable HKD step of the current state
    user_state: Mapped[UserState] = mapped_column(_enum(UserState, "user_state"), default=UserState.DISCONNECTED)
    user_state_ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    user_cmd: Mapped[UserCmd | None] = mapped_column(_enum(UserCmd, "user_cmd"))
    real_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    l7r_host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    l7r_pid: Mapped[int | None] = mapped_column(Integer)
    l7r_conn: Mapped[str | None] = mapped_column(String(64))  # id of the tunnel inside that L7R
    vm_address: Mapped[str | None] = mapped_column(String(64))
    vm_vma_port: Mapped[int | None] = mapped_column(Integer)
    vm_x_port: Mapped[int | None] = mapped_column(Integer)
    vma_ok_ts: Mapped[dt.datetime | None]
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    expiration_soft: Mapped[dt.datetime | None]
    expiration_hard: Mapped[dt.datetime | None]
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_error_ts: Mapped[dt.datetime | None]
    run_attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_ok: Mapped[int] = mapped_column(Integer, default=0)
    vm: Mapped[Vm] = relationship(back_populates="runtime")


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    address: Mapped[str] = mapped_column(String(64), unique=True)
    frontend: Mapped[bool] = mapped_column(Boolean, default=True)
    backend: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    runtime: Mapped[HostRuntime] = relationship(
        lazy="joined", uselist=False, back_populates="host", cascade="all, delete-orphan"
    )


class HostRuntime(Base):
    __tablename__ = "host_runtimes"
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[HostState] = mapped_column(_enum(HostState, "host_state"), default=HostState.STOPPED)
    state_ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    cmd: Mapped[HostCmd | None] = mapped_column(_enum(HostCmd, "host_cmd"))
    pid: Mapped[int | None] = mapped_column(Integer)
    ok_ts: Mapped[dt.datetime | None]
    usable_ram: Mapped[int] = mapped_column(Integer, default=0)  # MB free for desktops
    usable_cpu: Mapped[float] = mapped_column(Float, default=0.0)  # idle CPUs
    load: Mapped[float] = mapped_column(Float, default=0.0)
    http_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    auth_attempts: Mapped[int] = mapped_column(BigInteger, default=0)
    auth_ok: Mapped[int] = mapped_column(BigInteger, default=0)
    nx_attempts: Mapped[int] = mapped_column(BigInteger, default=0)
    nx_ok: Mapped[int] = mapped_column(BigInteger, default=0)
    short_sessions: Mapped[int] = mapped_column(BigInteger, default=0)
    host: Mapped[Host] = relationship(back_populates="runtime")


# --- configuration, properties, tokens, audit ---------------------------------------------------


class ConfigRow(Base):
    """A database override of a config key; ``tenant_id`` NULL = global."""

    __tablename__ = "configs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key"),
        _null_unique("uq_configs_global_key", "configs", "key", where="tenant_id IS NULL"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(128))
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Property(Base):
    """A custom property value on a user, VM, host, OSF or DI."""

    __tablename__ = "properties"
    __table_args__ = (UniqueConstraint("object_type", "object_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    object_type: Mapped[ObjectType] = mapped_column(_enum(ObjectType, "object_type"))
    object_id: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(256))
    value: Mapped[str] = mapped_column(Text)


class UserToken(Base):
    """A user bearer token for the L7R (stored as its SHA-256)."""

    __tablename__ = "user_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    multi_use: Mapped[bool] = mapped_column(Boolean, default=False)
    used_at: Mapped[dt.datetime | None]
    auth_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class LoginFailure(Base):
    """Recent failed logins of one login name of a tenant, whether a user has that name or not
    (so that a lockout does not reveal which logins exist).  Shared by every L7R of the cluster."""

    __tablename__ = "login_failures"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    login: Mapped[str] = mapped_column(String(255), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    first_failure_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_failure_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    locked_until: Mapped[dt.datetime | None]


class AddressFailure(Base):
    """Recent failed logins from one client address (any login, any tenant)."""

    __tablename__ = "address_failures"
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    first_failure_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_failure_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    locked_until: Mapped[dt.datetime | None]


class AuditEntry(Base):
    """Append-only audit log: who did what, when, from where, with before/after values.

    Rows are never updated or deleted (database triggers refuse it).  Refused
    attempts are logged too, with ``status`` = the error code.
    """

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    admin_id: Mapped[int | None] = mapped_column(Integer)
    admin_name: Mapped[str] = mapped_column(String(64), default="")
    tenant_id: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32), default="")
    object_id: Mapped[int | None] = mapped_column(Integer)
    object_name: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(32), default="ok")
    message: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(32), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    arguments: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
