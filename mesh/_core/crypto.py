"""Message protection: pair keys, sealing (XChaCha20-Poly1305), event signatures, replay guard.

Per-message public-key operations are kept off request/reply: each peer pair derives one
symmetric key (X25519, then BLAKE2b over the shared secret, both public keys and the subject
prefix) and caches it. Events, which have many readers, are signed with Ed25519 instead, over
the prefix and the frame. Binding the prefix means a frame captured on one mesh does not open or
verify on another mesh sharing the broker and the identities. Pure core: no I/O.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Hashable

from nacl import _sodium
from nacl.bindings import crypto_scalarmult
from nacl.encoding import RawEncoder
from nacl.exceptions import BadSignatureError
from nacl.hash import blake2b
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from mesh.errors import Unauthenticated

__all__ = ["NONCE_LEN", "TAG_LEN", "PairKeys", "ReplayGuard", "open_body", "seal_body"]

NONCE_LEN = 24
TAG_LEN = 16
SIG_LEN = 64
_PAIR_PERSON = b"mesh-pair-v1"
DEFAULT_PREFIX = "mesh"  # ``MeshConfig.prefix`` by default


def derive_pair_key(own: PrivateKey, peer_box_pk: bytes, prefix: str = DEFAULT_PREFIX) -> bytes:
    """The symmetric key two instances share on one mesh: BLAKE2b-256 of the X25519 secret,
    both public keys and the subject prefix (``docs/protocol.md`` section 6).

    Both sides compute the same key: the public keys are hashed in sorted order. The prefix
    comes last, after 96 bytes of fixed length, so it needs no length in front of it.
    """
    shared = crypto_scalarmult(bytes(own), peer_box_pk)
    a, b = sorted((bytes(own.public_key), peer_box_pk))
    data = shared + a + b + prefix.encode()
    return blake2b(data, digest_size=32, person=_PAIR_PERSON, encoder=RawEncoder)


class PairKeys:
    """Cache of derived pair keys of one mesh, by the peer's box public key (bounded, oldest
    dropped first).

    One cache serves one subject prefix: a key derived for another prefix is never in it, so
    the cache key is in effect ``(prefix, peer box key)`` at no cost per message.

    Args:
        own: this instance's box key.
        prefix: the subject prefix bound into every key (``MeshConfig.prefix``).
        max_entries: cache bound.
    """

    def __init__(
        self, own: PrivateKey, prefix: str = DEFAULT_PREFIX, max_entries: int = 8192
    ) -> None:
        self._own = own
        self.prefix = prefix
        self._keys: dict[bytes, bytes] = {}
        self._max = max_entries

    def get(self, peer_box_pk: bytes) -> bytes:
        """The pair key for a peer, derived once."""
        key = self._keys.get(peer_box_pk)
        if key is None:
            if len(peer_box_pk) != 32:
                raise Unauthenticated("peer box key must be 32 bytes")
            try:
                key = derive_pair_key(self._own, peer_box_pk, self.prefix)
            except Exception:  # libsodium refuses low-order points
                raise Unauthenticated("peer box key is not a usable X25519 key") from None
            if len(self._keys) >= self._max:
                self._keys.pop(next(iter(self._keys)))
            self._keys[peer_box_pk] = key
        return key


# The hot path calls libsodium through PyNaCl's cffi module directly: PyNaCl's wrappers spend
# more time on argument checks than the cipher spends on a small body (measured: 9.5 us
# against 4.5 us per call for 256 bytes). Keys, nonces and lengths are fixed by this module,
# so the checks the wrappers make hold by construction.
_encrypt = _sodium.lib.crypto_aead_xchacha20poly1305_ietf_encrypt
_decrypt = _sodium.lib.crypto_aead_xchacha20poly1305_ietf_decrypt
_new = _sodium.ffi.new
_buffer = _sodium.ffi.buffer
_from_buffer = _sodium.ffi.from_buffer
_NULL = _sodium.ffi.NULL
_memmove = _sodium.ffi.memmove


def seal_body(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` bound to ``aad``; returns ``nonce || ciphertext``
    (``seal_frame`` without the header in front)."""
    return seal_frame(key, aad, plaintext)[len(aad) :]


def seal_frame(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """``aad || nonce || ciphertext`` in one buffer: a whole sealed frame whose header is
    ``aad`` (one copy fewer than sealing and concatenating)."""
    a, n = len(aad), len(plaintext)
    total = a + NONCE_LEN + n + TAG_LEN
    out = _new("unsigned char[]", total)
    _memmove(out, aad, a)
    _memmove(out + a, os.urandom(NONCE_LEN), NONCE_LEN)
    _encrypt(out + a + NONCE_LEN, _NULL, plaintext, n, aad, a, _NULL, out + a, key)
    frame: bytes = _buffer(out, total)[:]
    return frame


def open_frame(key: bytes, frame: bytes, header_end: int) -> bytes:
    """Open the sealed body of ``frame`` (``header || nonce || ciphertext``), the header bytes
    ``frame[:header_end]`` being the associated data. No slice of the frame is copied.

    Raises:
        Unauthenticated: the body or the header was changed, or the key is wrong.
    """
    n = len(frame) - header_end - NONCE_LEN
    if n < TAG_LEN or len(key) != 32:
        raise Unauthenticated("sealed body too short")
    p = _from_buffer(frame)
    out = _new("unsigned char[]", n - TAG_LEN + 1)
    nonce = p + header_end
    if _decrypt(out, _NULL, _NULL, nonce + NONCE_LEN, n, p, header_end, nonce, key) != 0:
        raise Unauthenticated("seal does not verify: body or header was altered")
    plaintext: bytes = _buffer(out, n - TAG_LEN)[:]
    return plaintext


def open_body(key: bytes, aad: bytes | memoryview, sealed: bytes | memoryview) -> bytes:
    """Decrypt ``nonce || ciphertext`` bound to ``aad`` (``open_frame`` on a separate body).

    Raises:
        Unauthenticated: the body or the associated data was changed, or the key is wrong.
    """
    return open_frame(key, bytes(aad) + bytes(sealed), len(aad))


def signed_event_bytes(prefix: str, signed: bytes) -> bytes:
    """What an event's signature covers: ``len(prefix) (1 byte) || prefix || frame bytes``
    (``docs/protocol.md`` section 8), so that it verifies under its own prefix only."""
    p = prefix.encode()
    return bytes((len(p),)) + p + signed


def sign_frame(signing: SigningKey, signed: bytes, prefix: str = DEFAULT_PREFIX) -> bytes:
    """The Ed25519 signature appended to an event frame (``signed``: the frame so far) sent
    under ``prefix``."""
    return signing.sign(signed_event_bytes(prefix, signed)).signature


def verify_frame(sign_pk: bytes, frame: bytes, prefix: str = DEFAULT_PREFIX) -> bytes:
    """Check an event frame's trailing signature, made for ``prefix``; return the frame bytes
    it covers (the frame without the signature).

    Raises:
        Unauthenticated: a bad or missing signature, or one made under another prefix.
    """
    if len(frame) < SIG_LEN:
        raise Unauthenticated("event too short to carry a signature")
    signed, sig = frame[:-SIG_LEN], frame[-SIG_LEN:]
    try:
        VerifyKey(sign_pk).verify(signed_event_bytes(prefix, signed), sig)
    except BadSignatureError:
        raise Unauthenticated("event signature does not verify") from None
    return signed


UNVERIFIED = object()
"""The ``sender`` of an id recorded before its seal was opened (a rate-limit refusal): such an
entry blocks copies of its frame but never raises anyone's floor when evicted, since anyone can
send a frame that names any sender."""


class ReplayGuard:
    """Refuses messages outside the time window, dated before ``not_before_ms`` and ids already
    seen within the window.

    Memory is bounded: at most ``max_entries`` ids and ``max_senders`` floors. When the cache
    is full the entry that **arrived** first is evicted, and the floor of **its sender** rises
    to its timestamp, so an evicted id can never be replayed (``docs/protocol.md`` section 15).

    Why arrival order and per-sender floors: evicting the oldest timestamp and raising one
    floor for everyone let a single certified sender flood ~100 000 requests dated 55 s ahead
    and lift the floor past the present, refusing every genuine request for ~46 s. Now a
    flood only raises the flooder's own floor; an honest sender's entries are evicted after
    living ``max_entries / flood rate`` seconds (2 s at 50 000/s), and only its requests
    delayed by more than that behind a later-dated request of its own are refused. Timestamps
    are accepted at most ``max_future`` seconds ahead (5 s by default, against 60 s before),
    which bounds any floor to ``now + max_future`` at the time of recording.

    Args:
        window: seconds a message stays acceptable after its timestamp.
        max_future: seconds a timestamp may be ahead of this clock (caller clock skew).
        max_entries: cache bound.
        max_senders: bound of the per-sender floors; past it the lowest one is folded into a
            floor shared by all senders (needs that many distinct certified flooders).
        not_before_ms: refuse timestamps before this (unix ms): an instance's start, so that
            a message captured before a restart is not accepted again after it.
        noun: what the refusal of a message dated before ``not_before_ms`` calls it.
        clock: unix time in seconds.
    """

    def __init__(
        self,
        window: float = 60.0,
        *,
        max_future: float = 5.0,
        max_entries: int = 100_000,
        max_senders: int = 4096,
        not_before_ms: int = 0,
        noun: str = "request",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_ms = int(window * 1000)
        self.future_ms = int(max_future * 1000)
        self.not_before_ms = not_before_ms
        self._predates = f"{noun} predates this instance's start"
        self._max = max(1, max_entries)
        self._max_senders = max(1, max_senders)
        self._clock = clock
        self._seen: set[bytes] = set()
        self._order: deque[tuple[bytes, int, Hashable]] = deque()
        self._floors: dict[Hashable, int] = {}
        self._floor_ms = 0  # shared by all senders; rises only when the floors overflow

    def check(self, msg_id: bytes, ts_ms: int, sender: Hashable = None) -> None:
        """Refuse a stale, future-dated, pre-start or already seen message (records nothing).

        Args:
            sender: who the header says sent it (agent and instance); its floor applies.

        Raises:
            Unauthenticated: naming which check failed.
        """
        now_ms = int(self._clock() * 1000)
        if ts_ms < now_ms - self.window_ms or ts_ms <= self._floor_ms:
            raise Unauthenticated("message is older than the replay window")
        if ts_ms > now_ms + self.future_ms:
            raise Unauthenticated("message is dated in the future beyond the allowed skew")
        if ts_ms < self.not_before_ms:
            raise Unauthenticated(self._predates)
        if msg_id in self._seen:
            raise Unauthenticated("replayed message id")
        floors = self._floors
        if floors and ts_ms <= floors.get(sender, -1):
            raise Unauthenticated("message is older than its sender's replay floor")

    def record(self, msg_id: bytes, ts_ms: int, sender: Hashable = None) -> None:
        """Remember a message's id until it leaves the window (after ``check`` passed)."""
        now_ms = int(self._clock() * 1000)
        horizon = now_ms - self.window_ms
        order, seen = self._order, self._seen
        while order and order[0][1] < horizon:
            seen.discard(order.popleft()[0])
        while len(order) >= self._max:
            old_id, old_ts, old_sender = order.popleft()
            seen.discard(old_id)
            if old_ts >= horizon and old_sender is not UNVERIFIED:
                self._raise_floor(old_sender, old_ts, horizon)  # its sender's floor covers it
        order.append((msg_id, ts_ms, sender))
        seen.add(msg_id)

    def _raise_floor(self, sender: Hashable, ts_ms: int, horizon: int) -> None:
        floors = self._floors
        if ts_ms <= floors.get(sender, -1):
            return
        if sender not in floors and len(floors) >= self._max_senders:
            for key in [k for k, v in floors.items() if v < horizon]:
                del floors[key]  # below the window: the window check refuses those anyway
            if len(floors) >= self._max_senders:
                lowest = min(floors, key=floors.__getitem__)
                self._floor_ms = max(self._floor_ms, floors.pop(lowest))
        floors[sender] = ts_ms

    def __len__(self) -> int:
        return len(self._seen)
