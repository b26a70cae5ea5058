"""``python -m benchmarks.gateway``: what a call through the HTTP gateway costs against a direct
mesh call to the same endpoint.

One local nats-server started here; in this process, on one event loop: the registry (heads
and the key), an echo agent (256-byte JSON body in, the same out), a caller mesh, the gateway
(``mesh.bridges.http``: its mesh connection, Starlette on uvicorn bound to 127.0.0.1) and an
httpx client with keep-alive. Sequential calls, one at a time, in four scenarios taken in
turns (``--rounds`` turns of ``--calls`` calls each, after ``--warmup`` calls of each):

- ``direct``: ``Mesh.request_json`` from the caller mesh (no chain): the baseline;
- ``direct, chain``: the same call from the gateway's identity with
  ``Delegate(origin="user:bench", scopes=("bench",))``, as the gateway makes it: what the
  delegation chain costs (one signature here, one verification at the callee);
- ``gateway app, no socket``: the gateway's ASGI app called in process with the request as
  ASGI messages (no HTTP parsing, no socket): the gateway's own work on top of the chained call;
- ``HTTP only``: the same httpx client against a Starlette route on the same uvicorn setup that
  answers a fixed 256-byte JSON body without the mesh: what HTTP costs, both ends;
- ``gateway``: ``POST /v1/bench-echo/echo`` with an API key through the gateway.

Everything shares one core (the server has the other), so each figure is the whole hop's CPU:
the client's HTTP work counts here, though a real client runs elsewhere. ``--write`` writes the
``gateway`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import mesh
from mesh.bridges.http import Gateway, GatewaySettings, serve_gateway
from mesh.bridges.serving import listen_socket
from mesh.control_plane import (
    ApplyReply,
    ApplyRequest,
    GatewayKeyIssueReply,
    GatewayKeyIssueRequest,
    TrustRoot,
)
from mesh.testing import NatsServer
from mesh_agents import registry as reg

from .machine import machine_info
from .payload import Body, body_of
from .sections import write_section
from .stats import percentile
from .traffic import config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
AGENT = "bench-echo"
SIZE = 256
OPEN = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: bench-gateway}
spec:
  defaults: {authorization: allow}
"""
SCENARIOS = ("direct", "direct, chain", "gateway app, no socket", "HTTP only", "gateway")


def echo() -> mesh.Agent:
    agent = mesh.Agent(AGENT)

    @agent.endpoint(name="echo", idempotent=True, concurrency=64)
    async def run(q: Body) -> Body:
        return q

    return agent


@contextlib.asynccontextmanager
async def http_only(payload: bytes) -> AsyncIterator[str]:
    """A Starlette route answering ``payload`` on uvicorn, configured as the gateway's."""

    async def answer(request: Request) -> Response:
        await request.body()
        return Response(payload, media_type="application/json")

    app = Starlette(routes=[Route("/v1/x/y", answer, methods=["POST"])])
    sock = listen_socket("127.0.0.1", 0)  # TCP_NODELAY, as the gateway's
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                       lifespan="off", ws="none")
    )  # fmt: skip
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def measure(calls: int, warmup: int, rounds: int) -> dict[str, list[int]]:
    """Latencies (ns) per scenario, every round taking each scenario in turn."""
    body = body_of(SIZE)
    payload = body.model_dump_json().encode()
    root = TrustRoot.generate()
    async with NatsServer() as server:
        cfg = config(server.url)
        async with contextlib.AsyncExitStack() as stack:

            async def join(name: str, roles: tuple[str, ...] = (), **kw: Any) -> mesh.Mesh:
                ident = root.issue_identity(name, roles=roles)
                c = dataclasses.replace(cfg, **kw.pop("config", {}))
                return await stack.enter_async_context(mesh.Mesh(ident, c, **kw))

            await join("registry", ("registry",), agent=reg.registry, trust_root=root)
            admin = await join("admin", ("admin",))
            await join(AGENT, agent=echo())
            caller = await join("bench-caller")
            gm = await join("gateway", ("gateway",), config={"caller_checks": False})
            await admin.wait_for("registry")
            applied = await admin.request(
                "registry", "apply", ApplyRequest(policy=OPEN), ApplyReply
            )
            for m in (caller, gm):
                await m.governance.wait_for_revision(applied.revision)
                await m.wait_for(AGENT)
            key = (
                await admin.request(
                    "registry", "gateway_key_issue",
                    GatewayKeyIssueRequest(principal="user:bench", roles=["bench"]),
                    GatewayKeyIssueReply,
                )
            ).key  # fmt: skip
            gateway = Gateway(gm, GatewaySettings(agents=(AGENT,), access_log=False))
            await gateway.start()
            stack.push_async_callback(gateway.close)
            urls: list[str] = []
            serving = asyncio.create_task(
                serve_gateway(gateway, "127.0.0.1", 0, started=urls.append)
            )
            stack.callback(serving.cancel)
            while not urls:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # the key reaches the gateway's watch
            plain_url = await stack.enter_async_context(http_only(payload))
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            delegate = mesh.Delegate(origin="user:bench", scopes=("bench",))
            gateway_url = f"{urls[0]}/v1/{AGENT}/echo"

            async def via_gateway() -> None:
                res = await http.post(gateway_url, content=payload, headers=headers)
                assert res.status_code == 200, res.text

            path = f"/v1/{AGENT}/echo"
            raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
            app = gateway.app()

            async def in_process() -> None:
                scope = {
                    "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                    "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                    "raw_path": path.encode(), "root_path": "", "query_string": b"",
                    "headers": raw_headers, "client": ("127.0.0.1", 1),
                    "server": ("127.0.0.1", 80),
                }  # fmt: skip
                given = False
                sent: list[Any] = []

                async def receive() -> dict[str, Any]:
                    nonlocal given
                    if not given:
                        given = True
                        return {"type": "http.request", "body": payload, "more_body": False}
                    await asyncio.Event().wait()  # no disconnect
                    raise AssertionError

                async def send(message: Any) -> None:
                    sent.append(message)

                await app(scope, receive, send)
                assert sent[0]["status"] == 200

            async def plain() -> None:
                res = await http.post(f"{plain_url}/v1/x/y", content=payload, headers=headers)
                assert res.status_code == 200

            ops: dict[str, Callable[[], Awaitable[Any]]] = {
                "direct": lambda: caller.request_json(AGENT, "echo", payload),
                "direct, chain": lambda: gm.request_json(AGENT, "echo", payload, delegate=delegate),
                "gateway app, no socket": in_process,
                "HTTP only": plain,
                "gateway": via_gateway,
            }
            samples: dict[str, list[int]] = {name: [] for name in SCENARIOS}
            for name in SCENARIOS:
                for _ in range(warmup):
                    await ops[name]()
            for _ in range(rounds):
                for name in SCENARIOS:
                    op = ops[name]
                    for _ in range(calls):
                        t0 = time.perf_counter_ns()
                        await op()
                        samples[name].append(time.perf_counter_ns() - t0)
            return samples


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def render(samples: dict[str, list[int]], command: str, load: tuple[float, float]) -> str:
    m = machine_info()
    rows = []
    base = sorted(samples["direct"])
    base_p50 = percentile(base, 50) / 1000
    for name in SCENARIOS:
        values = sorted(samples[name])
        p50, p99 = percentile(values, 50) / 1000, percentile(values, 99) / 1000
        rate = len(values) / (sum(values) / 1e9)
        added = "-" if name == "direct" else f"+{p50 - base_p50:.0f}"
        rows.append(f"| {name} | {len(values)} | {p50:.0f} | {p99:.0f} | {rate:,.0f} | {added} |")

    def p50(name: str) -> float:
        return percentile(sorted(samples[name]), 50) / 1000

    gw, app, chain = p50("gateway"), p50("gateway app, no socket"), p50("direct, chain")
    bare = p50("HTTP only")
    return f"""## HTTP gateway: what a call through it costs

`benchmarks/gateway.py`. Machine: {m["cpu"]}, {m["cores"]} cores (shared with other work;
run under `nice`), {m["python"]}, nats-py {m["nats-py"]}, nats-server {m["nats-server"]},
pydantic {m["pydantic"]}, Starlette {_version("starlette")}, uvicorn {_version("uvicorn")},
httpx {_version("httpx")}; {m["date"]}; load average (1 min) {load[0]:.1f} at the start,
{load[1]:.1f} at the end.

    {command}

One local nats-server; in one process and event loop: the registry, an echo agent (256-byte
JSON body in and out), a caller mesh, the gateway (its mesh connection, Starlette on uvicorn
on 127.0.0.1) and an httpx client with keep-alive. Sequential calls, the scenarios taken in
turns. **direct**: `Mesh.request_json` from a caller mesh; **direct, chain**: the same call
from the gateway's identity with the chain the gateway starts (`Delegate(origin=...,
scopes=...)`: one Ed25519 signature here, one verification at the callee); **gateway app, no
socket**: the gateway's ASGI app called in process with the request as ASGI messages;
**HTTP only**: the httpx client against a Starlette route on the same uvicorn setup that
answers a fixed body (no mesh); **gateway**: `POST /v1/bench-echo/echo` with an API key. All
of it shares one core, so the client's HTTP work is counted too (a real client runs
elsewhere). No goal is set.

| scenario | calls | p50 µs | p99 µs | calls/s | p50 added to direct, µs |
|---|--:|--:|--:|--:|--:|
{chr(10).join(rows)}

Where the gateway's {gw - base_p50:.0f} µs over a direct call go (differences of p50s, so only
roughly additive): the delegation chain ≈ {chain - base_p50:.0f} µs; the gateway's own work in its
app (Starlette's routing, the key check, the name, size and JSON checks, the disconnect
watch, the reply's JSON) ≈ {app - chain:.0f} µs; HTTP over the socket, both ends (httpx,
uvicorn with its pure-Python h11 parser) ≈ {gw - app:.0f} µs. The bare HTTP exchange alone
(**HTTP only**) costs {bare:.0f} µs; the rest of that last difference is not attributed (one
event loop serves the HTTP connections and the mesh connections at once, and the runs differ
by a few hundred µs from one to the next on this shared machine).
"""


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__)
    p.add_argument("--calls", type=int, default=500, help="calls per scenario and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=100, help="calls per scenario, not counted")
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    args = p.parse_args()
    start_load = os.getloadavg()[0]
    samples = asyncio.run(measure(args.calls, args.warmup, args.rounds))
    command = (
        f"nice python -m benchmarks.gateway --calls {args.calls} --rounds {args.rounds} "
        f"--warmup {args.warmup}" + (" --write" if args.write else "")
    )
    text = render(samples, command, (start_load, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(PAGE, "gateway", text)
        print(f"wrote {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
