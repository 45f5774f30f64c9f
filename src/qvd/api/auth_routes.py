"""Admin API routes of user authentication: TOTP enrolment and login lockouts.

Wired into the app by :func:`qvd.api.app.create_app` (``app.include_router(auth_router())``).

* ``POST /api/v1/users/{id}/totp`` - new TOTP secret (replaces any previous one); the answer
  carries the secret and the ``otpauth://`` URI, the only time they are shown (``Cache-Control:
  no-store``); audited ``user.totp_enable`` without the secret;
* ``DELETE /api/v1/users/{id}/totp`` - remove it; audited ``user.totp_disable``;
* ``POST /api/v1/users/{id}/unlock`` - forget the user's failed logins (ends a lockout);
  audited ``user.unlock``;
* ``GET /api/v1/lockouts/addresses`` and ``DELETE /api/v1/lockouts/addresses/{address}`` - client
  addresses with failed logins (platform administrators); audited ``address.unlock``.

The lockout state of a user is part of the user resource (``failed_logins``, ``locked_until``)
and its TOTP state too (``totp_enabled``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from qvd.api.app import ActorDep, ApiState
from qvd.services import lockout, totp
from qvd.services.base import jsonable


def _state(request: Request) -> ApiState:
    st: ApiState = request.app.state.qvd
    return st


def auth_router() -> APIRouter:
    api = APIRouter(prefix="/api/v1")

    @api.post("/users/{obj_id}/totp", tags=["user"], name="enable_user_totp")
    def totp_enable(obj_id: int, request: Request, actor: ActorDep) -> JSONResponse:
        st = _state(request)
        result = totp.enable_totp(st.factory, actor, st.node, st.paths, obj_id)
        # The secret must not stay in any cache on the way back.
        return JSONResponse(jsonable(result), headers={"Cache-Control": "no-store"})

    @api.delete("/users/{obj_id}/totp", tags=["user"], name="disable_user_totp")
    def totp_disable(obj_id: int, request: Request, actor: ActorDep) -> Any:
        return jsonable(totp.disable_totp(_state(request).factory, actor, obj_id))

    @api.post("/users/{obj_id}/unlock", tags=["user"], name="unlock_user")
    def user_unlock(obj_id: int, request: Request, actor: ActorDep) -> Any:
        return jsonable(lockout.unlock_user(_state(request).factory, actor, obj_id))

    @api.get("/lockouts/addresses", tags=["user"], name="list_address_lockouts")
    def addresses(request: Request, actor: ActorDep) -> Any:
        items = lockout.list_addresses(_state(request).factory, actor)
        return {"total": len(items), "items": jsonable(items)}

    @api.delete("/lockouts/addresses/{address}", status_code=204, tags=["user"], name="unlock_address")
    def address_unlock(address: str, request: Request, actor: ActorDep) -> Response:
        lockout.unlock_address(_state(request).factory, actor, address)
        return Response(status_code=204)

    return api
