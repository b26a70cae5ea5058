"""``mesh-agent gateway`` as a user runs it: the real process on a free port in front of a real
nats-server, a registry and an agent, called over HTTP with httpx. Each status of
``docs/gateway.md`` with its problem body, API keys issued and revoked with ``mesh-policy
gateway-key``, server-sent events, cancellation on disconnect, trace context, the OpenAPI
document, and the demo's ``--gateway``.

Forged key entries and other attacks on the key store are in
``tests/security/test_gateway_keys.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from pydantic import BaseModel, Field

import mesh
from mesh.control_plane import (
    ApplyReply,
    ApplyRequest,
    GatewayKeyIssueReply,
    GatewayKeyIssueRequest,
    TokenReply,
    TokenRequest,
    TrustRoot,
    save_trust_root,
)
from mesh.testing import NatsServer, test_config, wait_until
from mesh_agents import registry as reg

from .cli_helpers import BIN, base_env, run

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: gateway-test}
spec:
  defaults: {authorization: deny}
  rules:
    - name: no-guests
      deny: {callers: [gateway], origins: ["guest:*"]}
    - name: users-may-echo
      allow: {callers: [gateway], agent: echo, origins: ["user:*"], scopes: [echo]}
  endpoints:
    echo.limited:
      rate_limit: {per_caller: 100/s, per_origin: 1/s}
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Msg(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)


class Seen(BaseModel):
    text: str
    caller: str
    origin: str | None
    path: list[str]
    scopes: list[str]
    traceparent: str | None


class Count(BaseModel):
    n: int = Field(ge=0, le=1000)
    pause_ms: int = 0


@dataclass
class Calls:
    """What the echo agent's handlers saw."""

    served: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)


def echo_agent(calls: Calls) -> mesh.Agent:
    agent = mesh.Agent("echo", version="1.0.0")

    @agent.endpoint()
    async def say(m: Msg, ctx: mesh.Context) -> Seen:
        calls.served += 1
        d = ctx.delegation
        return Seen(
            text=m.text,
            caller=ctx.caller.agent,
            origin=d.origin if d else None,
            path=list(d.path) if d else [],
            scopes=list(d.scopes) if d else [],
            traceparent=ctx.traceparent,
        )

    @agent.endpoint()
    async def limited(m: Msg) -> Msg:
        calls.served += 1
        return m

    @agent.endpoint()
    async def slow(m: Msg) -> Msg:
        await asyncio.sleep(2)
        return m

    @agent.endpoint()
    async def hang(m: Msg) -> Msg:
        calls.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            calls.cancelled.set()
            raise
        return m

    @agent.endpoint()
    async def count(c: Count) -> AsyncIterator[Msg]:
        try:
            for i in range(c.n):
                if c.pause_ms:
                    await asyncio.sleep(c.pause_ms / 1000)
                yield Msg(text=str(i))
        except asyncio.CancelledError:
            calls.cancelled.set()
            raise

    return agent


class Process:
    """A ``mesh-agent gateway`` process; its stdout (the access log) and stderr collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.out)),
            asyncio.create_task(self._read(proc.stderr, self.err)),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode())

    async def url(self, timeout: float = 20) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.err:
                m = re.search(r"gateway: (http://\S+) serving", line)
                if m:
                    return m.group(1)
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not start:\n" + "".join(self.err))

    def access(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out if line.startswith("{")]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 15)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code


async def start_gateway(env: dict[str, str], *args: str) -> Process:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"), "gateway", "--listen", "127.0.0.1:0", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Process(proc)


@dataclass
class World:
    server: NatsServer
    root: TrustRoot
    keys: Path
    admin: mesh.Mesh
    registry: mesh.Mesh
    echo: mesh.Mesh
    calls: Calls
    gateway: Process
    http: httpx.AsyncClient
    env: dict[str, str]

    async def key(self, principal: str = "user:alice", roles: tuple[str, ...] = ("echo",)) -> str:
        reply = await self.admin.request(
            "registry",
            "gateway_key_issue",
            GatewayKeyIssueRequest(principal=principal, roles=list(roles)),
            GatewayKeyIssueReply,
        )
        return reply.key

    async def post(self, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return await self.http.post(path, headers=headers, **kwargs)

    async def audit(self, kind: str) -> list[mesh.control_plane.AuditRecord]:
        records, _ = await self.admin.control.read_audit()
        return [r for r in records if r.kind == kind]


@pytest.fixture
async def world(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    keys = tmp_path / "keys"
    save_trust_root(root, keys)
    mesh.save_identity(root.issue_identity("admin", roles=["admin"]), keys / "admin")
    mesh.save_identity(root.issue_identity("gateway", roles=["gateway"]), keys / "gateway")
    cfg = test_config([nats_server.url])
    calls = Calls()
    async with contextlib.AsyncExitStack() as stack:
        registry = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("registry", roles=["registry"]), cfg,
                      agent=reg.registry, trust_root=root)
        )  # fmt: skip
        admin = await stack.enter_async_context(mesh.Mesh(mesh.load_identity(keys / "admin"), cfg))
        echo = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("echo"), test_config([nats_server.url], access_log=True),
                      agent=echo_agent(calls))
        )  # fmt: skip
        await admin.wait_for("registry")
        applied = await admin.request("registry", "apply", ApplyRequest(policy=POLICY), ApplyReply)
        await echo.governance.wait_for_revision(applied.revision)
        env = base_env(servers=nats_server.url, identity=keys / "gateway")
        gateway = await start_gateway(
            env, "--agents", "echo", "--max-body", "64KiB", "--max-timeout", "5s"
        )
        try:
            url = await gateway.url()
            admin_env = base_env(servers=nats_server.url, identity=keys / "admin")
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                yield World(nats_server, root, keys, admin, registry, echo, calls, gateway,
                            http, admin_env)  # fmt: skip
        finally:
            await gateway.stop()


# --- calls ------------------------------------------------------------------------------------


async def test_an_allowed_call_answers_the_reply_for_the_keys_principal(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 with the reply as JSON; the callee sees the gateway as the caller and the key's
    principal and roles as the chain's origin and scopes, and logs both; the gateway's access
    log names the principal and the key, never the body."""
    key = await world.key()
    res = await world.post("/v1/echo/say", key, json={"text": "secret words"})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "application/json"
    seen = Seen.model_validate(res.json())
    assert (seen.text, seen.caller, seen.origin) == ("secret words", "gateway", "user:alice")
    assert (seen.path, seen.scopes) == (["gateway"], ["echo"])
    callee = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if '"access"' in line
    ]
    assert any(
        (r["caller"], r["origin"], r["endpoint"], r["code"])
        == ("gateway", "user:alice", "say", "OK")
        for r in callee
    ), callee
    await wait_until(lambda: any(a.get("endpoint") == "say" for a in world.gateway.access()))
    (line,) = [a for a in world.gateway.access() if a.get("endpoint") == "say"]
    assert (line["status"], line["principal"], line["code"]) == (200, "user:alice", "OK")
    assert line["key"] == key.split("_")[1] and line["method"] == "POST"
    assert line["duration_ms"] > 0 and line["request_bytes"] > 0
    assert "secret words" not in "".join(world.gateway.out)


async def test_a_denied_call_is_403_naming_the_rule_and_audited_with_both_identities(
    world: World,
) -> None:
    """A guest is refused by the rule that names guests; a user without the role the rule
    asks for, by the default. The callee decides and audits both: caller and origin."""
    guest = await world.key("guest:eve")
    res = await world.post("/v1/echo/say", guest, json={"text": "hi"})
    assert res.status_code == 403
    assert res.headers["content-type"] == "application/problem+json"
    problem = res.json()
    assert (problem["rule"], problem["code"], problem["status"]) == (
        "no-guests", "PERMISSION_DENIED", 403,
    )  # fmt: skip
    assert "for guest:eve via gateway" in problem["detail"]
    assert problem["type"] == "urn:natsmesh:problem:permission-denied"
    no_role = await world.key("user:bob", roles=("other",))
    res = await world.post("/v1/echo/say", no_role, json={"text": "hi"})
    assert (res.status_code, res.json()["rule"]) == (403, "default deny")
    assert world.calls.served == 0

    async def audited() -> list[Any]:
        return [r for r in await world.audit("authz.denied") if r.details.get("origin")]

    for _ in range(50):
        denied = await audited()
        if len(denied) == 2:
            break
        await asyncio.sleep(0.1)
    assert {(r.details["caller"], r.details["origin"], r.details["rule"]) for r in denied} == {
        ("gateway", "guest:eve", "no-guests"),
        ("gateway", "user:bob", "default deny"),
    }


async def test_a_rate_limited_call_is_429_with_retry_after(world: World) -> None:
    """``per_origin: 1/s``: the second call within the second is refused with Retry-After."""
    key = await world.key()
    first = await world.post("/v1/echo/limited", key, json={"text": "a"})
    assert first.status_code == 200, first.text
    second = await world.post("/v1/echo/limited", key, json={"text": "b"})
    assert second.status_code == 429, second.text
    assert int(second.headers["retry-after"]) >= 1
    problem = second.json()
    assert problem["code"] == "RESOURCE_EXHAUSTED" and 0 < problem["retry_after"] <= 1
    assert "for user:alice" in problem["detail"]
    other = await world.key("user:carol")  # another principal has its own bucket
    assert (await world.post("/v1/echo/limited", other, json={"text": "c"})).status_code == 200


async def test_a_call_past_its_deadline_is_504(world: World) -> None:
    """``X-Mesh-Timeout: 0.3`` on a handler that takes 2 s."""
    key = await world.key()
    started = time.monotonic()
    res = await world.post(
        "/v1/echo/slow", key, json={"text": "a"}, headers={"X-Mesh-Timeout": "0.3"}
    )
    assert res.status_code == 504, res.text
    assert res.json()["code"] == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 1.8


async def test_malformed_json_is_400_and_never_sent(world: World) -> None:
    """Malformed JSON is answered by the gateway; a body the model refuses by the callee; a
    malformed X-Mesh-Timeout by the gateway. All 400, with a problem saying why."""
    key = await world.key()
    res = await world.post("/v1/echo/say", key, content=b'{"text": ')
    assert res.status_code == 400
    assert res.json()["type"] == "urn:natsmesh:problem:malformed-json"
    assert "not valid JSON" in res.json()["detail"]
    assert world.calls.served == 0
    res = await world.post("/v1/echo/say", key, json={"text": ""})
    assert (res.status_code, res.json()["code"]) == (400, "INVALID_ARGUMENT")
    assert "text" in res.json()["detail"] and world.calls.served == 0
    res = await world.post(
        "/v1/echo/say", key, json={"text": "a"}, headers={"X-Mesh-Timeout": "soon"}
    )
    assert (res.status_code, res.json()["type"]) == (400, "urn:natsmesh:problem:bad-timeout")


async def test_a_body_too_large_is_413(world: World) -> None:
    """Over ``--max-body`` (64 KiB here): refused by its Content-Length before it is read, or
    while it is read when it comes in chunks."""
    key = await world.key()
    big = json.dumps({"text": "x" * (70 * 1024)}).encode()
    res = await world.post("/v1/echo/say", key, content=big)
    assert res.status_code == 413
    assert res.json()["code"] == "RESOURCE_EXHAUSTED" and "65536 bytes" in res.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    res = await world.post("/v1/echo/say", key, content=chunks())
    assert res.status_code == 413
    assert world.calls.served == 0
    ok = await world.post("/v1/echo/say", key, json={"text": "x" * 60_000})
    assert ok.status_code == 200


async def test_an_unknown_agent_or_endpoint_is_404(world: World) -> None:
    """An agent the gateway does not expose, the registry, a name that cannot exist and an
    endpoint the agent does not have: 404 with the type and detail saying which."""
    key = await world.key()
    for path, kind in (
        ("/v1/nobody/say", "unknown-agent"),
        ("/v1/registry/gateway_key_issue", "unknown-agent"),
        ("/v1/Bad.Name/say", "unknown-agent"),
        ("/v1/echo/nothing", "unknown-endpoint"),
    ):
        res = await world.post(path, key, json={})
        assert res.status_code == 404, (path, res.text)
        assert res.json()["type"] == f"urn:natsmesh:problem:{kind}", path
    res = await world.post("/v1/echo/nothing", key, json={})
    assert res.json()["detail"] == "agent 'echo' has no endpoint 'nothing'"
    res = await world.http.get("/v1/echo/say")
    assert res.status_code == 405 and res.json()["status"] == 405
    assert (await world.http.get("/elsewhere")).status_code == 404


async def test_a_missing_or_invalid_key_is_401_with_www_authenticate(world: World) -> None:
    key = await world.key()
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for presented, detail in (
        (None, "an API key is required"),
        ("nonsense", "malformed"),
        (forged, "is not valid"),
    ):
        res = await world.post("/v1/echo/say", presented, json={"text": "a"})
        assert res.status_code == 401, presented
        assert res.headers["www-authenticate"].startswith('Bearer realm="natsmesh"')
        assert detail in res.json()["detail"]
        assert res.json()["type"] == "urn:natsmesh:problem:invalid-key"
    res = await world.http.post("/v1/echo/say", json={"text": "a"}, headers={"X-API-Key": key})
    assert res.status_code == 200
    assert world.calls.served == 1


async def test_a_key_revoked_with_mesh_policy_is_refused_within_seconds(world: World) -> None:
    """``mesh-policy gateway-key issue`` prints the key once; ``revoke`` makes the gateway
    refuse it within a few seconds; ``list`` shows it revoked. Both are audited."""
    issued = await run("mesh-policy", "gateway-key", "issue", "user:dave", "--roles", "echo",
                       "--ttl", "1h", env=world.env)  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert re.fullmatch(r"mgk_[0-9a-f]{24}_[A-Za-z0-9_-]{43}", key)
    assert "shown once" in issued.stderr
    key_id = key.split("_")[1]
    for _ in range(50):  # the gateway follows the key store
        res = await world.post("/v1/echo/say", key, json={"text": "a"})
        if res.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert res.status_code == 200, res.text
    revoked = await run("mesh-policy", "gateway-key", "revoke", key_id, env=world.env)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked gateway key {key_id} of user:dave" in revoked.stdout
    started = time.monotonic()
    while (res := await world.post("/v1/echo/say", key, json={"text": "a"})).status_code == 200:
        assert time.monotonic() - started < 5, "the revoked key still works after 5 s"
        await asyncio.sleep(0.05)
    assert res.status_code == 401 and res.json()["detail"] == f"API key {key_id} was revoked"
    listed = await run("mesh-policy", "gateway-key", "list", "-o", "json", env=world.env)
    (row,) = [k for k in json.loads(listed.stdout)["keys"] if k["id"] == key_id]
    assert (row["principal"], row["roles"], row["state"]) == ("user:dave", ["echo"], "revoked")
    assert [r.details["id"] for r in await world.audit("gateway.key_issued")] == [key_id]
    (record,) = await world.audit("gateway.key_revoked")
    assert (record.subject, record.details["id"]) == ("user:dave", key_id)
    assert record.actor.startswith("admin/")


# --- streams, cancellation, trace context -------------------------------------------------------


def events(text: str) -> list[tuple[str, Any]]:
    """The server-sent events of ``text``: ``(event name, data as JSON)``."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        out.append((name, json.loads(data)))
    return out


async def test_a_streaming_endpoint_answers_server_sent_events(world: World) -> None:
    """One ``data:`` event per chunk, then ``event: end``; a refusal before the first chunk is
    an ordinary problem response."""
    key = await world.key()
    res = await world.post("/v1/echo/count", key, json={"n": 4})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/event-stream")
    assert events(res.text) == [
        ("message", {"text": "0"}), ("message", {"text": "1"}), ("message", {"text": "2"}),
        ("message", {"text": "3"}), ("end", {"chunks": 4, "code": "OK"}),
    ]  # fmt: skip
    empty = await world.post("/v1/echo/count", key, json={"n": 0})
    assert events(empty.text) == [("end", {"chunks": 0, "code": "OK"})]
    guest = await world.key("guest:eve")
    denied = await world.post("/v1/echo/count", guest, json={"n": 4})
    assert (denied.status_code, denied.json()["rule"]) == (403, "no-guests")


async def test_a_stream_that_fails_midway_ends_with_an_error_event(world: World) -> None:
    """The deadline passes after some chunks: ``event: error`` with the problem, then end."""
    key = await world.key()
    res = await world.post(
        "/v1/echo/count", key, json={"n": 50, "pause_ms": 100}, headers={"X-Mesh-Timeout": "0.5"}
    )
    assert res.status_code == 200
    got = events(res.text)
    assert got[0][0] == "message" and got[-2][0] == "error" and got[-1][0] == "end"
    assert got[-2][1]["code"] == "DEADLINE_EXCEEDED" and got[-2][1]["status"] == 504
    assert got[-1][1] == {"chunks": len(got) - 2, "code": "DEADLINE_EXCEEDED"}


async def test_a_client_disconnect_cancels_the_handler(world: World) -> None:
    """Leaving a stream after its first event, or giving up on a call, cancels the mesh call,
    and so the handler at the callee."""
    key = await world.key()
    headers = {"Authorization": f"Bearer {key}"}
    async with world.http.stream(
        "POST", "/v1/echo/count", json={"n": 1000, "pause_ms": 50}, headers=headers
    ) as res:
        async for line in res.aiter_lines():
            if line.startswith("data: "):
                break
    await asyncio.wait_for(world.calls.cancelled.wait(), 5)
    world.calls.cancelled.clear()
    call = asyncio.create_task(world.post("/v1/echo/hang", key, json={"text": "a"}))
    await asyncio.wait_for(world.calls.started.wait(), 5)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    await asyncio.wait_for(world.calls.cancelled.wait(), 5)
    await wait_until(lambda: any(a["status"] == 499 for a in world.gateway.access()), 5)


async def test_the_trace_context_is_continued_to_the_callee(world: World) -> None:
    key = await world.key()
    res = await world.post(
        "/v1/echo/say", key, json={"text": "a"},
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"},
    )  # fmt: skip
    seen = Seen.model_validate(res.json())
    assert seen.traceparent is not None
    assert seen.traceparent.split("-")[1] == TRACEPARENT.split("-")[1]
    bad = await world.post("/v1/echo/say", key, json={"text": "a"}, headers={"traceparent": "x"})
    assert bad.status_code == 200  # a malformed one is dropped, as W3C says, not refused
    assert Seen.model_validate(bad.json()).traceparent != "x"


# --- the document and the process ---------------------------------------------------------------


async def test_the_openapi_document_validates_and_matches_the_published_schemas(
    world: World,
) -> None:
    res = await world.http.get("/openapi.json")
    assert res.status_code == 200
    doc = res.json()
    validate(doc)
    schemas = await world.admin.schemas("echo")
    assert sorted(doc["paths"]) == [f"/v1/echo/{name}" for name in sorted(schemas)]
    components = doc["components"]["schemas"]
    for name, schema in schemas.items():
        op = doc["paths"][f"/v1/echo/{name}"]["post"]
        assert op["x-mesh-schema-hash"] == schema.hash
        assert components[f"echo.{name}.input"] == schema.input
        assert components[f"echo.{name}.output"] == schema.output
        media = "text/event-stream" if schema.streams else "application/json"
        assert list(op["responses"]["200"]["content"]) == [media]
    assert (await world.http.get("/healthz")).json()["status"] == "ok"


async def test_the_gateway_refuses_to_start_without_the_gateway_role(
    world: World, tmp_path: Path
) -> None:
    mesh.save_identity(world.root.issue_identity("gateway"), tmp_path / "plain")
    env = base_env(servers=world.server.url, identity=tmp_path / "plain")
    proc = await start_gateway(env, "--agents", "echo")
    code = await asyncio.wait_for(proc.proc.wait(), 30)
    await proc.stop()
    assert code == 2
    assert "lacks the role 'gateway'" in "".join(proc.err)
    assert "--roles gateway" in "".join(proc.err)


async def test_the_gateway_enrols_with_a_join_token(world: World, tmp_path: Path) -> None:
    """``--token`` with ``--roles gateway``: the gateway enrols, saves its identity and serves
    calls with it."""
    reply = await world.admin.request(
        "registry", "token", TokenRequest(agent="edge", roles=["gateway"]), TokenReply
    )
    env = base_env(servers=world.server.url, identity=tmp_path / "edge")
    proc = await start_gateway(
        env, "--agents", "echo", "--token", reply.token, "--name", "edge",
        "--root", str(world.keys / "root.pub"),
    )  # fmt: skip
    try:
        url = await proc.url()
        assert (tmp_path / "edge" / "identity.key").exists()
        key = await world.key()
        async with httpx.AsyncClient(base_url=url) as http:
            res = await http.post("/v1/echo/say", json={"text": "a"},
                                  headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert res.status_code == 403  # the policy names callers: [gateway], not edge
        assert res.json()["rule"] == "default deny"
    finally:
        assert await proc.stop() == 0


def test_the_demo_serves_the_gateway_with_keys_to_try(tmp_path: Path) -> None:
    """``mesh-agent demo --gateway 0``: after the demo's story the gateway serves the
    researcher; the printed key of user:alice is answered, guest:eve's refused by its rule."""
    env = {**base_env(), "TMPDIR": str(tmp_path)}
    with subprocess.Popen(
        [str(BIN / "mesh-agent"), "demo", "--gateway", "0"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "Ctrl-C to stop" in line:
                    break
            text = "".join(lines)
            url = re.search(r"HTTP gateway at (http://\S+) ", text)
            alice = re.search(r"user:alice \(role research\): (\S+)", text)
            eve = re.search(r"guest:eve \(refused by rule [\w-]+\): (\S+)", text)
            assert url and alice and eve, text
            body = {"text": "nats"}
            with httpx.Client(base_url=url[1], timeout=20) as http:
                ok = http.post("/v1/researcher/answer", json=body,
                               headers={"Authorization": f"Bearer {alice[1]}"})  # fmt: skip
                assert ok.status_code == 200, ok.text
                assert ok.json()["sources"] == ["doc-17", "doc-42"]
                no = http.post("/v1/researcher/answer", json=body,
                               headers={"Authorization": f"Bearer {eve[1]}"})  # fmt: skip
                assert (no.status_code, no.json()["rule"]) == (403, "no-guests-through-the-gateway")
                sse = http.post("/v1/writer/draft", json={"topic": "mesh", "words": 3},
                                headers={"Authorization": f"Bearer {alice[1]}"})  # fmt: skip
                assert [e for e, _ in events(sse.text)] == ["message"] * 3 + ["end"]
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0
