"""Delegation chains: who a call is on behalf of, through which agents, with what authority
(normative: ``docs/protocol.md`` section 37). Pure core: no I/O.

A chain is a list of **links**, one per hop from the origin. Link ``i`` is a signed document
(``mesh._core.signed``) made by the caller of hop ``i`` for that one request: it names the
chain, the previous link (by hash), the agent it delegates to (``to``), the request it travels
with (``req``), and what is left to everyone downstream: the calls they may make, the scopes,
how many more hops, the deadline, and the budgets. Each link may only narrow the one before it.
A receiver verifies the whole chain offline with the issuers' certificates, which travel in the
links (their verification is cached, as for requests), and each link's signature once
(``LinkCache``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from mesh._core.identity import Certificate, CertificateVerifier
from mesh._core.signed import open_document, sign_document, typed_field
from mesh.errors import CertificateError, DecodeError, DelegationRefused, InvalidArgument

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "EVENT_AUDIENCE",
    "GATEWAY_ROLE",
    "LINK_TYPE",
    "MAX_LINKS",
    "Delegate",
    "Delegation",
    "Link",
    "LinkCache",
    "check_calls",
    "covers",
    "direct",
    "encode_chain",
    "extend",
    "link_digest",
    "start",
    "verify_chain",
]

LINK_TYPE = "mesh.link.v1"
DEFAULT_MAX_DEPTH = 8
"""Hops from the origin a chain may reach unless policy says otherwise (``spec.delegation``)."""
MAX_LINKS = 32
"""The most links a receiver decodes: beyond, the chain is refused before any is read."""
EVENT_AUDIENCE = "*"
"""The ``to`` of a link that travels with an event: whoever subscribed to it."""
GATEWAY_ROLE = "gateway"
"""The certificate role that may start a chain for an external principal (``origin``)."""
_CALL = re.compile(r"(\*|[a-z0-9][a-z0-9_-]{0,62})\.(\*|[a-z0-9][a-z0-9_-]{0,62})")
_SCOPE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,62}")
_ORIGIN = re.compile(r"[a-z][a-z0-9_-]{0,15}:[A-Za-z0-9_.@+-]{1,128}")


@dataclass(frozen=True, slots=True)
class Delegate:
    """What a caller gives the next hop, narrower than what it holds (``None``: the same).

    Attributes:
        calls: ``agent.endpoint`` patterns (``*`` for a whole name) the next hops may call.
        scopes: the scopes passed on.
        depth: how many hops may follow the callee.
        budget: calls the whole tree may still make (shared by every branch).
        cost: the opaque cost budget (LLM tokens, money) the tree may still spend.
        origin: an external principal (``user:alice``) the chain starts for; only when
            starting a chain, and only by an instance whose certificate has the role
            ``gateway``.
    """

    calls: tuple[str, ...] | None = None
    scopes: tuple[str, ...] | None = None
    depth: int | None = None
    budget: int | None = None
    cost: int | None = None
    origin: str | None = None

    def __post_init__(self) -> None:
        check_calls(self.calls or ())
        for scope in self.scopes or ():
            if not _SCOPE.fullmatch(scope):
                raise InvalidArgument(f"scope {scope!r} must match [a-z0-9][a-z0-9_.:-]{{0,62}}")
        for name in ("depth", "budget", "cost"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise InvalidArgument(f"delegation {name} must be a whole number >= 0")
        if self.origin is not None and not _ORIGIN.fullmatch(self.origin):
            raise InvalidArgument(
                f"origin {self.origin!r} must look like kind:name (e.g. user:alice)"
            )


@dataclass(frozen=True, slots=True)
class Link:
    """One decoded link (its signature not yet checked)."""

    raw: bytes
    body: bytes
    signature: bytes
    cert_raw: bytes
    chain: bytes
    prev: bytes | None
    to: str
    ep: str
    req: bytes
    calls: tuple[str, ...]
    scopes: tuple[str, ...]
    depth: int
    exp: int
    budget: int | None
    cost: int | None
    origin: str | None


@dataclass(frozen=True, slots=True)
class Delegation:
    """A verified chain, as the callee (and its handler, ``ctx.delegation``) sees it.

    Attributes:
        chain: the chain's id (16 bytes; the key of its shared budget).
        origin: who the work is for: the first link's issuer agent, or the external principal
            a gateway named.
        path: the agents the call came through, origin's agent first, the caller last.
        depth: hops from the origin to this callee (``len(path)``).
        calls / scopes / remaining / expires / budget / cost: what the last link allows:
            calls, scopes, hops after this one, the deadline (unix ms), budgets.
        links: the chain's links, to extend.
    """

    chain: bytes
    origin: str
    path: tuple[str, ...]
    depth: int
    calls: tuple[str, ...]
    scopes: tuple[str, ...]
    remaining: int
    expires: int
    budget: int | None
    cost: int | None
    links: tuple[bytes, ...]

    @property
    def describe(self) -> str:
        """``origin via a → b (depth n)``, for logs and errors."""
        return f"{self.origin} via {' → '.join(self.path)} (depth {self.depth})"


def direct(caller: str) -> Delegation:
    """What a request without a chain is: on its caller's own behalf, depth 1."""
    return Delegation(bytes(16), caller, (caller,), 1, ("*.*",), (), DEFAULT_MAX_DEPTH - 1, 0,
                      None, None, ())  # fmt: skip


def check_calls(calls: Iterable[str]) -> None:
    """``agent.endpoint`` patterns where a whole name may be ``*``.

    Raises:
        InvalidArgument: naming the pattern.
    """
    for call in calls:
        if not _CALL.fullmatch(call):
            raise InvalidArgument(f"call pattern {call!r} must be agent.endpoint, each a name or *")


def covers(patterns: Iterable[str], call: str) -> bool:
    """Whether one of ``patterns`` allows ``call`` (itself a pattern: ``*`` in ``call`` is
    covered only by ``*``)."""
    agent, _, endpoint = call.partition(".")
    for p in patterns:
        pa, _, pe = p.partition(".")
        if pa in ("*", agent) and pe in ("*", endpoint):
            return True
    return False


def link_digest(raw: bytes) -> bytes:
    """BLAKE2b-128 of a link's bytes: how the next link names it (``prev``)."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def encode_chain(links: Sequence[bytes]) -> bytes:
    """The chain as it travels: a msgpack array of the links' bytes."""
    return msgpack.packb(list(links), use_bin_type=True)


def _sign(
    signing: SigningKey,
    cert: Certificate,
    *,
    chain: bytes,
    prev: bytes | None,
    to: str,
    ep: str,
    req: bytes,
    calls: tuple[str, ...],
    scopes: tuple[str, ...],
    depth: int,
    exp: int,
    budget: int | None,
    cost: int | None,
    origin: str | None,
) -> bytes:
    body: dict[str, Any] = {
        "type": LINK_TYPE,
        "cert": cert.raw,
        "chain": chain,
        "to": to,
        "ep": ep,
        "req": req,
        "calls": list(calls),
        "scopes": list(scopes),
        "depth": depth,
        "exp": exp,
    }
    if prev is not None:
        body["prev"] = prev
    if budget is not None:
        body["budget"] = budget
    if cost is not None:
        body["cost"] = cost
    if origin is not None:
        body["origin"] = origin
    return sign_document(body, lambda packed: signing.sign(packed).signature)


def start(
    signing: SigningKey,
    cert: Certificate,
    *,
    to: str,
    endpoint: str,
    req: bytes,
    exp_ms: int,
    narrowing: Delegate | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    chain: bytes | None = None,
) -> bytes:
    """The first link of a new chain, for the request ``req`` to ``to.endpoint``.

    Raises:
        InvalidArgument: an ``origin`` from an instance without the role ``gateway``.
    """
    n = narrowing or Delegate()
    if n.origin is not None and GATEWAY_ROLE not in cert.roles:
        raise InvalidArgument(
            f"only an instance with the role {GATEWAY_ROLE!r} may start a chain for {n.origin!r}"
        )
    return _sign(
        signing, cert, chain=chain or os.urandom(16), prev=None, to=to, ep=endpoint, req=req,
        calls=("*.*",) if n.calls is None else n.calls, scopes=() if n.scopes is None else n.scopes,
        depth=max_depth - 1 if n.depth is None else n.depth, exp=exp_ms, budget=n.budget,
        cost=n.cost, origin=n.origin,
    )  # fmt: skip


def extend(
    signing: SigningKey,
    cert: Certificate,
    parent: Delegation,
    *,
    to: str,
    endpoint: str,
    req: bytes,
    exp_ms: int,
    narrowing: Delegate | None = None,
) -> bytes:
    """The next link of ``parent``'s chain, for a nested call ``to.endpoint``: what the
    handler holds, narrowed by ``narrowing``.

    Raises:
        DelegationRefused: the chain allows no further hop, does not cover the call, or
            ``narrowing`` would widen it (refused here: nothing is sent).
    """
    n = narrowing or Delegate()
    if n.origin is not None:
        raise DelegationRefused("a chain's origin is set by its first link only")
    if parent.remaining < 1:
        raise DelegationRefused(
            f"delegation depth exhausted: {parent.describe} may make no further call "
            f"({to}.{endpoint} refused before sending)"
        )
    if to != EVENT_AUDIENCE and not covers(parent.calls, f"{to}.{endpoint}"):
        raise DelegationRefused(
            f"the chain of {parent.describe} does not allow calling {to}.{endpoint}"
        )
    calls = parent.calls if n.calls is None else n.calls
    scopes = parent.scopes if n.scopes is None else n.scopes
    depth = parent.remaining - 1 if n.depth is None else n.depth
    budget = parent.budget if n.budget is None else n.budget
    cost = parent.cost if n.cost is None else n.cost
    _narrower(
        "the call", parent.calls, parent.scopes, parent.remaining - 1, parent.budget, parent.cost,
        calls, scopes, depth, budget, cost,
    )  # fmt: skip
    return _sign(
        signing, cert, chain=parent.chain, prev=link_digest(parent.links[-1]), to=to,
        ep=endpoint, req=req,
        calls=calls, scopes=scopes, depth=depth, exp=min(exp_ms, parent.expires),
        budget=budget, cost=cost, origin=None,
    )  # fmt: skip


def _narrower(
    what: str,
    calls: tuple[str, ...],
    scopes: tuple[str, ...],
    depth: int,
    budget: int | None,
    cost: int | None,
    new_calls: tuple[str, ...],
    new_scopes: tuple[str, ...],
    new_depth: int,
    new_budget: int | None,
    new_cost: int | None,
) -> None:
    """Refuse ``what`` if it gives more than the link before it.

    Raises:
        DelegationRefused: naming the widened field.
    """
    for call in new_calls:
        if not covers(calls, call):
            raise DelegationRefused(f"{what} widens the calls: {call!r} is not allowed before")
    extra = sorted(set(new_scopes) - set(scopes))
    if extra:
        raise DelegationRefused(f"{what} widens the scopes: {', '.join(extra)}")
    if new_depth > depth:
        raise DelegationRefused(f"{what} widens the depth: {new_depth} hops, at most {depth}")
    for name, old, new in (("budget", budget, new_budget), ("cost budget", cost, new_cost)):
        if old is not None and (new is None or new > old):
            raise DelegationRefused(f"{what} widens the {name}: {new}, at most {old}")


class LinkCache:
    """Links whose signature verified, by digest, decoded (bounded; the oldest forgotten
    first): a chain's earlier links, shared by every request of its subtree, are decoded and
    checked once. Their issuers' certificates are still checked on every use (revocation)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._seen: OrderedDict[bytes, tuple[Link, Certificate] | None] = OrderedDict()

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._seen

    def get(self, digest: bytes) -> tuple[Link, Certificate] | None:
        """The decoded link and its issuer's (decoded) certificate, if verified before."""
        return self._seen.get(digest)

    def add(self, digest: bytes, decoded: tuple[Link, Certificate] | None = None) -> None:
        self._seen[digest] = decoded
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)


def _decode_link(raw: Any, i: int) -> Link:
    what = f"delegation link {i}"
    if type(raw) is not bytes:
        raise DecodeError(f"{what} must be binary")
    body, packed, sig = open_document(raw, what)
    if body.get("type") != LINK_TYPE:
        raise DecodeError(f"{what} is not a {LINK_TYPE} document")
    prev = body.get("prev")
    budget, cost, origin = body.get("budget"), body.get("cost"), body.get("origin")
    calls = typed_field(body, "calls", list, what)
    scopes = typed_field(body, "scopes", list, what)
    if (
        (prev is not None and (type(prev) is not bytes or len(prev) != 16))
        or any(v is not None and (type(v) is not int or v < 0) for v in (budget, cost))
        or (origin is not None and (type(origin) is not str or not _ORIGIN.fullmatch(origin)))
        or not all(type(c) is str and _CALL.fullmatch(c) for c in calls)
        or not all(type(s) is str and _SCOPE.fullmatch(s) for s in scopes)
    ):
        raise DecodeError(f"{what} has a field of the wrong type")
    chain = typed_field(body, "chain", bytes, what)
    req = typed_field(body, "req", bytes, what)
    depth = typed_field(body, "depth", int, what)
    if len(chain) != 16 or len(req) != 16 or depth < 0:
        raise DecodeError(f"{what} has a field of the wrong type")
    return Link(
        raw, packed, sig, typed_field(body, "cert", bytes, what), chain, prev,
        typed_field(body, "to", str, what), typed_field(body, "ep", str, what), req,
        tuple(calls), tuple(scopes), depth,
        typed_field(body, "exp", int, what), budget, cost, origin,
    )  # fmt: skip


def verify_chain(
    raw: bytes,
    *,
    verifier: CertificateVerifier,
    cache: LinkCache,
    now_ms: float,
    agent: str,
    endpoint: str,
    request_id: bytes,
    sender: tuple[str, str],
    deadline_ms: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    reentrant: bool | Callable[[str], bool] = False,
    event: bool = False,
) -> Delegation:
    """Verify a chain that came with the request ``request_id`` from ``sender`` (agent,
    instance) to ``agent.endpoint``: structure and narrowing first, then each link's
    certificate (cached) and signature (once per link, ``cache``). With ``event``, the chain
    came with the event ``request_id`` on the topic ``endpoint``: its last link is for any
    subscriber (``to`` = ``"*"``). ``reentrant``: the agents a path may visit twice (a
    predicate, or ``True`` for all, as for events); any other agent twice is a loop.

    Raises:
        DecodeError: malformed.
        DelegationRefused: naming the link and why (spliced, widened, not for this request,
            expired, too deep, a loop, a forged signature, an invalid issuer certificate).
    """
    try:
        items = msgpack.unpackb(raw, raw=False, max_array_len=MAX_LINKS, max_bin_len=len(raw))
    except Exception as exc:
        raise DecodeError(
            f"delegation chain is not a msgpack array ({type(exc).__name__})"
        ) from None
    if type(items) is not list or not items:
        raise DecodeError("delegation chain must be a non-empty array of links")
    n = len(items)
    if n > max_depth:
        raise DelegationRefused(
            f"delegation chain of {n} hops exceeds the maximum depth {max_depth}"
        )
    digests: list[bytes] = []
    links: list[Link] = []
    issuers: list[Certificate] = []
    fresh: list[int] = []
    for i, item in enumerate(items):
        if type(item) is not bytes:
            raise DecodeError(f"delegation link {i} must be binary")
        digest = link_digest(item)
        known = cache.get(digest)
        if known is None:
            link = _decode_link(item, i)
            known = (link, Certificate.decode(link.cert_raw)[0])
            fresh.append(i)
        digests.append(digest)
        links.append(known[0])
        issuers.append(known[1])
    first = links[0]
    for i, (link, cert) in enumerate(zip(links, issuers, strict=True)):
        where = f"delegation link {i} ({cert.agent})"
        if link.chain != first.chain:
            raise DelegationRefused(f"{where} belongs to another chain")
        if i == 0:
            if link.prev is not None:
                raise DelegationRefused(f"{where} names a previous link: links are missing")
            if link.origin is not None and GATEWAY_ROLE not in cert.roles:
                raise DelegationRefused(f"{where} names an origin without the role gateway")
            continue
        before = links[i - 1]
        if before.depth == 0:
            raise DelegationRefused(f"{where}: link {i - 1} allows no further hop")
        if link.prev != digests[i - 1]:
            raise DelegationRefused(f"{where} does not follow link {i - 1}: spliced or reordered")
        if before.to == EVENT_AUDIENCE:
            raise DelegationRefused(
                f"{where} follows link {i - 1}, made for an event's subscribers: nothing may"
            )
        if before.to != cert.agent:
            raise DelegationRefused(
                f"{where} is issued by {cert.agent}, but link {i - 1} delegates to {before.to}"
            )
        if link.origin is not None:
            raise DelegationRefused(f"{where} sets an origin: only the first link may")
        if link.to != EVENT_AUDIENCE and not covers(before.calls, f"{link.to}.{link.ep}"):
            raise DelegationRefused(
                f"{where}: link {i - 1} does not allow calling {link.to}.{link.ep}"
            )
        if link.exp > before.exp:
            raise DelegationRefused(f"{where} widens the deadline")
        _narrower(
            where, before.calls, before.scopes, before.depth - 1, before.budget, before.cost,
            link.calls, link.scopes, link.depth, link.budget, link.cost,
        )  # fmt: skip
    last, caller = links[-1], issuers[-1]
    where = f"delegation link {n - 1} ({caller.agent})"
    if (caller.agent, caller.instance) != sender:
        raise DelegationRefused(f"{where} was not issued by the caller {sender[0]}.{sender[1]}")
    if last.to not in (agent, EVENT_AUDIENCE) or (last.to == EVENT_AUDIENCE) != event:
        raise DelegationRefused(f"{where} is for another request (to {last.to})")
    if event and (last.calls or last.depth):
        raise DelegationRefused(f"{where}, for an event's subscribers, may allow nothing")
    if last.req != request_id or last.ep != endpoint:
        raise DelegationRefused(f"{where} is for another request")
    if last.exp < now_ms:
        raise DelegationRefused(f"{where} expired: the chain's deadline has passed")
    if deadline_ms > last.exp:
        raise DelegationRefused(f"{where} ends before the request's deadline")
    path = tuple(c.agent for c in issuers)
    visits = (*path, agent)
    if len(set(visits)) != len(visits):
        may_return = reentrant if callable(reentrant) else (lambda _agent: reentrant)
        for again in visits:
            if visits.count(again) > 1 and not may_return(again):
                raise DelegationRefused(
                    f"delegation loop: {again} appears twice in {' → '.join(visits)}"
                )
    for i, link in enumerate(links):
        try:
            verifier.verify(link.cert_raw)
        except CertificateError as exc:
            raise DelegationRefused(f"delegation link {i}: issuer {exc.message}") from None
    for i in fresh:
        link, cert = links[i], issuers[i]
        try:
            VerifyKey(cert.sign_pk).verify(link.body, link.signature)
        except (BadSignatureError, ValueError):
            raise DelegationRefused(f"delegation link {i} ({cert.agent}) is forged") from None
        cache.add(digests[i], (link, cert))
    return Delegation(
        first.chain, first.origin or issuers[0].agent, path, n, last.calls, last.scopes,
        last.depth, last.exp, last.budget, last.cost, tuple(lk.raw for lk in links),
    )  # fmt: skip
