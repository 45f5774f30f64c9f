"""The ``auto`` authentication plugin: users accepted by a back-end are provisioned at first login.

It authenticates nobody itself; it runs after a successful login (usually by
``ldap``: ``l7r.auth.plugins = auto,ldap``) and

1. creates the user in the tenant if the database does not know it (no password:
   the ``default`` plugin will never accept it, only the back-end that did);
2. if the user owns no VM of the OSF ``auth.auto.osf``, creates
   ``auth.auto.max_vms`` of them (``0`` = users only), named ``<login>-1``,
   ``<login>-2``... (the first free names), with the DI tag ``auth.auto.di_tag``.

Both go through the domain services (:func:`qvd.services.users.create_user`,
:func:`qvd.services.vms.create_vm`), so they get the same checks, address
allocation and audit rows as an administrator's, with the actor ``l7r:<node>``.
Two L7Rs provisioning the same new user at once is harmless: the loser finds
the user (or the VM name) already there and carries on.

Blocked users get nothing: the chain refuses them right after this plugin.
At start, for every tenant using it: ``auth.auto.osf`` must name an OSF of that
tenant and ``auth.auto.di_tag`` must be a tag of it (``default``/``head`` always are).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select

from qvd.core.config import Config
from qvd.core.errors import AlreadyExists, ConfigError, QvdError
from qvd.db.engine import transaction
from qvd.db.models import DiTag, Osf, User, Vm
from qvd.l7r.auth.base import Attempt, AuthPlugin
from qvd.services.base import Actor
from qvd.services.users import create_user
from qvd.services.vms import create_vm

log = logging.getLogger(__name__)

#: What the plugin may do, and nothing else.
PERMISSIONS = frozenset({"user.see", "user.create", "vm.see", "vm.create"})


class AutoPlugin(AuthPlugin):
    name = "auto"

    def check_config(self, cfg: Config, tenant_id: int | None) -> None:
        osf = cfg.get_str("auth.auto.osf")
        tag = cfg.get_str("auth.auto.di_tag")
        if cfg.get_int("auth.auto.max_vms") == 0:
            return
        if not osf:
            raise ConfigError("auth.auto.osf is not set: name the OSF of the VMs auto-provisioned users get "
                              "(or set auth.auto.max_vms = 0 to provision users only)")
        if tenant_id is None:
            return  # no tenant yet: nobody can log in
        with transaction(self.ctx.factory) as s:
            osf_id = s.scalar(select(Osf.id).where(Osf.tenant_id == tenant_id, Osf.name == osf))
            if osf_id is None:
                raise ConfigError(f"auth.auto.osf: the tenant has no OSF named {osf!r}")
            if tag not in ("default", "head") and s.scalar(
                select(DiTag.id).where(DiTag.osf_id == osf_id, DiTag.tag == tag)
            ) is None:
                raise ConfigError(f"auth.auto.di_tag: OSF {osf!r} has no disk image tagged {tag!r}")

    def _actor(self, attempt: Attempt) -> Actor:
        return Actor(admin_id=None, name=self.ctx.actor_name, tenant_id=attempt.tenant_id, permissions=PERMISSIONS,
                     source="l7r", ip=attempt.client_ip)

    def _find_user(self, tenant_id: int, login: str, cfg: Config) -> Any:
        col = User.login if cfg.get_bool("model.user.login.case-sensitive") else func.lower(User.login)
        with transaction(self.ctx.factory) as s:
            return s.execute(select(User.id, User.login, User.blocked)
                             .where(User.tenant_id == tenant_id, col == login)).first()

    def after_authenticate(self, attempt: Attempt, cfg: Config) -> None:
        if attempt.tenant_id is None:
            return
        tenant_id = attempt.tenant_id
        case_sensitive = cfg.get_bool("model.user.login.case-sensitive")
        login = attempt.login.strip() if case_sensitive else attempt.login.strip().lower()
        actor = self._actor(attempt)
        row = self._find_user(tenant_id, login, cfg)
        if row is None:
            try:
                create_user(self.ctx.factory, actor, self.ctx.node_cfg,
                            {"name": login, "tenant": attempt.tenant,
                             "description": "created at first login (auto-provisioning)"})
                log.info("auto-provisioned user %s@%s", login, attempt.tenant)
            except AlreadyExists:
                pass  # another L7R was faster
            row = self._find_user(tenant_id, login, cfg)
            if row is None:  # pragma: no cover - created or found just above
                raise QvdError(f"user {login}@{attempt.tenant} vanished during provisioning")
        if row.blocked:
            return
        self._provision_vms(actor, int(row.id), str(row.login), tenant_id, cfg)

    def _provision_vms(self, actor: Actor, user_id: int, login: str, tenant_id: int, cfg: Config) -> None:
        wanted = cfg.get_int("auth.auto.max_vms")
        osf = cfg.get_str("auth.auto.osf")
        if wanted == 0 or not osf:
            return
        with transaction(self.ctx.factory) as s:
            osf_id = s.scalar(select(Osf.id).where(Osf.tenant_id == tenant_id, Osf.name == osf))
            if osf_id is None:
                raise ConfigError(f"auth.auto.osf: the tenant has no OSF named {osf!r}")
            if s.scalar(select(func.count(Vm.id)).where(Vm.user_id == user_id, Vm.osf_id == osf_id)):
                return
            taken = set(s.scalars(select(Vm.name).where(Vm.user_id == user_id)))
        created = 0
        n = 0
        # A few spare names in case another L7R creates some of them at the same moment.
        while created < wanted and n < wanted + 16:
            n += 1
            name = f"{login}-{n}"
            if name in taken:
                continue
            try:
                vm = create_vm(self.ctx.factory, actor, self.ctx.node_cfg,
                               {"name": name, "user_id": user_id, "osf_id": osf_id,
                                "di_tag": cfg.get_str("auth.auto.di_tag"),
                                "description": "created at first login (auto-provisioning)"})
            except AlreadyExists:
                # Another L7R provisioning the same user (or taking the same address) at this moment.
                with transaction(self.ctx.factory) as s:
                    have = s.scalar(select(func.count(Vm.id)).where(Vm.user_id == user_id, Vm.osf_id == osf_id))
                if (have or 0) >= wanted:
                    return
                continue
            created += 1
            log.info("auto-provisioned VM %s (%s) for %s", vm.get("id"), name, login)
