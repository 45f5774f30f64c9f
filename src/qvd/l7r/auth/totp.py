"""The ``totp`` authentication plugin: a time-based one-time code as second factor.

The client has no field for it, so the user types the code right after the
password (reference §3.1.4): with ``l7r.auth.plugin.totp.token_size`` = 6 the
password field ``s3cret123456`` is the password ``s3cret`` and the code
``123456``.  The password is checked by the next plugins (``default``,
``ldap``...), the code here (:mod:`qvd.services.totp`: RFC 6238 window,
each code accepted once).

Every user of a tenant whose chain has ``totp`` needs a secret (``qa user alice
totp enable``), unless ``l7r.auth.plugin.totp.optional`` lets users without one
log in with the password alone.

At start the plugin checks that this node's ``$QVD_ROOT/etc/secret.key`` opens
the secrets already enrolled (the file must be the same on every node).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import func, select

from qvd.core.config import Config
from qvd.core.errors import ConfigError, Unavailable
from qvd.core.secretbox import SecretError, box_for
from qvd.db.engine import transaction
from qvd.db.models import User
from qvd.l7r.auth.base import Attempt, AuthPlugin, PluginContext
from qvd.services import totp

log = logging.getLogger(__name__)


class TotpPlugin(AuthPlugin):
    name = "totp"

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.box = box_for(ctx.node_paths)
        self._key_checked = False
        self._lock = threading.Lock()

    def check_config(self, cfg: Config, tenant_id: int | None) -> None:
        with self._lock:
            if self._key_checked:
                return
            sample = totp.enrolled_secrets_sample(self.ctx.factory)
            if sample is not None:
                user_id, sealed = sample
                try:
                    self.box.open(sealed, totp.purpose(user_id))
                except SecretError as e:
                    raise ConfigError(f"the TOTP secrets cannot be opened on this node: {e.message}") from None
            self._key_checked = True

    @staticmethod
    def _login_match(login: str, cfg: Config) -> Any:
        if cfg.get_bool("model.user.login.case-sensitive"):
            return User.login == login
        return func.lower(User.login) == login.lower()

    def split_second_factor(self, attempt: Attempt, cfg: Config) -> tuple[str, str] | None:
        if attempt.tenant_id is None:
            return None
        if cfg.get_bool("l7r.auth.plugin.totp.optional") and not totp.has_secret(
            self.ctx.factory, attempt.tenant_id, self._login_match(attempt.login, cfg)
        ):
            return None
        n = cfg.get_int("l7r.auth.plugin.totp.token_size")
        pw = attempt.password
        # A password no longer than the code leaves an empty password, which every plugin refuses:
        # never fall back to "no second factor" here.
        return (pw[:-n] if len(pw) > n else ""), pw[-n:]

    def authenticate_second_factor(self, attempt: Attempt, cfg: Config) -> bool | None:
        code = attempt.second_factor
        if code is None or attempt.tenant_id is None:
            return None
        with transaction(self.ctx.factory) as s:
            user_id = s.scalar(select(User.id).where(User.tenant_id == attempt.tenant_id,
                                                     self._login_match(attempt.login, cfg)))
        if user_id is None:
            return False
        try:
            return totp.verify(self.ctx.factory, self.box, int(user_id), code, totp.TotpParams.from_config(cfg))
        except (SecretError, ConfigError) as e:
            # Our fault (key file), not the user's: reported as an outage, not counted as a failure.
            raise Unavailable(f"TOTP secret of user {user_id} cannot be opened on this node: {e.message}") from None
