"""Unit tests for mesh.crypto: pair keys, sealing, event signatures and the replay guard."""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from mesh._core.crypto import (
    NONCE_LEN,
    TAG_LEN,
    UNVERIFIED,
    PairKeys,
    ReplayGuard,
    derive_pair_key,
    open_body,
    seal_body,
    sign_frame,
    verify_frame,
)
from mesh.errors import Unauthenticated
from mesh.testing import FakeClock

NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)


def _id(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def key() -> bytes:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    return derive_pair_key(a, bytes(b.public_key))


class TestPairKeys:
    def test_symmetric(self) -> None:
        """A's key with B's public key equals B's key with A's public key."""
        a, b = PrivateKey.generate(), PrivateKey.generate()

        assert derive_pair_key(a, bytes(b.public_key)) == derive_pair_key(b, bytes(a.public_key))

    def test_cache_symmetric(self) -> None:
        """PairKeys of both sides return the same 32-byte key."""
        a, b = PrivateKey.generate(), PrivateKey.generate()

        ka = PairKeys(a).get(bytes(b.public_key))
        kb = PairKeys(b).get(bytes(a.public_key))

        assert ka == kb
        assert len(ka) == 32

    def test_distinct_peers_distinct_keys(self) -> None:
        """Different peers give different pair keys."""
        a, b, c = (PrivateKey.generate() for _ in range(3))
        pairs = PairKeys(a)

        assert pairs.get(bytes(b.public_key)) != pairs.get(bytes(c.public_key))

    def test_prefix_bound_into_the_key(self) -> None:
        """The same two keys under another subject prefix give another pair key."""
        a, b = PrivateKey.generate(), PrivateKey.generate()
        peer = bytes(b.public_key)

        assert derive_pair_key(a, peer, "mesh") != derive_pair_key(a, peer, "mesh2")
        assert PairKeys(a, "mesh2").get(peer) == derive_pair_key(b, bytes(a.public_key), "mesh2")
        assert PairKeys(a, "mesh2").get(peer) != PairKeys(a, "mesh").get(peer)

    def test_bad_peer_key_length_refused(self) -> None:
        """A peer box key that is not 32 bytes is Unauthenticated."""
        with pytest.raises(Unauthenticated, match="32 bytes"):
            PairKeys(PrivateKey.generate()).get(b"short")

    def test_cache_bounded(self) -> None:
        """The cache holds at most max_entries keys and still answers for evicted peers."""
        own = PrivateKey.generate()
        pairs = PairKeys(own, max_entries=2)
        peers = [bytes(PrivateKey.generate().public_key) for _ in range(5)]

        keys = [pairs.get(p) for p in peers]

        assert len(pairs._keys) == 2
        assert pairs.get(peers[0]) == keys[0]


class TestSeal:
    def test_round_trip(self, key: bytes) -> None:
        """open_body returns what seal_body sealed, bound to the same aad."""
        sealed = seal_body(key, b"header", b"plaintext")

        assert open_body(key, b"header", sealed) == b"plaintext"
        assert open_body(key, b"header", memoryview(sealed)) == b"plaintext"
        assert len(sealed) == NONCE_LEN + len(b"plaintext") + TAG_LEN

    def test_fresh_nonce_each_seal(self, key: bytes) -> None:
        """Sealing the same plaintext twice gives different ciphertexts."""
        assert seal_body(key, b"h", b"p") != seal_body(key, b"h", b"p")

    def test_wrong_aad_refused(self, key: bytes) -> None:
        """Opening with other associated data is Unauthenticated."""
        sealed = seal_body(key, b"header", b"plaintext")

        with pytest.raises(Unauthenticated, match="altered"):
            open_body(key, b"headex", sealed)

    def test_wrong_key_refused(self, key: bytes) -> None:
        """Opening with another key is Unauthenticated."""
        sealed = seal_body(key, b"header", b"plaintext")

        with pytest.raises(Unauthenticated):
            open_body(bytes(32), b"header", sealed)

    def test_every_flipped_byte_refused(self, key: bytes) -> None:
        """Flipping any byte of nonce, ciphertext or tag is Unauthenticated."""
        sealed = seal_body(key, b"header", b"plaintext")

        for i in range(len(sealed)):
            tampered = bytearray(sealed)
            tampered[i] ^= 0x01
            with pytest.raises(Unauthenticated):
                open_body(key, b"header", bytes(tampered))

    def test_too_short_refused(self, key: bytes) -> None:
        """A sealed body shorter than nonce plus tag is Unauthenticated."""
        with pytest.raises(Unauthenticated, match="too short"):
            open_body(key, b"", bytes(NONCE_LEN + TAG_LEN - 1))


class TestEventSignature:
    def test_round_trip(self) -> None:
        """verify_frame accepts a signed frame and returns the signed bytes."""
        sk = SigningKey.generate()
        frame = b"header+body"

        signed = frame + sign_frame(sk, frame)

        assert verify_frame(bytes(sk.verify_key), signed) == frame

    def test_tampered_refused(self) -> None:
        """A changed byte in a signed frame is Unauthenticated."""
        sk = SigningKey.generate()
        signed = bytearray(b"header+body" + sign_frame(sk, b"header+body"))
        signed[0] ^= 0x01

        with pytest.raises(Unauthenticated, match="does not verify"):
            verify_frame(bytes(sk.verify_key), bytes(signed))

    def test_other_signer_refused(self) -> None:
        """A frame signed by another key is Unauthenticated."""
        sk, other = SigningKey.generate(), SigningKey.generate()
        signed = b"frame" + sign_frame(other, b"frame")

        with pytest.raises(Unauthenticated):
            verify_frame(bytes(sk.verify_key), signed)

    def test_other_prefix_refused(self) -> None:
        """A frame signed under one subject prefix does not verify under another."""
        sk = SigningKey.generate()
        signed = b"header+body" + sign_frame(sk, b"header+body", "mesh")

        assert verify_frame(bytes(sk.verify_key), signed, "mesh") == b"header+body"
        with pytest.raises(Unauthenticated, match="does not verify"):
            verify_frame(bytes(sk.verify_key), signed, "mesh2")

    def test_too_short_refused(self) -> None:
        """A frame shorter than a signature is Unauthenticated."""
        with pytest.raises(Unauthenticated, match="too short"):
            verify_frame(bytes(SigningKey.generate().verify_key), bytes(63))


class TestReplayGuard:
    def test_fresh_message_accepted(self) -> None:
        """A new id with a current timestamp passes check."""
        guard = ReplayGuard(60, clock=FakeClock(NOW))

        guard.check(_id(1), NOW_MS)

    def test_replay_refused(self) -> None:
        """A recorded id is refused when seen again."""
        guard = ReplayGuard(60, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS)

        with pytest.raises(Unauthenticated, match="replayed"):
            guard.check(_id(1), NOW_MS)

    def test_check_records_nothing(self) -> None:
        """check alone does not remember the id."""
        guard = ReplayGuard(60, clock=FakeClock(NOW))

        guard.check(_id(1), NOW_MS)
        guard.check(_id(1), NOW_MS)

        assert len(guard) == 0

    def test_stale_refused(self) -> None:
        """A timestamp older than the window is refused."""
        guard = ReplayGuard(60, clock=FakeClock(NOW))

        with pytest.raises(Unauthenticated, match="older than the replay window"):
            guard.check(_id(1), NOW_MS - 60_001)

    def test_edge_of_window_accepted(self) -> None:
        """Timestamps exactly one window old or max_future ahead are still accepted."""
        guard = ReplayGuard(60, max_future=5, clock=FakeClock(NOW))

        guard.check(_id(1), NOW_MS - 60_000)
        guard.check(_id(2), NOW_MS + 5_000)

    def test_future_beyond_skew_refused(self) -> None:
        """A timestamp further ahead than max_future is refused."""
        guard = ReplayGuard(60, max_future=5, clock=FakeClock(NOW))

        with pytest.raises(Unauthenticated, match="future"):
            guard.check(_id(1), NOW_MS + 5_001)

    def test_default_future_skew_is_a_few_seconds(self) -> None:
        """By default a timestamp 55 s ahead (inside the old 60 s allowance) is refused."""
        guard = ReplayGuard(60, clock=FakeClock(NOW))

        with pytest.raises(Unauthenticated, match="future"):
            guard.check(_id(1), NOW_MS + 55_000)

    def test_timestamp_before_start_refused(self) -> None:
        """A timestamp before not_before_ms (the instance's start) is refused, naming it."""
        guard = ReplayGuard(60, not_before_ms=NOW_MS, clock=FakeClock(NOW + 1))

        with pytest.raises(Unauthenticated, match="predates this instance's start"):
            guard.check(_id(1), NOW_MS - 1)
        guard.check(_id(2), NOW_MS)

    def test_caller_behind_refused_only_until_it_passes_the_start(self) -> None:
        """A caller 3 s behind is refused for 3 s after a start, then passes."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, not_before_ms=NOW_MS, clock=clock)

        with pytest.raises(Unauthenticated, match="predates"):
            guard.check(_id(1), int((clock.now - 3) * 1000))
        clock.advance(3)
        guard.check(_id(2), int((clock.now - 3) * 1000))

    def test_future_flood_does_not_refuse_another_sender(self) -> None:
        """A full cache of one sender's ids dated 5 s ahead leaves another sender's present
        id accepted."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, max_future=5, max_entries=100, clock=clock)
        for n in range(1000):  # each dated later than the last, as a flooder's clock moves
            guard.check(_id(n), NOW_MS + 4_000 + n, "mallory")
            guard.record(_id(n), NOW_MS + 4_000 + n, "mallory")

        guard.check(_id(5000), NOW_MS, "alice")
        guard.record(_id(5000), NOW_MS, "alice")
        assert len(guard) == 100

    def test_future_flood_raises_only_the_flooders_floor(self) -> None:
        """An evicted flood id is refused for its sender; the floor never passes now + 5 s."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, max_future=5, max_entries=10, clock=clock)
        for n in range(20):
            guard.record(_id(n), NOW_MS + 5_000, "mallory")

        with pytest.raises(Unauthenticated, match="replay floor"):
            guard.check(_id(0), NOW_MS + 5_000, "mallory")
        clock.advance(5.001)
        guard.check(_id(99), int(clock.now * 1000), "mallory")

    def test_honest_entries_evicted_by_a_flood_stay_refused(self) -> None:
        """An honest id pushed out by a flood is still refused when replayed."""
        guard = ReplayGuard(60, max_entries=10, clock=FakeClock(NOW))
        guard.record(_id(1), NOW_MS, "alice")
        for n in range(100, 120):
            guard.record(_id(n), NOW_MS + 5_000, "mallory")

        with pytest.raises(Unauthenticated, match="replay floor"):
            guard.check(_id(1), NOW_MS, "alice")
        guard.check(_id(2), NOW_MS + 1, "alice")

    def test_unverified_entries_raise_no_floor_when_evicted(self) -> None:
        """Ids recorded before their seal opened (peek refusals) name no sender: junk that names
        alice and churns the cache cannot lift alice's floor."""
        guard = ReplayGuard(60, max_entries=10, clock=FakeClock(NOW))
        for n in range(20):
            guard.record(_id(n), NOW_MS + 5_000, UNVERIFIED)

        guard.check(_id(99), NOW_MS + 1, "alice")
        guard.check(_id(98), NOW_MS + 1, UNVERIFIED)
        with pytest.raises(Unauthenticated, match="replayed message id"):
            guard.check(_id(19), NOW_MS + 5_000, UNVERIFIED)

    def test_sender_floors_bounded(self) -> None:
        """With max_senders=N, floors of many evicted senders keep at most N, and an evicted id
        of a dropped sender floor stays refused through the shared floor."""
        guard = ReplayGuard(60, max_entries=1, max_senders=4, clock=FakeClock(NOW))
        for n in range(50):
            guard.record(_id(n), NOW_MS - 50 + n, f"s{n}")
            assert len(guard._floors) <= 4

        for n in range(49):
            with pytest.raises(Unauthenticated, match="older"):
                guard.check(_id(n), NOW_MS - 50 + n, f"s{n}")

    def test_ids_forgotten_after_window(self) -> None:
        """Ids whose timestamps left the window are dropped at the next record."""
        clock = FakeClock(NOW)
        guard = ReplayGuard(60, clock=clock)
        guard.record(_id(1), NOW_MS)
        guard.record(_id(2), NOW_MS)
        clock.now = NOW + 61

        guard.record(_id(3), int(clock.now * 1000))

        assert len(guard) == 1
        with pytest.raises(Unauthenticated, match="older"):
            guard.check(_id(1), NOW_MS)

    def test_bounded_memory(self) -> None:
        """With max_entries=N, recording N+k ids keeps at most N."""
        guard = ReplayGuard(60, max_entries=10, clock=FakeClock(NOW))

        for n in range(25):
            guard.record(_id(n), NOW_MS - 25 + n)
            assert len(guard) <= 10

        assert len(guard) == 10

    def test_evicted_id_still_refused(self) -> None:
        """An id evicted for space is refused: its sender's floor rose to its timestamp."""
        guard = ReplayGuard(60, max_entries=10, clock=FakeClock(NOW))
        for n in range(15):
            guard.record(_id(n), NOW_MS - 15 + n)

        for n in range(5):
            with pytest.raises(Unauthenticated, match="older"):
                guard.check(_id(n), NOW_MS - 15 + n)

    def test_newer_ids_accepted_after_eviction(self) -> None:
        """After eviction a new id newer than the floor is still accepted."""
        guard = ReplayGuard(60, max_entries=2, clock=FakeClock(NOW))
        for n in range(5):
            guard.record(_id(n), NOW_MS - 5 + n)

        guard.check(_id(99), NOW_MS)
