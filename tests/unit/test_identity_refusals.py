"""Every refusal of certificates and key files, fed the input it refuses, with its type and
message, and the validity limits on both sides (``docs/protocol.md``, Certificates)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest

from mesh._core.identity import (
    CERT_VERSION,
    DEFAULT_CERT_TTL,
    Certificate,
    CertificateVerifier,
    InstanceKeys,
    TrustRoot,
    _encode_cert_body,
    key_id,
    load_identity,
    load_keys,
    load_trust_root,
    new_instance_id,
    save_identity,
    save_keys,
    save_trust_root,
)
from mesh.errors import CertificateError, DecodeError, InvalidArgument
from mesh.testing import FakeClock

NOW = 1_700_000_000.0
KEY = bytes(range(32))


def _body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "agent": "bob",
        "box_pk": KEY,
        "instance": "i-1",
        "issuer": "0" * 16,
        "not_after": 2,
        "not_before": 1,
        "roles": ["r"],
        "serial": "s",
        "sign_pk": KEY,
        "version": CERT_VERSION,
    }
    body.update(changes)
    return body


def _raw(body: dict[str, object]) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    raw: bytes = msgpack.packb([packed, bytes(64)], use_bin_type=True)
    return raw


class TestDecode:
    def test_well_formed_body_decodes(self) -> None:
        """A well-formed (unverified) certificate decodes to its fields, body and signature."""
        raw = _raw(_body())

        cert, body, sig = Certificate.decode(raw)

        assert (cert.agent, cert.instance, cert.roles, cert.version) == ("bob", "i-1", ("r",), 1)
        assert body == msgpack.packb(_body(), use_bin_type=True)
        assert sig == bytes(64)
        assert cert.raw == raw

    @pytest.mark.parametrize("roles", [[1], ["a", b"b"], [None]])
    def test_roles_not_strings_refused(self, roles: list[object]) -> None:
        """Roles that are not all strings are a DecodeError saying so."""
        with pytest.raises(DecodeError, match=r"certificate roles must be a list of strings$"):
            Certificate.decode(_raw(_body(roles=roles)))

    @pytest.mark.parametrize("version", [0, 2])
    def test_other_version_refused(self, version: int) -> None:
        """A certificate version other than 1 is a DecodeError naming it."""
        with pytest.raises(DecodeError, match=rf"unsupported certificate version {version}$"):
            Certificate.decode(_raw(_body(version=version)))

    @pytest.mark.parametrize("field", ["sign_pk", "box_pk"])
    @pytest.mark.parametrize("size", [31, 33])
    def test_key_not_32_bytes_refused(self, field: str, size: int) -> None:
        """A signing or box key that is not 32 bytes is a DecodeError."""
        with pytest.raises(DecodeError, match=r"certificate keys must be 32 bytes$"):
            Certificate.decode(_raw(_body(**{field: bytes(size)})))

    def test_fingerprint_is_blake2b_128_of_the_bytes(self) -> None:
        """The fingerprint is 32 hex characters: BLAKE2b-128 of the wire bytes."""
        import hashlib

        raw = _raw(_body())

        fingerprint = Certificate.decode(raw)[0].fingerprint
        assert fingerprint == hashlib.blake2b(raw, digest_size=16).hexdigest()
        assert len(fingerprint) == 32


class TestIds:
    def test_instance_id_is_16_hex_characters(self) -> None:
        """A fresh instance id is 16 lowercase hex characters, different each time."""
        ids = {new_instance_id() for _ in range(8)}

        assert len(ids) == 8
        assert all(len(i) == 16 and int(i, 16) >= 0 and i == i.lower() for i in ids)

    def test_key_id_is_an_8_byte_blake2b_digest(self) -> None:
        """A key id is the hex of an 8-byte BLAKE2b digest of the key (16 characters)."""
        import hashlib

        assert key_id(KEY) == hashlib.blake2b(KEY, digest_size=8).hexdigest()
        assert len(key_id(KEY)) == 16
        assert TrustRoot.from_public(KEY).key_id == key_id(KEY)


class TestTrustRoot:
    @pytest.mark.parametrize("size", [0, 31, 33])
    def test_public_key_not_32_bytes_refused(self, size: int) -> None:
        """A verify-only root from a key that is not 32 bytes is InvalidArgument."""
        with pytest.raises(InvalidArgument, match=r"trust root public key must be 32 bytes$"):
            TrustRoot.from_public(bytes(size))

    def test_verify_only_root_cannot_sign(self) -> None:
        """A verify-only root refuses to sign, saying why."""
        public = TrustRoot.from_public(KEY)

        assert not public.can_sign
        with pytest.raises(InvalidArgument, match=r"holds only the public key; cannot sign$"):
            public.sign(b"data")

    def test_full_root_signs(self) -> None:
        """A root with its private key signs: a 64-byte Ed25519 signature."""
        root = TrustRoot.generate()

        assert root.can_sign
        assert len(root.sign(b"data")) == 64

    def test_reserved_instance_refused(self) -> None:
        """The instance name the subjects reserve ("any") is refused at issuance."""
        with pytest.raises(InvalidArgument, match=r"instance name 'any' is reserved$"):
            TrustRoot.generate().issue_identity("bob", instance="any")

    def test_validity_tolerates_a_minute_of_skew(self) -> None:
        """A certificate is valid from 60 s before issuance to issuance plus its ttl."""
        cert = TrustRoot.generate().issue_identity("bob", ttl=3600, now=NOW).certificate

        assert cert.not_before == int(NOW) - 60
        assert cert.not_after == int(NOW) + 3600

    def test_default_ttl_is_a_day(self) -> None:
        """Without a ttl a certificate lives 24 hours."""
        cert = TrustRoot.generate().issue_identity("bob", now=NOW).certificate

        assert DEFAULT_CERT_TTL == 86_400
        assert cert.not_after - int(NOW) == 86_400

    def test_roles_sorted_and_deduplicated(self) -> None:
        """Roles go on the wire sorted, each once."""
        body = _encode_cert_body(
            serial="s",
            agent="a",
            instance="i",
            roles=["b", "a", "b"],
            sign_pk=KEY,
            box_pk=KEY,
            not_before=1,
            not_after=2,
            issuer="x",
        )

        assert msgpack.unpackb(body)["roles"] == ["a", "b"]

    def test_reissue_keeps_the_lifetime(self) -> None:
        """Renewal issues a new serial for the same agent, instance, roles and keys, with the
        old lifetime."""
        root = TrustRoot.generate()
        old = root.issue_identity("bob", roles=["r"], instance="i-1", ttl=7200).certificate

        new = root.reissue(old)

        assert new.serial != old.serial
        assert (new.agent, new.instance, new.roles) == (old.agent, old.instance, old.roles)
        assert (new.sign_pk, new.box_pk) == (old.sign_pk, old.box_pk)
        assert new.not_after - new.not_before == 7200 + 60

    def test_reissue_with_a_ttl(self) -> None:
        """Renewal with a ttl uses it, but never less than a minute."""
        root = TrustRoot.generate()
        old = root.issue_identity("bob", ttl=7200).certificate

        assert root.reissue(old, ttl=600).not_after - root.reissue(old, ttl=600).not_before == 660
        short = root.reissue(old, ttl=1)
        assert short.not_after - short.not_before == 120

    def test_repr_names_the_key_id(self) -> None:
        """The root's repr shows its key id and whether it can sign, nothing private."""
        root = TrustRoot.generate()

        assert repr(root) == f"TrustRoot(key_id={root.key_id}, can_sign=True)"
        assert repr(TrustRoot.from_public(KEY)).endswith("can_sign=False)")


class TestVerifyLimits:
    @pytest.fixture
    def root(self) -> TrustRoot:
        return TrustRoot.generate()

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(NOW)

    @pytest.fixture
    def verifier(self, root: TrustRoot, clock: FakeClock) -> CertificateVerifier:
        return CertificateVerifier(root.public_key, clock=clock)

    def test_valid_from_not_before_until_just_before_not_after(
        self, root: TrustRoot, verifier: CertificateVerifier, clock: FakeClock
    ) -> None:
        """At not_before exactly and just before not_after a certificate verifies."""
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate
        clock.now = cert.not_before
        assert verifier.verify(cert.raw) == cert
        clock.now = cert.not_after - 0.001
        assert verifier.verify(cert.raw) == cert

    def test_expired_message(
        self, root: TrustRoot, verifier: CertificateVerifier, clock: FakeClock
    ) -> None:
        """Expiry is refused with the serial, the agent and the expiry time."""
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate
        clock.now = cert.not_after

        with pytest.raises(CertificateError, match=r"certificate .+ of 'bob' expired at \d+$"):
            verifier.verify(cert.raw)

    def test_not_yet_valid_message(
        self, root: TrustRoot, verifier: CertificateVerifier, clock: FakeClock
    ) -> None:
        """A certificate used before not_before is refused with that time."""
        cert = root.issue_identity("bob", now=NOW).certificate
        clock.now = cert.not_before - 0.001

        with pytest.raises(CertificateError, match=rf"is not valid before {cert.not_before}$"):
            verifier.verify(cert.raw)

    def test_cache_bounded_oldest_dropped(self, root: TrustRoot, clock: FakeClock) -> None:
        """The verifier caches at most max_entries certificates, dropping the oldest first."""
        verifier = CertificateVerifier(root.public_key, clock=clock, max_entries=2)
        certs = [root.issue_identity(f"a{i}", now=NOW).certificate for i in range(3)]
        for cert in certs[:2]:
            verifier.verify(cert.raw)
        assert list(verifier._cache) == [certs[0].raw, certs[1].raw]

        verifier.verify(certs[2].raw)

        assert list(verifier._cache) == [certs[1].raw, certs[2].raw]

    def test_issuer_mismatch_names_both_ids(
        self, root: TrustRoot, verifier: CertificateVerifier
    ) -> None:
        """A certificate from another root is refused naming both key ids, and not cached."""
        other = TrustRoot.generate()
        cert = other.issue_identity("bob", now=NOW).certificate

        with pytest.raises(CertificateError, match=rf"issued by {other.key_id}, not by") as ei:
            verifier.verify(cert.raw)

        assert ei.value.message.endswith(f"trust root {root.key_id}")
        assert cert.raw not in verifier._cache

    def test_bad_signature_not_cached(self, root: TrustRoot, clock: FakeClock) -> None:
        """A forged signature is refused every time: a refusal is never cached."""
        forger = TrustRoot.generate()
        forger.key_id = root.key_id
        forged = forger.issue_identity("bob", now=NOW).certificate
        verifier = CertificateVerifier(root.public_key, clock=clock)

        for _ in range(2):
            with pytest.raises(
                CertificateError, match=r"certificate of 'bob' has a bad signature$"
            ):
                verifier.verify(forged.raw)


class TestRenewalGrace:
    @pytest.fixture
    def setup(self) -> tuple[TrustRoot, CertificateVerifier, FakeClock]:
        root, clock = TrustRoot.generate(), FakeClock(NOW)
        return root, CertificateVerifier(root.public_key, clock=clock), clock

    def test_current_certificate_is_not_expired(
        self, setup: tuple[TrustRoot, CertificateVerifier, FakeClock]
    ) -> None:
        """A current certificate renews with 0 s past expiry."""
        root, verifier, _clock = setup
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate

        assert verifier.verify_for_renewal(cert.raw, grace=100) == (cert, 0.0)

    def test_within_grace_accepted_with_its_lateness(
        self, setup: tuple[TrustRoot, CertificateVerifier, FakeClock]
    ) -> None:
        """Just inside the grace the certificate is accepted, with how late it is."""
        root, verifier, clock = setup
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate
        clock.now = cert.not_after + 99.5

        assert verifier.verify_for_renewal(cert.raw, grace=100) == (cert, 99.5)

    def test_at_the_end_of_grace_refused(
        self, setup: tuple[TrustRoot, CertificateVerifier, FakeClock]
    ) -> None:
        """At not_after + grace the renewal is refused, naming the join token remedy."""
        root, verifier, clock = setup
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate
        clock.now = cert.not_after + 100

        with pytest.raises(CertificateError, match="expired 100 s ago, beyond the renewal grace"):
            verifier.verify_for_renewal(cert.raw, grace=100)

    def test_not_yet_valid_refused(
        self, setup: tuple[TrustRoot, CertificateVerifier, FakeClock]
    ) -> None:
        """A renewal before not_before is refused."""
        root, verifier, clock = setup
        cert = root.issue_identity("bob", now=NOW).certificate
        clock.now = cert.not_before - 0.001

        with pytest.raises(CertificateError, match=rf"is not valid before {cert.not_before}$"):
            verifier.verify_for_renewal(cert.raw, grace=100)
        clock.now = cert.not_before
        assert verifier.verify_for_renewal(cert.raw, grace=100)[0] == cert

    def test_revoked_refused(self, setup: tuple[TrustRoot, CertificateVerifier, FakeClock]) -> None:
        """A revoked certificate does not renew, even within the grace."""
        root, verifier, clock = setup
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate
        verifier.revoked.add(cert.serial)
        clock.now = cert.not_after + 1

        with pytest.raises(CertificateError, match=r"is revoked$"):
            verifier.verify_for_renewal(cert.raw, grace=100)


class TestKeyFileRefusals:
    def test_verify_only_root_not_saved(self, tmp_path: Path) -> None:
        """Saving a root without its private key is InvalidArgument."""
        with pytest.raises(InvalidArgument, match=r"cannot save a verify-only trust root$"):
            save_trust_root(TrustRoot.from_public(KEY), tmp_path)

    def test_root_expiry_metadata_round_trip(self, tmp_path: Path) -> None:
        """A root's advisory not_after is kept in root.json and read back."""
        sk_root = TrustRoot.generate()
        root = TrustRoot(sk_root._signing, sk_root.public_key, not_after=NOW)
        save_trust_root(root, tmp_path)

        meta = json.loads((tmp_path / "root.json").read_text())
        assert meta == {"key_id": root.key_id, "not_after": int(NOW)}
        assert load_trust_root(tmp_path).not_after == NOW
        assert load_trust_root(tmp_path / "root.pub").not_after == NOW

    def test_no_metadata_file_without_expiry(self, tmp_path: Path) -> None:
        """A root without not_after writes no root.json, and loads without one."""
        save_trust_root(TrustRoot.generate(), tmp_path)

        assert not (tmp_path / "root.json").exists()
        assert load_trust_root(tmp_path).not_after is None

    @pytest.mark.parametrize("meta", ["not json", "{}", '{"not_after": "soon"}', "[]"])
    def test_bad_metadata_refused(self, tmp_path: Path, meta: str) -> None:
        """A root.json that is not valid metadata is InvalidArgument naming it."""
        save_trust_root(TrustRoot.generate(), tmp_path)
        (tmp_path / "root.json").write_text(meta)

        with pytest.raises(InvalidArgument, match=r"root.json: not a valid trust root metadata"):
            load_trust_root(tmp_path)

    def test_missing_root_file(self, tmp_path: Path) -> None:
        """A directory without root.key or root.pub is InvalidArgument naming root.pub."""
        with pytest.raises(InvalidArgument, match=r"root.pub: trust root file not found$"):
            load_trust_root(tmp_path)

    def test_root_file_not_hex(self, tmp_path: Path) -> None:
        """A root.pub that is not hex is InvalidArgument."""
        (tmp_path / "root.pub").write_text("zz\n")

        with pytest.raises(InvalidArgument, match=r"expected 64 hex characters$"):
            load_trust_root(tmp_path)

    @pytest.mark.parametrize("size", [31, 33])
    def test_root_key_of_wrong_size(self, tmp_path: Path, size: int) -> None:
        """A root.pub holding a key that is not 32 bytes is InvalidArgument giving the size."""
        (tmp_path / "root.pub").write_text(bytes(size).hex())

        with pytest.raises(InvalidArgument, match=rf"got {size} bytes$"):
            load_trust_root(tmp_path)

    def test_unreadable_root_file(self, tmp_path: Path) -> None:
        """A root file that cannot be read (here: below a file) is InvalidArgument."""
        (tmp_path / "file").write_text("")

        with pytest.raises(InvalidArgument, match=r"root.pub: cannot read \(.+\)$"):
            load_trust_root(tmp_path / "file" / "root.pub")

    def test_key_file_loads_what_was_saved(self, tmp_path: Path) -> None:
        """save_keys then load_keys gives the same keys."""
        keys = InstanceKeys.generate()
        save_keys(keys, tmp_path / "k")

        loaded = load_keys(tmp_path / "k")

        assert (loaded.sign_pk, loaded.box_pk) == (keys.sign_pk, keys.box_pk)

    @pytest.mark.parametrize("content", ["{}", "not json", '{"sign_seed": "zz", "box_sk": ""}'])
    def test_malformed_key_file(self, tmp_path: Path, content: str) -> None:
        """A key file that is not what save_keys writes is InvalidArgument saying what it is."""
        path = tmp_path / "k"
        path.write_text(content)
        path.chmod(0o600)

        with pytest.raises(InvalidArgument, match=r"k: not a valid my keys$"):
            load_keys(path, what="my keys")

    def test_missing_key_file_raises_file_not_found(self, tmp_path: Path) -> None:
        """load_keys lets FileNotFoundError through: its caller says what a missing file means."""
        with pytest.raises(FileNotFoundError):
            load_keys(tmp_path / "absent")

    def test_unreadable_key_file(self, tmp_path: Path) -> None:
        """A key file that cannot be read is InvalidArgument."""
        path = tmp_path / "k"
        path.mkdir()
        path.chmod(0o700)

        with pytest.raises(InvalidArgument, match=r"k: cannot read \(.+\)$"):
            load_keys(path)

    def test_missing_certificate_file(self, tmp_path: Path) -> None:
        """An identity directory without identity.cert is InvalidArgument naming it."""
        save_identity(TrustRoot.generate().issue_identity("bob"), tmp_path)
        (tmp_path / "identity.cert").unlink()

        with pytest.raises(InvalidArgument, match=r"identity.cert: certificate file not found$"):
            load_identity(tmp_path)

    def test_unreadable_certificate_file(self, tmp_path: Path) -> None:
        """An identity.cert that cannot be read is InvalidArgument."""
        save_identity(TrustRoot.generate().issue_identity("bob"), tmp_path)
        (tmp_path / "identity.cert").unlink()
        (tmp_path / "identity.cert").mkdir()

        with pytest.raises(InvalidArgument, match=r"identity.cert: cannot read \(.+\)$"):
            load_identity(tmp_path)

    def test_malformed_certificate_file(self, tmp_path: Path) -> None:
        """An identity.cert that is not a certificate is InvalidArgument with the decode error."""
        save_identity(TrustRoot.generate().issue_identity("bob"), tmp_path)
        (tmp_path / "identity.cert").write_bytes(_raw(_body(version=9)))

        with pytest.raises(InvalidArgument, match=r"unsupported certificate version 9$"):
            load_identity(tmp_path)

    @pytest.mark.parametrize("which", ["sign_pk", "box_pk"])
    def test_certificate_of_other_keys_refused(self, tmp_path: Path, which: str) -> None:
        """A certificate whose signing or box key is not the key file's is refused."""
        root = TrustRoot.generate()
        ident = root.issue_identity("bob")
        save_identity(ident, tmp_path)
        other = InstanceKeys.generate()
        keys = {"sign_pk": ident.keys.sign_pk, "box_pk": ident.keys.box_pk}
        keys[which] = getattr(other, which)
        cert = root.issue("bob", **keys)
        (tmp_path / "identity.cert").write_bytes(cert.raw)

        with pytest.raises(InvalidArgument, match="certificate does not match the keys in"):
            load_identity(tmp_path)

    def test_root_public_key_override(self, tmp_path: Path) -> None:
        """A root key given to load_identity wins over root.pub beside it."""
        save_identity(TrustRoot.generate().issue_identity("bob"), tmp_path)
        os.remove(tmp_path / "root.pub")

        assert load_identity(tmp_path, root_public_key=KEY).root_public_key == KEY


class TestFilesAndDefaults:
    def test_certificate_repr_leaves_out_the_raw_bytes(self) -> None:
        """A certificate's repr shows its fields but not its wire bytes."""
        cert = TrustRoot.generate().issue_identity("bob").certificate

        assert "raw=" not in repr(cert)
        assert "agent='bob'" in repr(cert)

    def test_saving_makes_missing_directories(self, tmp_path: Path) -> None:
        """Saving a root or an identity makes the directory and its parents."""
        root = TrustRoot.generate()

        save_trust_root(root, tmp_path / "a" / "root")
        save_identity(root.issue_identity("bob"), tmp_path / "b" / "bob")

        assert load_trust_root(tmp_path / "a" / "root").public_key == root.public_key
        assert load_identity(tmp_path / "b" / "bob").agent == "bob"

    def test_saving_again_into_the_same_directory(self, tmp_path: Path) -> None:
        """Saving into a directory that exists replaces the files."""
        first, second = TrustRoot.generate(), TrustRoot.generate()
        save_trust_root(first, tmp_path)
        save_trust_root(second, tmp_path)
        save_identity(first.issue_identity("a"), tmp_path / "id")
        save_identity(second.issue_identity("b"), tmp_path / "id")

        assert load_trust_root(tmp_path).public_key == second.public_key
        assert load_identity(tmp_path / "id").agent == "b"

    @pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
    def test_key_files_leave_no_descriptor_open(self, tmp_path: Path) -> None:
        """Writing private key files closes what it opened."""
        before = len(os.listdir("/proc/self/fd"))

        for i in range(5):
            save_keys(InstanceKeys.generate(), tmp_path / f"k{i}")

        assert len(os.listdir("/proc/self/fd")) == before

    def test_verifier_caches_4096_certificates_by_default(self) -> None:
        """The verifier's cache bound is 4096 certificates unless told otherwise."""
        assert CertificateVerifier(KEY)._max == 4096
