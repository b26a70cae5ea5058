"""The composition root: ``Mesh``, ``connect`` and ``enrol`` with their defaults filled in.

The runtime takes its transport and its observer as arguments and imports neither nats-py nor
OpenTelemetry; this module is the one place that picks them (nats-py to ``config.servers``,
``Telemetry`` over the OpenTelemetry providers), so it may import every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from mesh._core.config import MeshConfig
from mesh._core.identity import Identity, InstanceKeys, TrustRoot
from mesh._observability.telemetry import Telemetry
from mesh._runtime import enrol as _enrol
from mesh._runtime.agent import Agent
from mesh._runtime.mesh import MeshRuntime
from mesh._transport.base import Transport
from mesh._transport.nats import NatsTransport

__all__ = ["Mesh", "connect", "enrol"]


class Mesh(MeshRuntime):
    """A connection to the mesh as one agent instance.

    Args:
        identity: this instance's keys and certificate.
        config: servers, prefix, timeouts, retry policy, limits.
        agent: the agent definition to serve (``None`` for a caller-only client).
        transport: the broker connection (default: nats-py to ``config.servers``).
        trust_root: the trust root with its private key, for the registry (which signs
            policy, certificates and audit records); others need only the public key.
        tracer_provider / meter_provider: OpenTelemetry providers (default: the global ones;
            with no tracer provider installed no span is made).

    Use as ``async with Mesh(...) as m:``; nothing is sent or served before ``start`` returns.
    Besides its methods it offers, for handlers, hooks and control-plane code: ``name``,
    ``instance``, ``identity``, ``config``, ``agent``, ``trust_root``, ``verifier``, ``control``
    (the signed control-plane stores), ``directory`` (the verified live view), ``governance``
    (the policy in force: ``revision``, ``error``, ``engine``, ``wait_for_revision``), ``stats``
    (refusals, dropped replies, call fates) and ``endpoint_stats``.
    """

    def __init__(
        self,
        identity: Identity,
        config: MeshConfig | None = None,
        *,
        agent: Agent | None = None,
        transport: Transport | None = None,
        trust_root: TrustRoot | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        config = config or MeshConfig()
        super().__init__(
            identity,
            config,
            agent=agent,
            transport=transport
            or NatsTransport(
                config.servers,
                name=f"{identity.agent}.{identity.instance}",
                connect_timeout=config.timeouts.connect,
            ),
            observer=Telemetry(
                identity.agent,
                identity.instance,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
                access_log=config.access_log,
            ),
            trust_root=trust_root,
        )

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self


@contextlib.asynccontextmanager
async def connect(
    identity: Identity,
    config: MeshConfig | None = None,
    *,
    agent: Agent | None = None,
    transport: Transport | None = None,
) -> AsyncIterator[Mesh]:
    """Join the mesh for the duration of an ``async with`` block.

    Example::

        async with mesh.connect(identity, MeshConfig(servers=(url,))) as m:
            answer = await m.request("researcher", "answer", Question(text="?"), Answer)
    """
    m = Mesh(identity, config, agent=agent, transport=transport)
    await m.start()
    try:
        yield m
    finally:
        await m.drain()


async def enrol(
    config: MeshConfig,
    *,
    agent: str,
    token: str,
    root_public_key: bytes,
    keys: InstanceKeys | None = None,
    transport: Transport | None = None,
    timeout: float = 15.0,
) -> Identity:
    """Exchange a join token for a certificate; returns the new identity.

    Args:
        config: servers and prefix of the mesh.
        agent: the agent name the token was made for.
        token: the one-time join token.
        root_public_key: the trust root the certificate must chain to.
        keys: keys to certify (fresh ones when omitted).
        transport: a broker connection (default: nats-py to ``config.servers``, opened and
            closed here).
        timeout: overall bound in seconds.

    Raises:
        Unauthenticated: the token was refused (unknown, used, expired or for another agent).
        Unavailable: no registry could be reached in time.
    """
    return await _enrol.enrol(
        config,
        agent=agent,
        token=token,
        root_public_key=root_public_key,
        keys=keys,
        transport=transport or NatsTransport(config.servers, name=f"{agent}.enrolment"),
        own_transport=transport is None,
        timeout=timeout,
    )
