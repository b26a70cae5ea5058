"""Unit tests for mesh._core.delegation: making links (``start``, ``extend``), what a callee's
``verify_chain`` refuses and why (``docs/protocol.md`` section 37, checks 1 to 10, each at its
exact boundary), ``covers``, ``Delegate``'s validation and the ``LinkCache``.

Every refusal is asserted by type and by message. Chains are made as the runtime makes them: a
caller ``start``s one, the callee verifies it and its handler ``extend``s it for the next hop.
What the runtime would never make (a widened, spliced or forged link) is signed here by hand,
with ``link``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey, VerifyKey

import mesh
import mesh._core.delegation as delegation_mod
from mesh._core.delegation import (
    DEFAULT_MAX_DEPTH,
    EVENT_AUDIENCE,
    GATEWAY_ROLE,
    LINK_TYPE,
    MAX_LINKS,
    Delegate,
    Delegation,
    LinkCache,
    check_calls,
    covers,
    direct,
    encode_chain,
    extend,
    link_digest,
    start,
    verify_chain,
)
from mesh._core.identity import Certificate, CertificateVerifier, Identity
from mesh._core.signed import sign_document
from mesh.errors import DecodeError, DelegationRefused, InvalidArgument, PermissionDenied
from mesh.testing import FakeClock, Trust

NOW_S = 1_767_225_600  # 2026-01-01, unix seconds
NOW_MS = NOW_S * 1000
EXP = NOW_MS + 30_000  # the chains' deadline
DROP = object()  # a field ``link`` leaves out
NAMES = ("planner", "assistant", "vault", "librarian", "scribe", "critic", "editor", "judge",
         "clerk", "porter")  # fmt: skip


def req(n: int) -> bytes:
    """The id of the request of hop ``n``."""
    return bytes([n]) * 16


class World:
    """A trust root, one identity per agent (and a gateway), and a verifier at ``NOW_S``."""

    def __init__(self) -> None:
        self.trust = Trust()
        self.ids: dict[str, Identity] = {
            name: self.trust.identity(name, now=NOW_S - 60) for name in NAMES
        }
        self.ids["gateway"] = self.trust.identity("gateway", roles=[GATEWAY_ROLE], now=NOW_S - 60)
        self.clock = FakeClock(NOW_S)
        self.verifier = CertificateVerifier(self.trust.root.public_key, clock=self.clock)
        self.cache = LinkCache()

    def __getitem__(self, name: str) -> Identity:
        return self.ids[name]

    def start(self, caller: str, to: str, narrowing: Delegate | None = None, **kw: Any) -> bytes:
        ident = self[caller]
        return start(ident.keys.signing, ident.certificate, to=to,
                     endpoint=kw.pop("endpoint", "hop"), req=req(0),
                     exp_ms=kw.pop("exp_ms", EXP), narrowing=narrowing, **kw)  # fmt: skip

    def verify(
        self,
        links: Sequence[bytes],
        *,
        at: str,
        endpoint: str = "hop",
        sender: str | tuple[str, str] | None = None,
        request: bytes | None = None,
        **kw: Any,
    ) -> Delegation:
        """``verify_chain`` at agent ``at`` for the request of the last hop, from the last
        link's issuer unless ``sender`` says otherwise."""
        n = len(links)
        if sender is None:
            sender = (self._issuer(links[-1]).agent, self._issuer(links[-1]).instance)
        elif isinstance(sender, str):
            sender = (self[sender].agent, self[sender].instance)
        kw.setdefault("now_ms", NOW_MS)
        kw.setdefault("deadline_ms", EXP)
        kw.setdefault("verifier", self.verifier)
        kw.setdefault("cache", self.cache)
        return verify_chain(
            encode_chain(links), agent=at, endpoint=endpoint,
            request_id=req(n - 1) if request is None else request, sender=sender, **kw,
        )  # fmt: skip

    @staticmethod
    def _issuer(raw: bytes) -> Certificate:
        return Certificate.decode(body_of(raw)["cert"])[0]

    def extend(
        self,
        links: Sequence[bytes],
        to: str,
        *,
        endpoint: str = "hop",
        narrowing: Delegate | None = None,
        exp_ms: int = EXP,
        parent: Delegation | None = None,
        by: str | None = None,
    ) -> bytes:
        """The next link after ``links``, made by the callee of the last one (``by``) from
        the chain it verified (``parent``)."""
        if parent is None:
            parent = self.verify(links, at=self.to_of(links[-1]), reentrant=True)
        ident = self[by or self.to_of(links[-1])]
        return extend(ident.keys.signing, ident.certificate, parent, to=to, endpoint=endpoint,
                      req=req(len(links)), exp_ms=exp_ms, narrowing=narrowing)  # fmt: skip

    @staticmethod
    def to_of(raw: bytes) -> str:
        return str(body_of(raw)["to"])

    def chain(self, *agents: str, **start_kw: Any) -> list[bytes]:
        """A valid chain through ``agents``: the first calls the second, and so on (the last is
        the callee, which the returned links are for)."""
        links = [self.start(agents[0], agents[1], **start_kw)]
        for to in agents[2:]:
            links.append(self.extend(links, to))
        return links


def body_of(raw: bytes) -> dict[str, Any]:
    packed, _sig = msgpack.unpackb(raw)
    body: dict[str, Any] = msgpack.unpackb(packed, raw=False)
    return body


def link(ident: Identity, *, signer: SigningKey | None = None, **fields: Any) -> bytes:
    """A link signed by hand: the fields of a first link from ``ident`` to assistant, with
    ``fields`` set (``DROP`` leaves one out)."""
    body: dict[str, Any] = {
        "type": LINK_TYPE,
        "cert": ident.certificate.raw,
        "chain": bytes(range(16)),
        "to": "assistant",
        "ep": "hop",
        "req": req(0),
        "calls": ["*.*"],
        "scopes": [],
        "depth": 7,
        "exp": EXP,
    }
    for key, value in fields.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    signing = signer or ident.keys.signing
    return sign_document(body, lambda packed: signing.sign(packed).signature)


def after(w: World, links: Sequence[bytes], by: str, **fields: Any) -> bytes:
    """A hand-signed link following ``links`` (``prev``, ``chain``, ``req`` filled in), to
    the agent after ``by`` in ``NAMES`` unless ``to`` is given."""
    before = body_of(links[-1])
    base: dict[str, Any] = {
        "to": NAMES[NAMES.index(by) + 1],
        "chain": before["chain"],
        "prev": link_digest(links[-1]),
        "req": req(len(links)),
        "calls": before["calls"],
        "scopes": before["scopes"],
        "depth": max(0, before["depth"] - 1),
        "exp": before["exp"],
    }
    for name in ("budget", "cost"):
        if name in before:
            base[name] = before[name]
    base.update(fields)
    return link(w[by], **base)


def refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the ``DelegationRefused`` that ``fn`` raises."""
    with pytest.raises(DelegationRefused) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, PermissionDenied)
    assert info.value.rule == "delegation"
    assert info.value.code == "PERMISSION_DENIED"
    return info.value.message


def malformed(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        fn(*args, **kwargs)
    return info.value.message


@pytest.fixture
def w() -> World:
    return World()


# --- constants, direct, digests -------------------------------------------------------------------


def test_constants() -> None:
    assert (DEFAULT_MAX_DEPTH, MAX_LINKS, GATEWAY_ROLE, LINK_TYPE) == (
        8, 32, "gateway", "mesh.link.v1",
    )  # fmt: skip
    assert mesh.Delegate is Delegate


def test_a_direct_call_is_the_callers_own_at_depth_one() -> None:
    d = direct("planner")
    assert d == Delegation(bytes(16), "planner", ("planner",), 1, ("*.*",), (), 7, 0, None, None,
                           ())  # fmt: skip
    assert len(d.chain) == 16
    assert d.describe == "planner via planner (depth 1)"


def test_link_digest_is_blake2b_128_and_the_chain_a_msgpack_array_of_bin() -> None:
    import hashlib

    assert link_digest(b"abc") == hashlib.blake2b(b"abc", digest_size=16).digest()
    assert len(link_digest(b"")) == 16
    raw = encode_chain([b"a", b"bc"])
    assert raw == b"\x92\xc4\x01a\xc4\x02bc"  # fixarray of two bin 8
    assert msgpack.unpackb(raw, raw=False) == [b"a", b"bc"]


# --- covers and call patterns ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "call", "expected"),
    [
        (("*.*",), "vault.read", True),
        (("vault.*",), "vault.read", True),
        (("vault.*",), "librarian.read", False),
        (("*.read",), "vault.read", True),
        (("*.read",), "vault.write", False),
        (("vault.read",), "vault.read", True),
        (("vault.read",), "vault.write", False),
        (("vault.read",), "librarian.read", False),
        (("vault.write",), "librarian.read", False),
        ((), "vault.read", False),
        (("librarian.find", "vault.read"), "vault.read", True),  # any pattern may cover
        (("vault.read", "librarian.find"), "vault.read", True),
        # a pattern as the call: its * only by *
        (("vault.read",), "vault.*", False),
        (("vault.*",), "vault.*", True),
        (("*.read",), "*.read", True),
        (("vault.read",), "*.read", False),
        (("*.*",), "*.*", True),
        (("vault.*",), "*.*", False),
    ],
)
def test_covers(patterns: tuple[str, ...], call: str, expected: bool) -> None:
    assert covers(patterns, call) is expected
    assert covers(iter(patterns), call) is expected  # any iterable


@pytest.mark.parametrize("bad", ["vault", "vault.", ".read", "a.b.c", "Vault.read", "va*.read",
                                 "vault.re?d", "-x.read", "a" * 64 + ".read", ""])  # fmt: skip
def test_check_calls_refuses_what_is_not_agent_dot_endpoint(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_calls(["vault.read", bad])
    assert info.value.message == f"call pattern {bad!r} must be agent.endpoint, each a name or *"


def test_check_calls_accepts_names_and_stars() -> None:
    check_calls(["vault.read", "*.read", "vault.*", "*.*", "a" * 63 + ".b_-9", "0.x"])
    check_calls([])


# --- Delegate -------------------------------------------------------------------------------------


def test_delegate_defaults_to_no_narrowing() -> None:
    d = Delegate()
    assert (d.calls, d.scopes, d.depth, d.budget, d.cost, d.origin) == (None,) * 6


def test_delegate_accepts_the_smallest_values() -> None:
    d = Delegate(calls=(), scopes=(), depth=0, budget=0, cost=0, origin="user:alice")
    assert (d.calls, d.scopes, d.depth, d.budget, d.cost) == ((), (), 0, 0, 0)
    Delegate(calls=("vault.read", "*.*"), scopes=("read", "a.b:c-d_e", "0" * 63))
    Delegate(origin="x:" + "A" * 128)
    Delegate(origin="svc-1_a:alice@example.com+tag.x")


@pytest.mark.parametrize("bad", [("vault",), ("vault.read", "x")])
def test_delegate_refuses_bad_call_patterns(bad: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as info:
        Delegate(calls=bad)
    assert "must be agent.endpoint, each a name or *" in info.value.message
    assert info.value.message.startswith("call pattern ")


@pytest.mark.parametrize("bad", ["Read", "-read", "", "a" * 64, "read write", "read/x"])
def test_delegate_refuses_bad_scopes(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Delegate(scopes=("ok", bad))
    assert info.value.message == f"scope {bad!r} must match [a-z0-9][a-z0-9_.:-]{{0,62}}"


@pytest.mark.parametrize("name", ["depth", "budget", "cost"])
@pytest.mark.parametrize("bad", [-1, True, False, 1.0, "3"])
def test_delegate_refuses_numbers_that_are_not_whole_and_non_negative(
    name: str, bad: object
) -> None:
    with pytest.raises(InvalidArgument) as info:
        Delegate(**{name: bad})  # type: ignore[arg-type]
    assert info.value.message == f"delegation {name} must be a whole number >= 0"


@pytest.mark.parametrize("bad", ["alice", "user:", ":alice", "User:alice", "1user:alice",
                                 "user:al ice", "averyveryverylongkind:alice",
                                 "user:" + "a" * 129])  # fmt: skip
def test_delegate_refuses_an_origin_that_is_not_kind_name(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Delegate(origin=bad)
    assert info.value.message == f"origin {bad!r} must look like kind:name (e.g. user:alice)"


# --- start ----------------------------------------------------------------------------------------


def test_a_first_link_names_everything_in_protocol_order(w: World) -> None:
    raw = w.start("planner", "assistant", chain=b"C" * 16)
    body = body_of(raw)
    assert list(body) == [
        "type",
        "cert",
        "chain",
        "to",
        "ep",
        "req",
        "calls",
        "scopes",
        "depth",
        "exp",
    ]
    assert body == {
        "type": LINK_TYPE, "cert": w["planner"].certificate.raw, "chain": b"C" * 16,
        "to": "assistant", "ep": "hop", "req": req(0), "calls": ["*.*"], "scopes": [], "depth": 7,
        "exp": EXP,
    }  # fmt: skip
    packed, sig = msgpack.unpackb(raw)
    w["planner"].keys.signing.verify_key.verify(packed, sig)


def test_a_first_link_with_every_optional_field(w: World) -> None:
    n = Delegate(calls=("vault.read",), scopes=("read",), depth=2, budget=5, cost=10,
                 origin="user:alice")  # fmt: skip
    body = body_of(w.start("gateway", "assistant", n))
    assert list(body) == ["type", "cert", "chain", "to", "ep", "req", "calls", "scopes", "depth",
                          "exp", "budget", "cost", "origin"]  # fmt: skip
    assert (body["calls"], body["scopes"], body["depth"]) == (["vault.read"], ["read"], 2)
    assert (body["budget"], body["cost"], body["origin"]) == (5, 10, "user:alice")


def test_start_chooses_a_fresh_chain_id_unless_given(w: World) -> None:
    a, b = body_of(w.start("planner", "assistant")), body_of(w.start("planner", "assistant"))
    assert len(a["chain"]) == len(b["chain"]) == 16 and a["chain"] != b["chain"]
    assert body_of(w.start("planner", "assistant", chain=b"K" * 16))["chain"] == b"K" * 16


def test_start_depth_is_max_depth_minus_one_unless_narrowed(w: World) -> None:
    assert body_of(w.start("planner", "assistant", max_depth=3))["depth"] == 2
    assert body_of(w.start("planner", "assistant", Delegate(depth=0)))["depth"] == 0
    assert body_of(w.start("planner", "assistant", Delegate(depth=5), max_depth=3))["depth"] == 5


def test_start_keeps_empty_narrowings_empty(w: World) -> None:
    """Regression: ``Delegate(calls=())`` is no call at all, not every call."""
    body = body_of(w.start("planner", "assistant", Delegate(calls=(), scopes=())))
    assert (body["calls"], body["scopes"]) == ([], [])
    d = w.verify([w.start("planner", "assistant", Delegate(calls=()))], at="assistant")
    assert d.calls == ()
    assert refused(w.extend, [w.start("planner", "assistant", Delegate(calls=()))], "vault") == (
        "the chain of planner via planner (depth 1) does not allow calling vault.hop"
    )


def test_only_a_gateway_starts_a_chain_for_an_external_origin(w: World) -> None:
    with pytest.raises(InvalidArgument) as info:
        w.start("planner", "assistant", Delegate(origin="user:alice"))
    assert not isinstance(info.value, DelegationRefused)
    assert info.value.message == (
        "only an instance with the role 'gateway' may start a chain for 'user:alice'"
    )
    raw = w.start("gateway", "assistant", Delegate(origin="user:alice"))
    d = w.verify([raw], at="assistant")
    assert (d.origin, d.path) == ("user:alice", ("gateway",))
    w.start("gateway", "assistant")  # a gateway may also start one for itself


# --- extend ---------------------------------------------------------------------------------------


def test_extend_inherits_what_the_handler_holds(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(scopes=("read", "write"), budget=5, cost=9,
                                                     depth=4))  # fmt: skip
    parent = w.verify([first], at="assistant")
    raw = w.extend([first], "vault", parent=parent)
    body = body_of(raw)
    assert list(body) == ["type", "cert", "chain", "to", "ep", "req", "calls", "scopes", "depth",
                          "exp", "prev", "budget", "cost"]  # fmt: skip
    assert body["prev"] == link_digest(first) and body["chain"] == parent.chain
    assert (body["to"], body["req"], body["cert"]) == ("vault", req(1),
                                                       w["assistant"].certificate.raw)  # fmt: skip
    assert (body["calls"], body["scopes"], body["depth"]) == (["*.*"], ["read", "write"], 3)
    assert (body["budget"], body["cost"], body["exp"]) == (5, 9, EXP)


def test_extend_applies_a_narrowing(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(scopes=("read", "write"), budget=5, cost=9))
    raw = w.extend([first], "vault", narrowing=Delegate(
        calls=("librarian.find",), scopes=("read",), depth=1, budget=4, cost=0,
    ))  # fmt: skip
    body = body_of(raw)
    assert (body["calls"], body["scopes"], body["depth"]) == (["librarian.find"], ["read"], 1)
    assert (body["budget"], body["cost"]) == (4, 0)


def test_extend_keeps_the_earlier_deadline(w: World) -> None:
    first = w.start("planner", "assistant")
    assert body_of(w.extend([first], "vault", exp_ms=EXP - 1))["exp"] == EXP - 1
    assert body_of(w.extend([first], "vault", exp_ms=EXP + 1000))["exp"] == EXP


def test_extend_names_the_last_link_of_a_long_parent(w: World) -> None:
    links = w.chain("planner", "assistant", "vault", "librarian")
    links.append(w.extend(links, "scribe"))
    assert body_of(links[-1])["prev"] == link_digest(links[2])
    d = w.verify(links, at="scribe")
    assert d.path == ("planner", "assistant", "vault", "librarian")


def test_extend_refuses_an_origin(w: World) -> None:
    first = w.start("gateway", "assistant", Delegate(origin="user:alice"))
    assert refused(w.extend, [first], "vault", narrowing=Delegate(origin="user:alice")) == (
        "a chain's origin is set by its first link only"
    )


def test_extend_refuses_when_the_depth_is_exhausted(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(depth=1))
    second = w.extend([first], "vault")  # one hop left: allowed
    parent = w.verify([first, second], at="vault")
    assert parent.remaining == 0
    assert refused(w.extend, [first, second], "librarian", endpoint="find", parent=parent) == (
        "delegation depth exhausted: planner via planner → assistant (depth 2) may make no "
        "further call (librarian.find refused before sending)"
    )


def test_extend_refuses_a_call_the_chain_does_not_cover(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read",)))
    w.extend([first], "vault", endpoint="read")
    assert refused(w.extend, [first], "vault", endpoint="write") == (
        "the chain of planner via planner (depth 1) does not allow calling vault.write"
    )


@pytest.mark.parametrize(
    ("narrowing", "message"),
    [
        (Delegate(calls=("vault.read", "librarian.*")),
         "the call widens the calls: 'librarian.*' is not allowed before"),
        (Delegate(calls=("vault.*",)),
         "the call widens the calls: 'vault.*' is not allowed before"),
        (Delegate(scopes=("write", "admin", "read")), "the call widens the scopes: admin, write"),
        (Delegate(depth=3), "the call widens the depth: 3 hops, at most 2"),
        (Delegate(budget=6), "the call widens the budget: 6, at most 5"),
        (Delegate(cost=11), "the call widens the cost budget: 11, at most 10"),
    ],
)  # fmt: skip
def test_extend_refuses_a_widening(w: World, narrowing: Delegate, message: str) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read",), scopes=("read",),
                                                     depth=3, budget=5, cost=10))  # fmt: skip
    assert refused(w.extend, [first], "vault", endpoint="read", narrowing=narrowing) == message


def test_extend_accepts_the_same_as_it_holds(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read",), scopes=("read",),
                                                     depth=3, budget=5, cost=10))  # fmt: skip
    same = Delegate(calls=("vault.read",), scopes=("read",), depth=2, budget=5, cost=10)
    body = body_of(w.extend([first], "vault", endpoint="read", narrowing=same))
    assert (body["depth"], body["budget"], body["cost"]) == (2, 5, 10)


def test_extend_may_set_a_budget_where_none_was(w: World) -> None:
    first = w.start("planner", "assistant")
    body = body_of(w.extend([first], "vault", narrowing=Delegate(budget=3, cost=4)))
    assert (body["budget"], body["cost"]) == (3, 4)


# --- verify_chain: what a good chain gives --------------------------------------------------------


def test_a_verified_chain_says_who_through_whom_and_what_is_left(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(scopes=("read",), budget=9, cost=7),
                    chain=b"Q" * 16)  # fmt: skip
    links = [first, w.extend([first], "vault", narrowing=Delegate(budget=8))]
    d = w.verify(links, at="vault")
    assert d == Delegation(b"Q" * 16, "planner", ("planner", "assistant"), 2, ("*.*",),
                           ("read",), 6, EXP, 8, 7, tuple(links))  # fmt: skip
    assert d.describe == "planner via planner → assistant (depth 2)"


def test_a_chain_of_three_hops(w: World) -> None:
    links = w.chain("planner", "assistant", "vault", "librarian")
    d = w.verify(links, at="librarian")
    assert (d.origin, d.path, d.depth, d.remaining) == (
        "planner", ("planner", "assistant", "vault"), 3, 5,
    )  # fmt: skip


def test_max_depth_is_a_number_of_links(w: World) -> None:
    """Check 2: ``max_depth`` links accepted, one more refused before any is read."""
    eight = w.chain(*NAMES[:9])
    assert w.verify(eight, at=NAMES[8]).depth == 8  # the default, 8
    nine = w.chain(*NAMES[:10], max_depth=9)
    assert refused(w.verify, nine, at=NAMES[9]) == (
        "delegation chain of 9 hops exceeds the maximum depth 8"
    )
    assert w.verify(nine, at=NAMES[9], max_depth=9).depth == 9
    three = w.chain(*NAMES[:4])
    assert w.verify(three, at=NAMES[3], max_depth=3).depth == 3
    assert refused(w.verify, three, at=NAMES[3], max_depth=2) == (
        "delegation chain of 3 hops exceeds the maximum depth 2"
    )
    junk = encode_chain([b"junk"] * 3)  # refused by its length before its links are decoded
    message = refused(verify_chain, junk, verifier=w.verifier, cache=w.cache, now_ms=NOW_MS,
                      agent="x", endpoint="y", request_id=req(0), sender=("a", "b"),
                      deadline_ms=0, max_depth=2)  # fmt: skip
    assert message == "delegation chain of 3 hops exceeds the maximum depth 2"


# --- verify_chain: check 1, malformed -------------------------------------------------------------


def decode(w: World, raw: bytes) -> str:
    return malformed(verify_chain, raw, verifier=w.verifier, cache=w.cache, now_ms=NOW_MS,
                     agent="assistant", endpoint="hop", request_id=req(0),
                     sender=("planner", w["planner"].instance), deadline_ms=EXP,
                     max_depth=MAX_LINKS)  # fmt: skip


def test_more_than_max_links_is_refused_before_decoding(w: World) -> None:
    good = w.start("planner", "assistant")
    msg = decode(w, encode_chain([good] * (MAX_LINKS + 1)))
    assert msg == "delegation chain is not a msgpack array (ValueError)"
    # 32 links are decoded (and then refused for what they are)
    assert "32 hops" in refused(w.verify, [good] * MAX_LINKS, at="assistant")
    assert "delegation link 1 (planner) does not follow link 0" in refused(
        w.verify, [good] * MAX_LINKS, at="assistant", max_depth=MAX_LINKS
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "delegation chain is not a msgpack array (ValueError)"),
        (b"\xc1", "delegation chain is not a msgpack array (FormatError)"),
        (b"\x91\xc4\x10", "delegation chain is not a msgpack array (ValueError)"),
        (b"\x90\x90", "delegation chain is not a msgpack array (ExtraData)"),
        (msgpack.packb([]), "delegation chain must be a non-empty array of links"),
        (msgpack.packb({"a": 1}), "delegation chain must be a non-empty array of links"),
        (msgpack.packb(b"link"), "delegation chain must be a non-empty array of links"),
        (msgpack.packb(3), "delegation chain must be a non-empty array of links"),
        (msgpack.packb(["text"]), "delegation link 0 must be binary"),
        (msgpack.packb([7]), "delegation link 0 must be binary"),
        (msgpack.packb([b"\x93\x01\x02\x03"]),
         "delegation link 0 must be a 2-element array [body, signature]"),
        (msgpack.packb([b"\xc1"]), "malformed delegation link 0 (FormatError)"),
    ],
)  # fmt: skip
def test_malformed_chains(w: World, raw: bytes, message: str) -> None:
    assert decode(w, raw) == message


def test_a_str_link_is_not_binary_even_as_utf8_bytes(w: World) -> None:
    """A link must be msgpack bin: the same bytes as str are refused, not decoded."""
    good = w.start("planner", "assistant")
    as_str = msgpack.packb([good.decode("latin-1")], use_bin_type=True)
    assert decode(w, as_str) == "delegation link 0 must be binary"
    assert decode(w, msgpack.packb([good, "x"], use_bin_type=True)) == (
        "delegation link 1 must be binary"
    )


def test_a_link_is_decoded_only_from_bytes() -> None:
    """``verify_chain`` refuses a non-binary item before decoding it; the decoder refuses one
    as well (its own contract, whoever calls it)."""
    for item in ("text", 7, None, bytearray(b"x")):
        assert malformed(delegation_mod._decode_link, item, 3) == "delegation link 3 must be binary"


WRONG = "delegation link 0 has a field of the wrong type"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "mesh.record.v1"}, "delegation link 0 is not a mesh.link.v1 document"),
        ({"type": DROP}, "delegation link 0 is not a mesh.link.v1 document"),
        ({"calls": DROP}, "delegation link 0 field 'calls' is missing"),
        ({"calls": "*.*"}, "delegation link 0 field 'calls' must be list"),
        ({"scopes": DROP}, "delegation link 0 field 'scopes' is missing"),
        ({"scopes": {}}, "delegation link 0 field 'scopes' must be list"),
        ({"chain": DROP}, "delegation link 0 field 'chain' is missing"),
        ({"chain": "c" * 16}, "delegation link 0 field 'chain' must be bytes"),
        ({"req": DROP}, "delegation link 0 field 'req' is missing"),
        ({"req": 1}, "delegation link 0 field 'req' must be bytes"),
        ({"depth": DROP}, "delegation link 0 field 'depth' is missing"),
        ({"depth": True}, "delegation link 0 field 'depth' must be int"),
        ({"depth": 1.0}, "delegation link 0 field 'depth' must be int"),
        ({"cert": DROP}, "delegation link 0 field 'cert' is missing"),
        ({"cert": "x"}, "delegation link 0 field 'cert' must be bytes"),
        ({"to": DROP}, "delegation link 0 field 'to' is missing"),
        ({"to": b"assistant"}, "delegation link 0 field 'to' must be str"),
        ({"ep": DROP}, "delegation link 0 field 'ep' is missing"),
        ({"ep": b"hop"}, "delegation link 0 field 'ep' must be str"),
        ({"exp": DROP}, "delegation link 0 field 'exp' is missing"),
        ({"exp": float(EXP)}, "delegation link 0 field 'exp' must be int"),
        ({"prev": b"p" * 15}, WRONG),
        ({"prev": b"p" * 17}, WRONG),
        ({"prev": "p" * 16}, WRONG),
        ({"prev": 16}, WRONG),
        ({"budget": -1}, WRONG),
        ({"budget": "5"}, WRONG),
        ({"budget": True}, WRONG),
        ({"budget": 1.5}, WRONG),
        ({"cost": -1}, WRONG),
        ({"cost": "5"}, WRONG),
        ({"origin": 5}, WRONG),
        ({"origin": b"user:alice"}, WRONG),
        ({"origin": "alice"}, WRONG),
        ({"calls": [5]}, WRONG),
        ({"calls": ["*.*", "vault"]}, WRONG),
        ({"calls": [b"*.*"]}, WRONG),
        ({"scopes": [5]}, WRONG),
        ({"scopes": ["read", "Bad"]}, WRONG),
        ({"chain": b"c" * 15}, WRONG),
        ({"chain": b"c" * 17}, WRONG),
        ({"req": b"r" * 15}, WRONG),
        ({"req": b"r" * 17}, WRONG),
        ({"depth": -1}, WRONG),
        ({"cert": b"junk"}, "malformed certificate (ExtraData)"),
    ],
)  # fmt: skip
def test_malformed_links(w: World, fields: dict[str, Any], message: str) -> None:
    assert decode(w, encode_chain([link(w["planner"], **fields)])) == message


def test_a_malformed_later_link_is_named(w: World) -> None:
    first = w.start("planner", "assistant")
    bad = after(w, [first], "assistant", budget="x")
    assert (
        decode(w, encode_chain([first, bad])) == "delegation link 1 has a field of the wrong type"
    )


def test_the_smallest_well_formed_values_decode(w: World) -> None:
    """Zero budget, cost and depth, and a 16-byte prev, are well formed."""
    first = w.start("planner", "assistant", Delegate(depth=1, budget=0, cost=0), chain=bytes(16))
    d = w.verify([first], at="assistant")
    assert (d.remaining, d.budget, d.cost) == (1, 0, 0)
    second = after(w, [first], "assistant", depth=0)
    assert len(body_of(second)["prev"]) == 16
    d = w.verify([first, second], at="vault")
    assert (d.remaining, d.budget, d.cost, d.depth) == (0, 0, 0, 2)


# --- verify_chain: checks 3 to 5, the links' order and narrowing ----------------------------------


def test_check_3_every_link_is_of_one_chain(w: World) -> None:
    first = w.start("planner", "assistant")
    parent = w.verify([first], at="assistant")
    other = w.extend([first], "vault", parent=dataclasses.replace(parent, chain=b"O" * 16))
    assert refused(w.verify, [first, other], at="vault") == (
        "delegation link 1 (assistant) belongs to another chain"
    )


def test_check_4_the_first_link_has_no_prev(w: World) -> None:
    links = w.chain("planner", "assistant", "vault", "librarian")
    assert refused(w.verify, links[1:], at="librarian") == (
        "delegation link 0 (assistant) names a previous link: links are missing"
    )


def test_check_4_only_a_gateway_names_an_origin(w: World) -> None:
    forged = link(w["planner"], origin="user:alice")
    assert refused(w.verify, [forged], at="assistant") == (
        "delegation link 0 (planner) names an origin without the role gateway"
    )
    ok = link(w["gateway"], origin="user:alice")
    assert w.verify([ok], at="assistant").origin == "user:alice"


def test_check_5_the_link_before_allows_a_further_hop(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(depth=0))
    assert w.verify([first], at="assistant").remaining == 0
    second = after(w, [first], "assistant", depth=0)
    assert refused(w.verify, [first, second], at="vault") == (
        "delegation link 1 (assistant): link 0 allows no further hop"
    )
    one = w.start("planner", "assistant", Delegate(depth=1))
    assert w.verify([one, after(w, [one], "assistant", depth=0)], at="vault").remaining == 0


def test_check_5_a_dropped_or_reordered_link_is_spliced(w: World) -> None:
    links = w.chain("planner", "assistant", "vault", "librarian")
    assert refused(w.verify, [links[0], links[2]], at="librarian") == (
        "delegation link 1 (vault) does not follow link 0: spliced or reordered"
    )
    no_prev = after(w, links[:1], "assistant", prev=DROP)
    assert refused(w.verify, [links[0], no_prev], at="vault") == (
        "delegation link 1 (assistant) does not follow link 0: spliced or reordered"
    )
    assert refused(w.verify, [links[0], links[1], links[1]], at="vault") == (
        "delegation link 2 (assistant) does not follow link 1: spliced or reordered"
    )


def test_check_5_a_link_is_issued_by_the_agent_the_link_before_delegates_to(w: World) -> None:
    first = w.start("planner", "assistant")
    parent = w.verify([first], at="assistant")
    stolen = w.extend([first], "librarian", parent=parent, by="vault")
    assert refused(w.verify, [first, stolen], at="librarian") == (
        "delegation link 1 (vault) is issued by vault, but link 0 delegates to assistant"
    )


def test_check_5_only_the_first_link_sets_an_origin(w: World) -> None:
    first = w.start("gateway", "assistant", Delegate(origin="user:alice"))
    second = after(w, [first], "assistant", origin="user:bob")
    assert refused(w.verify, [first, second], at="vault") == (
        "delegation link 1 (assistant) sets an origin: only the first link may"
    )


def test_check_5_a_later_link_may_not_widen_the_deadline(w: World) -> None:
    first = w.start("planner", "assistant", exp_ms=EXP)
    same = after(w, [first], "assistant", exp=EXP)
    assert w.verify([first, same], at="vault").expires == EXP
    later = after(w, [first], "assistant", exp=EXP + 1)
    assert refused(w.verify, [first, later], at="vault", deadline_ms=EXP) == (
        "delegation link 1 (assistant) widens the deadline"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"calls": ["vault.read", "vault.write"]},
         "widens the calls: 'vault.write' is not allowed before"),
        ({"calls": ["*.read"]}, "widens the calls: '*.read' is not allowed before"),
        ({"scopes": ["read", "write", "admin"]}, "widens the scopes: admin, write"),
        ({"depth": 3}, "widens the depth: 3 hops, at most 2"),
        ({"budget": 6}, "widens the budget: 6, at most 5"),
        ({"budget": DROP}, "widens the budget: None, at most 5"),
        ({"cost": 11}, "widens the cost budget: 11, at most 10"),
        ({"cost": DROP}, "widens the cost budget: None, at most 10"),
    ],
)  # fmt: skip
def test_check_5_a_later_link_may_only_narrow(
    w: World, fields: dict[str, Any], message: str
) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read",), scopes=("read",),
                                                     depth=3, budget=5, cost=10))  # fmt: skip
    second = after(w, [first], "assistant", ep="read", **fields)
    assert refused(w.verify, [first, second], at="vault", endpoint="read") == (
        f"delegation link 1 (assistant) {message}"
    )


def test_check_5_the_same_as_before_is_a_narrowing(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read",), scopes=("read",),
                                                     depth=3, budget=5, cost=10))  # fmt: skip
    same = after(w, [first], "assistant", ep="read", calls=["vault.read"], scopes=["read"],
                 depth=2, budget=5, cost=10)  # fmt: skip
    d = w.verify([first, same], at="vault", endpoint="read")
    assert (d.calls, d.scopes, d.remaining, d.budget, d.cost) == (
        ("vault.read",), ("read",), 2, 5, 10,
    )  # fmt: skip
    fewer = after(w, [first], "assistant", ep="read", calls=[], scopes=[], depth=0, budget=0,
                  cost=0)  # fmt: skip
    d = w.verify([first, fewer], at="vault", endpoint="read")
    assert (d.calls, d.scopes, d.remaining, d.budget, d.cost) == ((), (), 0, 0, 0)


def test_check_5_runs_for_every_later_link(w: World) -> None:
    links = w.chain("planner", "assistant", "vault")
    wide = after(w, links, "vault", depth=6)
    assert refused(w.verify, [*links, wide], at="librarian") == (
        "delegation link 2 (vault) widens the depth: 6 hops, at most 5"
    )


# --- verify_chain: checks 6 to 9, the request it came with ----------------------------------------


def test_check_6_the_last_link_is_issued_by_the_sender(w: World) -> None:
    links = w.chain("planner", "assistant", "vault")
    other = w.trust.identity("assistant", now=NOW_S - 60)  # same agent, another instance
    assert refused(w.verify, links, at="vault", sender=("assistant", other.instance)) == (
        f"delegation link 1 (assistant) was not issued by the caller assistant.{other.instance}"
    )
    instance = w["assistant"].instance
    assert refused(w.verify, links, at="vault", sender=("planner", instance)) == (
        f"delegation link 1 (assistant) was not issued by the caller planner.{instance}"
    )


def test_check_6_the_last_link_is_for_this_request(w: World) -> None:
    links = w.chain("planner", "assistant", "vault")
    assert refused(w.verify, links, at="librarian") == (
        "delegation link 1 (assistant) is for another request (to vault)"
    )
    assert refused(w.verify, links, at="vault", request=req(9)) == (
        "delegation link 1 (assistant) is for another request"
    )


def test_check_7_the_chain_has_not_expired(w: World) -> None:
    first = w.start("planner", "assistant", exp_ms=EXP)
    assert w.verify([first], at="assistant", now_ms=EXP).expires == EXP
    assert w.verify([first], at="assistant", now_ms=EXP - 0.5).expires == EXP
    assert refused(w.verify, [first], at="assistant", now_ms=EXP + 1) == (
        "delegation link 0 (planner) expired: the chain's deadline has passed"
    )
    assert refused(w.verify, [first], at="assistant", now_ms=EXP + 0.5) == (
        "delegation link 0 (planner) expired: the chain's deadline has passed"
    )
    late = w.start("planner", "assistant", exp_ms=NOW_MS - 1)
    assert refused(w.verify, [late], at="assistant", deadline_ms=NOW_MS - 1) == (
        "delegation link 0 (planner) expired: the chain's deadline has passed"
    )
    exact = w.start("planner", "assistant", exp_ms=NOW_MS)
    assert w.verify([exact], at="assistant", deadline_ms=NOW_MS).expires == NOW_MS


def test_check_7_the_request_ends_no_later_than_the_chain(w: World) -> None:
    first = w.start("planner", "assistant", exp_ms=EXP)
    assert w.verify([first], at="assistant", deadline_ms=EXP).expires == EXP
    assert w.verify([first], at="assistant", deadline_ms=0).expires == EXP
    assert refused(w.verify, [first], at="assistant", deadline_ms=EXP + 1) == (
        "delegation link 0 (planner) ends before the request's deadline"
    )


def test_check_6_the_last_link_is_for_this_endpoint(w: World) -> None:
    first = w.start("planner", "assistant", endpoint="read")
    assert w.verify([first], at="assistant", endpoint="read").depth == 1
    assert refused(w.verify, [first], at="assistant", endpoint="write") == (
        "delegation link 0 (planner) is for another request"
    )


def test_check_8_each_hop_was_allowed_by_the_link_before(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read", "librarian.*")))
    second = w.extend([first], "vault", endpoint="read", narrowing=Delegate(
        calls=("librarian.*",)))  # fmt: skip
    assert w.verify([first, second], at="vault", endpoint="read").calls == ("librarian.*",)
    unallowed = after(w, [first], "assistant", ep="write", calls=["librarian.*"])
    assert refused(w.verify, [first, unallowed], at="vault", endpoint="write") == (
        "delegation link 1 (assistant): link 0 does not allow calling vault.write"
    )
    elsewhere = after(w, [first], "assistant", to="scribe", calls=["librarian.*"])
    assert refused(w.verify, [first, elsewhere], at="scribe") == (
        "delegation link 1 (assistant): link 0 does not allow calling scribe.hop"
    )


def test_check_8_is_checked_at_every_hop(w: World) -> None:
    """Two colluding insiders cannot pass on authority the chain never allowed: the middle
    hop (vault to librarian.find) is refused though the last one is covered."""
    first = w.start("planner", "assistant", Delegate(calls=("vault.hop", "scribe.hop")))
    mid = after(w, [first], "assistant", calls=["vault.hop", "scribe.hop"])
    assert w.verify([first, mid], at="vault").path == ("planner", "assistant")
    bad = after(w, [first, mid], "vault", to="librarian", ep="find", calls=["scribe.hop"])
    assert refused(w.verify, [first, mid, bad], at="librarian", endpoint="find") == (
        "delegation link 2 (vault): link 1 does not allow calling librarian.find"
    )
    first = w.start("planner", "assistant")
    mid = w.extend([first], "vault", narrowing=Delegate(calls=("librarian.read",)))
    last = w.extend([first, mid], "librarian", endpoint="read", narrowing=Delegate(calls=()))
    assert w.verify([first, mid, last], at="librarian", endpoint="read").calls == ()
    wide = after(w, [first, mid], "vault", to="librarian", ep="find", calls=[])
    assert refused(w.verify, [first, mid, wide], at="librarian", endpoint="find") == (
        "delegation link 2 (vault): link 1 does not allow calling librarian.find"
    )


def test_check_8_a_single_link_allows_its_own_call(w: World) -> None:
    """With one link, what the caller may call is not in the chain: its own policy decided."""
    first = w.start("planner", "assistant", Delegate(calls=()), endpoint="anything")
    assert w.verify([first], at="assistant", endpoint="anything").calls == ()


def test_check_9_a_loop_is_refused(w: World) -> None:
    links = w.chain("planner", "assistant", "vault", "assistant")
    assert refused(w.verify, links, at="assistant") == (
        "delegation loop: assistant appears twice in planner → assistant → vault → assistant"
    )
    back = w.chain("planner", "assistant", "planner")
    assert refused(w.verify, back, at="planner") == (
        "delegation loop: planner appears twice in planner → assistant → planner"
    )
    assert w.verify(links, at="assistant", reentrant=True).path == (
        "planner", "assistant", "vault",
    )  # fmt: skip


def test_check_9_only_the_agents_policy_names_may_come_back(w: World) -> None:
    links = w.chain("planner", "assistant", "vault", "assistant")
    may = {"assistant"}.__contains__
    assert w.verify(links, at="assistant", reentrant=may).depth == 3
    assert refused(w.verify, links, at="assistant", reentrant={"vault"}.__contains__) == (
        "delegation loop: assistant appears twice in planner → assistant → vault → assistant"
    )
    twice = w.chain("planner", "assistant", "planner", "assistant")
    assert refused(w.verify, twice, at="assistant", reentrant={"assistant"}.__contains__) == (
        "delegation loop: planner appears twice in planner → assistant → planner → assistant"
    )
    assert refused(w.verify, twice, at="assistant", reentrant={"planner"}.__contains__) == (
        "delegation loop: assistant appears twice in planner → assistant → planner → assistant"
    )
    assert w.verify(twice, at="assistant", reentrant={"planner", "assistant"}.__contains__)
    assert w.verify(twice, at="assistant", reentrant=True).depth == 3
    asked: list[str] = []

    def may_return(agent: str) -> bool:
        asked.append(agent)
        return True

    w.verify(w.chain("planner", "assistant", "vault"), at="vault", reentrant=may_return)
    assert asked == []  # no agent twice: nobody is asked about


def test_check_9_a_caller_calling_itself_is_a_loop(w: World) -> None:
    self_call = [w.start("planner", "planner")]
    assert refused(w.verify, self_call, at="planner") == (
        "delegation loop: planner appears twice in planner → planner"
    )
    assert w.verify(self_call, at="planner", reentrant=True).depth == 1


def test_check_9_distinct_agents_are_no_loop(w: World) -> None:
    for n in (2, 3, 4):
        links = w.chain(*NAMES[: n + 1])
        assert w.verify(links, at=NAMES[n]).path == NAMES[:n]


# --- verify_chain: check 10, certificates and signatures ------------------------------------------


def test_check_10_a_forged_link_is_refused(w: World) -> None:
    forged = link(w["planner"], signer=SigningKey.generate())
    assert refused(w.verify, [forged], at="assistant") == "delegation link 0 (planner) is forged"
    links = w.chain("planner", "assistant")
    body = body_of(after(w, links, "assistant"))
    body.pop("cert")
    forged2 = link(w["assistant"], signer=SigningKey.generate(), **body)
    assert refused(w.verify, [links[0], forged2], at="vault") == (
        "delegation link 1 (assistant) is forged"
    )


def test_check_10_a_forged_link_after_a_cached_one_is_still_checked(w: World) -> None:
    links = w.chain("planner", "assistant")
    w.verify(links, at="assistant")
    assert link_digest(links[0]) in w.cache
    body = body_of(after(w, links, "assistant"))
    body.pop("cert")
    forged = link(w["assistant"], signer=SigningKey.generate(), **body)
    assert refused(w.verify, [links[0], forged], at="vault") == (
        "delegation link 1 (assistant) is forged"
    )
    assert link_digest(forged) not in w.cache


def test_check_10_verified_links_are_cached_once_each(w: World) -> None:
    links = w.chain("planner", "assistant", "vault")
    w.cache = LinkCache()
    assert link_digest(links[0]) not in w.cache
    w.verify(links, at="vault")
    assert link_digest(links[0]) in w.cache and link_digest(links[1]) in w.cache


def test_check_10_each_signature_is_checked_once(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subtree's shared links are decoded and their signatures checked once: verifying the
    chain again checks none, a chain one link longer checks only the new link."""
    checked: list[bytes] = []

    class Counting(VerifyKey):
        def verify(self, *args: Any, **kwargs: Any) -> Any:
            checked.append(bytes(self))
            return super().verify(*args, **kwargs)

    monkeypatch.setattr(delegation_mod, "VerifyKey", Counting)
    links = w.chain("planner", "assistant")
    w.cache = LinkCache()
    w.verify(links, at="assistant")
    assert checked == [w["planner"].keys.signing.verify_key.encode()]
    checked.clear()
    w.verify(links, at="assistant")
    assert checked == []
    longer = [*links, w.extend(links, "vault")]
    checked.clear()
    w.verify(longer, at="vault")
    assert checked == [w["assistant"].keys.signing.verify_key.encode()]


def test_check_10_a_link_cached_without_its_decoding_is_checked_again(w: World) -> None:
    forged = link(w["planner"], signer=SigningKey.generate())
    w.cache.add(link_digest(forged))
    assert link_digest(forged) in w.cache and w.cache.get(link_digest(forged)) is None
    assert refused(w.verify, [forged], at="assistant") == "delegation link 0 (planner) is forged"


def test_check_10_a_cached_link_still_has_its_certificate_checked(w: World) -> None:
    links = w.chain("planner", "assistant", "vault")
    w.verify(links, at="vault")
    w.verifier.revoked.add(w["planner"].certificate.serial)
    serial = w["planner"].certificate.serial
    assert refused(w.verify, links, at="vault") == (
        f"delegation link 0: issuer certificate {serial} of 'planner' is revoked"
    )
    w.verifier.revoked.clear()
    w.verifier.revoked.add(w["assistant"].certificate.serial)
    serial = w["assistant"].certificate.serial
    assert refused(w.verify, links, at="vault") == (
        f"delegation link 1: issuer certificate {serial} of 'assistant' is revoked"
    )


def test_check_10_an_expired_or_foreign_certificate(w: World) -> None:
    links = w.chain("planner", "assistant")
    cert = w["planner"].certificate
    w.clock.now = cert.not_after
    assert refused(w.verify, links, at="assistant") == (
        f"delegation link 0: issuer certificate {cert.serial} of 'planner' expired at "
        f"{cert.not_after}"
    )
    w.clock.now = NOW_S
    stranger = Trust().identity("planner", now=NOW_S - 60)
    root = stranger.certificate.issuer
    raw = start(stranger.keys.signing, stranger.certificate, to="assistant", endpoint="hop",
                req=req(0), exp_ms=EXP)  # fmt: skip
    message = refused(w.verify, [raw], at="assistant")
    assert message.startswith(
        f"delegation link 0: issuer certificate of 'planner' was issued by {root}, not by "
    )


# --- LinkCache ------------------------------------------------------------------------------------


def test_link_cache_forgets_the_oldest_first() -> None:
    cache = LinkCache(max_entries=3)
    for d in (b"a", b"b", b"c"):
        cache.add(d)
    assert all(d in cache for d in (b"a", b"b", b"c"))
    cache.add(b"d")
    assert b"a" not in cache
    assert all(d in cache for d in (b"b", b"c", b"d"))
    cache.add(b"e")
    assert b"b" not in cache and b"c" in cache and b"e" in cache
    assert b"z" not in cache


def test_link_cache_default_bound_is_4096() -> None:
    cache = LinkCache()
    for i in range(4096):
        cache.add(i.to_bytes(4, "big"))
    assert (0).to_bytes(4, "big") in cache
    cache.add(b"more")
    assert (0).to_bytes(4, "big") not in cache and (1).to_bytes(4, "big") in cache
    assert b"more" in cache


# --- events: a last link to "*" -------------------------------------------------------------------


def event_link(w: World, links: Sequence[bytes], by: str) -> bytes:
    """What a publisher adds to its chain for an event (``mesh/_runtime/events.py``)."""
    parent = w.verify(links, at=by)
    ident = w[by]
    return extend(ident.keys.signing, ident.certificate, parent, to=EVENT_AUDIENCE,
                  endpoint="news", req=req(len(links)), exp_ms=EXP,
                  narrowing=Delegate(calls=(), depth=0))  # fmt: skip


def test_an_event_link_needs_no_covering_call(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(calls=()))
    body = body_of(event_link(w, [first], "assistant"))
    assert (body["to"], body["calls"], body["depth"]) == ("*", [], 0)


def test_an_event_chain_verifies_at_any_subscriber(w: World) -> None:
    first = w.start("planner", "assistant", Delegate(calls=("vault.read",)))
    links = [first, event_link(w, [first], "assistant")]
    for at in ("librarian", "planner"):  # the topic is not a call; a loop is not checked
        d = w.verify(links, at=at, endpoint="news", event=True, reentrant=True, deadline_ms=0)
        assert (d.origin, d.path, d.calls, d.remaining) == (
            "planner", ("planner", "assistant"), (), 0,
        )  # fmt: skip


def test_only_an_event_has_a_last_link_to_anyone(w: World) -> None:
    first = w.start("planner", "assistant")
    links = [first, event_link(w, [first], "assistant")]
    assert refused(w.verify, links, at="vault") == (
        "delegation link 1 (assistant) is for another request (to *)"
    )
    direct_links = w.chain("planner", "assistant", "vault")
    assert refused(w.verify, direct_links, at="vault", event=True, reentrant=True) == (
        "delegation link 1 (assistant) is for another request (to vault)"
    )
    assert refused(w.verify, links, at="vault", event=True, request=req(7)) == (
        "delegation link 1 (assistant) is for another request"
    )


def test_nothing_may_follow_a_link_to_anyone(w: World) -> None:
    """A link for an event's subscribers (to "*") ends the chain, even a hand-made one that
    allows a further hop: any reader of the (unsealed) event could otherwise act on it."""
    first = link(w["planner"], to=EVENT_AUDIENCE, depth=1)
    second = after(w, [first], "vault", depth=0)
    assert refused(w.verify, [first, second], at="librarian") == (
        "delegation link 1 (vault) follows link 0, made for an event's subscribers: nothing may"
    )


def test_an_event_link_that_allows_anything_is_refused(w: World) -> None:
    first = w.start("planner", "assistant")
    parent = w.verify([first], at="assistant")
    ident = w["assistant"]
    for narrowing in (Delegate(calls=("vault.read",), depth=0), Delegate(calls=(), depth=1)):
        generous = extend(ident.keys.signing, ident.certificate, parent, to=EVENT_AUDIENCE,
                          endpoint="news", req=req(1), exp_ms=EXP, narrowing=narrowing)  # fmt: skip
        message = refused(
            w.verify, [first, generous], at="librarian", endpoint="news", event=True,
            reentrant=True, deadline_ms=0, request=req(1),
        )  # fmt: skip
        assert message == (
            "delegation link 1 (assistant), for an event's subscribers, may allow nothing"
        )
