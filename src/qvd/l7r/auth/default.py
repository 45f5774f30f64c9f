"""The ``default`` authentication plugin: users, passwords and tokens of our own database.

* Tenant: the typed login is split at the last of the characters in
  ``l7r.auth.plugin.default.separators`` (``alice@acme``, ``alice#acme``);
  without one the tenant is ``l7r.auth.plugin.default.tenant``.
* Password: argon2id hash in ``users.password_hash``.  An unknown user costs
  the same argon2 work as a known one, so timing does not reveal which logins exist.
* Bearer token: looked up by its SHA-256 in ``user_tokens``; expired rows are
  deleted; a single-use token (``multi_use`` false) is consumed on first use
  (the reference ignored the column and made every token single-use, §10.2.5).
* Access: a user may open the VMs it owns.
"""

from __future__ import annotations

import functools
import logging

from sqlalchemy import delete, func, select, update

from qvd.core.config import Config
from qvd.core.security import hash_password, random_password, token_hash, verify_password
from qvd.db.engine import transaction
from qvd.db.models import User, UserToken, utcnow
from qvd.db.queries import cas_update
from qvd.l7r.auth.base import Attempt, AuthPlugin, BearerGrant, Identity, VmInfo

log = logging.getLogger(__name__)


@functools.cache
def _dummy_hash() -> str:
    return hash_password(random_password())


def split_login(raw_login: str, separators: str, default_tenant: str) -> tuple[str, str]:
    """(login, tenant) from ``login``, ``login@tenant`` or ``login#tenant``."""
    cut = max((raw_login.rfind(c) for c in separators), default=-1)
    if cut > 0 and cut < len(raw_login) - 1:
        return raw_login[:cut], raw_login[cut + 1 :]
    return raw_login, default_tenant


class DefaultPlugin(AuthPlugin):
    name = "default"

    def find_tenant(self, raw_login: str, cfg: Config) -> tuple[str, str] | None:
        return split_login(
            raw_login,
            cfg.get_str("l7r.auth.plugin.default.separators"),
            cfg.get_str("l7r.auth.plugin.default.tenant"),
        )

    def authenticate_basic(self, attempt: Attempt, cfg: Config) -> bool | None:
        if attempt.tenant_id is None:
            return None
        login_col = User.login if cfg.get_bool("model.user.login.case-sensitive") else func.lower(User.login)
        login = attempt.login if cfg.get_bool("model.user.login.case-sensitive") else attempt.login.lower()
        with transaction(self.ctx.factory) as s:
            stored = s.scalars(
                select(User.password_hash).where(User.tenant_id == attempt.tenant_id, login_col == login)
            ).first()
        # argon2 runs outside the transaction: it takes tens of milliseconds.
        if stored is None:
            verify_password(_dummy_hash(), attempt.password)
            return False
        return verify_password(stored, attempt.password)

    def authenticate_bearer(self, token: str, cfg: Config) -> BearerGrant | None:
        digest = token_hash(token)
        now = utcnow()
        with transaction(self.ctx.factory) as s:
            row = s.get(UserToken, digest)
            if row is None:
                return None
            if row.expires_at <= now:
                s.execute(delete(UserToken).where(UserToken.token_hash == digest))
                log.info("expired bearer token of user %s removed", row.user_id)
                return None
            stmt = update(UserToken).where(UserToken.token_hash == digest).values(used_at=now)
            if not row.multi_use:
                stmt = stmt.where(UserToken.used_at.is_(None))
            if not cas_update(s, stmt):
                log.info("single-use bearer token of user %s was already used", row.user_id)
                return None
            params = {str(k): str(v) for k, v in (row.auth_params or {}).items()}
            return BearerGrant(user_id=row.user_id, params=params, vm_id=row.vm_id)

    def allow_access_to_vm(self, identity: Identity, vm: VmInfo, cfg: Config) -> bool | None:
        return True if vm.user_id == identity.user_id else None
