"""Unit tests for mesh._core.admission: which refusals leave the request id recorded."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from mesh import Identity
from mesh._core.admission import SealedRefusal, admit_request
from mesh._core.crypto import PairKeys, ReplayGuard, derive_pair_key, seal_frame
from mesh._core.envelope import HDR_DEADLINE, decode_frame, request_header
from mesh._core.identity import CertificateVerifier
from mesh.errors import ResourceExhausted, Unauthenticated
from mesh.testing import Trust


def _request(alice: Identity, bob: Identity) -> tuple[bytes, dict[str, str]]:
    deadline = int((time.time() + 10) * 1000)
    aad = request_header(
        os.urandom(16), int(time.time() * 1000), alice.agent, alice.instance, bob.agent,
        bob.instance, "echo", deadline, 1, alice.certificate.raw, None, None, None,
    )  # fmt: skip
    key = derive_pair_key(alice.keys.box, bob.certificate.box_pk)
    return seal_frame(key, aad, b'{"text":"hi"}'), {HDR_DEADLINE: str(deadline)}


def _admit(
    bob: Identity,
    frame: bytes,
    headers: dict[str, str],
    guard: ReplayGuard,
    peek: Callable[[str, str], None],
) -> None:
    hdr, end = decode_frame(frame)
    admit_request(
        hdr, end, frame, f"mesh.rpc.bob.{bob.instance}.echo", headers,
        agent=bob.agent, instance=bob.instance, now_ms=time.time() * 1000, max_sealed=1 << 20,
        replay=guard, verifier=CertificateVerifier(bob.root_public_key),
        pair=PairKeys(bob.keys.box), peek=peek,
    )  # fmt: skip


def _full(caller: str, endpoint: str) -> None:
    raise ResourceExhausted(f"rate limit exceeded for {caller}", retry_after=1.0)


def _open(caller: str, endpoint: str) -> None:
    return None


class TestRecording:
    def test_peek_refusal_records_the_id(self) -> None:
        """A request refused by the rate-limit peek is refused as a replay once the bucket
        refilled."""
        trust = Trust()
        alice, bob = trust.identity("alice"), trust.identity("bob")
        frame, headers = _request(alice, bob)
        guard = ReplayGuard()

        with pytest.raises(SealedRefusal) as refused:
            _admit(bob, frame, headers, guard, _full)
        assert isinstance(refused.value.error, ResourceExhausted)
        with pytest.raises(Unauthenticated, match="replayed message id"):
            _admit(bob, frame, headers, guard, _open)

    def test_peek_refusal_carries_the_pair_key(self) -> None:
        """The peek refusal comes with the pair key, so that the callee answers it sealed."""
        trust = Trust()
        alice, bob = trust.identity("alice"), trust.identity("bob")
        frame, headers = _request(alice, bob)

        with pytest.raises(SealedRefusal) as refused:
            _admit(bob, frame, headers, ReplayGuard(), _full)
        assert refused.value.key == derive_pair_key(alice.keys.box, bob.certificate.box_pk)
        assert refused.value.error.retry_after == 1.0

    def test_seal_failure_records_nothing(self) -> None:
        """A request whose seal does not open leaves no id behind (nothing vouches for it)."""
        trust = Trust()
        alice, bob = trust.identity("alice"), trust.identity("bob")
        frame, headers = _request(alice, bob)
        guard = ReplayGuard()
        broken = frame[:-1] + bytes([frame[-1] ^ 1])

        with pytest.raises(Unauthenticated, match="seal does not verify"):
            _admit(bob, broken, headers, guard, _open)
        assert len(guard) == 0
        _admit(bob, frame, headers, guard, _open)
        assert len(guard) == 1
