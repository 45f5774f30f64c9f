"""The client side of QVD/1.0: requests to the L7R and their answers (no UI here).

All requests go over ONE connection, like the reference client: ``list_of_vm``,
then ``connect_to_vm`` with ``Connection: Upgrade`` + ``Upgrade: QVD/1.0``,
whose answer is any number of ``102 Processing`` lines (``X-QVD-VM-Info``)
and then either ``101 Switching Protocols`` (``X-QVD-Slave-Key``; the
connection now carries NX) or a final error.  Parsing is h11's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

import h11

USER_AGENT = "qvd-client/0.1 (linux)"
MAX_BODY = 4 * 1024 * 1024


class ClientError(Exception):
    """Anything that stops the client; ``exit_code`` is what the process returns."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ServerRefused(ClientError):
    """A final non-2xx answer; the message says what it means for the user."""

    def __init__(self, status: int, reason: str, body: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.body = body
        self.exit_code = exit_code


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes = b""
    infos: tuple[str, ...] = ()


@dataclass(frozen=True)
class Switched:
    """The 101: the connection is now a tunnel; ``trailing`` = tunnel bytes already read."""

    slave_key: str
    infos: tuple[str, ...]
    trailing: bytes = b""


@dataclass(frozen=True)
class VmEntry:
    id: int
    name: str
    state: str
    blocked: bool


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse_vm_list(body: bytes) -> list[VmEntry]:
    """``list_of_vm`` JSON; tolerant of strings/booleans where numbers are expected (older servers)."""
    try:
        items = json.loads(body)
    except ValueError:
        raise ClientError("the server's list of virtual machines is not JSON") from None
    if not isinstance(items, list):
        raise ClientError("the server's list of virtual machines is not a list")
    out = []
    for it in items:
        if not isinstance(it, dict) or "id" not in it:
            continue
        blocked = it.get("blocked", 0)
        out.append(VmEntry(id=int(it["id"]), name=str(it.get("name", "")), state=str(it.get("state", "")),
                           blocked=blocked not in (0, "0", False, None, "")))
    return out


def refusal(status: int, reason: str, body: bytes, *, connecting: bool) -> ServerRefused:
    """A user-level explanation of a final error status (what the stock clients say, more precisely)."""
    text = body.decode("utf-8", "replace").strip()
    if status == 401:
        return ServerRefused(status, reason, text, "login refused: wrong user name, password or token", 3)
    if status == 403:
        what = "you may not use this virtual machine, or it is under maintenance" if connecting else "forbidden"
        return ServerRefused(status, reason, text, f"{what}: {text}", 4)
    if status == 404:
        return ServerRefused(status, reason, text, f"the virtual machine does not exist (any more): {text}", 5)
    if status == 426:
        return ServerRefused(status, reason, text, "the server requires a more up-to-date client", 6)
    if status == 503:
        return ServerRefused(status, reason, text, f"the server is not available: {text}", 7)
    return ServerRefused(status, reason, text, f"unexpected answer {status} {reason}: {text}", 1)


@dataclass
class L7rConnection:
    """One connection to an L7R (TLS unless ``ssl_context`` is None)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    host: str
    port: int
    auth: str
    _h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    @classmethod
    async def open(cls, host: str, port: int, auth: str, ssl_context: ssl.SSLContext | None,
                   timeout: float = 20.0) -> L7rConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_context,
                                        server_hostname=host if ssl_context else None), timeout)
        except TimeoutError:
            raise ClientError(f"cannot connect to {host}:{port}: timed out") from None
        except ssl.SSLError as e:
            raise ClientError(f"TLS handshake with {host}:{port} failed: {e.reason or e}") from None
        except OSError as e:
            raise ClientError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        return cls(reader, writer, host, port, auth)

    def peer_certificate(self) -> bytes | None:
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return None
        der = obj.getpeercert(binary_form=True)
        return bytes(der) if der else None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def _send(self, target: str, upgrade: bool) -> None:
        if self._h11.our_state is h11.DONE:
            self._h11.start_next_cycle()
        host = f"[{self.host}]" if ":" in self.host else self.host
        headers = [("Host", f"{host}:{self.port}"), ("Authorization", self.auth), ("User-Agent", USER_AGENT),
                   ("Accept", "application/json")]
        if upgrade:
            headers += [("Connection", "Upgrade"), ("Upgrade", "QVD/1.0")]
        data = self._h11.send(h11.Request(method="GET", target=target, headers=headers)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        self.writer.write(data)
        await self.writer.drain()

    async def _event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        eof = False
        while True:
            try:
                ev = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                if eof:
                    raise ClientError("the server closed the connection without answering") from None
                raise ClientError(f"the server's answer is not valid HTTP: {e}") from None
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await self.reader.read(65536)
            except (OSError, ssl.SSLError) as e:
                raise ClientError(f"connection to the server lost: {e}") from None
            eof = not data
            self._h11.receive_data(data)  # b"" = EOF: h11 then reports ConnectionClosed or an error

    async def get(self, path: str, query: Mapping[str, str] | None = None, *, upgrade: bool = False,
                  on_info: Callable[[str], None] | None = None) -> Answer | Switched:
        """One request; 102 infos go to ``on_info`` as they arrive."""
        target = path + ("?" + urlencode(list(query.items())) if query else "")
        await self._send(target, upgrade)
        infos: list[str] = []
        response: h11.Response | None = None
        body = bytearray()
        while True:
            ev = await self._event()
            if isinstance(ev, h11.InformationalResponse):
                hdrs = {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in ev.headers}
                if ev.status_code == 101:
                    key = hdrs.get("x-qvd-slave-key", "")
                    data, _closed = self._h11.trailing_data
                    return Switched(key, tuple(infos), bytes(data))
                info = hdrs.get("x-qvd-vm-info", "")
                infos.append(info)
                if on_info:
                    on_info(info)
            elif isinstance(ev, h11.Response):
                response = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise ClientError("the server's answer is too large")
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ClientError("the server closed the connection without answering")
        if response is None:
            raise ClientError("the server closed the connection without answering")
        hdrs = {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in response.headers}
        return Answer(response.status_code, bytes(response.reason).decode("latin-1"), hdrs, bytes(body), tuple(infos))

    async def list_of_vm(self) -> list[VmEntry]:
        ans = await self.get("/qvd/list_of_vm")
        if isinstance(ans, Switched) or ans.status != 200:
            assert isinstance(ans, Answer)
            raise refusal(ans.status, ans.reason, ans.body, connecting=False)
        return parse_vm_list(ans.body)

    async def connect_to_vm(self, vm_id: int, params: Mapping[str, str],
                            on_info: Callable[[str], None] | None = None) -> Switched:
        ans = await self.get("/qvd/connect_to_vm", {"id": str(vm_id), **params}, upgrade=True, on_info=on_info)
        if isinstance(ans, Switched):
            if len(ans.slave_key) != 64 or not ans.slave_key.isalnum():
                raise ClientError("the server switched protocols without a valid X-QVD-Slave-Key")
            return ans
        raise refusal(ans.status, ans.reason, ans.body, connecting=True)
