"""The MCP bridges end to end, on a real nats-server with a registry and a policy, with the
official MCP SDK on the other side (``docs/mcp.md``).

- ``mesh-agent mcp`` (mesh endpoints as MCP tools), as a real process, reached by
  ``mcp.ClientSession`` over stdio (``stdio_client`` spawning it) and over streamable HTTP
  (``streamable_http_client`` against ``mesh-agent mcp --http``): tools listed with the
  endpoints' input schemas, a call, a denial as a tool error naming the rule, progress from a
  long and from a streaming endpoint, a cancellation that reaches the handler.
- ``mesh-agent mcp-wrap`` (an MCP server as a mesh agent): the SDK's ``MCPServer`` in
  ``mcp_server_tool.py``, wrapped and called by mesh callers: allowed for one, denied for
  another, each call in the wrapper's access log and the denial in the audit log.

The endpoints served come from ``mcp_workers.py`` (``calc``, in the test process).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

import mesh
from mesh._core.schemas import schema_hash
from mesh.control_plane import ApplyReply, ApplyRequest, PolicyEngine, TrustRoot
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg

from .cli_helpers import BIN, REPO, base_env
from .mcp_workers import calc, recorder

pytestmark = pytest.mark.timeout(90)

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: mcp-test}
spec:
  defaults: {authorization: deny}
  rules:
    - name: no-secrets-over-mcp
      deny: {callers: ["*"], agent: calc, endpoints: [secret]}
    - name: the-bridge-may-calc
      allow: {callers: [mcp-bridge], agent: calc, endpoints: ["*"]}
    - name: bob-may-not-use-tools
      deny: {callers: [bob], agent: tools, endpoints: ["*"]}
    - name: alice-may-use-tools
      allow: {callers: [alice], agent: tools, endpoints: ["*"]}
"""
TOOL_SERVER = REPO / "tests" / "integration" / "mcp_server_tool.py"
CALC_TOOLS = ["calc.add", "calc.count", "calc.secret", "calc.slow"]


@dataclass
class World:
    """A nats-server, the registry with the policy above, ``calc`` served in this process,
    and a directory of identities for the processes the tests start."""

    url: str
    root: TrustRoot
    cfg: mesh.MeshConfig
    stack: AsyncExitStack
    admin: mesh.Mesh
    tmp: Path

    def identity(self, agent: str, roles: tuple[str, ...] = ()) -> Path:
        d = self.tmp / agent
        mesh.save_identity(self.root.issue_identity(agent, roles=roles), d)
        return d

    async def join(self, agent: str, served: mesh.Agent | None = None) -> mesh.Mesh:
        ident = self.root.issue_identity(agent)
        return await self.stack.enter_async_context(mesh.Mesh(ident, self.cfg, agent=served))


@pytest.fixture
async def world(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    async with AsyncExitStack() as stack:
        registry = mesh.Mesh(
            root.issue_identity("registry", roles=["registry"]),
            cfg,
            agent=reg.registry,
            trust_root=root,
        )
        await registry.start()
        stack.push_async_callback(registry.drain)
        admin = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), watching_all(cfg))
        )
        await admin.wait_for("registry")
        await admin.request(
            "registry", "apply", ApplyRequest(policy=POLICY, source="mcp.yaml"), ApplyReply
        )
        w = World(nats_server.url, root, cfg, stack, admin, tmp_path)
        await w.join("calc", calc)
        yield w


def bridge_args(w: World, *extra: str, log_level: str = "warning") -> list[str]:
    """``mesh-agent mcp`` serving every endpoint of ``calc`` as ``mcp-bridge`` (a gateway)."""
    identity = w.identity("mcp-bridge", roles=("gateway",))
    return [
        "mcp",
        "--agents",
        "calc",
        "--servers",
        w.url,
        "--identity",
        str(identity),
        "--log-level",
        log_level,
        *extra,
    ]


@asynccontextmanager
async def stdio_bridge(w: World, *extra: str) -> AsyncIterator[tuple[ClientSession, Path]]:
    """A ClientSession over stdio to a ``mesh-agent mcp`` the SDK spawns; its stderr in a
    file."""
    params = StdioServerParameters(
        command=str(BIN / "mesh-agent"),
        args=bridge_args(w, *extra),
        env=base_env(columns=None),
        cwd=REPO,
    )
    err_path = w.tmp / "bridge.stderr"
    with err_path.open("w") as err:
        async with (
            stdio_client(params, errlog=err) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session, err_path


def spawn(
    args: list[str], env: dict[str, str], out: IO[bytes] | int, err: IO[bytes]
) -> subprocess.Popen[bytes]:
    """``mesh-agent ARGS`` from the repository's root."""
    return subprocess.Popen(
        [str(BIN / "mesh-agent"), *args], cwd=REPO, env=env, stdout=out, stderr=err
    )


async def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (a drain), then SIGKILL after 15 s; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def http_bridge(w: World) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """``mesh-agent mcp --http 127.0.0.1:PORT`` as a process, once it listens."""
    port = free_port()
    err_path = w.tmp / "http-bridge.stderr"
    err: IO[bytes] = err_path.open("wb")
    args = bridge_args(w, "--http", f"127.0.0.1:{port}")
    proc = spawn(args, base_env(columns=None), subprocess.DEVNULL, err)
    try:
        end = time.monotonic() + 30
        while True:
            assert proc.poll() is None, err_path.read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < end, err_path.read_text()
            await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp", proc
        code = await stop(proc)
        assert code == 0, f"exit {code} after SIGTERM:\n{err_path.read_text()}"
    finally:
        await stop(proc)
        err.close()


def text_of(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


# --- mesh endpoints as MCP tools ---------------------------------------------------------------


async def test_stdio_client_lists_the_endpoints_as_tools_with_their_input_schemas(
    world: World,
) -> None:
    """tools/list over stdio: one tool per endpoint, the input schema the published one."""
    published = calc.schemas()
    async with stdio_bridge(world) as (session, _):
        listed = await session.list_tools()
    tools = {t.name: t for t in listed.tools}
    assert sorted(tools) == CALC_TOOLS
    add = tools["calc.add"]
    assert add.input_schema == published["add"].input
    assert add.input_schema["properties"]["b"]["minimum"] == 0
    assert add.output_schema == published["add"].output
    count = tools["calc.count"].output_schema
    assert count is not None and count["properties"]["chunks"]["type"] == "array"


async def test_stdio_call_returns_the_reply_as_structured_content_and_json_text(
    world: World,
) -> None:
    """tools/call is a mesh request made for the --principal; the reply comes back whole."""
    async with stdio_bridge(world, "--principal", "user:alice") as (session, _):
        result = await session.call_tool("calc.add", {"a": 2, "b": 40})
    assert not result.is_error, text_of(result)
    assert result.structured_content == {"total": 42, "origin": "user:alice"}
    assert json.loads(text_of(result)) == {"total": 42, "origin": "user:alice"}


async def test_stdio_denied_call_is_a_tool_error_naming_the_rule(world: World) -> None:
    """A policy denial is a tool error (isError) that says which rule refused it."""
    async with stdio_bridge(world) as (session, _):
        result = await session.call_tool("calc.secret", {"a": 1, "b": 1})
        invalid = await session.call_tool("calc.add", {"a": 1, "b": -1})
    assert result.is_error
    text = text_of(result)
    assert text.startswith("PermissionDenied: ") and "no-secrets-over-mcp" in text, text
    assert "Traceback" not in text
    assert invalid.is_error and text_of(invalid).startswith("InvalidArgument: "), text_of(invalid)


async def test_stdio_progress_arrives_for_a_long_and_for_a_streaming_endpoint(
    world: World,
) -> None:
    """ctx.progress reports and streamed chunks arrive as notifications/progress."""
    long: list[tuple[float, float | None, str | None]] = []
    chunks: list[tuple[float, float | None, str | None]] = []

    async def on_long(progress: float, total: float | None, message: str | None) -> None:
        long.append((progress, total, message))

    async def on_chunk(progress: float, total: float | None, message: str | None) -> None:
        chunks.append((progress, total, message))

    async with stdio_bridge(world) as (session, _):
        slow = await session.call_tool(
            "calc.slow", {"key": "progress", "steps": 4, "interval_s": 0.15}, None, on_long
        )
        streamed = await session.call_tool("calc.count", {"n": 5}, None, on_chunk)
    assert slow.structured_content == {"total": 4, "origin": None}
    assert len(long) >= 2, long
    assert [p for p, _, _ in long] == sorted({p for p, _, _ in long})  # increasing
    assert all(t == 1.0 for _, t, _ in long) and long[-1][2] is not None
    assert streamed.structured_content == {
        "chunks": [{"index": i, "text": f"tick {i}"} for i in range(5)]
    }
    assert [p for p, _, _ in chunks] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert json.loads(chunks[0][2] or "") == {"index": 0, "text": "tick 0"}


async def test_stdio_cancellation_reaches_the_handler(world: World) -> None:
    """notifications/cancelled (the SDK sends it when the call's task is cancelled) cancels
    the mesh call, and the handler gets CancelledError."""
    async with stdio_bridge(world) as (session, _):
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    await session.call_tool(
                        "calc.slow", {"key": "cancel-me", "steps": 600, "interval_s": 0.1}
                    )

                tg.start_soon(call)
                await wait_until(lambda: recorder.of("cancel-me") == ["started"], 15)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        await wait_until(lambda: recorder.of("cancel-me") == ["started", "cancelled"], 10)
        # The bridge serves on: a later call works.
        again = await session.call_tool("calc.add", {"a": 1, "b": 2})
    assert again.structured_content == {"total": 3, "origin": None}


async def test_streamable_http_client_lists_and_calls_tools(world: World) -> None:
    """The same over streamable HTTP, against `mesh-agent mcp --http` as a process."""
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with (
        http_bridge(world) as (url, _),
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = await session.list_tools()
        added = await session.call_tool("calc.add", {"a": 20, "b": 22})
        denied = await session.call_tool("calc.secret", {"a": 1, "b": 1})
        slow = await session.call_tool(
            "calc.slow", {"key": "http", "steps": 3, "interval_s": 0.15}, None, on_progress
        )
    tools = {t.name: t for t in listed.tools}
    assert sorted(tools) == CALC_TOOLS
    assert tools["calc.add"].input_schema == calc.schemas()["add"].input
    assert added.structured_content == {"total": 42, "origin": None}
    assert denied.is_error and "no-secrets-over-mcp" in text_of(denied)
    assert slow.structured_content == {"total": 3, "origin": None} and progress


async def test_streamable_http_cancellation_reaches_the_handler(world: World) -> None:
    """Over streamable HTTP too, a cancelled call cancels the handler."""
    async with (
        http_bridge(world) as (url, _),
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await session.call_tool(
                    "calc.slow", {"key": "http-cancel", "steps": 600, "interval_s": 0.1}
                )

            tg.start_soon(call)
            await wait_until(lambda: recorder.of("http-cancel") == ["started"], 15)
            tg.cancel_scope.cancel()
        await wait_until(lambda: recorder.of("http-cancel") == ["started", "cancelled"], 10)


async def test_stdio_bridge_writes_nothing_but_mcp_on_stdout(world: World) -> None:
    """With debug logging on, stdout carries only JSON-RPC messages; the logs go to stderr."""
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
         "params": {"name": "calc.add", "arguments": {"a": 1, "b": 2}}},
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"),
        *bridge_args(world, log_level="debug"),
        cwd=REPO,
        env=base_env(columns=None),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    replies: dict[int, dict[str, Any]] = {}
    lines: list[bytes] = []
    for message in messages:
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        await proc.stdin.drain()
        while "id" in message and message["id"] not in replies:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "stdout closed early"
            lines.append(line)
            reply = json.loads(line)
            assert reply["jsonrpc"] == "2.0"
            if "id" in reply:
                replies[reply["id"]] = reply
    proc.stdin.close()
    rest, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    for line in [*lines, *rest.splitlines(keepends=True)]:
        assert json.loads(line)["jsonrpc"] == "2.0", line
    assert replies[3]["result"]["structuredContent"] == {"total": 3, "origin": None}
    assert b"mcp.ready" in err  # the logs went to stderr


async def test_principal_without_the_gateway_role_is_refused_at_start(world: World) -> None:
    """--principal needs the role gateway: a clear error and exit 2, no traceback."""
    identity = world.identity("plain")
    result = await asyncio.to_thread(
        subprocess.run,
        [
            *(str(BIN / "mesh-agent"), "mcp", "--agents", "calc", "--identity", str(identity)),
            *("--servers", world.url, "--principal", "user:alice"),
        ],
        capture_output=True,
        text=True,
        env=base_env(columns=None),
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("InvalidArgument: --principal user:alice needs"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- an MCP server as a mesh agent -------------------------------------------------------------


@asynccontextmanager
async def wrapped_tools(w: World) -> AsyncIterator[Path]:
    """``mesh-agent mcp-wrap tools --command "python mcp_server_tool.py" --access-log``,
    until ``tools`` is listed; yields the file its stdout (the access log) goes to."""
    identity = w.identity("tools")
    out_path, err_path = w.tmp / "wrap.stdout", w.tmp / "wrap.stderr"
    out, err = out_path.open("wb"), err_path.open("wb")
    env = base_env(columns=None)
    env["PYTHONUNBUFFERED"] = "1"
    args = [
        *("mcp-wrap", "tools", "--access-log", "--log-level", "info"),
        *("--command", f"{sys.executable} {TOOL_SERVER}"),
        *("--servers", w.url, "--identity", str(identity), "--drain", "2s"),
    ]
    proc = spawn(args, env, out, err)
    try:
        end = time.monotonic() + 30
        while not w.admin.directory.instances("tools"):
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < end, err_path.read_text()
            await asyncio.sleep(0.1)
        yield out_path
        code = await stop(proc)
        assert code == 0, f"exit {code} after SIGTERM:\n{err_path.read_text()}"
    finally:
        await stop(proc)
        out.close()
        err.close()


def access_lines(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "access"]


async def test_wrapped_mcp_server_is_governed_by_policy_and_logged(world: World) -> None:
    """The tools of an MCP server become endpoints of `tools`: alice may call them, bob is
    refused by policy (by his own mesh, and by the wrapper when his mesh does not check);
    the wrapper's access log shows each call and the audit log the denial."""
    alice = await world.join("alice")
    bob = await world.join("bob")
    async with wrapped_tools(world) as access_log:
        schemas = await alice.schemas("tools")
        assert sorted(schemas) == ["add", "fail", "shout-text"]
        add = schemas["add"]
        assert add.input is not None and add.input["title"] == "addArguments"
        assert add.input["required"] == ["a", "b"]
        assert add.hash == schema_hash(add.input, add.output)

        assert await alice.request_json("tools", "add", {"a": 2, "b": 3}) == {"result": 5}
        shouted = await alice.request_json("tools", "shout-text", {"text": "hi"})
        assert shouted["text"] == "HI" and shouted["content"][0]["type"] == "text"
        with pytest.raises(mesh.FailedPrecondition, match="refused: no"):
            await alice.request_json("tools", "fail", {"reason": "no"})
        with pytest.raises(mesh.InvalidArgument, match="is not of type 'integer'"):
            await alice.request_json("tools", "add", {"a": "two", "b": 3})

        with pytest.raises(mesh.PermissionDenied, match="bob-may-not-use-tools"):
            await bob.request_json("tools", "add", {"a": 1, "b": 1})
        bob.governance.engine = PolicyEngine(None)  # a caller that does not check: the callee does
        with pytest.raises(mesh.PermissionDenied, match="bob-may-not-use-tools"):
            await bob.request_json("tools", "add", {"a": 1, "b": 1})

        def logged() -> list[tuple[str, str, str, str | None]]:
            return [
                (x["caller"], x["endpoint"], x["code"], x.get("rule"))
                for x in access_lines(access_log)
            ]

        await wait_until(lambda: ("bob", "add", "PERMISSION_DENIED", "bob-may-not-use-tools")
                         in logged(), 10)  # fmt: skip
    assert ("alice", "add", "OK", None) in logged()
    assert ("alice", "shout-text", "OK", None) in logged()
    assert any(c == "alice" and e == "fail" and code != "OK" for c, e, code, _ in logged())

    async def audited() -> bool:
        records, _ = await world.admin.control.read_audit()
        return any(r.kind == "authz.denied" and r.subject == "bob -> tools.add" for r in records)

    end = time.monotonic() + 10
    while not await audited():
        assert time.monotonic() < end, "the denial never reached the audit log"
        await asyncio.sleep(0.1)
