"""Running nxproxy and splicing it into the tunnel (with a stand-in nxproxy script)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from qvd.client.nxproxy import nxproxy_argv, run_session
from qvd.client.protocol import ClientError

STANDIN = r'''import os, socket, sys
opts = dict(kv.split("=") for kv in sys.argv[2].split(":")[0].split(",")[1:])
s = socket.create_connection((opts["connect"], int(opts["port"])))
first = s.recv(5)
s.sendall(b"UP:" + first)
s.shutdown(socket.SHUT_WR)
rest = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    rest += d
open(os.environ["OUT"], "wb").write(first + rest)
'''


def test_argv() -> None:
    argv = nxproxy_argv("/usr/bin/nxproxy", 40123)
    assert argv[:2] == ["/usr/bin/nxproxy", "-S"]
    assert argv[2].startswith("nx/nx,connect=127.0.0.1,port=40123:")
    assert 50 <= int(argv[2].rsplit(":", 1)[1]) < 950


def _standin(tmp_path: Path, code: str) -> str:
    p = tmp_path / "standin"
    p.write_text(f"#!{sys.executable}\n{code}")
    p.chmod(0o755)
    return str(p)


def test_session_forwards_early_bytes_first(tmp_path: Path) -> None:
    out = tmp_path / "got"

    async def go() -> None:
        tunnel_peer: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def on(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await tunnel_peer.put((r, w))

        srv = await asyncio.start_server(on, "127.0.0.1", 0)
        tunnel = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        server_r, server_w = await tunnel_peer.get()
        env = dict(os.environ, OUT=str(out))
        task = asyncio.create_task(run_session(tunnel, b"EARLY", _standin(tmp_path, STANDIN), env=env,
                                               log_path=tmp_path / "nx.log"))
        assert await server_r.readexactly(8) == b"UP:EARLY"
        server_w.write(b" and the rest")
        await server_w.drain()
        server_w.close()
        result = await asyncio.wait_for(task, 20)
        assert result.nxproxy_status == 0
        assert (result.bytes_up, result.bytes_down) == (8, 5 + len(b" and the rest"))
        srv.close()

    asyncio.run(go())
    assert out.read_bytes() == b"EARLY and the rest"


def test_nxproxy_dying_early_is_reported(tmp_path: Path) -> None:
    async def go() -> None:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        tunnel = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        with pytest.raises(ClientError, match="exited with status 3 before connecting"):
            await run_session(tunnel, b"", _standin(tmp_path, "import sys; sys.exit(3)\n"))
        with pytest.raises(ClientError, match="cannot start"):
            await run_session(tunnel, b"", str(tmp_path / "missing"))
        srv.close()

    asyncio.run(go())
