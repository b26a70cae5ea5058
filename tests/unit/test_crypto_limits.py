"""Sealing, event signatures, pair keys and the replay guard at their exact limits, each refusal
fed the input it refuses (``docs/protocol.md`` §6 to §8 and §15)."""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from mesh._core.crypto import (
    NONCE_LEN,
    SIG_LEN,
    TAG_LEN,
    UNVERIFIED,
    PairKeys,
    ReplayGuard,
    derive_pair_key,
    open_body,
    open_frame,
    seal_body,
    seal_frame,
    sign_frame,
    signed_event_bytes,
    verify_frame,
)
from mesh.errors import Unauthenticated
from mesh.testing import FakeClock

NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)
# X25519 points of small order: the shared secret with any key is all zeros, and libsodium
# refuses it (RFC 7748 section 6.1; the list of libsodium's blocklist).
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


def _id(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def key() -> bytes:
    return derive_pair_key(PrivateKey.generate(), bytes(PrivateKey.generate().public_key))


class TestPairKeyRefusals:
    @pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
    def test_low_order_key_refused(self, point: bytes) -> None:
        """A low-order X25519 public key is Unauthenticated, and nothing is cached for it."""
        pairs = PairKeys(PrivateKey.generate())

        with pytest.raises(Unauthenticated, match=r"peer box key is not a usable X25519 key$"):
            pairs.get(point)

        assert point not in pairs._keys

    @pytest.mark.parametrize("size", [0, 31, 33])
    def test_key_of_wrong_length_refused(self, size: int) -> None:
        """A peer box key that is not 32 bytes is Unauthenticated saying so."""
        with pytest.raises(Unauthenticated, match=r"peer box key must be 32 bytes$"):
            PairKeys(PrivateKey.generate()).get(bytes(range(size)))

    def test_cache_drops_the_oldest(self) -> None:
        """At max_entries the oldest key is dropped to make room, never a newer one."""
        pairs = PairKeys(PrivateKey.generate(), max_entries=3)
        peers = [bytes(PrivateKey.generate().public_key) for _ in range(4)]

        for peer in peers[:3]:
            pairs.get(peer)
        assert list(pairs._keys) == peers[:3]
        pairs.get(peers[3])

        assert list(pairs._keys) == peers[1:]

    def test_cached_key_is_the_derived_key(self) -> None:
        """The cache returns the derived key, for the cache's prefix."""
        own, peer = PrivateKey.generate(), bytes(PrivateKey.generate().public_key)
        pairs = PairKeys(own, "p")

        assert pairs.get(peer) == pairs.get(peer) == derive_pair_key(own, peer, "p")
        assert len(pairs.get(peer)) == 32


class TestSealLimits:
    def test_empty_plaintext_round_trips(self, key: bytes) -> None:
        """An empty body seals to nonce and tag alone, and opens."""
        sealed = seal_body(key, b"hdr", b"")

        assert len(sealed) == NONCE_LEN + TAG_LEN == 40
        assert open_body(key, b"hdr", sealed) == b""

    def test_one_byte_short_refused(self, key: bytes) -> None:
        """A body one byte shorter than nonce and tag is refused before any decryption."""
        with pytest.raises(Unauthenticated, match=r"sealed body too short$"):
            open_body(key, b"hdr", bytes(NONCE_LEN + TAG_LEN - 1))

    @pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
    def test_key_of_wrong_length_refused(self, key: bytes, size: int) -> None:
        """A key that is not 32 bytes is refused (libsodium would read past a short one)."""
        sealed = seal_body(key, b"hdr", b"body")

        with pytest.raises(Unauthenticated, match=r"sealed body too short$"):
            open_body(bytes(size), b"hdr", sealed)

    def test_seal_frame_layout(self, key: bytes) -> None:
        """seal_frame gives header, then nonce, then ciphertext and tag; open_frame opens it."""
        frame = seal_frame(key, b"header", b"plaintext")

        assert frame.startswith(b"header")
        assert len(frame) == len(b"header") + NONCE_LEN + len(b"plaintext") + TAG_LEN
        assert open_frame(key, frame, len(b"header")) == b"plaintext"
        assert seal_body(key, b"header", b"p")[:NONCE_LEN] != seal_body(key, b"header", b"p")[:24]

    def test_altered_header_refused(self, key: bytes) -> None:
        """A frame whose header changed does not open, with the reason."""
        frame = bytearray(seal_frame(key, b"header", b"plaintext"))
        frame[0] ^= 1

        with pytest.raises(Unauthenticated, match="seal does not verify: body or header was"):
            open_frame(key, bytes(frame), 6)


class TestEventSignatureLimits:
    def test_signed_bytes_layout(self) -> None:
        """The signature covers the prefix's length (one byte), the prefix and the frame."""
        assert signed_event_bytes("mesh", b"frame") == b"\x04meshframe"
        assert signed_event_bytes("", b"f") == b"\x00f"

    def test_signature_over_an_empty_frame_verifies(self) -> None:
        """A frame of exactly 64 bytes (a signature over nothing) verifies, giving b""."""
        signing = SigningKey.generate()
        frame = sign_frame(signing, b"", "mesh")

        assert len(frame) == SIG_LEN == 64
        assert verify_frame(bytes(signing.verify_key), frame, "mesh") == b""

    def test_frame_of_sixty_four_bytes_is_checked(self) -> None:
        """64 bytes that are no signature fail the signature check, not the length check."""
        pk = bytes(SigningKey.generate().verify_key)

        with pytest.raises(Unauthenticated, match=r"^UNAUTHENTICATED: event signature does not"):
            verify_frame(pk, bytes(64))
        with pytest.raises(Unauthenticated, match=r"event too short to carry a signature$"):
            verify_frame(pk, bytes(63))

    def test_default_prefix_is_mesh(self) -> None:
        """Without a prefix, events are signed and verified under "mesh"."""
        signing = SigningKey.generate()
        frame = b"frame" + sign_frame(signing, b"frame")
        pk = bytes(signing.verify_key)

        assert verify_frame(pk, frame, "mesh") == b"frame"
        with pytest.raises(Unauthenticated):
            verify_frame(pk, frame, "other")


class TestReplayLimits:
    def test_at_the_start_accepted(self) -> None:
        """A timestamp exactly at not_before_ms is accepted; one ms before is refused."""
        guard = ReplayGuard(60, not_before_ms=NOW_MS, clock=FakeClock(NOW))

        guard.check(_id(1), NOW_MS)
        with pytest.raises(Unauthenticated, match=r"^UNAUTHENTICATED: request predates this"):
            guard.check(_id(1), NOW_MS - 1)

    def test_predates_names_the_noun(self) -> None:
        """The refusal of a message from before the start uses the guard's noun."""
        guard = ReplayGuard(60, not_before_ms=NOW_MS, noun="event", clock=FakeClock(NOW))

        with pytest.raises(Unauthenticated, match=r"event predates this instance's start$"):
            guard.check(_id(1), NOW_MS - 1)

    def test_window_and_skew_in_seconds(self) -> None:
        """The window and skew are given in seconds and kept in milliseconds."""
        guard = ReplayGuard(2.5, max_future=0.25)

        assert (guard.window_ms, guard.future_ms) == (2500, 250)

    def test_entry_at_the_horizon_is_still_refused(self) -> None:
        """An id exactly one window old is still remembered: its replay is refused."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, clock=clock)
        guard.record(_id(1), NOW_MS)
        clock.now = NOW + 60  # now the first id's timestamp is exactly at the window's edge
        guard.record(_id(2), NOW_MS + 60_000)  # recording prunes what left the window

        with pytest.raises(Unauthenticated, match=r"replayed message id$"):
            guard.check(_id(1), NOW_MS)

    def test_entry_past_the_horizon_is_forgotten(self) -> None:
        """One ms later the id is forgotten (the window check refuses it instead)."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, clock=clock)
        guard.record(_id(1), NOW_MS)
        clock.now = NOW + 60.001
        guard.record(_id(2), NOW_MS + 60_001)

        assert len(guard) == 1
        with pytest.raises(Unauthenticated, match=r"older than the replay window$"):
            guard.check(_id(1), NOW_MS)

    def test_sender_floor_itself_refused(self) -> None:
        """A message dated exactly at its sender's floor is refused; one ms later passes."""
        guard = ReplayGuard(60, max_entries=1, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS, sender="a")
        guard.record(_id(2), NOW_MS, sender="b")  # evicts a's id: a's floor is NOW_MS

        with pytest.raises(Unauthenticated, match=r"older than its sender's replay floor$"):
            guard.check(_id(3), NOW_MS, sender="a")
        guard.check(_id(3), NOW_MS + 1, sender="a")
        guard.check(_id(3), NOW_MS, sender="b")

    def test_entry_evicted_at_the_horizon_raises_its_floor(self) -> None:
        """An id evicted while exactly at the window's edge still raises its sender's floor."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, max_entries=1, clock=clock)
        guard.record(_id(1), NOW_MS - 60_000, sender="a")
        guard.record(_id(2), NOW_MS, sender="b")

        with pytest.raises(Unauthenticated, match=r"sender's replay floor$"):
            guard.check(_id(1), NOW_MS - 60_000, sender="a")

    def test_sender_without_floor_has_none(self) -> None:
        """While other senders have floors, a sender with none is not refused, however early
        its timestamp within the window."""
        clock = FakeClock(0.5)
        guard = ReplayGuard(60, max_entries=1, clock=clock)
        guard.record(_id(1), 400, sender="a")
        guard.record(_id(2), 450, sender="b")  # a now has a floor (400)

        guard.check(_id(3), 1, sender="c")

    def test_one_entry_at_least(self) -> None:
        """max_entries below 1 still keeps one id; max_senders below 1 one floor."""
        guard = ReplayGuard(60, max_entries=0, max_senders=0, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS, sender="a")

        assert len(guard) == 1
        with pytest.raises(Unauthenticated, match="replayed"):
            guard.check(_id(1), NOW_MS)
        guard.record(_id(2), NOW_MS, sender="b")  # evicts a's id: a's floor rises
        assert guard._floors == {"a": NOW_MS}
        guard.record(_id(3), NOW_MS + 1, sender="c")  # evicts b's: b's floor pushes a's out
        assert guard._floors == {"b": NOW_MS}
        assert guard._floor_ms == NOW_MS

    def test_shared_floor_itself_refused(self) -> None:
        """Once the floors overflow into the shared floor, a message dated at it is refused."""
        guard = ReplayGuard(60, max_entries=1, max_senders=1, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS, sender="a")
        guard.record(_id(2), NOW_MS + 1, sender="b")  # a's floor: NOW_MS
        guard.record(_id(3), NOW_MS + 2, sender="c")  # b's floor pushes a's into the shared

        assert guard._floor_ms == NOW_MS
        with pytest.raises(Unauthenticated, match=r"older than the replay window$"):
            guard.check(_id(4), NOW_MS, sender="z")
        guard.check(_id(4), NOW_MS + 1, sender="z")

    def test_floors_below_the_window_are_dropped_first(self) -> None:
        """When the floors are full, those below the window go before any is folded into the
        shared floor."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, max_entries=1, max_senders=1, clock=clock)
        guard.record(_id(1), NOW_MS, sender="a")
        guard.record(_id(2), NOW_MS, sender="b")  # a's floor: NOW_MS
        clock.now = NOW + 59.999  # a's floor is still inside the window...
        guard.record(_id(3), NOW_MS + 59_999, sender="c")  # ...so b's folds a's into shared
        assert guard._floor_ms == NOW_MS

        clock.now = NOW + 130
        guard.record(_id(4), NOW_MS + 130_000, sender="d")  # c's id left the window: no floor
        guard.record(_id(5), NOW_MS + 130_000, sender="e")  # d's id evicted: b's floor is old
        assert guard._floors == {"d": NOW_MS + 130_000}
        assert guard._floor_ms == NOW_MS

    def test_floor_never_lowered(self) -> None:
        """Evicting an older id of a sender never lowers its floor."""
        guard = ReplayGuard(60, max_entries=2, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS + 10, sender="a")
        guard.record(_id(2), NOW_MS, sender="a")
        guard.record(_id(3), NOW_MS, sender="b")  # evicts a's +10: floor NOW_MS + 10
        guard.record(_id(4), NOW_MS, sender="b")  # evicts a's +0: the floor stays

        assert guard._floors["a"] == NOW_MS + 10

    def test_unverified_sender_never_gets_a_floor(self) -> None:
        """An id recorded as UNVERIFIED raises no floor when evicted."""
        guard = ReplayGuard(60, max_entries=1, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS, sender=UNVERIFIED)
        guard.record(_id(2), NOW_MS, sender="b")

        assert guard._floors == {}


class TestDefaults:
    def test_replay_guard_defaults(self) -> None:
        """By default: a 60 s window, 5 s of skew, 100 000 ids, 4096 sender floors, no start."""
        guard = ReplayGuard()

        assert (guard.window_ms, guard.future_ms, guard.not_before_ms) == (60_000, 5_000, 0)
        assert (guard._max, guard._max_senders) == (100_000, 4096)

    def test_pair_key_cache_default(self) -> None:
        """The pair-key cache keeps 8192 peers unless told otherwise."""
        assert PairKeys(PrivateKey.generate())._max == 8192


class TestFloorBookkeeping:
    def test_updating_a_known_sender_folds_nothing(self) -> None:
        """Raising the floor of a sender that has one never folds floors into the shared one,
        even with the floors full."""
        guard = ReplayGuard(60, max_entries=1, max_senders=1, clock=FakeClock(NOW))
        for i in range(3):
            guard.record(_id(i), NOW_MS + i, sender="a")

        assert guard._floors == {"a": NOW_MS + 1}
        assert guard._floor_ms == 0
        guard.check(_id(9), NOW_MS, sender="z")

    def test_floor_at_the_horizon_is_still_live(self) -> None:
        """A floor exactly at the window's edge still counts: with the floors full it is
        folded into the shared floor, not dropped."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, max_entries=1, max_senders=1, clock=clock)
        guard.record(_id(1), NOW_MS, sender="a")
        guard.record(_id(2), NOW_MS, sender="b")  # a's floor: NOW_MS
        clock.now = NOW + 60  # the horizon is NOW_MS now

        guard.record(_id(3), NOW_MS + 60_000, sender="c")  # evicts b's: b needs a floor

        assert guard._floors == {"b": NOW_MS}
        assert guard._floor_ms == NOW_MS
