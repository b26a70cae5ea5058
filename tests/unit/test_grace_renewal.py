"""The pure checks of the grace path: which certificates the registry may renew after their
expiry, the replay guard of its requests, the request checks and the agent's retry delays."""

from __future__ import annotations

import msgpack
import pytest
from nacl.public import PrivateKey, SealedBox

from mesh import CertificateError, DecodeError, Identity, ResourceExhausted, Unavailable
from mesh._core.identity import CertificateVerifier, TrustRoot
from mesh._runtime.governance import renewal_retry_in
from mesh._runtime.recovery import (
    GraceRenewal,
    NonceGuard,
    Replayed,
    _Opened,
    check_grace_request,
    grace_request,
    open_grace_request,
)
from mesh.errors import Unauthenticated

T0 = 1_700_000_000.0
GRACE = 3600.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def setup(ttl: float = 100.0) -> tuple[TrustRoot, Identity, CertificateVerifier, Clock]:
    root = TrustRoot.generate()
    identity = root.issue_identity("worker", roles=["svc"], ttl=ttl, now=T0)
    clock = Clock(T0)
    return root, identity, CertificateVerifier(root.public_key, clock=clock), clock


def test_an_expired_certificate_is_refused_by_verify_but_renewable_within_the_grace() -> None:
    """Past ``not_after`` the ordinary check refuses; the renewal check accepts it and says
    how long ago it expired."""
    _, identity, verifier, clock = setup()
    clock.now = identity.certificate.not_after + 10
    with pytest.raises(CertificateError, match="expired"):
        verifier.verify(identity.certificate.raw)
    cert, expired_for = verifier.verify_for_renewal(identity.certificate.raw, GRACE)
    assert cert.serial == identity.certificate.serial
    assert expired_for == pytest.approx(10)


def test_a_certificate_past_the_grace_needs_a_new_join_token() -> None:
    """At ``not_after + grace`` the renewal check refuses, naming the fix."""
    _, identity, verifier, clock = setup()
    clock.now = identity.certificate.not_after + GRACE
    with pytest.raises(CertificateError, match="new join token"):
        verifier.verify_for_renewal(identity.certificate.raw, GRACE)


def test_the_renewal_check_still_refuses_revoked_and_forged_certificates() -> None:
    """Revocation and the root's signature apply within the grace as always."""
    _, identity, verifier, clock = setup()
    clock.now = identity.certificate.not_after + 1
    verifier.revoked.add(identity.certificate.serial)
    with pytest.raises(CertificateError, match="revoked"):
        verifier.verify_for_renewal(identity.certificate.raw, GRACE)
    other = TrustRoot.generate().issue_identity("worker", ttl=100, now=T0)
    with pytest.raises(CertificateError, match="issued by"):
        verifier.verify_for_renewal(other.certificate.raw, GRACE)


def test_a_valid_certificate_passes_the_renewal_check_as_not_expired() -> None:
    """An agent whose clock runs ahead may use the grace path early: ``expired_for`` is 0."""
    _, identity, verifier, _ = setup()
    assert verifier.verify_for_renewal(identity.certificate.raw, GRACE)[1] == 0.0


def test_the_nonce_guard_takes_each_nonce_once_and_only_in_time() -> None:
    """Seen nonces are replays; too old, future-dated or from before the start is stale."""
    guard = NonceGuard(window=60, future=5, start=T0)
    now = T0 + 10
    ts = int(now * 1000)
    guard.check(ts, b"n" * 16, now)
    guard.record(ts, b"n" * 16, now)
    with pytest.raises(Replayed):
        guard.check(ts, b"n" * 16, now)
    with pytest.raises(Unauthenticated, match="future"):
        guard.check(ts + 6000, b"m" * 16, now)
    with pytest.raises(Unauthenticated, match="stale"):
        guard.check(int((T0 - 1) * 1000), b"m" * 16, now)  # before this instance started
    with pytest.raises(Unauthenticated, match="stale"):
        guard.check(int((now + 100 - 61) * 1000), b"m" * 16, now + 100)


def test_a_nonce_evicted_from_a_full_guard_cannot_be_replayed() -> None:
    """When full, the oldest nonce goes and the floor rises to its time."""
    guard = NonceGuard(window=60, future=5, start=T0, max_entries=2)
    now = T0 + 10
    for i in range(3):
        guard.record(int(now * 1000) + i, bytes([i]) * 16, now)
    with pytest.raises(Unauthenticated, match="stale"):
        guard.check(int(now * 1000), bytes([0]) * 16, now)


def _opened(
    identity: Identity, box: PrivateKey, prefix: str = "mesh", registry: str = "reg1"
) -> _Opened:
    body = grace_request(identity, prefix, registry, now=T0 + 200)
    sealed = SealedBox(box.public_key).encrypt(msgpack.packb(body, use_bin_type=True))
    return open_grace_request(sealed, box)


def _check(opened: _Opened, verifier: CertificateVerifier, guard: NonceGuard) -> GraceRenewal:
    return check_grace_request(
        opened,
        prefix="mesh",
        instance="reg1",
        verifier=verifier,
        grace=GRACE,
        guard=guard,
        now=T0 + 200,
    )


def test_a_grace_request_proves_the_key_and_is_bound_to_mesh_and_registry() -> None:
    """The holder's request passes once; another key, another prefix or another registry
    instance does not."""
    root, identity, verifier, clock = setup()
    clock.now = T0 + 200
    box = PrivateKey.generate()
    guard = NonceGuard(window=60, future=5, start=T0)
    opened = _opened(identity, box)
    got = _check(opened, verifier, guard)
    assert got.certificate.serial == identity.certificate.serial
    assert got.expired_for == pytest.approx(100)
    with pytest.raises(Replayed):
        _check(opened, verifier, guard)
    thief = root.issue_identity("thief", now=T0)
    forged = Identity(thief.keys, identity.certificate, identity.root_public_key)
    with pytest.raises(Unauthenticated, match="not signed by the certificate's key"):
        _check(_opened(forged, box), verifier, guard)
    with pytest.raises(Unauthenticated, match="not signed by the certificate's key"):
        _check(_opened(identity, box, prefix="other"), verifier, guard)
    with pytest.raises(DecodeError, match="another registry instance"):
        _check(_opened(identity, box, registry="reg2"), verifier, guard)


def test_a_grace_request_sealed_for_another_box_does_not_open() -> None:
    """Only the registry instance it was sealed for can read it."""
    _, identity, _, _ = setup()
    body = grace_request(identity, "mesh", "reg1")
    sealed = SealedBox(PrivateKey.generate().public_key).encrypt(
        msgpack.packb(body, use_bin_type=True)
    )
    with pytest.raises(DecodeError):
        open_grace_request(sealed, PrivateKey.generate())


def test_renewal_retries_back_off_and_respect_the_registry() -> None:
    """Before expiry at most a tenth of the time left (at least 1 s); after it the backoff
    itself, jittered; never before the registry's ``retry_after``."""
    down = Unavailable("no registry")
    assert renewal_retry_in(8.0, 30.0, down) == 3.0
    assert renewal_retry_in(8.0, 5.0, down) == 1.0
    assert 6.4 <= renewal_retry_in(8.0, -1.0, down) <= 9.6
    limited = ResourceExhausted("slow down", retry_after=20.0)
    assert renewal_retry_in(1.0, -1.0, limited) == 20.0
