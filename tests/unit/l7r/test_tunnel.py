"""The splice: exact bytes both ways, half-close, stop."""

from __future__ import annotations

import asyncio
import os

from qvd.l7r.tunnel import splice


async def _pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter],
                           tuple[asyncio.StreamReader, asyncio.StreamWriter], asyncio.Server]:
    """(our end of a connection, the peer's end), over loopback TCP."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    srv = await asyncio.start_server(on, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    mine = await asyncio.open_connection("127.0.0.1", port)
    theirs = await accepted.get()
    return mine, theirs, srv


def test_bytes_both_ways_and_half_close() -> None:
    async def go() -> None:
        (c_r, c_w), client_side, s1 = await _pair()  # client_side = what the L7R holds
        desk_side, (d_r, d_w), s2 = await _pair()    # desk_side = what the L7R holds
        up, down = os.urandom(700_000), os.urandom(500_000)
        task = asyncio.create_task(splice(client_side, desk_side, initial=b"early"))

        async def client() -> bytes:
            c_w.write(up)
            await c_w.drain()
            c_w.write_eof()
            return await c_r.read()

        async def desktop() -> bytes:
            got = await d_r.read()  # until the half-close arrives
            d_w.write(down)
            await d_w.drain()
            d_w.close()
            return got

        got_client, got_desk = await asyncio.gather(client(), desktop())
        result = await task
        assert got_desk == b"early" + up
        assert got_client == down
        assert (result.bytes_in, result.bytes_out) == (len(up) + 5, len(down))
        assert result.ended_by == "client"
        c_w.close()
        s1.close()
        s2.close()

    asyncio.run(go())


def test_stop_ends_both() -> None:
    async def go() -> None:
        (c_r, c_w), client_side, s1 = await _pair()
        desk_side, (d_r, _d_w), s2 = await _pair()
        stop = asyncio.Event()
        task = asyncio.create_task(splice(client_side, desk_side, stop=stop))
        c_w.write(b"hello")
        assert await d_r.readexactly(5) == b"hello"
        stop.set()
        result = await asyncio.wait_for(task, 3)
        assert result.ended_by == "stop"
        assert await asyncio.wait_for(c_r.read(), 3) == b""
        assert await asyncio.wait_for(d_r.read(), 3) == b""
        s1.close()
        s2.close()

    asyncio.run(go())
