"""``qa``: the command-line client of the admin REST API (``docs/api.md``).

One command per run: parse it (:mod:`qvd.cli.qa_grammar`), read the settings, log in, make
the calls, print a table or JSON, log out.  Exit status: 0 success, 1 an error reported by
the API or the network (or a bad ``qa.toml``), 2 a command-line error.

Settings, later wins: ``$QVD_ROOT/etc/qa.toml``, ``~/.config/qvd/qa.toml``, the environment
(``QVD_API_URL``, ``QVD_ADMIN_LOGIN``, ``QVD_ADMIN_PASSWORD``), the command-line options.

Tests and embedders pass an ``httpx`` transport: ``main(["vm", "get"], transport=mock)``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import quote

import httpx

import qvd
from qvd.cli.qa_grammar import ACTION_VERBS, Command, GrammarError, parse
from qvd.core.config import Paths, resolve_root

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_LOGIN = "admin"
API_PREFIX = "/api/v1"

RESOURCES: dict[str, str] = {
    "tenant": "/tenants", "admin": "/administrators", "role": "/roles", "acl": "/acls",
    "user": "/users", "osf": "/osfs", "di": "/dis", "vm": "/vms", "host": "/hosts",
    "config": "/configs", "audit": "/audit",
}

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "vm": ("id", "name", "user_name", "state", "host_name", "ip", "di_tag", "blocked", "user_state"),
    "user": ("id", "name", "tenant", "blocked", "number_of_vms", "totp_enabled", "failed_logins", "locked_until"),
    "host": ("id", "name", "address", "state", "blocked"),
    "osf": ("id", "name", "tenant", "memory", "overlay", "user_storage", "number_of_dis", "number_of_vms"),
    "di": ("id", "osf_name", "version", "disk_image", "tags", "blocked", "state"),
    "tenant": ("id", "name", "blocked"),
    "admin": ("id", "name", "tenant", "roles"),
    "role": ("id", "name", "tenant", "description"),
    "acl": ("id", "name", "description"),
    "config": ("key", "value", "default", "is_default"),
    "audit": ("at", "admin_name", "action", "object_type", "object_name", "status", "message"),
}

# The audit log is read for what just happened, so newest first unless told otherwise;
# ids grow with time and every resource has one.
DEFAULT_ORDER: dict[str, list[str]] = {"audit": ["-id"]}

_DONE: dict[str, str] = {
    "set": "updated", "del": "deleted", "block": "blocked", "unblock": "unblocked",
    "start": "start requested for", "stop": "stop requested for",
    "disconnect": "disconnect requested for", "stop_vms": "stop requested for every VM of",
    "tag": "tagged", "untag": "untagged", "prop": "set properties on", "unprop": "removed properties from",
    "unlock": "unlocked",
}

_ENV_SETTINGS = {"url": "QVD_API_URL", "login": "QVD_ADMIN_LOGIN", "password": "QVD_ADMIN_PASSWORD"}
_TOML_TYPES: dict[str, type] = {
    "url": str, "login": str, "password": str, "tenant": str, "format": str, "insecure": bool,
}
FORMATS = ("table", "json")

HELP_EPILOG = """\
command:
  qa [options] <object> [<filters>] <verb> [<arguments-or-fields>] [order [asc|desc] f1, f2]

objects: vm user host osf di tenant admin role acl config audit (log = audit, administrator = admin)

filters:
  name=desk1                a bare value means name= (di: id= or version=, config: key=)
  = != < > <= >= ~          ~ is SQL LIKE with % and _:  user_name~'%ana%'
  id=[1,2,3]  id=[1:20]     in a list / between
  a, b   a; b   !a   (..)   AND, OR, NOT, grouping
  Quote values with spaces for qa too: "description='my desk'".

verbs:
  get [f1, f2]              list (default columns per object)
  new k=v, k2=v2            create
  set k=v, ...              update every match
  del  block  unblock       vm: start stop disconnect; host: stop stop_vms
  tag t1, t2  untag t1      di tags
  prop k=v  unprop k        custom properties (user vm host osf di)
  config: get, set key=value [, tenant=NAME], default (revert to the default)
  user: totp enable (prints the secret, its otpauth URI and a QR code; --qr-png FILE
  also writes the QR code as a PNG), totp disable, unlock (forget failed logins)
  An action without a filter needs --force.

examples:
  qa user new name=alice, password=secret
  qa vm user_name~'%ali%' get name, state
  qa vm id=[1:20] block
  qa di osf_name=desktop tag default
  qa config set l7r.auth.plugins=ldap
  qa user alice totp enable --qr-png alice.png
  qa user get order desc name

settings (later wins): $QVD_ROOT/etc/qa.toml, ~/.config/qvd/qa.toml, QVD_API_URL,
QVD_ADMIN_LOGIN, QVD_ADMIN_PASSWORD, options.  qa.toml keys: url login password tenant
format insecure.
"""


class QaError(Exception):
    """An error that ends the run with a message and an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ApiError(QaError):
    """The API answered with an error (problem+json)."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.code = code


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    url: str = DEFAULT_URL
    login: str = DEFAULT_LOGIN
    password: str | None = None
    tenant: str | None = None
    format: str = "table"
    insecure: bool = False


def config_files(root: str | None) -> list[Path]:
    """The qa.toml files read, in order (later wins)."""
    files = [Paths(resolve_root(root)).qa_file]
    # Without a home directory (a service account without HOME) only the node file applies.
    with contextlib.suppress(RuntimeError):
        files.append(Path.home() / ".config" / "qvd" / "qa.toml")
    return files


def read_qa_toml(path: Path, warn: Callable[[str], None]) -> dict[str, Any]:
    """The settings in one qa.toml; ``{}`` if it does not exist."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise QaError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise QaError(f"{path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        wanted = _TOML_TYPES.get(key)
        if wanted is None:
            # Warn rather than fail, so that a file written for a newer qa still works.
            warn(f"{path}: unknown key '{key}' ignored (known: {', '.join(_TOML_TYPES)})")
            continue
        if not isinstance(value, wanted):
            kind = "true or false" if wanted is bool else "a string"
            raise QaError(f"{path}: '{key}' must be {kind}, not {value!r}")
        out[key] = value
    if "format" in out and out["format"] not in FORMATS:
        raise QaError(f"{path}: 'format' must be one of {', '.join(FORMATS)}, not {out['format']!r}")
    if "password" in out and mode & stat.S_IROTH:
        warn(f"{path} holds a password and every local user can read it (chmod o-r)")
    return out


def load_settings(opts: argparse.Namespace, warn: Callable[[str], None]) -> Settings:
    values: dict[str, Any] = {}
    for path in config_files(opts.root):
        values.update(read_qa_toml(path, warn))
    for key, var in _ENV_SETTINGS.items():
        env = os.environ.get(var)
        if env:
            values[key] = env
    for key in ("url", "login", "password", "tenant", "format"):
        given = getattr(opts, key)
        if given is not None:
            values[key] = given
    if opts.insecure:
        values["insecure"] = True
    return Settings(**values)


def _ask_password(settings: Settings) -> str:
    if settings.password is not None:
        return settings.password
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            return getpass.getpass(f"Password for {settings.login} at {settings.url}: ")
        except EOFError:
            raise QaError("no password given") from None
    raise QaError("no password: use --password, QVD_ADMIN_PASSWORD or 'password' in qa.toml")


# --- HTTP -----------------------------------------------------------------------------------------


class ApiClient:
    """A thin synchronous client of the admin API: login, JSON calls, paginated lists."""

    def __init__(
        self,
        url: str,
        *,
        verify: bool = True,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        base = url.rstrip("/")
        # People paste the URL of the docs page; accept it with or without the API prefix.
        base = base.removesuffix(API_PREFIX)
        self.url = base
        self._token: str | None = None
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        # Importing a disk image copies gigabytes before the API answers.
        self._long_timeout = httpx.Timeout(None, connect=10.0)
        self._http = httpx.Client(
            base_url=base + API_PREFIX,
            headers={
                "User-Agent": f"qa/{qvd.__version__}",
                "X-QVD-Source": "CLI",
                "Accept": "application/json",
            },
            verify=verify,
            transport=transport,
            timeout=self._timeout,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        long: bool = False,
    ) -> Any:
        """One request; the decoded JSON answer, or ``None`` for an empty one (204)."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            resp = self._http.request(
                method, path, params=params, json=body, headers=headers,
                timeout=self._long_timeout if long else self._timeout,
            )
        except httpx.ConnectError as exc:
            raise QaError(f"cannot reach the QVD API at {self.url}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise QaError(f"the QVD API at {self.url} did not answer in time: {exc}") from None
        except httpx.HTTPError as exc:
            raise QaError(f"request to the QVD API at {self.url} failed: {exc}") from None
        if resp.status_code >= 400:
            raise _api_error(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise QaError(f"the QVD API answered {method} {path} with something that is not JSON") from None

    def login(self, login: str, password: str, tenant: str | None) -> None:
        answer = self.call("POST", "/login", body={"login": login, "password": password, "tenant": tenant})
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise QaError("the QVD API's login answer has no token")
        self._token = token

    def logout(self) -> None:
        """Revoke the token; a failure here must not hide the command's own result."""
        if self._token is None:
            return
        with contextlib.suppress(QaError):
            self.call("POST", "/logout")
        self._token = None

    def list_all(self, path: str, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """Every page of a list; returns (items, total)."""
        items: list[dict[str, Any]] = []
        total = 0
        while True:
            page_params = dict(params, offset=len(items)) if items else params
            page = self.call("GET", path, params=page_params)
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise QaError(f"the QVD API answered GET {path} without an 'items' list")
            got = [item for item in page["items"] if isinstance(item, dict)]
            total = int(page.get("total", len(items) + len(got)))
            items.extend(got)
            if not got or len(items) >= total:
                return items, total


def _api_error(resp: httpx.Response) -> ApiError:
    detail: str | None = None
    code: str | None = None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        raw = data.get("detail")
        if isinstance(raw, str) and raw:
            detail = raw
        elif isinstance(raw, list):
            # FastAPI's own validation answer: [{"loc": [...], "msg": "..."}, ...]
            detail = "; ".join(_validation_message(item) for item in raw) or None
        if detail is None and isinstance(data.get("title"), str):
            detail = data["title"]
        if isinstance(data.get("code"), str):
            code = data["code"]
    if detail is None:
        detail = resp.text.strip()[:300] or resp.reason_phrase or "error"
    return ApiError(resp.status_code, detail, code)


def _validation_message(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = item.get("loc")
    where = ".".join(str(p) for p in loc if p != "body") if isinstance(loc, list) else ""
    msg = str(item.get("msg", item))
    return f"{where}: {msg}" if where else msg


# --- output ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    # Keep one row per line whatever the API returns.
    return " ".join(str(value).split()) if isinstance(value, str) else str(value)


def render_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """An aligned plain-text table; numeric columns are right-aligned."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    numeric = [
        any(isinstance(row.get(col), int | float) for row in rows)
        and all(row.get(col) is None or _is_number(row.get(col)) for row in rows)
        for col in columns
    ]

    def line(values: Sequence[str], align: bool = True) -> str:
        parts = [
            v.rjust(w) if align and num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(columns), line(["-" * w for w in widths], align=False)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _print_json(data: Any, out: TextIO) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False), file=out)


# --- commands -------------------------------------------------------------------------------------


def refusal(cmd: Command, force: bool) -> str | None:
    """Why the command must not run as given, or ``None``."""
    # `config set k=v` names its keys in the arguments; it needs no filter.
    acts = cmd.verb in ACTION_VERBS and not (cmd.obj == "config" and cmd.verb == "set")
    if acts and not cmd.filters and not force:
        return (
            f"refusing to {cmd.verb} every {cmd.obj} without a filter; "
            f"give one (qa {cmd.obj} name=... {cmd.verb}) or add --force"
        )
    return None


def write_qr(uri: str, out: TextIO | None, png: str | None) -> str | None:
    """Draw ``uri`` as a QR code on ``out`` (if given) and, with ``png``, into that file (mode 0600:
    it holds a secret).  Returns a warning when the QR code cannot be made (the URI is shown anyway)."""
    try:
        import segno  # optional: the secret and the URI are enough to enrol by hand
    except ImportError:
        return "the Python package 'segno' is not installed: no QR code (type the secret in the app instead)"
    qr = segno.make(uri, error="m")
    if out is not None:
        qr.terminal(out=out, compact=True, border=2)
    if png:
        try:
            fd = os.open(png, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                qr.save(fh, kind="png", scale=8, border=4)
        except OSError as exc:
            return f"cannot write {png}: {exc.strerror or exc}"
    return None


class _Runner:
    def __init__(self, client: ApiClient, cmd: Command, fmt: str, out: TextIO, err: TextIO,
                 qr_png: str | None = None) -> None:
        self.client = client
        self.cmd = cmd
        self.fmt = fmt
        self.out = out
        self.err = err
        self.path = RESOURCES[cmd.obj]
        self.qr_png = qr_png
        self._qr_written = False

    def run(self) -> int:
        if self.cmd.verb == "get":
            return self.get()
        if self.cmd.verb == "new":
            return self.new()
        if self.cmd.obj == "config" and self.cmd.verb == "set" and not self.cmd.filters:
            args = dict(self.cmd.args)
            tenant = args.pop("tenant", None)
            done: list[tuple[Any, Any]] = []
            failed: list[tuple[Any, ApiError]] = []
            for key, value in args.items():
                try:
                    done.append((key, self.config_set(key, value, tenant)))
                except ApiError as exc:
                    failed.append((key, exc))
            return self.report(done, failed)
        return self.act()

    def list_params(self, fields: Sequence[str], order: Sequence[str]) -> dict[str, Any]:
        filters = dict(self.cmd.filters)
        params: dict[str, Any] = {}
        if self.cmd.obj == "config" and isinstance(filters.get("tenant"), str):
            # The config list takes the tenant as a parameter: it selects whose effective values to show.
            params["tenant"] = filters.pop("tenant")
        if filters:
            params["filters"] = json.dumps(filters, separators=(",", ":"), ensure_ascii=False)
        if fields:
            params["fields"] = ",".join(fields)
        if order:
            params["order_by"] = ",".join(order)
        return params

    def get(self) -> int:
        order = self.cmd.order or DEFAULT_ORDER.get(self.cmd.obj, [])
        items, total = self.client.list_all(self.path, self.list_params(self.cmd.fields, order))
        if self.fmt == "json":
            _print_json(items, self.out)
        else:
            columns = self.cmd.fields or DEFAULT_COLUMNS[self.cmd.obj]
            print(render_table(columns, items), file=self.out)
            print(f"Total: {total}", file=self.out)
        return EXIT_OK

    def new(self) -> int:
        body = dict(self.cmd.args)
        if self.cmd.obj == "di" and isinstance(body.get("disk_image"), str):
            body["disk_image"] = local_image_path(body["disk_image"])
        created = self.client.call("POST", self.path, body=body, long=self.cmd.obj == "di")
        if self.fmt == "json":
            _print_json(created, self.out)
        else:
            ident = created.get("id") if isinstance(created, dict) else None
            print(f"created {self.cmd.obj} {ident}", file=self.out)
        return EXIT_OK

    def act(self) -> int:
        key = "key" if self.cmd.obj == "config" else "id"
        matches, _ = self.client.list_all(self.path, self.list_params([key], [key]))
        idents = [m[key] for m in matches if key in m]
        if not idents:
            raise QaError(f"no {self.cmd.obj} matches the filter")
        if self.cmd.verb == "tag" and len(idents) > 1:
            print(
                f"qa: warning: {len(idents)} DIs match; each takes the tags in turn, "
                f"so they end on DI {idents[-1]}", file=self.err,
            )
        done: list[tuple[Any, Any]] = []
        failed: list[tuple[Any, ApiError]] = []
        for ident in idents:
            try:
                done.append((ident, self.act_on(ident)))
            except ApiError as exc:
                failed.append((ident, exc))
        return self.report(done, failed)

    def act_on(self, ident: Any) -> Any:
        cmd = self.cmd
        if cmd.obj == "config":
            filter_tenant = cmd.filters.get("tenant")
            tenant = cmd.args.get("tenant", filter_tenant if isinstance(filter_tenant, str) else None)
            if cmd.verb == "set":
                return self.config_set(str(ident), cmd.args["value"], tenant)
            params = {"tenant": tenant} if tenant is not None else None
            try:
                reverted = self.client.call("DELETE", f"{self.path}/{_segment(ident)}", params=params)
            except ApiError as exc:
                # The key came from the listing, so 404 means "no override": the wanted end state
                # already holds, and `qa config k default` stays idempotent.
                if exc.status != 404:
                    raise
                return {"key": ident, "is_default": True, "changed": False}
            return reverted if isinstance(reverted, dict) else {"key": ident}
        base = f"{self.path}/{_segment(ident)}"
        answer = None
        if cmd.verb == "set":
            answer = self.client.call("PATCH", base, body=cmd.args)
        elif cmd.verb == "del":
            answer = self.client.call("DELETE", base)
        elif cmd.verb == "tag":
            answer = self.client.call("POST", f"{base}/tags", body={"tags": cmd.args["tags"]})
        elif cmd.verb == "untag":
            for tag in cmd.args["tags"]:
                answer = self.client.call("DELETE", f"{base}/tags/{_segment(tag)}")
        elif cmd.verb == "prop":
            for prop, value in cmd.args.items():
                answer = self.client.call("PUT", f"{base}/properties/{_segment(prop)}", body={"value": value})
        elif cmd.verb == "unprop":
            for prop in cmd.args["keys"]:
                answer = self.client.call("DELETE", f"{base}/properties/{_segment(prop)}")
        elif cmd.verb == "totp":
            answer = self.client.call("POST" if cmd.args["totp"] == "enable" else "DELETE", f"{base}/totp")
        else:
            answer = self.client.call("POST", f"{base}/{cmd.verb}")
        return answer if isinstance(answer, dict) else {"id": ident}

    def config_set(self, key: str, value: Any, tenant: Any) -> Any:
        body = {"value": value, "tenant": tenant}
        answer = self.client.call("PUT", f"{self.path}/{_segment(key)}", body=body)
        return answer if isinstance(answer, dict) else {"key": key, "value": value, "tenant": tenant}

    def report(self, done: list[tuple[Any, Any]], failed: list[tuple[Any, ApiError]]) -> int:
        for ident, exc in failed:
            print(f"qa: error: {self.cmd.obj} {ident}: {exc}", file=self.err)
        if self.fmt == "json":
            _print_json([result for _, result in done], self.out)
            totp_uri = done[0][1].get("uri") if done and isinstance(done[0][1], dict) else None
            if self.cmd.verb == "totp" and self.qr_png and isinstance(totp_uri, str):
                warning = write_qr(totp_uri, None, self.qr_png)  # stdout stays pure JSON
                if warning:
                    print(f"qa: warning: {warning}", file=self.err)
        else:
            for ident, result in done:
                print(self.describe(ident, result), file=self.out)
                if self.cmd.verb == "totp" and self.cmd.args.get("totp") == "enable":
                    self.show_totp(result)
            print(f"Total: {len(done)}", file=self.out)
        return EXIT_ERROR if failed else EXIT_OK

    def show_totp(self, result: Any) -> None:
        """The new secret, once: for the user's authenticator app."""
        if not isinstance(result, dict) or not isinstance(result.get("uri"), str):
            return
        print(f"  secret: {result.get('secret')}", file=self.out)
        print(f"  uri:    {result['uri']}", file=self.out)
        # Several users matched: the PNG file is for the first one only.
        png = None if self._qr_written else self.qr_png
        warning = write_qr(result["uri"], self.out, png)
        self._qr_written = True
        if warning:
            print(f"qa: warning: {warning}", file=self.err)
        elif png:
            print(f"  QR code written to {png} (it holds the secret: hand it over and delete it)", file=self.out)
        if result.get("enforced") is False:
            print("qa: warning: the tenant's authentication chain has no 'totp' plugin, so the code is not "
                  "asked yet: qa config set l7r.auth.plugins.head=totp, tenant=...", file=self.err)

    def describe(self, ident: Any, result: Any) -> str:
        cmd = self.cmd
        if cmd.verb == "totp":
            user = result.get("user", result) if isinstance(result, dict) else result
            state = "enabled" if cmd.args.get("totp") == "enable" else "disabled"
            return f"TOTP {state} for user {ident}{_label(cmd.obj, user)}"
        if cmd.obj == "config":
            if cmd.verb == "set":
                value = result.get("value") if isinstance(result, dict) else None
                return f"config {ident} = {_cell(value)}"
            if isinstance(result, dict) and result.get("changed") is False:
                return f"config {ident} is already at its default"
            return f"config {ident} reverted to its default"
        what = f"{cmd.obj} {ident}{_label(cmd.obj, result)}"
        if cmd.verb in ("tag", "untag"):
            joiner = "with" if cmd.verb == "tag" else "from"
            return f"{_DONE[cmd.verb]} {what} {joiner} {', '.join(cmd.args['tags'])}"
        if cmd.verb in ("prop", "unprop"):
            keys = cmd.args["keys"] if cmd.verb == "unprop" else list(cmd.args)
            return f"{_DONE[cmd.verb]} {what}: {', '.join(keys)}"
        return f"{_DONE.get(cmd.verb, cmd.verb)} {what}"


def _label(obj: str, result: Any) -> str:
    if not isinstance(result, dict):
        return ""
    name = result.get("name")
    if obj == "di":
        parts = [str(result[k]) for k in ("osf_name", "version") if result.get(k) is not None]
        name = " ".join(parts) or result.get("disk_image")
    return f" ({name})" if name else ""


def _segment(value: Any) -> str:
    return quote(str(value), safe="")


def local_image_path(value: str) -> str:
    """Make a path the user can see absolute, so that the API imports that very file.

    A bare name that is not a file here keeps its API meaning: a file in storage/images.
    """
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    if "/" in expanded or os.path.isfile(expanded):
        return os.path.abspath(expanded)
    return value


# --- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qa",
        description="Command-line client of the QVD admin API.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("-u", "--url", help=f"API URL (default {DEFAULT_URL})")
    parser.add_argument("-l", "--login", help=f"administrator, or admin@tenant (default {DEFAULT_LOGIN})")
    parser.add_argument("-p", "--password", help="administrator password (prompted for on a terminal)")
    parser.add_argument("-t", "--tenant", help="tenant of the administrator")
    parser.add_argument("-f", "--format", choices=FORMATS, help="output format (default table)")
    parser.add_argument("--root", help="QVD root holding etc/qa.toml (default $QVD_ROOT or /var/lib/qvd)")
    parser.add_argument("--force", action="store_true", help="allow an action without a filter")
    parser.add_argument("--qr-png", metavar="FILE", help="user ... totp enable: also write the QR code to FILE")
    parser.add_argument("--insecure", action="store_const", const=True, default=None,
                        help="do not verify the API's TLS certificate")
    parser.add_argument("--version", action="version", version=f"qa {qvd.__version__}")
    parser.add_argument("command", nargs="*", help="<object> [<filters>] <verb> [...]; see below")
    return parser


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    """Options may come anywhere; everything after ``--`` is command (for values starting with '-')."""
    args = list(argv)
    tail: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, tail = args[:cut], args[cut + 1:]
    opts = build_parser().parse_intermixed_args(args)
    opts.command = list(opts.command) + tail
    return opts


def main(argv: list[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run one qa command; returns the exit status.

    ``transport`` replaces the network (``httpx.MockTransport`` in tests).
    """
    out, err = sys.stdout, sys.stderr
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        # argparse exits on --help, --version and bad options; the caller gets the status instead.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not opts.command:
        print(build_parser().format_usage().rstrip(), file=err)
        print("qa: error: no command given (try qa --help)", file=err)
        return EXIT_USAGE
    try:
        cmd = parse(opts.command)
    except GrammarError as exc:
        print(f"qa: {exc}", file=err)
        return EXIT_USAGE
    why_not = refusal(cmd, opts.force)
    if why_not is not None:
        print(f"qa: {why_not}", file=err)
        return EXIT_USAGE

    def warn(message: str) -> None:
        print(f"qa: warning: {message}", file=err)

    try:
        settings = load_settings(opts, warn)
        password = _ask_password(settings)
        with ApiClient(settings.url, verify=not settings.insecure, transport=transport) as client:
            client.login(settings.login, password, settings.tenant)
            try:
                return _Runner(client, cmd, settings.format, out, err, qr_png=opts.qr_png).run()
            finally:
                client.logout()
    except QaError as exc:
        print(f"qa: error: {exc}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=err)
        return 130


__all__ = [
    "DEFAULT_COLUMNS", "RESOURCES", "ApiClient", "ApiError", "QaError", "Settings", "build_parser",
    "config_files", "load_settings", "main", "parse_options", "read_qa_toml", "refusal", "render_table",
]


if __name__ == "__main__":
    sys.exit(main())
