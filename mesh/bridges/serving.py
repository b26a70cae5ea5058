"""Serving an ASGI app on uvicorn inside a running command: the HTTP gateway, the MCP bridge's
streamable HTTP and the dashboard share it.

The caller owns the process's signals (uvicorn installs none), binds through ``listen_socket``
(so responses are not held back by Nagle's algorithm), and learns the real port once uvicorn
listens; leaving the ``serving`` block stops the server and closes its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from mesh.errors import FailedPrecondition

__all__ = ["base_url", "listen_socket", "serving"]


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn.

    Made with the protocol ``IPPROTO_TCP`` rather than ``0`` (what ``socket.create_server``
    gives): asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on sockets whose protocol
    says TCP, and the accepted sockets inherit it. Without that, every response whose headers
    and body leave in two writes waits for the client's delayed ACK: about 40 ms a call.

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@contextlib.asynccontextmanager
async def serving(
    app: Any,
    host: str,
    port: int,
    *,
    what: str,
    missing: str,
    lifespan: Literal["on", "off"] = "off",
) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """Serve ``app`` on ``host:port`` (``0``: a free port) for the ``async with`` block, which
    gets the base URL (the real port) and uvicorn's task (await it, shielded, to serve until
    cancelled).

    Args:
        app: the ASGI application.
        what: what is served, for errors ("the gateway server").
        missing: the error when uvicorn is not installed (which extra to install).
        lifespan: ``on`` runs the app's lifespan (the MCP SDK's session manager needs it).

    Raises:
        FailedPrecondition: uvicorn is missing, the address cannot be bound, or the server
            stopped before it listened.
    """
    try:
        import uvicorn
    except ImportError:
        raise FailedPrecondition(missing) from None

    class Server(uvicorn.Server):
        # The caller owns the signals: SIGTERM and Ctrl-C reach it, as in every command.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    try:
        sock = listen_socket(host, port)
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot listen on {base_url(host, port)}: {exc.strerror or exc}"
        ) from None
    server = Server(
        uvicorn.Config(
            app,
            log_config=None,  # the process's logging stays as configured
            log_level="warning",
            access_log=False,  # each bridge writes its own, if any
            lifespan=lifespan,
            ws="none",
            timeout_graceful_shutdown=2,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn's only signal)
            await asyncio.sleep(0.02)
        if task.done():
            task.result()  # raises what stopped it
            raise FailedPrecondition(f"{what} on {base_url(host, port)} stopped")
        yield base_url(host, int(sock.getsockname()[1])), task
    finally:
        server.should_exit = True  # then uvicorn closes the connections
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
