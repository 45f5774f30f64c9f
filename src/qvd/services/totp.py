"""TOTP second factor (RFC 6238): per-user secrets sealed at rest, codes checked once.

* Codes: HOTP(secret, T) with T = floor((now - t0) / interval), ``token_size``
  digits, HMAC-SHA1 (what authenticator apps use) - keys
  ``l7r.auth.plugin.totp.{token_size,interval,t0}``.  Steps from
  T - ``leeway`` to T + ``leeway_before`` are accepted (clock skew).
* A code is accepted once: the last accepted step is stored per user and only a
  later step passes, written with a compare-and-swap so that two L7R nodes
  racing with the same code cannot both accept it.
* The secret (160 random bits, base32 as the apps expect) is sealed with
  :mod:`qvd.core.secretbox`, bound to the user id, in ``users.totp_secret``; it
  is shown once, when enabled, and never logged or audited.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pyotp
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from qvd.core.config import Config, Paths
from qvd.core.errors import InvalidState
from qvd.core.secretbox import SecretBox, box_for
from qvd.db.engine import transaction
from qvd.db.models import ObjectType, User
from qvd.db.queries import cas_update
from qvd.services.base import Actor, Change, audited
from qvd.services.common import view_row
from qvd.services.lookup import effective_config, get_user
from qvd.services.views import USER

log = logging.getLogger(__name__)

SECRET_BYTES = 20  # 160 bits, the key length RFC 4226 recommends


@dataclass(frozen=True)
class TotpParams:
    digits: int = 6
    interval: int = 30
    t0: int = 0
    leeway: int = 1
    leeway_before: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> TotpParams:
        return cls(
            digits=cfg.get_int("l7r.auth.plugin.totp.token_size"),
            interval=cfg.get_int("l7r.auth.plugin.totp.interval"),
            t0=cfg.get_int("l7r.auth.plugin.totp.t0"),
            leeway=cfg.get_int("l7r.auth.plugin.totp.leeway"),
            leeway_before=cfg.get_int("l7r.auth.plugin.totp.leeway_before"),
        )

    def step(self, now: float) -> int:
        return int((now - self.t0) // self.interval)


def purpose(user_id: int) -> str:
    """What a user's sealed secret is bound to: it opens for that user only."""
    return f"qvd:totp:user:{user_id}"


def new_secret() -> str:
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def code_at(secret32: str, step: int, digits: int) -> str:
    return str(pyotp.HOTP(secret32, digits=digits).at(step))


def matching_step(secret32: str, code: str, params: TotpParams, now: float) -> int | None:
    """The time step whose code is ``code`` within the accepted window, or None."""
    if len(code) != params.digits or not code.isdigit():
        return None
    current = params.step(now)
    found: int | None = None
    # Every candidate is computed and compared in constant time: no early exit to time.
    for step in range(current - params.leeway, current + params.leeway_before + 1):
        if step >= 0 and hmac.compare_digest(code_at(secret32, step, params.digits), code) and found is None:
            found = step
    return found


def provisioning_uri(secret32: str, account: str, issuer: str, params: TotpParams) -> str:
    """The ``otpauth://totp/...`` URI authenticator apps read (from a QR code).

    ``t0`` cannot be expressed in it: apps assume 0, so keep ``l7r.auth.plugin.totp.t0`` at 0
    for users enrolled with a QR code.
    """
    uri: str = pyotp.TOTP(secret32, digits=params.digits, interval=params.interval).provisioning_uri(
        name=account, issuer_name=issuer or None)
    return uri


def verify(factory: sessionmaker[Session], box: SecretBox, user_id: int, code: str, params: TotpParams,
           *, now: float | None = None) -> bool:
    """Whether ``code`` is the user's current code and was never accepted before (then it is burnt).

    Raises :class:`~qvd.core.secretbox.SecretError` / :class:`~qvd.core.errors.ConfigError` when the
    secret cannot be opened on this node (wrong or missing key file).
    """
    now = time.time() if now is None else now
    with transaction(factory) as s:
        row = s.execute(select(User.totp_secret, User.totp_last_step).where(User.id == user_id)).first()
    if row is None or not row.totp_secret:
        return False
    secret32 = box.open(row.totp_secret, purpose(user_id)).decode("ascii")
    step = matching_step(secret32, code, params, now)
    if step is None:
        return False
    if row.totp_last_step is not None and step <= row.totp_last_step:
        log.info("TOTP code of user %s replayed (step %s, last accepted %s)", user_id, step, row.totp_last_step)
        return False
    with transaction(factory) as s:
        last = User.totp_last_step
        ok = cas_update(s, update(User).where(User.id == user_id, User.totp_secret == row.totp_secret,
                                              last.is_(None) | (last < step)).values(totp_last_step=step))
    if not ok:
        log.info("TOTP code of user %s was accepted meanwhile by another login", user_id)
    return ok


def has_secret(factory: sessionmaker[Session], tenant_id: int, login_match: Any) -> bool | None:
    """Whether the user (``login_match`` a WHERE clause on the login) has TOTP; None = no such user."""
    with transaction(factory) as s:
        row = s.execute(select(User.totp_secret).where(User.tenant_id == tenant_id, login_match)).first()
    if row is None:
        return None
    return bool(row.totp_secret)


def enforced(cfg: Config) -> bool:
    """Whether the tenant's authentication chain runs the ``totp`` plugin."""
    return any("totp" in cfg.get_list(k) for k in ("l7r.auth.plugins.head", "l7r.auth.plugins",
                                                     "l7r.auth.plugins.tail"))


# --- administration -----------------------------------------------------------------------------


def enable_totp(factory: sessionmaker[Session], actor: Actor, node: Config, paths: Paths,
                user_id: int) -> dict[str, Any]:
    """Give the user a new TOTP secret (replacing any previous one).  Audited ``user.totp_enable``.

    Returns the secret and the otpauth URI: the only time they are shown.
    """
    actor.require("user.update")
    box = box_for(paths)
    secret32 = new_secret()
    result: dict[str, Any] = {}

    def work(s: Session, ch: Change) -> dict[str, Any]:
        u = get_user(s, actor, user_id)
        ch.object_id, ch.object_name, ch.tenant_id = u.id, u.login, u.tenant_id
        ch.before = {"totp_enabled": bool(u.totp_secret)}
        cfg = effective_config(s, node, u.tenant_id)
        params = TotpParams.from_config(cfg)
        u.totp_secret = box.seal(secret32.encode("ascii"), purpose(u.id))
        u.totp_last_step = None
        s.flush()
        ch.after = {"totp_enabled": True}
        result.update(
            user=view_row(s, USER, actor, u.id, ObjectType.USER),
            secret=secret32,
            uri=provisioning_uri(secret32, f"{u.login}@{u.tenant.name}",
                                 cfg.get_str("l7r.auth.plugin.totp.issuer"), params),
            digits=params.digits,
            interval=params.interval,
            enforced=enforced(cfg),
        )
        return result

    # No arguments are audited: nothing here may carry the secret into the log.
    return audited(factory, actor, "user.totp_enable", "user", work)


def disable_totp(factory: sessionmaker[Session], actor: Actor, user_id: int) -> dict[str, Any]:
    """Remove the user's TOTP secret.  Audited ``user.totp_disable``."""
    actor.require("user.update")

    def work(s: Session, ch: Change) -> dict[str, Any]:
        u = get_user(s, actor, user_id)
        ch.object_id, ch.object_name, ch.tenant_id = u.id, u.login, u.tenant_id
        if not u.totp_secret:
            raise InvalidState(f"user '{u.login}' has no TOTP secret")
        ch.before = {"totp_enabled": True}
        u.totp_secret = None
        u.totp_last_step = None
        s.flush()
        ch.after = {"totp_enabled": False}
        return view_row(s, USER, actor, u.id, ObjectType.USER)

    return audited(factory, actor, "user.totp_disable", "user", work)


def enrolled_secrets_sample(factory: sessionmaker[Session]) -> tuple[int, str] | None:
    """(user id, sealed secret) of one enrolled user, to check at start that this node's key opens it."""
    with transaction(factory) as s:
        row = s.execute(select(User.id, User.totp_secret).where(User.totp_secret.is_not(None)).limit(1)).first()
    return (int(row.id), str(row.totp_secret)) if row is not None else None

