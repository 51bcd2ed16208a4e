#!/usr/bin/env python3
# Demo helper for scripts/run (any machine): relays NBD clients on a TCP address to blockd's unix-socket NBD server.
"""blockd, like qemu-storage-daemon, runs one NBD server with one listening address. The demo wants the
disk on a unix socket and on 127.0.0.1:10809, so scripts/run starts the server on the unix socket and this
relay on the TCP port. Usage: nbd_tcp_relay.py HOST PORT UNIX_SOCKET"""
import asyncio
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(host, port, path):
    async def client(r, w):
        try:
            ur, uw = await asyncio.open_unix_connection(path)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    server = await asyncio.start_server(client, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
