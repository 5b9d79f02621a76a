"""A read-only core-NATS subscription for the heartbeat firehose.

nats-py spends about ten microseconds on every message before a handler sees it
(a regex per protocol line, a ``Msg`` object, header processing, an
``asyncio.Queue`` put and get, a coroutine per callback): at 50,000 heartbeats
a second that alone is half a core. This connection only subscribes and reads:
it parses ``MSG``/``HMSG`` frames straight out of 256 KiB reads and hands each
(subject, payload) to a plain function, answers the server's ``PING``, and
reconnects forever. It authenticates like the bus (user and password, TLS);
a deployment with a credentials file (JWT/nkey) uses nats-py instead.

It never drains: stopping closes the socket, so SIGTERM is immediate under any load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlparse

log = logging.getLogger("hafence.heartbeat.wire")

READ_SIZE = 256 * 1024
Handler = Callable[[str, bytes], None]  # (subject, payload)


class ProtocolError(Exception):
    pass


class FirehoseSubscription:
    def __init__(self, urls: list[str], subjects: list[str], handle: Handler, user: str = "", password: str = "",
                 tls: ssl.SSLContext | None = None, name: str = "hafence-heartbeat-firehose") -> None:
        self.urls = urls
        self.subjects = subjects
        self.handle = handle
        self.user, self.password, self.tls, self.name = user, password, tls, name
        self.connected = False
        # Connections lost so far: one lost and restored between two looks at
        # ``connected`` (a slow consumer closed by the server reconnects in ~0.1 s)
        # still dropped what the server held for it.
        self.disconnects = 0
        self.frames = 0
        self.errors: list[str] = []

    async def run(self) -> None:
        """Connect, subscribe and read until cancelled; reconnect after any failure."""
        delay, attempt = 0.1, 0
        while True:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await self._connect(url)
                self.connected, delay = True, 0.1
                await self._read(reader, writer)
                raise ConnectionError("connection closed by the server")
            except (OSError, ConnectionError, ProtocolError, TimeoutError, ssl.SSLError, ValueError) as err:
                if self.connected:
                    log.warning("heartbeat subscription lost; reconnecting: %s", err)
                self.errors.append(str(err) or type(err).__name__)
                del self.errors[:-10]
            finally:
                if self.connected:
                    self.disconnects += 1
                self.connected = False
                if writer is not None:
                    writer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _connect(self, url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        u = urlparse(url.strip())
        host, port = u.hostname or "127.0.0.1", u.port or 4222
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2 * READ_SIZE), 5)
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line.startswith(b"INFO "):
            raise ProtocolError(f"expected INFO from {host}:{port}, got {line[:80]!r}")
        info = json.loads(line[5:])
        if self.tls is not None or info.get("tls_required"):
            ctx = self.tls or ssl.create_default_context()
            await writer.start_tls(ctx, server_hostname=host)
        opts: dict[str, object] = {"verbose": False, "pedantic": False, "name": self.name, "lang": "python-hafence",
                                   "version": "1", "protocol": 1, "headers": True, "no_responders": False}
        if self.user:
            opts.update(user=self.user, **{"pass": self.password})
        out = [b"CONNECT " + json.dumps(opts).encode() + b"\r\n"]
        out += [f"SUB {s} {i}\r\n".encode() for i, s in enumerate(self.subjects, start=1)]
        writer.write(b"".join(out) + b"PING\r\n")
        await writer.drain()
        # The PONG answers the PING after CONNECT and SUB: the server accepted both.
        while True:
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.startswith(b"PONG"):
                return reader, writer
            if line.startswith(b"-ERR"):
                raise ConnectionError(f"NATS refused the heartbeat subscription: {line.decode().strip()}")
            if not line:
                raise ConnectionError("connection closed during the handshake")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        handle = self.handle
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            buf = buf + data if buf else data
            pos, end = 0, len(buf)
            while pos < end:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                op = buf[pos:pos + 4]
                if op == b"MSG ":
                    # MSG <subject> <sid> [reply] <size>
                    parts = buf[pos + 4:eol].split(b" ")
                    start = eol + 2
                    stop = start + int(parts[-1])
                    if stop + 2 > end:
                        break
                    handle(parts[0].decode(), buf[start:stop])
                    pos = stop + 2
                elif op == b"HMSG":
                    # HMSG <subject> <sid> [reply] <header size> <total size>: headers are not looked at
                    parts = buf[pos + 5:eol].split(b" ")
                    start = eol + 2
                    stop = start + int(parts[-1])
                    if stop + 2 > end:
                        break
                    handle(parts[0].decode(), buf[start + int(parts[-2]):stop])
                    pos = stop + 2
                elif op == b"PING":
                    writer.write(b"PONG\r\n")
                    pos = eol + 2
                elif op == b"-ERR":
                    error = buf[pos:eol].decode(errors="replace")
                    self.errors.append(error)
                    log.warning("NATS error on the heartbeat subscription: %s", error)
                    pos = eol + 2
                elif op in (b"PONG", b"+OK\r", b"INFO"):
                    pos = eol + 2
                else:
                    raise ProtocolError(f"unexpected NATS protocol line {buf[pos:min(eol, pos + 80)]!r}")
                self.frames += 1
            buf = buf[pos:]
            # reader.read() returns buffered data without suspending: yield, or a
            # flood of heartbeats would starve the ticker and the signal handler.
            await asyncio.sleep(0)
