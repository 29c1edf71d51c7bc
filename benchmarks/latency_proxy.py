"""A TCP proxy on 127.0.0.1 that delays what clients send by a fixed time: a local store with the
round trip of a remote one (each request waits ``latency`` once; responses pass at once).

``python -m benchmarks.latency_proxy LISTEN_PORT TARGET_PORT LATENCY_MS`` (used by ``stablerep-bench
offline --store-latency-ms``; runs in its own process so it takes no time from the reader measured).
"""
from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(1 << 16):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, latency_s: float) -> None:
    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pipe(client_reader, server_writer, latency_s), _pipe(server_reader, client_writer, 0.0))

    server = await asyncio.start_server(connect, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    listen_port, target_port, latency_ms = int(argv[0]), int(argv[1]), float(argv[2])
    asyncio.run(serve(listen_port, target_port, latency_ms / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
