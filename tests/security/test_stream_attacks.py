"""What a hostile broker (or an insider) can do to a streamed reply, on a real nats-server.

The callee ``llm`` serves ``generate``, a stream of numbered tokens; ``alice`` calls it through
``BrokerProxy`` (``tests/security/broker_proxy.py``), which plays the broker of her connection:
it sees every frame the server delivers to her and every frame she publishes, and can drop,
duplicate, reorder, alter or inject them. Other attackers are a plain nats-py client with no
keys, connected straight to the server, and ``mallory``, an insider with a certificate of its
own from the same root. Every test checks what alice's loop yields (never a chunk out of
order, after a gap, from another stream, or forged) and how the stream ends.

Attacks on the chunks (callee to caller):

- the broker drops a chunk mid-stream, or the first one: ``StreamBroken`` after the genuine
  prefix; the callee's handler is cancelled (its ``finally`` runs);
- the broker swaps two chunks: ``StreamBroken``, the late one is never yielded;
- the broker delivers chunks twice and replays old ones: copies dropped and counted, the
  stream complete and exact;
- the broker splices a chunk of another concurrent stream of alice's (same callee, same pair
  key, another request id), or the genuine end frame of a finished one: dropped; a spliced
  chunk in place of the genuine one breaks the stream;
- the broker drops the end frame: no silent end, ``DeadlineExceeded`` after all chunks (at the
  deadline, or the idle timeout); it goes silent mid-stream: ``DeadlineExceeded`` at the idle
  timeout, and the producer is stopped;
- a client without keys forges chunks, ends and errors; the broker alters real frames
  (ciphertext, tag, the ``end``, ``sq`` or ``st`` of their header): dropped, the stream goes
  on; an altered frame in place of the genuine one breaks it;
- a callee that sends more than the credit it was granted: ``StreamBroken``.

Attacks on the CONTROL frames (caller to callee):

- forged cancels (no key, no seal, an insider's own pair key, a genuine cancel of another call
  with its ``re`` rewritten): the handler is not cancelled, ``dropped_controls`` counts them;
  the genuine cancel still works, and replayed after that call ended it does nothing;
- replayed credit frames: the producer never gets beyond the credit granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import BaseModel

import mesh
from mesh._core.crypto import derive_pair_key, seal_frame
from mesh._core.envelope import (
    MAGIC,
    PREFIX,
    PREFIX_LEN,
    Header,
    Kind,
    control_header,
    decode_frame,
    reply_header,
)
from mesh._runtime.server import Exchange
from mesh.errors import DecodeError
from mesh.testing import NatsServer, Trust, test_config, wait_until

from .broker_proxy import BrokerProxy

pytestmark = pytest.mark.integration

WAIT = 5.0  # for what should happen at once (shared hosts)


class Prompt(BaseModel):
    text: str
    tokens: int = 10
    hold_at: int = -1  # wait for the test's gate before producing this token


class Token(BaseModel):
    i: int
    text: str


@dataclass
class Log:
    """What the handler did, per prompt text."""

    started: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    produced: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    cancelled: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    cleaned: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    gates: defaultdict[str, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )


def make_llm(log: Log) -> mesh.Agent:
    agent = mesh.Agent("llm")

    @agent.endpoint(concurrency=16)
    async def generate(p: Prompt, ctx: mesh.Context) -> AsyncIterator[Token]:
        log.started[p.text] += 1
        try:
            for i in range(p.tokens):
                if i == p.hold_at:
                    await log.gates[p.text].wait()
                log.produced[p.text] += 1
                yield Token(i=i, text=f"{p.text}-{i}")
        except (asyncio.CancelledError, GeneratorExit):
            log.cancelled[p.text] += 1
            raise
        finally:
            log.cleaned[p.text] += 1

    return agent


@dataclass
class World:
    alice: mesh.Mesh
    llm: mesh.Mesh
    proxy: BrokerProxy
    log: Log
    trust: Trust
    url: str  # the real server's

    @property
    def served(self) -> dict[bytes, Exchange]:
        """The calls llm is serving, by request id."""
        assert self.llm.server is not None
        return self.llm.server.running

    def tokens(self, text: str, n: int) -> list[tuple[int, str]]:
        return [(i, f"{text}-{i}") for i in range(n)]


@pytest_asyncio.fixture
async def world(nats_server: NatsServer, trust: Trust) -> AsyncIterator[World]:
    log = Log()
    async with BrokerProxy(nats_server.url) as proxy:
        async with (
            mesh.Mesh(trust.identity("llm"), test_config([nats_server.url]), agent=make_llm(log))
            as llm,
            mesh.Mesh(trust.identity("alice"), test_config([proxy.url])) as alice,
        ):  # fmt: skip
            await alice.wait_for("llm")
            yield World(alice, llm, proxy, log, trust, nats_server.url)
            for gate in log.gates.values():
                gate.set()  # let nothing hang at teardown
        assert proxy.errors == []


@contextlib.asynccontextmanager
async def attacker(url: str) -> AsyncIterator[NatsClient]:
    """A plain nats-py client on the real server: NATS access, no mesh keys."""
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


# --- frames -----------------------------------------------------------------------------------


def header(payload: bytes) -> Header | None:
    """The cleartext header of a mesh frame, or ``None`` for anything else."""
    try:
        return decode_frame(payload)[0]
    except DecodeError:
        return None


def rewrite_header(frame: bytes, **fields: Any) -> bytes:
    """``frame`` with header fields (wire keys: ``re``, ``sq``, ``end``, ``st``...) changed and
    its sealed body kept: what a broker can do to cleartext headers."""
    hdr, end = decode_frame(frame)
    wire = hdr.to_map() | fields
    hb = msgpack.packb(wire, use_bin_type=True)
    return PREFIX.pack(MAGIC, len(hb)) + hb + frame[end:]


def flip(frame: bytes, at: int) -> bytes:
    """``frame`` with one bit of the byte at offset ``at`` (negative: from the end) flipped."""
    b = bytearray(frame)
    b[at] ^= 0x01
    return bytes(b)


def body_offset(frame: bytes) -> int:
    return decode_frame(frame)[1]


class ReplyTap:
    """A ``to_client`` hook: records alice's reply frames by request id and applies ``rule``
    (``rule(frame, header) -> payloads``) to them; everything else passes."""

    def __init__(self) -> None:
        self.frames: defaultdict[bytes, list[bytes]] = defaultdict(list)
        self.order: list[bytes] = []  # request ids, as their first frames arrived
        self.rule: Callable[[bytes, Header], list[bytes]] = lambda frame, _hdr: [frame]

    def __call__(self, subject: str, payload: bytes) -> list[bytes]:
        hdr = header(payload)
        if hdr is None or hdr.kind != Kind.REPLY or hdr.reply_to is None:
            return [payload]
        if hdr.reply_to not in self.frames:
            self.order.append(hdr.reply_to)
        self.frames[hdr.reply_to].append(payload)
        return self.rule(payload, hdr)


class ControlTap:
    """A ``to_server`` hook: records alice's requests and CONTROL frames and applies ``rule`` to
    the CONTROL frames (``rule(frame, header) -> payloads``)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []  # request ids in the order sent
        self.controls: list[tuple[str, Header, bytes]] = []
        self.rule: Callable[[bytes, Header], list[bytes]] = lambda frame, _hdr: [frame]

    def __call__(self, subject: str, payload: bytes) -> list[bytes]:
        hdr = header(payload)
        if hdr is None:
            return [payload]
        if hdr.kind == Kind.REQUEST:
            self.requests.append(hdr.id)
        if hdr.kind != Kind.CONTROL:
            return [payload]
        self.controls.append((subject, hdr, payload))
        return self.rule(payload, hdr)

    def of(self, rid: bytes, op: str) -> list[tuple[str, bytes]]:
        return [(s, f) for s, h, f in self.controls if h.reply_to == rid and h.op == op]


async def read_all(stream: mesh.Stream[Token], into: list[tuple[int, str]]) -> None:
    async for t in stream:
        into.append((t.i, t.text))


# --- the proxy itself -------------------------------------------------------------------------


async def test_alice_reaches_the_server_only_through_the_proxy(world: World) -> None:
    """The broker in the tests is really alice's broker: her connection is to the proxy, she
    knows no other server (INFO's connect_urls are stripped), and a clean stream passes."""
    nc = world.alice.transport.nc  # type: ignore[attr-defined]
    assert nc.connected_url.port == world.proxy.port
    assert {s.uri.port for s in nc._server_pool} == {world.proxy.port}
    tap = ReplyTap()
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    await read_all(world.alice.stream("llm", "generate", Prompt(text="a", tokens=20), Token), got)
    assert got == world.tokens("a", 20)
    (rid,) = tap.order
    assert len(tap.frames[rid]) == 21  # 20 chunks and the end, all through the proxy
    assert world.alice.stats.dropped_replies == 0


# --- dropped, reordered, replayed chunks ------------------------------------------------------


async def test_a_dropped_chunk_breaks_the_stream_after_the_genuine_prefix(world: World) -> None:
    tap = ReplyTap()
    tap.rule = lambda frame, hdr: [] if hdr.seq == 5 else [frame]
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    with pytest.raises(mesh.StreamBroken, match="frame 5 is missing"):
        await read_all(
            world.alice.stream("llm", "generate", Prompt(text="d", tokens=200), Token, credit=8),
            got,
        )
    assert got == world.tokens("d", 5)
    # The caller cannot trust what follows, so it stops the producer: the handler, waiting for
    # credit, is cancelled and its finally runs (not only after Timeouts.credit_wait, 30 s).
    await wait_until(lambda: world.log.cleaned["d"] == 1, timeout=3)
    assert world.log.cancelled["d"] == 1
    assert world.log.produced["d"] < 200


async def test_a_dropped_first_chunk_breaks_the_stream_before_anything(world: World) -> None:
    tap = ReplyTap()
    tap.rule = lambda frame, hdr: [] if hdr.seq == 0 else [frame]
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    with pytest.raises(mesh.StreamBroken, match="frame 0 is missing"):
        await read_all(
            world.alice.stream("llm", "generate", Prompt(text="f", tokens=200), Token, credit=8),
            got,
        )
    assert got == []
    assert world.log.started["f"] == 1  # not retried: StreamBroken is not retryable
    await wait_until(lambda: world.log.cleaned["f"] == 1, timeout=3)
    assert world.log.cancelled["f"] == 1


async def test_swapped_chunks_break_the_stream_and_the_late_one_is_never_yielded(
    world: World,
) -> None:
    tap = ReplyTap()
    held: list[bytes] = []

    def swap(frame: bytes, hdr: Header) -> list[bytes]:
        if hdr.seq == 3:
            held.append(frame)
            return []
        if hdr.seq == 4:
            return [frame, *held]  # 4 before 3
        return [frame]

    tap.rule = swap
    world.proxy.to_client = tap
    before = world.alice.stats.dropped_replies
    got: list[tuple[int, str]] = []
    with pytest.raises(mesh.StreamBroken, match="frame 3 is missing"):
        await read_all(
            world.alice.stream("llm", "generate", Prompt(text="s", tokens=10), Token), got
        )
    assert got == world.tokens("s", 3)
    assert held  # frame 3 was delivered after frame 4, and not yielded
    assert world.alice.stats.dropped_replies > before


async def test_replayed_chunks_are_dropped_and_the_stream_is_exact(world: World) -> None:
    """Every chunk delivered twice, and at chunk 6 chunks 0 to 5 again: 18 copies, each
    dropped and counted; the credit is not spent by copies (12 chunks, credit 4)."""
    tap = ReplyTap()
    seen: list[bytes] = []

    def replay(frame: bytes, hdr: Header) -> list[bytes]:
        if hdr.end:
            return [frame]
        out = [frame, frame]
        if hdr.seq == 6:
            out += seen[:6]
        seen.append(frame)
        return out

    tap.rule = replay
    world.proxy.to_client = tap
    before = world.alice.stats.dropped_replies
    got: list[tuple[int, str]] = []
    await read_all(
        world.alice.stream("llm", "generate", Prompt(text="r", tokens=12), Token, credit=4), got
    )
    assert got == world.tokens("r", 12)
    assert world.alice.stats.dropped_replies - before == 12 + 6
    assert world.log.cancelled["r"] == 0


# --- frames of other streams ------------------------------------------------------------------


async def test_chunks_spliced_from_a_concurrent_stream_are_dropped(world: World) -> None:
    """Stream B is open (held mid-way by its handler) while stream A runs: the broker puts B's
    chunk number j in front of A's chunk j. Same callee, same caller, same pair key: only the
    request id in the sealed header tells them apart, and it does."""
    tap = ReplyTap()
    world.proxy.to_client = tap
    alice, log = world.alice, world.log
    b = alice.stream("llm", "generate", Prompt(text="B", tokens=10, hold_at=5), Token)
    b_iter = aiter(b)
    b_got = [(t.i, t.text) for t in [await anext(b_iter) for _ in range(3)]]
    await wait_until(lambda: log.produced["B"] == 5)
    (b_rid,) = tap.order
    await wait_until(lambda: len(tap.frames[b_rid]) == 5)
    b_frames = {header(f).seq: f for f in tap.frames[b_rid]}  # type: ignore[union-attr]
    spliced: list[int] = []

    def splice(frame: bytes, hdr: Header) -> list[bytes]:
        if hdr.reply_to != b_rid and hdr.seq in b_frames and not hdr.end:
            spliced.append(hdr.seq or 0)
            return [b_frames[hdr.seq], frame]
        return [frame]

    tap.rule = splice
    before = alice.stats.dropped_replies
    a_got: list[tuple[int, str]] = []
    await read_all(alice.stream("llm", "generate", Prompt(text="A", tokens=10), Token), a_got)
    assert a_got == world.tokens("A", 10)
    assert spliced == [0, 1, 2, 3, 4]
    assert alice.stats.dropped_replies - before == 5
    tap.rule = lambda frame, _hdr: [frame]
    log.gates["B"].set()
    async for t in b_iter:
        b_got.append((t.i, t.text))
    assert b_got == world.tokens("B", 10)


async def test_a_chunk_of_another_stream_in_place_of_the_genuine_one_breaks_the_stream(
    world: World,
) -> None:
    tap = ReplyTap()
    world.proxy.to_client = tap
    alice = world.alice
    b_got: list[tuple[int, str]] = []
    await read_all(alice.stream("llm", "generate", Prompt(text="B", tokens=10), Token), b_got)
    (b_rid,) = tap.order
    b_frames = {header(f).seq: f for f in tap.frames[b_rid]}  # type: ignore[union-attr]
    tap.rule = lambda frame, hdr: [b_frames[2]] if hdr.seq == 2 else [frame]
    got: list[tuple[int, str]] = []
    with pytest.raises(mesh.StreamBroken, match="frame 2 is missing"):
        await read_all(alice.stream("llm", "generate", Prompt(text="A", tokens=10), Token), got)
    assert got == world.tokens("A", 2)


async def test_the_end_of_a_finished_stream_cannot_cut_another_short(world: World) -> None:
    """The genuine end frame of a finished 4-chunk stream (``sq`` 4, ``end``, OK) delivered into a
    10-chunk stream just before its own frame 4: dropped, the stream goes on to its end."""
    tap = ReplyTap()
    world.proxy.to_client = tap
    alice = world.alice
    short: list[tuple[int, str]] = []
    await read_all(alice.stream("llm", "generate", Prompt(text="S", tokens=4), Token), short)
    (s_rid,) = tap.order
    end_frame = tap.frames[s_rid][-1]
    end_hdr = header(end_frame)
    assert end_hdr is not None and end_hdr.end is True and end_hdr.seq == 4
    tap.rule = lambda frame, hdr: [end_frame, frame] if hdr.seq == 4 else [frame]
    before = alice.stats.dropped_replies
    got: list[tuple[int, str]] = []
    await read_all(alice.stream("llm", "generate", Prompt(text="L", tokens=10), Token), got)
    assert got == world.tokens("L", 10)
    assert alice.stats.dropped_replies - before == 1


# --- the end withheld -------------------------------------------------------------------------


async def test_a_withheld_end_fails_at_the_deadline_not_silently(world: World) -> None:
    tap = ReplyTap()
    tap.rule = lambda frame, hdr: [] if hdr.end else [frame]
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    started = time.monotonic()
    with pytest.raises(mesh.DeadlineExceeded, match="did not end before the deadline"):
        await read_all(
            world.alice.stream("llm", "generate", Prompt(text="e", tokens=6), Token, timeout=1.0),
            got,
        )
    elapsed = time.monotonic() - started
    assert got == world.tokens("e", 6)  # every chunk, then the error: never a clean end
    assert 0.8 < elapsed < 3.0


async def test_a_withheld_end_fails_at_the_idle_timeout(world: World) -> None:
    tap = ReplyTap()
    tap.rule = lambda frame, hdr: [] if hdr.end else [frame]
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    started = time.monotonic()
    with pytest.raises(mesh.DeadlineExceeded, match="idle timeout"):
        await read_all(
            world.alice.stream(
                "llm", "generate", Prompt(text="i", tokens=6), Token, timeout=20, idle_timeout=0.4
            ),
            got,
        )
    assert got == world.tokens("i", 6)
    assert time.monotonic() - started < 3.0


async def test_a_broker_gone_silent_mid_stream_fails_at_the_idle_timeout_and_frees_the_callee(
    world: World,
) -> None:
    """The broker delivers chunks 0 to 2 and nothing after: the caller fails at its idle
    timeout, long before its deadline, and stops the producer (still waiting for credit)
    rather than leaving it to its own deadline or ``Timeouts.credit_wait``."""
    tap = ReplyTap()
    tap.rule = lambda frame, hdr: [] if (hdr.seq or 0) >= 3 else [frame]
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    with pytest.raises(mesh.DeadlineExceeded, match="idle timeout"):
        await read_all(
            world.alice.stream(
                "llm",
                "generate",
                Prompt(text="q", tokens=200),
                Token,
                credit=8,
                timeout=20,
                idle_timeout=0.4,
            ),
            got,
        )
    assert got == world.tokens("q", 3)
    await wait_until(lambda: world.log.cleaned["q"] == 1, timeout=3)
    assert world.log.cancelled["q"] == 1


# --- forged and altered frames ----------------------------------------------------------------


async def test_frames_forged_without_keys_are_dropped_and_the_stream_completes(
    world: World,
) -> None:
    """A client with NATS access reads the request off the wire (ids, instances and reply
    subject are cleartext), then while the handler holds at chunk 5 sends alice chunk 5, an
    OK end, an error end (sealed with a key of its own), an unsealed end and junk."""
    alice, llm, log = world.alice, world.llm, world.log
    async with attacker(world.url) as nc:
        requests: list[Msg] = []

        async def sniff(msg: Msg) -> None:
            requests.append(msg)

        await nc.subscribe("mesh.rpc.llm.>", cb=sniff)
        await nc.flush()
        stream = alice.stream("llm", "generate", Prompt(text="g", tokens=10, hold_at=5), Token)
        it = aiter(stream)
        got = [(t.i, t.text) for t in [await anext(it) for _ in range(5)]]
        await wait_until(lambda: len(requests) == 1, timeout=WAIT)
        req = requests[0]
        hdr = header(req.data)
        assert hdr is not None and hdr.kind == Kind.REQUEST and req.reply

        def forged(seq: int, end: bool, status: str, body: bytes, sealed: bool = True) -> bytes:
            aad = reply_header(
                os.urandom(16), int(time.time() * 1000), "llm", llm.instance, "alice",
                alice.instance, hdr.id, status, seq, end,
            )  # fmt: skip
            return seal_frame(os.urandom(32), aad, body) if sealed else aad + body

        fakes = [
            forged(5, False, "OK", b'{"i":5,"text":"forged"}'),
            forged(5, True, "OK", b""),
            forged(5, True, "PERMISSION_DENIED", b'{"message":"forged"}'),
            forged(5, True, "OK", b"", sealed=False),
            forged(5, False, "OK", b'{"i":5,"text":"forged"}' + bytes(40), sealed=False),
            b"\x4d\x01junk",
        ]
        before = alice.stats.dropped_replies
        for fake in fakes:
            await nc.publish(req.reply, fake)
        await nc.flush()
        await wait_until(lambda: alice.stats.dropped_replies - before == len(fakes), timeout=WAIT)
    log.gates["g"].set()
    async for t in it:
        got.append((t.i, t.text))
    assert got == world.tokens("g", 10)
    assert log.cancelled["g"] == 0


async def test_altered_frames_are_dropped_and_the_genuine_one_is_taken(world: World) -> None:
    """Before chunk 3 the broker delivers copies of it altered: a bit of the ciphertext, of the
    tag, its header marked as the end, renumbered as chunk 3's successor... dropped; then the
    genuine chunk 3, and the stream completes."""
    tap = ReplyTap()
    altered: list[bytes] = []

    def alter(frame: bytes, hdr: Header) -> list[bytes]:
        if hdr.seq != 3:
            return [frame]
        body = body_offset(frame)
        altered.extend(
            [
                flip(frame, body + 24 + 1),  # ciphertext (after the 24-byte nonce)
                flip(frame, -1),  # tag
                flip(frame, body),  # nonce
                flip(frame, PREFIX_LEN + 3),  # a header byte
                rewrite_header(frame, end=True),  # "the last one"
                rewrite_header(frame, st="PERMISSION_DENIED", end=True),
                rewrite_header(frame, sq=4),
            ]
        )
        return [*altered, frame]

    tap.rule = alter
    world.proxy.to_client = tap
    before = world.alice.stats.dropped_replies
    got: list[tuple[int, str]] = []
    await read_all(world.alice.stream("llm", "generate", Prompt(text="x", tokens=8), Token), got)
    assert got == world.tokens("x", 8)
    assert len(altered) == 7
    assert world.alice.stats.dropped_replies - before == 7


async def test_an_altered_frame_in_place_of_the_genuine_one_breaks_the_stream(
    world: World,
) -> None:
    tap = ReplyTap()
    tap.rule = lambda frame, hdr: [flip(frame, -3)] if hdr.seq == 3 else [frame]
    world.proxy.to_client = tap
    got: list[tuple[int, str]] = []
    with pytest.raises(mesh.StreamBroken, match="frame 3 is missing"):
        await read_all(
            world.alice.stream("llm", "generate", Prompt(text="y", tokens=8), Token), got
        )
    assert got == world.tokens("y", 3)


# --- a callee beyond its credit ---------------------------------------------------------------


async def test_a_callee_that_sends_beyond_its_credit_breaks_the_stream(world: World) -> None:
    """A malicious ``llm`` (its own real identity and seals) that ignores the credit it was
    granted: the fifth chunk of a stream granted 4 breaks it; the four before are yielded."""
    server = world.llm.server
    assert server is not None
    endpoint = server.endpoint

    def greedy(ex: Exchange) -> None:
        endpoint(ex)
        ex.credit = 10**6  # as if the caller had granted all it wants

    server.accept_stages = (greedy, server.authorize)
    stream = world.alice.stream("llm", "generate", Prompt(text="c", tokens=30), Token, credit=4)
    it = aiter(stream)
    first = await anext(it)
    got = [(first.i, first.text)]
    await wait_until(lambda: world.log.cleaned["c"] == 1, timeout=WAIT)  # all 30 sent
    with pytest.raises(mesh.StreamBroken, match="more than the 4 chunks granted"):
        async for t in it:
            got.append((t.i, t.text))
    assert got == world.tokens("c", 4)


# --- CONTROL frames ---------------------------------------------------------------------------


async def test_forged_cancels_do_not_cancel_the_handler(world: World) -> None:
    """Stream Y runs (held by its credit of 4). Against it: a cancel sealed with a key of the
    forger's own, one not sealed at all, mallory's cancels (in its own name, and in alice's
    sealed with mallory's pair key), a forged credit, and alice's genuine cancel of another
    call X with its ``re`` rewritten to Y's. None does anything but count; the genuine cancel
    of X cancels X; replayed once X has ended, it does nothing."""
    alice, llm, log, trust = world.alice, world.llm, world.log, world.trust
    tap = ControlTap()

    def hold_cancels(frame: bytes, hdr: Header) -> list[bytes]:
        if hdr.op == "cancel":
            return []  # the broker keeps alice's cancels to itself
        return [frame]

    tap.rule = hold_cancels
    world.proxy.to_server = tap
    y = alice.stream("llm", "generate", Prompt(text="Y", tokens=100), Token, credit=4)
    y_iter = aiter(y)
    y_got = [(t.i, t.text) for t in [await anext(y_iter)]]
    (y_rid,) = tap.requests
    await wait_until(lambda: y_rid in world.served and world.served[y_rid].sent == 4)
    y_ex = world.served[y_rid]
    subject = f"mesh.rpc.llm.{llm.instance}.generate"

    # X: opened, one chunk read, left: alice sends its cancel, which the broker holds.
    x = alice.stream("llm", "generate", Prompt(text="X", tokens=100), Token, credit=4)
    async with x:
        await anext(aiter(x))
    x_rid = tap.requests[1]
    await wait_until(lambda: len(tap.of(x_rid, "cancel")) == 1, timeout=WAIT)
    ((x_subject, x_cancel),) = tap.of(x_rid, "cancel")
    assert x_subject == subject
    assert log.cancelled["X"] == 0  # the broker has it

    mallory = trust.identity("mallory")
    k_mallory = derive_pair_key(mallory.keys.box, llm.identity.certificate.box_pk)

    def control(
        key: bytes | None, fa: str, fi: str, op: str = "cancel", cr: int | None = None
    ) -> bytes:
        aad = control_header(
            os.urandom(16), int(time.time() * 1000), fa, fi, "llm", llm.instance, y_rid, op, cr
        )
        return aad if key is None else seal_frame(key, aad, b"")

    forged = [
        control(os.urandom(32), "alice", alice.instance),  # no key: its own
        control(None, "alice", alice.instance),  # no seal
        control(k_mallory, "mallory", mallory.instance),  # an insider, in its own name
        control(k_mallory, "alice", alice.instance),  # an insider, in alice's name
        control(k_mallory, "alice", alice.instance, "credit", 1000),  # credit, ditto
        control(os.urandom(32), "alice", alice.instance, "credit", 1000),
        rewrite_header(x_cancel, re=y_rid),  # alice's genuine cancel of X, aimed at Y
    ]
    stats = llm.stats
    before = stats.dropped_controls
    async with attacker(world.url) as nc:
        for frame in forged:
            await nc.publish(subject, frame)
        await nc.flush()
        await wait_until(lambda: stats.dropped_controls - before == len(forged), timeout=WAIT)
        assert log.cancelled["Y"] == 0 and log.cleaned["Y"] == 0
        assert y_ex.credit == 4 and y_ex.sent == 4 and not y_ex.cancelled
        assert y_rid in world.served

        # The genuine cancel of X, released: X stops (it was genuine, and still acted on).
        await nc.publish(subject, x_cancel)
        await nc.flush()
        await wait_until(lambda: log.cleaned["X"] == 1, timeout=WAIT)
        assert log.cancelled["X"] == 1
        await wait_until(lambda: x_rid not in world.served)

        # Replayed after X ended: nothing to cancel, counted, Y untouched.
        before = stats.dropped_controls
        await nc.publish(subject, x_cancel)
        await nc.flush()
        await wait_until(lambda: stats.dropped_controls - before == 1, timeout=WAIT)
    assert log.cancelled["Y"] == 0 and log.cancelled["X"] == 1

    tap.rule = lambda frame, _hdr: [frame]
    async for t in y_iter:
        y_got.append((t.i, t.text))
    assert y_got == world.tokens("Y", 100)
    assert log.cancelled["Y"] == 0 and log.cleaned["Y"] == 1


async def test_replayed_credit_frames_grant_nothing_new(world: World) -> None:
    """Alice reads 6 chunks of a stream granted 4 (credit 6, 8, then 10 in total) and stops.
    The broker re-sends each of her credit frames 20 times: the producer stays at 10."""
    alice, llm, log = world.alice, world.llm, world.log
    tap = ControlTap()
    world.proxy.to_server = tap
    stream = alice.stream("llm", "generate", Prompt(text="k", tokens=60), Token, credit=4)
    it = aiter(stream)
    got = [(t.i, t.text) for t in [await anext(it) for _ in range(6)]]
    (rid,) = tap.requests
    await wait_until(lambda: len(tap.of(rid, "credit")) == 3, timeout=WAIT)
    credits = [header(f).credit for _s, f in tap.of(rid, "credit")]  # type: ignore[union-attr]
    assert credits == [6, 8, 10]
    await wait_until(lambda: world.served[rid].sent == 10, timeout=WAIT)
    ex = world.served[rid]
    subject = f"mesh.rpc.llm.{llm.instance}.generate"
    stats = llm.stats
    refused = sum(stats.refused.values())
    async with attacker(world.url) as nc:
        for _ in range(20):
            for _s, frame in tap.of(rid, "credit"):
                await nc.publish(subject, frame)
        # Junk after the copies, refused and counted: llm reads its subject in order, so once
        # it is counted every copy has been handled.
        await nc.publish(subject, b"\x4d\x01sentinel")
        await nc.flush()
        await wait_until(lambda: sum(stats.refused.values()) > refused, timeout=WAIT)
    await asyncio.sleep(0.2)  # room for a chunk the copies would have let out
    assert ex.credit == 10 and ex.sent == 10
    assert log.produced["k"] <= 11  # 10 sent, one made and waiting at its yield
    async for t in it:
        got.append((t.i, t.text))
    assert got == world.tokens("k", 60)
