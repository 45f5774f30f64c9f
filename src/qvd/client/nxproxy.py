"""The local NX side: run ``nxproxy -S`` against ``$DISPLAY`` and splice it into the tunnel.

After ``101`` the L7R connection carries NX bytes to and from the desktop's
nxagent.  We listen on a free loopback port, start Debian's ``nxproxy`` in
"X server side" mode pointing at that port (``nx/nx,connect=127.0.0.1,port=P:D``;
the link type and geometry were decided on the agent side by ``x_start``),
accept its one connection, forward any tunnel bytes already read past the 101
head, then copy both ways until one side closes.

The display number ``D`` only names nxproxy's session directory
(``~/.nx/S-D``), so it is derived from the port to keep two clients on the
same machine apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qvd.client.protocol import ClientError
from qvd.core.streams import copy_stream

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 15.0


def nxproxy_argv(binary: str, port: int) -> list[str]:
    display = 50 + port % 900
    return [binary, "-S", f"nx/nx,connect=127.0.0.1,port={port}:{display}"]


@dataclass
class SessionResult:
    bytes_up: int
    bytes_down: int
    ended_by: str
    nxproxy_status: int | None


def _adder(counter: list[int]) -> Callable[[int], None]:
    def add(n: int) -> None:
        counter[0] += n
    return add


async def _close(w: asyncio.StreamWriter) -> None:
    w.close()
    try:
        await asyncio.wait_for(w.wait_closed(), 2)
    except (TimeoutError, OSError, ConnectionError):
        w.transport.abort()
    except Exception:  # TLS teardown errors (ssl.SSLError) after the session are not interesting
        w.transport.abort()


async def run_session(
    tunnel: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    initial: bytes,
    nxproxy: str,
    *,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> SessionResult:
    """Start nxproxy, splice it into ``tunnel`` until the session ends.

    Raises :class:`~qvd.client.protocol.ClientError` when nxproxy cannot be
    started or does not connect.
    """
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future())

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if accepted.done():
            w.close()  # only nxproxy's first connection is ours
            return
        accepted.set_result((r, w))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    argv = nxproxy_argv(nxproxy, port)
    child_env = dict(os.environ if env is None else env)
    child_env["NX_CLIENT"] = "/bin/false"  # no nxclient dialogs: closing the window suspends the session
    out = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("wb")
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=child_env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=out or asyncio.subprocess.DEVNULL,
                                                    stderr=out or asyncio.subprocess.DEVNULL)
    except OSError as e:
        server.close()
        if out:
            out.close()
        raise ClientError(f"cannot start {nxproxy}: {e.strerror or e}") from None
    log.debug("started %s (pid %s)", " ".join(argv), proc.pid)
    t_reader, t_writer = tunnel
    result = SessionResult(0, 0, "", None)
    try:
        waiter: asyncio.Future[int] = asyncio.ensure_future(proc.wait())
        first: set[asyncio.Future[object]] = {accepted, waiter}  # type: ignore[arg-type]
        started, _ = await asyncio.wait(first, timeout=ACCEPT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if accepted not in started:
            where = f" (see {log_path})" if log_path else ""
            if waiter in started:
                raise ClientError(f"nxproxy exited with status {proc.returncode} before connecting{where}")
            raise ClientError(f"nxproxy did not connect within {ACCEPT_TIMEOUT:g} s{where}")
        server.close()
        p_reader, p_writer = accepted.result()
        up, down = [0], [0]
        if initial:
            p_writer.write(initial)
            down[0] += len(initial)
            await p_writer.drain()
        t_up = asyncio.create_task(copy_stream(p_reader, t_writer, _adder(up)))
        t_down = asyncio.create_task(copy_stream(t_reader, p_writer, _adder(down)))
        pending: set[asyncio.Task[bool]] = {t_up, t_down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                result.ended_by = result.ended_by or ("nxproxy" if t is t_up else "server")
                if t.cancelled() or t.exception() is not None or not t.result():
                    # No half-close possible (the tunnel is TLS): one side done ends the session.
                    pending = set()
        for t in (t_up, t_down):
            t.cancel()
        await asyncio.gather(t_up, t_down, return_exceptions=True)
        await asyncio.gather(_close(p_writer), _close(t_writer), return_exceptions=True)
        result.bytes_up, result.bytes_down = up[0], down[0]
        with contextlib.suppress(TimeoutError):
            result.nxproxy_status = await asyncio.wait_for(asyncio.shield(waiter), 5)
        return result
    finally:
        server.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 3)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if result.nxproxy_status is None:
            result.nxproxy_status = proc.returncode
        if out:
            out.close()
