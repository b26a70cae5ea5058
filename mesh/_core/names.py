"""Names and the subject grammar: the one place ``docs/protocol.md`` section 2 lives in code.

Agent, instance, endpoint and topic names become NATS subject tokens, so they are checked here,
and every subject and JetStream store name the mesh uses is built by a function of this module
(none is spelled out elsewhere)::

    <prefix>.rpc.<agent>.<instance>.<endpoint>    requests to one instance
    <prefix>.evt.<agent>.<topic>                  signed events of an agent
    <prefix>.beat.<agent>.<instance>              signed heartbeats of one instance
    <prefix>.ctl.registry.<instance>.enrol        enrolment at one registry instance
    <prefix>.ctl.registry.<instance>.renew        grace renewal of an expired certificate
    <prefix>.audit                                the audit stream's subject
    <prefix>-directory, <prefix>-<store>, <prefix>-audit   JetStream stores
    <prefix>-claims, key <agent>.<caller>.<endpoint>.<hash of the idempotency key>
"""

from __future__ import annotations

import hashlib
import re

from mesh.errors import InvalidArgument

__all__ = [
    "RESERVED_INSTANCES",
    "audit_stream",
    "audit_subject",
    "beat_listen_subject",
    "beat_subject",
    "budgets_bucket",
    "claim_key",
    "claims_bucket",
    "directory_bucket",
    "enrol_subject",
    "event_subject",
    "grace_renew_subject",
    "rpc_listen_subject",
    "rpc_prefix",
    "rpc_subject",
    "store_bucket",
    "validate_name",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
RESERVED_INSTANCES = frozenset({"any"})  # <prefix>.rpc.<agent>.any.<endpoint> is reserved


def validate_name(kind: str, value: str) -> str:
    """Check an agent, instance, endpoint or topic name: lower-case letters, digits, ``-``, ``_``.

    Names become NATS subject tokens, so dots, spaces and wildcards are refused.

    Raises:
        InvalidArgument: naming the kind of name and the offending value.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"invalid {kind} name {value!r}: use 1-63 of a-z, 0-9, '-', '_', starting with a "
            "letter or digit"
        )
    return value


def rpc_prefix(prefix: str) -> str:
    """``<prefix>.rpc.``: what every request subject starts with."""
    return f"{prefix}.rpc."


def rpc_subject(prefix: str, agent: str, instance: str, endpoint: str) -> str:
    """The subject of a request to ``endpoint`` of one instance."""
    return f"{prefix}.rpc.{agent}.{instance}.{endpoint}"


def rpc_listen_subject(prefix: str, agent: str, instance: str) -> str:
    """The subscription of one instance for all its endpoints."""
    return f"{prefix}.rpc.{agent}.{instance}.*"


def event_subject(prefix: str, agent: str, topic: str) -> str:
    """The subject of ``agent``'s events on ``topic`` (``*`` for any agent when subscribing)."""
    return f"{prefix}.evt.{agent}.{topic}"


def beat_subject(prefix: str, agent: str, instance: str) -> str:
    """The subject of one instance's signed heartbeats (beats)."""
    return f"{prefix}.beat.{agent}.{instance}"


def beat_listen_subject(prefix: str, agent: str = "*") -> str:
    """The subscription of a caller for the beats of every instance of ``agent`` (``*``: of
    every agent)."""
    return f"{prefix}.beat.{agent}.*"


def enrol_subject(prefix: str, instance: str) -> str:
    """The subject on which one registry instance takes enrolments."""
    return f"{prefix}.ctl.registry.{instance}.enrol"


def grace_renew_subject(prefix: str, instance: str) -> str:
    """The subject on which one registry instance renews certificates past their expiry."""
    return f"{prefix}.ctl.registry.{instance}.renew"


def directory_bucket(prefix: str) -> str:
    """The JetStream key-value bucket of the directory."""
    return f"{prefix}-directory"


def store_bucket(prefix: str, store: str) -> str:
    """A control-plane key-value bucket (``policy``, ``certs``, ``tokens``, ``revoked``)."""
    return f"{prefix}-{store}"


def audit_stream(prefix: str) -> str:
    """The JetStream stream of the audit chain."""
    return f"{prefix}-audit"


def audit_subject(prefix: str) -> str:
    """The subject the audit stream captures."""
    return f"{prefix}.audit"


def budgets_bucket(prefix: str) -> str:
    """The JetStream key-value bucket of delegation chains' shared budgets."""
    return f"{prefix}-budgets"


def claims_bucket(prefix: str) -> str:
    """The JetStream key-value bucket of idempotency claims."""
    return f"{prefix}-claims"


def claim_key(agent: str, caller: str, endpoint: str, idempotency_key: str) -> str:
    """The claim of one keyed call: the idempotency key (any 1-256 characters) as the hex of
    its BLAKE2b-128, so that it is a valid key-value token."""
    digest = hashlib.blake2b(idempotency_key.encode(), digest_size=16).hexdigest()
    return f"{agent}.{caller}.{endpoint}.{digest}"
