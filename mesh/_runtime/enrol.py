"""Enrolment: an agent with a one-time join token gets its first certificate from the registry.

The agent makes its keys locally (they never leave it) and sends, to
``<prefix>.ctl.registry.<registry instance>.enrol``, a sealed box (X25519, anonymous sender)
for that registry instance's box key, containing its agent name, public keys, the token and an
Ed25519 signature proving it holds the signing key. The registry instance is found in the
directory and must hold the ``registry`` role. Only that registry can read the token. The reply
is the certificate (self-authenticating: the agent checks the root's signature and its keys) or
an error. See ``docs/protocol.md``, Enrolment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.signing import VerifyKey

from mesh._core.config import MeshConfig
from mesh._core.identity import CertificateVerifier, Identity, InstanceKeys
from mesh._core.names import directory_bucket, enrol_subject, validate_name
from mesh._core.ratelimit import TokenBucket
from mesh._runtime.directory import Directory
from mesh._runtime.ports import MeshHandle
from mesh._transport.base import InboundMessage, Transport, is_no_responders
from mesh.errors import (
    DecodeError,
    Internal,
    MeshError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    error_from_code,
)

__all__ = ["EnrolmentRequest", "enrol", "serve_enrolment"]

REGISTRY_AGENT = "registry"
REGISTRY_ROLE = "registry"
_CONTEXT = b"mesh-enrol-v1"
MAX_ENROL_FRAME = 4096
ENROL_RATE, ENROL_BURST = 20.0, 40  # enrolments a registry instance opens per second


@dataclass(frozen=True, slots=True)
class EnrolmentRequest:
    """A verified enrolment request, as the registry sees it."""

    agent: str
    token: str
    sign_pk: bytes
    box_pk: bytes


def _proof_bytes(agent: str, token: str, sign_pk: bytes, box_pk: bytes, ts: int) -> bytes:
    return msgpack.packb([_CONTEXT, agent, token, sign_pk, box_pk, ts], use_bin_type=True)


async def enrol(
    config: MeshConfig,
    *,
    agent: str,
    token: str,
    root_public_key: bytes,
    keys: InstanceKeys | None = None,
    transport: Transport,
    own_transport: bool = False,
    timeout: float = 15.0,
) -> Identity:
    """Exchange a join token for a certificate; returns the new identity.

    Args:
        config: servers and prefix of the mesh.
        agent: the agent name the token was made for.
        token: the one-time join token.
        root_public_key: the trust root the certificate must chain to.
        keys: keys to certify (fresh ones when omitted).
        transport: the broker connection.
        own_transport: connect ``transport`` first and close it after.
        timeout: overall bound in seconds.

    Raises:
        Unauthenticated: the token was refused (unknown, used, expired or for another agent).
        Unavailable: no registry could be reached in time.
    """
    validate_name("agent", agent)
    keys = keys or InstanceKeys.generate()
    own = own_transport
    verifier = CertificateVerifier(root_public_key)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    if own:
        await transport.connect()
    try:
        kv = await transport.key_value(
            directory_bucket(config.prefix),
            ttl=max(3 * config.directory.ttl, 10.0),
            replicas=config.directory.replicas,
        )
        directory = Directory(kv.watch, verifier, ttl=config.directory.ttl)
        await directory.start(max(0.1, end - loop.time()))
        try:
            record = await directory.wait_for(REGISTRY_AGENT, max(0.1, end - loop.time()))
        finally:
            await directory.close()
        if REGISTRY_ROLE not in record.certificate.roles:
            raise Unauthenticated("the directory's registry lacks the registry role")
        ts = int(time.time() * 1000)
        proof = keys.signing.sign(_proof_bytes(agent, token, keys.sign_pk, keys.box_pk, ts))
        sealed = SealedBox(PublicKey(record.certificate.box_pk)).encrypt(
            msgpack.packb(
                {
                    "agent": agent,
                    "token": token,
                    "sign_pk": keys.sign_pk,
                    "box_pk": keys.box_pk,
                    "ts": ts,
                    "sig": proof.signature,
                },
                use_bin_type=True,
            )
        )
        reply = await _request(
            transport,
            enrol_subject(config.prefix, record.instance),
            sealed,
            max(0.1, end - loop.time()),
        )
    finally:
        if own:
            await transport.close()
    try:
        body = msgpack.unpackb(reply, raw=False)
        status = body["status"]
    except Exception as exc:
        raise Internal(f"malformed enrolment reply ({type(exc).__name__})") from None
    if status != "OK":
        raise error_from_code(str(status), str(body.get("message", "enrolment refused")))
    cert = verifier.verify(body.get("certificate", b""))
    if (cert.agent, cert.sign_pk, cert.box_pk) != (agent, keys.sign_pk, keys.box_pk):
        raise Unauthenticated("the registry returned a certificate for other keys")
    return Identity(keys=keys, certificate=cert, root_public_key=root_public_key)


async def _request(transport: Transport, subject: str, payload: bytes, timeout: float) -> bytes:
    inbox = transport.new_inbox()
    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: InboundMessage) -> None:
        if not fut.done():
            if is_no_responders(msg):
                fut.set_exception(Unavailable("the registry instance is not listening"))
            else:
                fut.set_result(msg.data)

    sub = await transport.subscribe(inbox, on_reply)
    try:
        await transport.publish(subject, payload, reply=inbox)
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise Unavailable("the registry did not answer the enrolment in time") from None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def open_enrolment(sealed: bytes, box: Any, max_skew: float = 300.0) -> EnrolmentRequest:
    """Open and check an enrolment request sealed to this registry instance.

    Raises:
        DecodeError: not a readable request.
        Unauthenticated: the proof of key possession fails or the request is stale.
    """
    if len(sealed) > MAX_ENROL_FRAME:
        raise DecodeError("enrolment request too large")
    try:
        body = msgpack.unpackb(SealedBox(box).decrypt(sealed), raw=False)
        agent, token = str(body["agent"]), str(body["token"])
        sign_pk, box_pk, ts, sig = body["sign_pk"], body["box_pk"], int(body["ts"]), body["sig"]
    except (
        CryptoError,
        KeyError,
        TypeError,
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise DecodeError(f"unreadable enrolment request ({type(exc).__name__})") from None
    if not all(isinstance(b, bytes) for b in (sign_pk, box_pk, sig)) or len(box_pk) != 32:
        raise DecodeError("enrolment request keys must be binary")
    validate_name("agent", agent)
    if abs(time.time() * 1000 - ts) > max_skew * 1000:
        raise Unauthenticated("enrolment request is stale")
    try:
        VerifyKey(sign_pk).verify(_proof_bytes(agent, token, sign_pk, box_pk, ts), sig)
    except (BadSignatureError, ValueError):
        raise Unauthenticated("enrolment request does not prove possession of its key") from None
    return EnrolmentRequest(agent=agent, token=token, sign_pk=sign_pk, box_pk=box_pk)


async def serve_enrolment(
    mesh: MeshHandle, issue: Callable[[EnrolmentRequest], Awaitable[bytes]]
) -> None:
    """Answer enrolment requests addressed to this registry instance.

    Args:
        mesh: the registry's ``Mesh``; its box key opens the requests.
        issue: checks the token and returns the new certificate's wire bytes; raises a
            ``MeshError`` to refuse.
    """
    box = mesh.identity.keys.box
    if REGISTRY_ROLE not in mesh.identity.certificate.roles:
        raise PermissionDenied("serving enrolment needs an identity with the registry role")

    budget = TokenBucket(ENROL_RATE, ENROL_BURST)
    prefix = f"{mesh.config.prefix}."

    async def on_request(msg: InboundMessage) -> None:
        if not msg.reply or msg.reply.startswith(prefix):
            return  # never answer into the mesh's own subjects
        if not budget.try_take():
            return  # unauthenticated work is bounded; the enrolling agent retries
        try:
            request = open_enrolment(msg.data, box)
            out = {"status": "OK", "certificate": await issue(request)}
        except MeshError as exc:
            out = {"status": exc.code, "message": exc.message}
        except Exception:  # never leak internals to an unauthenticated party
            out = {"status": Internal.code, "message": "enrolment failed"}
        with contextlib.suppress(MeshError):
            await mesh.transport.publish(msg.reply, msgpack.packb(out, use_bin_type=True))

    await mesh.subscribe_raw(enrol_subject(mesh.config.prefix, mesh.instance), on_request)
