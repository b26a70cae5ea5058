"""A hostile broker for tests: a TCP proxy between one NATS client and a real nats-server.

The threat model (``docs/protocol.md`` section 23) makes the broker untrusted: it can drop,
delay, reorder, replay and inject messages. ``BrokerProxy`` lets a test be that broker for one
client connection (a caller's ``Mesh``) without touching the server: the client connects to
``proxy.url`` instead of the server's, and every message the server delivers to it goes
through ``to_client``, every message it publishes through ``to_server``::

    proxy = BrokerProxy(nats_server.url)
    await proxy.start()
    alice = mesh.Mesh(identity, test_config([proxy.url]))
    proxy.to_client = lambda subject, payload: [payload, payload]  # deliver everything twice

A hook takes ``(subject, payload)`` and returns the payloads to forward in its place, in
order, on the same subject (with the same reply subject and NATS headers): ``[]`` drops the
message, ``[payload]`` passes it, several duplicate it or inject others before or after it; a
hook may keep one back and return it with a later message (reordering). ``inject`` delivers a
payload to the client at any time.

The server-to-client byte stream is parsed into NATS protocol operations: ``MSG`` and ``HMSG``
go through the hook, everything else (``INFO``, ``PING``, ``PONG``, ``+OK``, ``-ERR``) is passed
on unchanged, except that ``INFO``'s ``connect_urls`` are removed, so that nats-py never
learns of (and never reconnects to) the real server behind the proxy. Client-to-server bytes
are parsed the same way; ``PUB`` and ``HPUB`` go through ``to_server`` when it is set.

The proxy is for one client connection at a time; a reconnect opens a new upstream
connection and the hooks apply to it as well. A hook that raises is recorded in ``errors``
and the message is passed on unchanged; tests should assert ``errors`` is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["BrokerProxy", "Hook", "Message"]

Hook = Callable[[str, bytes], list[bytes]]
"""``hook(subject, payload) -> payloads to forward instead`` (``[]``: drop)."""

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Message:
    """One ``MSG``/``HMSG`` (server to client) or ``PUB``/``HPUB`` (client to server).

    Attributes:
        op: the protocol verb as received (``MSG``, ``HMSG``, ``PUB``, ``HPUB``).
        subject: the subject.
        sid: the subscription id (server to client only; ``""`` for a publish).
        reply: the reply subject, ``""`` when none.
        headers: the NATS header block (``NATS/1.0\\r\\n...\\r\\n\\r\\n``) of ``HMSG``/``HPUB``,
            ``None`` for ``MSG``/``PUB``.
        payload: the payload after the headers.
    """

    op: str
    subject: str
    sid: str
    reply: str
    headers: bytes | None
    payload: bytes

    def encode(self, payload: bytes) -> bytes:
        """The wire form of this message carrying ``payload`` instead of its own."""
        head = [self.op, self.subject]
        if self.sid:
            head.append(self.sid)
        if self.reply:
            head.append(self.reply)
        if self.headers is None:
            head.append(str(len(payload)))
            return " ".join(head).encode() + CRLF + payload + CRLF
        head += [str(len(self.headers)), str(len(self.headers) + len(payload))]
        return " ".join(head).encode() + CRLF + self.headers + payload + CRLF


@dataclass(frozen=True, slots=True)
class _ControlLine:
    """The control line of a message: what it says, and how many bytes follow it."""

    op: str
    subject: str
    sid: str
    reply: str
    hdr_len: int | None  # None: no headers (MSG, PUB)
    total: int  # headers and payload

    @classmethod
    def parse(cls, line: bytes, to_client: bool) -> _ControlLine:
        """``MSG <subject> <sid> [reply] <#bytes>``, ``HMSG <subject> <sid> [reply] <#hdr>
        <#total>``, or the same without ``<sid>`` for ``PUB`` and ``HPUB``."""
        op, *args = line.decode().split()
        with_headers = op.upper() in ("HMSG", "HPUB")
        counts = 2 if with_headers else 1
        fixed = 2 if to_client else 1  # subject and sid, or subject alone
        reply = args[fixed] if len(args) == fixed + 1 + counts else ""
        return cls(
            op=op,
            subject=args[0],
            sid=args[1] if to_client else "",
            reply=reply,
            hdr_len=int(args[-2]) if with_headers else None,
            total=int(args[-1]),
        )


class _Pump:
    """Copies one direction of one connection, parsing it into operations."""

    def __init__(
        self,
        proxy: BrokerProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        to_client: bool,
    ) -> None:
        self._proxy = proxy
        self._reader = reader
        self.writer = writer
        self._to_client = to_client
        self._buf = bytearray()

    async def run(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    return
                self._buf += data
                self.writer.write(self._drain())
                await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()

    def _drain(self) -> bytes:
        """Every complete operation in the buffer, rewritten; a partial one stays."""
        out = bytearray()
        buf = self._buf
        msg_ops = (b"MSG", b"HMSG") if self._to_client else (b"PUB", b"HPUB")
        while True:
            nl = buf.find(CRLF)
            if nl < 0:
                break
            line = bytes(buf[:nl])
            verb = line.split(b" ", 1)[0].upper()
            if verb in msg_ops:
                spec = _ControlLine.parse(line, self._to_client)
                start = nl + len(CRLF)
                if len(buf) < start + spec.total + len(CRLF):
                    break  # the payload has not all arrived
                body = bytes(buf[start : start + spec.total])
                del buf[: start + spec.total + len(CRLF)]
                split = spec.hdr_len or 0
                headers = body[:split] if spec.hdr_len is not None else None
                msg = Message(spec.op, spec.subject, spec.sid, spec.reply, headers, body[split:])
                out += self._proxy._forward(msg, self._to_client)
                continue
            del buf[: nl + 2]
            if verb == b"INFO" and self._to_client:
                line = _strip_info(line)
            out += line + CRLF
        return bytes(out)


def _strip_info(line: bytes) -> bytes:
    """``INFO`` without ``connect_urls``: the client must not discover the real server."""
    info = json.loads(line[len(b"INFO ") :])
    info.pop("connect_urls", None)
    info.pop("ws_connect_urls", None)
    return b"INFO " + json.dumps(info, separators=(",", ":")).encode()


class BrokerProxy:
    """A broker in the middle of one NATS client connection (see the module docstring).

    Args:
        upstream: the real server's URL (``nats://host:port``).
        to_client: the hook for messages the server delivers to the client.
        to_server: the hook for messages the client publishes (``None``: bytes unchanged).

    Attributes:
        errors: exceptions raised by the hooks (the message was passed on unchanged).
        delivered: how many ``MSG``/``HMSG`` reached the client (after the hook).
    """

    def __init__(
        self, upstream: str, *, to_client: Hook | None = None, to_server: Hook | None = None
    ) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 4222
        self.to_client = to_client
        self.to_server = to_server
        self.errors: list[BaseException] = []
        self.delivered = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client_pump: _Pump | None = None
        self._sids: dict[str, Message] = {}
        self.port = 0

    @property
    def url(self) -> str:
        """Where the client connects instead of the server."""
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def __aenter__(self) -> BrokerProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def inject(self, subject: str, payload: bytes) -> None:
        """Deliver ``payload`` to the client on ``subject`` now, as the last message the server
        delivered on that subject was (same subscription, no reply subject, no headers).

        Raises:
            LookupError: nothing was delivered on ``subject`` yet (its subscription is unknown).
        """
        pump = self._client_pump
        template = self._sids.get(subject)
        if pump is None or template is None:
            raise LookupError(f"no message was delivered on {subject!r} yet")
        msg = Message("MSG", subject, template.sid, "", None, b"")
        self.delivered += 1
        pump.writer.write(msg.encode(payload))

    def _forward(self, msg: Message, to_client: bool) -> bytes:
        hook = self.to_client if to_client else self.to_server
        payloads = [msg.payload]
        if hook is not None:
            try:
                payloads = list(hook(msg.subject, msg.payload))
            except Exception as exc:  # recorded for the test; the message goes on unchanged
                self.errors.append(exc)
        if to_client:
            self._sids[msg.subject] = msg
            self.delivered += len(payloads)
        return b"".join(msg.encode(p) for p in payloads)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        down = _Pump(self, up_reader, writer, to_client=True)
        up = _Pump(self, reader, up_writer, to_client=False)
        self._client_pump = down
        pumps = [asyncio.ensure_future(down.run()), asyncio.ensure_future(up.run())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            for p in pumps:
                with contextlib.suppress(BaseException):
                    await p
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()
            self._tasks.discard(task)
