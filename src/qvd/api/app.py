"""The admin REST API (FastAPI).  Routers only translate HTTP to domain-service calls;
every rule lives in ``qvd.services``.

Errors are RFC 9457 problem+json with the status of the error class
(:mod:`qvd.core.errors`).  See docs/api.md for the contract.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

import qvd
from qvd.core.config import Config, Paths
from qvd.core.errors import AuthenticationFailed, FilterError, InputError, MalformedRequest, QvdError
from qvd.db.models import ObjectType
from qvd.services import audit as audit_svc
from qvd.services import configs, hosts, images, tenancy, users, vms
from qvd.services.base import Actor, Change, audit_only, jsonable
from qvd.services.properties import set_property
from qvd.services.query import Page

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
RESERVED_QUERY = {"filters", "order_by", "offset", "limit", "fields", "tenant"}


def problem(status: int, title: str, detail: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"type": f"urn:qvd:error:{code}", "title": title, "status": status, "detail": detail, "code": code},
        status_code=status,
        media_type=PROBLEM,
        headers={"WWW-Authenticate": 'Bearer realm="qvd"'} if status == 401 else None,
    )


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           422: "Unprocessable Content", 500: "Internal Server Error", 503: "Service Unavailable"}


def _page(p: Page) -> dict[str, Any]:
    return {"total": p.total, "offset": p.offset, "limit": p.limit, "items": jsonable(p.items)}


@dataclass
class ApiState:
    factory: sessionmaker[Session]
    node: Config
    paths: Paths


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def source_of(request: Request) -> str:
    return request.headers.get("x-qvd-source", "API")[:32]


def actor_dep(request: Request) -> Actor:
    st: ApiState = request.app.state.qvd
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("missing 'Authorization: Bearer <token>' header; log in at POST /api/v1/login")
    return tenancy.actor_for_token(st.factory, token.strip(), source=source_of(request), ip=client_ip(request))


ActorDep = Annotated[Actor, Depends(actor_dep)]
async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, whatever Content-Type the client declared."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    return data


JsonBody = Annotated[dict[str, Any], Depends(json_body)]


def create_app(factory: sessionmaker[Session], node: Config, paths: Paths) -> FastAPI:
    app = FastAPI(
        title="QVD-py admin API",
        version=qvd.__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    st = ApiState(factory, node, paths)
    app.state.qvd = st

    @app.exception_handler(QvdError)
    async def _qvd_error(_req: Request, exc: QvdError) -> JSONResponse:
        return problem(exc.http_status, _TITLES.get(exc.http_status, "Error"), exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        body_error = any(e.get("type") == "json_invalid" for e in exc.errors())
        status = 400 if body_error else 422
        return problem(status, _TITLES[status], "; ".join(parts) or "invalid request", "invalid-input")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, _TITLES.get(exc.status_code, "Error"), str(exc.detail), "http-error")

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, "Internal Server Error", "internal error; see the qvd-api log", "internal")

    api = APIRouter(prefix="/api/v1")

    def list_args(request: Request, resource: str, actor: Actor) -> dict[str, Any]:
        """filters (JSON) + field=value shorthands + order/offset/limit/fields.  A bad
        query is a refused attempt and is audited."""
        q = request.query_params
        try:
            tree: Any = None
            if "filters" in q:
                try:
                    tree = json.loads(q["filters"])
                except json.JSONDecodeError as e:
                    raise FilterError(f"'filters' is not valid JSON: {e.msg} at position {e.pos}") from None
            shorthand = {k: v for k, v in q.items() if k not in RESERVED_QUERY}
            if shorthand:
                tree = {"-and": [tree or {}, shorthand]}
            try:
                offset = int(q.get("offset", "0"))
                limit = int(q.get("limit", "100"))
            except ValueError:
                raise FilterError("offset and limit must be integers") from None
            fields = [f for f in q.get("fields", "").split(",") if f.strip()] or None
            return {"filters": tree, "order_by": q.get("order_by"), "offset": offset, "limit": limit,
                    "fields": fields, "max_limit": st.node.get_int("api.page.max")}
        except QvdError as e:
            audit_only(st.factory, actor, f"{resource}.list", Change(resource), e,
                       arguments={"query": str(q)})
            raise

    def audited_list(resource: str, fn: Callable[..., Page], actor: Actor, args: dict[str, Any]) -> Page:
        try:
            return fn(st.factory, actor, **args)
        except (FilterError, InputError) as e:
            audit_only(st.factory, actor, f"{resource}.list", Change(resource), e, arguments=jsonable(args))
            raise

    # --- session -------------------------------------------------------------------------------
    @api.post("/login", tags=["session"])
    def login(request: Request, body: JsonBody) -> dict[str, Any]:
        login_ = body.get("login")
        password = body.get("password")
        tenant = body.get("tenant")
        if not isinstance(login_, str) or not isinstance(password, str):
            raise InputError("login needs 'login' and 'password' strings")
        if tenant is not None and not isinstance(tenant, str):
            raise InputError("'tenant' must be a tenant name")
        return tenancy.login(st.factory, login_, password, tenant, ttl=st.node.get_int("api.token.ttl"),
                             source=source_of(request), ip=client_ip(request))

    @api.post("/logout", status_code=204, tags=["session"])
    def logout(request: Request, actor: ActorDep) -> Response:
        tenancy.logout(st.factory, request.headers["authorization"].partition(" ")[2].strip())
        return Response(status_code=204)

    @api.get("/whoami", tags=["session"])
    def whoami(actor: ActorDep) -> dict[str, Any]:
        return {"id": actor.admin_id, "name": actor.name, "tenant_id": actor.tenant_id,
                "permissions": sorted(actor.permissions)}

    # --- generic CRUD --------------------------------------------------------------------------
    def crud(
        path: str,
        resource: str,
        *,
        lister: Callable[..., Page],
        getter: Callable[[Actor, int], dict[str, Any]],
        creator: Callable[[Actor, dict[str, Any]], dict[str, Any]] | None,
        updater: Callable[[Actor, int, dict[str, Any], str], dict[str, Any]] | None,
        deleter: Callable[[Actor, int], None] | None,
        blockable: bool = False,
        obj_type: ObjectType | None = None,
    ) -> None:
        tag: list[str | Enum] = [resource]

        @api.get(f"/{path}", tags=tag, name=f"list_{path}")
        def _list(request: Request, actor: ActorDep) -> dict[str, Any]:
            return _page(audited_list(resource, lister, actor, list_args(request, resource, actor)))

        @api.get(f"/{path}/{{obj_id}}", tags=tag, name=f"get_{resource}")
        def _get(obj_id: int, actor: ActorDep) -> Any:
            return jsonable(getter(actor, obj_id))

        if creator is not None:
            create = creator

            @api.post(f"/{path}", status_code=201, tags=tag, name=f"create_{resource}")
            def _create(actor: ActorDep, body: JsonBody) -> Any:
                return jsonable(create(actor, body))

        if updater is not None:
            upd = updater

            @api.patch(f"/{path}/{{obj_id}}", tags=tag, name=f"update_{resource}")
            def _update(obj_id: int, actor: ActorDep, body: JsonBody) -> Any:
                return jsonable(upd(actor, obj_id, body, f"{resource}.update"))

            if blockable:
                @api.post(f"/{path}/{{obj_id}}/block", tags=tag, name=f"block_{resource}")
                def _block(obj_id: int, actor: ActorDep) -> Any:
                    return jsonable(upd(actor, obj_id, {"blocked": True}, f"{resource}.block"))

                @api.post(f"/{path}/{{obj_id}}/unblock", tags=tag, name=f"unblock_{resource}")
                def _unblock(obj_id: int, actor: ActorDep) -> Any:
                    return jsonable(upd(actor, obj_id, {"blocked": False}, f"{resource}.unblock"))

        if deleter is not None:
            dele = deleter

            @api.delete(f"/{path}/{{obj_id}}", status_code=204, tags=tag, name=f"delete_{resource}")
            def _delete(obj_id: int, actor: ActorDep) -> Response:
                dele(actor, obj_id)
                return Response(status_code=204)

        if obj_type is not None:
            ot = obj_type

            @api.put(f"/{path}/{{obj_id}}/properties/{{key}}", tags=tag, name=f"set_{resource}_property")
            def _set_prop(obj_id: int, key: str, actor: ActorDep, body: JsonBody) -> Any:
                value = body.get("value")
                if value is None or isinstance(value, dict | list):
                    raise InputError("property value must be given as {\"value\": \"...\"}")
                set_property(st.factory, actor, ot, obj_id, key, str(value))
                return jsonable(getter(actor, obj_id))

            @api.delete(f"/{path}/{{obj_id}}/properties/{{key}}", tags=tag, name=f"delete_{resource}_property")
            def _del_prop(obj_id: int, key: str, actor: ActorDep) -> Any:
                set_property(st.factory, actor, ot, obj_id, key, None)
                return jsonable(getter(actor, obj_id))

    f, node = st.factory, st.node
    crud("tenants", "tenant",
         lister=tenancy.list_tenants,
         getter=lambda a, i: tenancy.get_tenant_row(f, a, i),
         creator=lambda a, d: tenancy.create_tenant(f, a, d),
         updater=lambda a, i, d, act: tenancy.update_tenant(f, a, i, d, act),
         deleter=lambda a, i: tenancy.delete_tenant(f, a, i), blockable=True)
    crud("administrators", "admin",
         lister=tenancy.list_admins,
         getter=lambda a, i: tenancy.get_admin_row(f, a, i),
         creator=lambda a, d: tenancy.create_admin(f, a, d),
         updater=lambda a, i, d, act: tenancy.update_admin(f, a, i, d, act),
         deleter=lambda a, i: tenancy.delete_admin(f, a, i), blockable=True)
    crud("roles", "role",
         lister=tenancy.list_roles,
         getter=lambda a, i: next((r for r in tenancy.list_roles(f, a, limit=10_000).items if r["id"] == i), None)
         or _not_found("role", i),
         creator=lambda a, d: tenancy.create_role(f, a, d),
         updater=lambda a, i, d, act: tenancy.update_role(f, a, i, d),
         deleter=lambda a, i: tenancy.delete_role(f, a, i))
    crud("acls", "acl",
         lister=tenancy.list_acls,
         getter=lambda a, i: next((r for r in tenancy.list_acls(f, a, limit=10_000).items if r["id"] == i), None)
         or _not_found("ACL", i),
         creator=None, updater=None, deleter=None)
    crud("users", "user",
         lister=users.list_users,
         getter=lambda a, i: users.get_user_row(f, a, i),
         creator=lambda a, d: users.create_user(f, a, node, d),
         updater=lambda a, i, d, act: users.update_user(f, a, i, d, act),
         deleter=lambda a, i: users.delete_user(f, a, i), blockable=True, obj_type=ObjectType.USER)
    crud("osfs", "osf",
         lister=images.list_osfs,
         getter=lambda a, i: images.get_osf_row(f, a, i),
         creator=lambda a, d: images.create_osf(f, a, node, d),
         updater=lambda a, i, d, act: images.update_osf(f, a, i, d),
         deleter=lambda a, i: images.delete_osf(f, a, i), obj_type=ObjectType.OSF)
    crud("dis", "di",
         lister=images.list_dis,
         getter=lambda a, i: images.get_di_row(f, a, i),
         creator=lambda a, d: images.create_di(f, a, st.paths.images, d),
         updater=lambda a, i, d, act: images.update_di(f, a, i, d, act),
         deleter=lambda a, i: images.delete_di(f, a, st.paths.images, i), blockable=True, obj_type=ObjectType.DI)
    crud("vms", "vm",
         lister=lambda fac, a, **q: vms.list_vms(fac, a, node, **q),
         getter=lambda a, i: vms.get_vm_row(f, a, node, i),
         creator=lambda a, d: vms.create_vm(f, a, node, d),
         updater=lambda a, i, d, act: vms.update_vm(f, a, node, i, d, act),
         deleter=lambda a, i: vms.delete_vm(f, a, node, i), blockable=True, obj_type=ObjectType.VM)
    crud("hosts", "host",
         lister=hosts.list_hosts,
         getter=lambda a, i: hosts.get_host_row(f, a, i),
         creator=lambda a, d: hosts.create_host(f, a, d),
         updater=lambda a, i, d, act: hosts.update_host(f, a, i, d, act),
         deleter=lambda a, i: hosts.delete_host(f, a, i), blockable=True, obj_type=ObjectType.HOST)
    crud("audit", "audit",
         lister=audit_svc.list_audit,
         getter=lambda a, i: next(iter(audit_svc.list_audit(f, a, filters={"id": i}).items), None)
         or _not_found("audit entry", i),
         creator=None, updater=None, deleter=None)

    # --- actions -------------------------------------------------------------------------------
    @api.post("/vms/{obj_id}/start", tags=["vm"])
    def vm_start(obj_id: int, actor: ActorDep) -> Any:
        return jsonable(vms.start_vm(f, actor, node, obj_id))

    @api.post("/vms/{obj_id}/stop", tags=["vm"])
    def vm_stop(obj_id: int, actor: ActorDep) -> Any:
        return jsonable(vms.stop_vm(f, actor, node, obj_id))

    @api.post("/vms/{obj_id}/disconnect", tags=["vm"])
    def vm_disconnect(obj_id: int, actor: ActorDep) -> Any:
        return jsonable(vms.disconnect_vm(f, actor, node, obj_id))

    @api.post("/hosts/{obj_id}/stop", tags=["host"])
    def host_stop(obj_id: int, actor: ActorDep) -> Any:
        return jsonable(hosts.stop_host(f, actor, obj_id))

    @api.post("/hosts/{obj_id}/stop_vms", tags=["host"])
    def host_stop_vms(obj_id: int, actor: ActorDep) -> Any:
        return jsonable(hosts.stop_vms_of_host(f, actor, obj_id))

    @api.post("/dis/{obj_id}/tags", tags=["di"])
    def di_tag(obj_id: int, actor: ActorDep, body: JsonBody) -> Any:
        tags = body.get("tags")
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InputError("give the tags as {\"tags\": [\"default\", ...]}")
        return jsonable(images.tag_di(f, actor, obj_id, tags))

    @api.delete("/dis/{obj_id}/tags/{tag}", tags=["di"])
    def di_untag(obj_id: int, tag: str, actor: ActorDep) -> Any:
        return jsonable(images.untag_di(f, actor, obj_id, tag))

    # --- configuration -------------------------------------------------------------------------
    @api.get("/configs", tags=["config"])
    def config_list(request: Request, actor: ActorDep) -> dict[str, Any]:
        args = list_args(request, "config", actor)
        args.pop("max_limit", None)
        args.pop("order_by", None)
        args.pop("fields", None)
        if args["filters"] is None:
            args["filters"] = {}
        if isinstance(args["filters"], dict) and "-and" in args["filters"]:
            merged: dict[str, Any] = {}
            for part in args["filters"]["-and"]:
                merged.update(part)
            args["filters"] = merged
        return _page(configs.list_config(f, actor, node, tenant=request.query_params.get("tenant"), **args))

    @api.put("/configs/{key}", tags=["config"])
    def config_set(key: str, actor: ActorDep, body: JsonBody) -> Any:
        if "value" not in body:
            raise InputError("give the value as {\"value\": ...}")
        return jsonable(configs.set_config(f, actor, node, key, body["value"], body.get("tenant")))

    @api.delete("/configs/{key}", status_code=204, tags=["config"])
    def config_delete(key: str, request: Request, actor: ActorDep) -> Response:
        configs.delete_config(f, actor, key, request.query_params.get("tenant"))
        return Response(status_code=204)

    @api.get("/info", tags=["session"])
    def info() -> dict[str, Any]:
        return {"version": qvd.__version__, "api": "v1"}

    app.include_router(api)
    from qvd.api.auth_routes import auth_router  # local import: auth_routes imports this module

    app.include_router(auth_router())
    return app


def _not_found(what: str, obj_id: int) -> dict[str, Any]:
    from qvd.core.errors import NotFound

    raise NotFound(f"{what} {obj_id} does not exist")


