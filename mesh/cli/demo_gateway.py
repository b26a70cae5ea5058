"""``mesh-agent demo --gateway PORT``: the demo mesh kept up with the HTTP gateway in front of
it, and API keys to try it with ``curl`` (``docs/gateway.md``).

After the demo's story it stops the extra researcher instances of the canary part (one of them
fails every call), starts the streaming writer of ``examples/streaming.py``, applies
``policies/research-gateway.yaml`` (who may call through the gateway), issues the gateway an
identity with the role ``gateway`` (saved in the demo's folder, so ``mesh-agent gateway`` can
be run on the demo mesh too), serves the gateway on ``127.0.0.1:PORT`` and issues two keys
through the registry: ``user:alice`` with the role ``research``, and ``guest:eve``, whom a
rule refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from mesh._connect import Mesh
from mesh._core.config import MeshConfig
from mesh._core.identity import TrustRoot, save_identity
from mesh._runtime.agent import Agent
from mesh.bridges.http import Gateway, GatewaySettings, serve_gateway
from mesh.control_plane import GatewayKeyIssueReply, GatewayKeyIssueRequest

EXPOSED = ("researcher", "writer")


async def start_gateway(
    stack: contextlib.AsyncExitStack,
    *,
    root: TrustRoot,
    config: MeshConfig,
    admin: Mesh,
    meshes: Sequence[Mesh],
    keys: Path,
    port: int,
    writer: Agent,
    apply: Callable[..., object],
    say: Callable[[str], None],
) -> str:
    """Start the writer, the policy and the gateway on ``stack``; returns the gateway's URL.

    Args:
        stack: where everything started here is stopped (first, at the end of the demo).
        root / config / admin / meshes: the demo's trust root, configuration, admin mesh and
            the meshes that must run the new policy revision.
        keys: the demo's folder (the gateway's identity goes into ``keys/gateway``).
        port: the HTTP port (0: a free one).
        writer: the streaming agent to serve.
        apply: the demo's ``_apply`` (admin, meshes, text, source).
        say: the demo's narration.
    """
    from .demo import _policy_text

    identity = root.issue_identity("gateway", roles=["gateway"])
    save_identity(identity, keys / "gateway")
    writer_mesh = await stack.enter_async_context(
        Mesh(root.issue_identity("writer"), config, agent=writer)
    )
    # Callees decide (and audit) every call the gateway makes, as mesh-agent gateway does.
    gateway_config = dataclasses.replace(config, caller_checks=False)
    gateway_mesh = await stack.enter_async_context(Mesh(identity, gateway_config))
    text, source = _policy_text("research-gateway.yaml")
    await apply(admin, (*meshes, writer_mesh, gateway_mesh), text, source)  # type: ignore[misc]
    gateway = Gateway(gateway_mesh, GatewaySettings(agents=EXPOSED, access_log=False))
    await gateway.start()
    stack.push_async_callback(gateway.close)
    urls: list[str] = []
    serving = asyncio.create_task(serve_gateway(gateway, "127.0.0.1", port, started=urls.append))

    async def stop_serving() -> None:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    stack.push_async_callback(stop_serving)
    while not urls and not serving.done():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    if serving.done():
        serving.result()  # raises what stopped it (the port is taken, ...)
    url = urls[0]
    issued = {}
    for principal, roles in (("user:alice", ["research"]), ("guest:eve", ["research"])):
        issued[principal] = await admin.request(
            "registry",
            "gateway_key_issue",
            GatewayKeyIssueRequest(principal=principal, roles=roles, ttl=86400.0),
            GatewayKeyIssueReply,
        )
    alice, eve = issued["user:alice"].key, issued["guest:eve"].key
    say(f"gateway    HTTP gateway at {url} for {', '.join(EXPOSED)} (docs/gateway.md)")
    say(f"  API key of user:alice (role research): {alice}")
    say(f"  API key of guest:eve (refused by rule no-guests-through-the-gateway): {eve}")
    say("  try:")
    say(
        f"    curl -s {url}/v1/researcher/answer -H 'Authorization: Bearer {alice}' "
        """-H 'Content-Type: application/json' -d '{"text": "nats"}'"""
    )
    say(
        f"    curl -sN {url}/v1/writer/draft -H 'Authorization: Bearer {alice}' "
        """-d '{"topic": "mesh", "words": 5}'"""
    )
    say(
        f"    curl -s {url}/v1/researcher/answer -H 'Authorization: Bearer {eve}' "
        """-d '{"text": "nats"}'"""
    )
    say(f"    curl -s {url}/openapi.json")
    say(
        f"  or run the gateway yourself: mesh-agent gateway --servers {config.servers[0]} "
        f"--identity {keys / 'gateway'} --agents researcher,writer --listen 127.0.0.1:8481"
    )
    return url
