"""Unit tests for mesh.identity: issuance, verification, revocation, key files and names."""

from __future__ import annotations

import os
import stat
import types
from pathlib import Path

import pytest
from nacl.signing import SigningKey, VerifyKey

import mesh._core.identity as identity_mod
from mesh._core.identity import (
    IDENTITY_CERT_FILE,
    IDENTITY_KEY_FILE,
    ROOT_KEY_FILE,
    ROOT_PUB_FILE,
    CertificateVerifier,
    InstanceKeys,
    TrustRoot,
    load_identity,
    load_trust_root,
    save_identity,
    save_trust_root,
    validate_name,
)
from mesh.errors import CertificateError, DecodeError, InvalidArgument
from mesh.testing import FakeClock

NOW = 1_700_000_000.0


@pytest.fixture
def root() -> TrustRoot:
    return TrustRoot.generate()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def verifier(root: TrustRoot, clock: FakeClock) -> CertificateVerifier:
    return CertificateVerifier(root.public_key, clock=clock)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class TestIssueAndVerify:
    def test_round_trip(self, root: TrustRoot, verifier: CertificateVerifier) -> None:
        """A certificate issued by the root verifies and keeps every issued field."""
        ident = root.issue_identity("bob", roles=["worker", "admin"], instance="i-1", now=NOW)

        cert = verifier.verify(ident.certificate.raw)

        assert cert == ident.certificate
        assert (cert.agent, cert.instance) == ("bob", "i-1")
        assert cert.roles == ("admin", "worker")
        assert cert.sign_pk == ident.keys.sign_pk
        assert cert.box_pk == ident.keys.box_pk
        assert cert.issuer == root.key_id

    def test_second_verify_skips_signature_check(
        self,
        root: TrustRoot,
        verifier: CertificateVerifier,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Verifying the same bytes twice checks the root signature only once."""
        calls = []
        real_verify = VerifyKey.verify

        def counting_verify(self: VerifyKey, *args: object, **kwargs: object) -> bytes:
            calls.append(args)
            return real_verify(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(VerifyKey, "verify", counting_verify)
        raw = root.issue_identity("bob", now=NOW).certificate.raw

        first = verifier.verify(raw)
        second = verifier.verify(raw)

        assert first == second
        assert len(calls) == 1

    def test_expired(
        self, root: TrustRoot, verifier: CertificateVerifier, clock: FakeClock
    ) -> None:
        """A certificate used at or after not_after is refused."""
        cert = root.issue_identity("bob", ttl=3600, now=NOW).certificate
        clock.now = cert.not_after

        with pytest.raises(CertificateError, match="expired"):
            verifier.verify(cert.raw)

    def test_not_yet_valid(
        self, root: TrustRoot, verifier: CertificateVerifier, clock: FakeClock
    ) -> None:
        """A certificate used before not_before is refused."""
        cert = root.issue_identity("bob", now=NOW).certificate
        clock.now = cert.not_before - 1

        with pytest.raises(CertificateError, match="not valid before"):
            verifier.verify(cert.raw)

    def test_cached_certificate_still_expires(
        self, root: TrustRoot, verifier: CertificateVerifier, clock: FakeClock
    ) -> None:
        """A certificate verified (and cached) while valid is refused once it expires."""
        cert = root.issue_identity("bob", ttl=60, now=NOW).certificate
        verifier.verify(cert.raw)
        clock.now = cert.not_after + 1

        with pytest.raises(CertificateError, match="expired"):
            verifier.verify(cert.raw)

    def test_other_root_refused(self, verifier: CertificateVerifier) -> None:
        """A certificate issued by another trust root is refused."""
        other = TrustRoot.generate().issue_identity("bob", now=NOW)

        with pytest.raises(CertificateError, match="trust root"):
            verifier.verify(other.certificate.raw)

    def test_forged_issuer_id_refused(self, root: TrustRoot, clock: FakeClock) -> None:
        """Another root claiming this root's key id fails the signature check."""
        forger = TrustRoot.generate()
        forger.key_id = root.key_id
        forged = forger.issue_identity("bob", now=NOW).certificate

        with pytest.raises(CertificateError, match="bad signature"):
            CertificateVerifier(root.public_key, clock=clock).verify(forged.raw)

    def test_every_flipped_byte_refused(
        self, root: TrustRoot, verifier: CertificateVerifier
    ) -> None:
        """Flipping any bit pattern of any byte yields DecodeError or CertificateError."""
        raw = root.issue_identity("bob", roles=["r"], now=NOW).certificate.raw

        for i in range(len(raw)):
            for mask in (0x01, 0x80, 0xFF):
                tampered = bytearray(raw)
                tampered[i] ^= mask
                with pytest.raises((DecodeError, CertificateError)):
                    verifier.verify(bytes(tampered))

    def test_truncated_refused(self, root: TrustRoot, verifier: CertificateVerifier) -> None:
        """Truncated certificate bytes are a DecodeError."""
        raw = root.issue_identity("bob", now=NOW).certificate.raw

        with pytest.raises(DecodeError):
            verifier.verify(raw[:-1])

    def test_revoked_serial_refused(self, root: TrustRoot, verifier: CertificateVerifier) -> None:
        """A certificate whose serial is revoked is refused, even after being cached."""
        cert = root.issue_identity("bob", now=NOW).certificate
        verifier.verify(cert.raw)
        verifier.revoked.add(cert.serial)

        with pytest.raises(CertificateError, match="revoked"):
            verifier.verify(cert.raw)

    def test_verify_only_root_cannot_issue(self, root: TrustRoot) -> None:
        """A root holding only the public key refuses to issue."""
        public = TrustRoot.from_public(root.public_key)

        with pytest.raises(InvalidArgument, match="only the public key"):
            public.issue_identity("bob")


class TestKeyFiles:
    def test_identity_round_trip(self, root: TrustRoot, tmp_path: Path) -> None:
        """save_identity then load_identity gives back the same keys, certificate and root."""
        ident = root.issue_identity("bob", roles=["worker"], now=NOW)

        d = save_identity(ident, tmp_path)
        loaded = load_identity(d)

        assert loaded.keys.sign_pk == ident.keys.sign_pk
        assert loaded.keys.box_pk == ident.keys.box_pk
        assert loaded.certificate == ident.certificate
        assert loaded.root_public_key == root.public_key

    def test_identity_key_file_mode_0600(self, root: TrustRoot, tmp_path: Path) -> None:
        """The identity key file is written with mode 0600."""
        d = save_identity(root.issue_identity("bob", now=NOW), tmp_path)

        assert _mode(d / IDENTITY_KEY_FILE) == 0o600

    def test_existing_key_file_tightened_to_0600(self, root: TrustRoot, tmp_path: Path) -> None:
        """Saving over a world-readable key file leaves it at mode 0600."""
        key_file = tmp_path / IDENTITY_KEY_FILE
        key_file.write_text("old")
        key_file.chmod(0o644)

        save_identity(root.issue_identity("bob", now=NOW), tmp_path)

        assert _mode(key_file) == 0o600

    def test_key_never_written_to_readable_file(
        self, root: TrustRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Private key bytes are only ever written into a file of mode 0600."""
        key_file = tmp_path / IDENTITY_KEY_FILE
        key_file.write_text("old")
        key_file.chmod(0o644)
        modes_at_write = []

        def spying_write(fd: int, data: bytes) -> int:
            modes_at_write.append(stat.S_IMODE(os.fstat(fd).st_mode))
            return os.write(fd, data)

        fake_os = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if n[0] != "_"})
        fake_os.write = spying_write
        monkeypatch.setattr(identity_mod, "os", fake_os)

        save_identity(root.issue_identity("bob", now=NOW), tmp_path)

        assert modes_at_write == [0o600]

    def test_trust_root_round_trip_and_mode(self, root: TrustRoot, tmp_path: Path) -> None:
        """save_trust_root writes root.key with mode 0600 and load_trust_root restores it."""
        d = save_trust_root(root, tmp_path)

        loaded = load_trust_root(d)

        assert _mode(d / ROOT_KEY_FILE) == 0o600
        assert loaded.can_sign
        assert loaded.public_key == root.public_key

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
    def test_readable_key_file_refused(self, root: TrustRoot, tmp_path: Path, mode: int) -> None:
        """load_identity refuses a group/world-readable key file, naming the file."""
        d = save_identity(root.issue_identity("bob", now=NOW), tmp_path)
        key_file = d / IDENTITY_KEY_FILE
        key_file.chmod(mode)

        with pytest.raises(InvalidArgument) as ei:
            load_identity(d)

        assert str(key_file) in ei.value.message
        assert "chmod 600" in ei.value.message

    def test_readable_key_file_error_names_mode_and_fix(
        self, root: TrustRoot, tmp_path: Path
    ) -> None:
        """The refusal of a 0644 identity key names the file, the mode and `chmod 600 <path>`."""
        d = save_identity(root.issue_identity("bob", now=NOW), tmp_path)
        key_file = d / IDENTITY_KEY_FILE
        key_file.chmod(0o644)

        with pytest.raises(InvalidArgument) as ei:
            load_identity(d)

        assert ei.value.message == (
            f"{key_file}: private key file is accessible to group or others (mode 0644); "
            f"fix it with: chmod 600 {key_file}"
        )

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620, 0o602])
    def test_root_key_with_group_or_other_bits_refused(
        self, root: TrustRoot, tmp_path: Path, mode: int
    ) -> None:
        """load_trust_root refuses a root.key with any group/other bit, with the chmod hint."""
        d = save_trust_root(root, tmp_path)
        key_file = d / ROOT_KEY_FILE
        key_file.chmod(mode)

        with pytest.raises(InvalidArgument) as ei:
            load_trust_root(d)

        assert str(key_file) in ei.value.message
        assert f"mode {mode:04o}" in ei.value.message
        assert f"chmod 600 {key_file}" in ei.value.message

    def test_root_key_file_path_with_0644_refused(self, root: TrustRoot, tmp_path: Path) -> None:
        """Naming root.key itself (not its directory) is checked the same way."""
        key_file = save_trust_root(root, tmp_path) / ROOT_KEY_FILE
        key_file.chmod(0o644)

        with pytest.raises(InvalidArgument, match="chmod 600"):
            load_trust_root(key_file)

    def test_root_key_0600_accepted(self, root: TrustRoot, tmp_path: Path) -> None:
        """A root.key of mode 0600 (or 0400) loads as a signing root."""
        key_file = save_trust_root(root, tmp_path) / ROOT_KEY_FILE
        for mode in (0o600, 0o400):
            key_file.chmod(mode)
            assert load_trust_root(tmp_path).can_sign

    def test_readable_root_pub_accepted(self, root: TrustRoot, tmp_path: Path) -> None:
        """root.pub is public: mode 0644 is fine for a verify-only root."""
        d = save_trust_root(root, tmp_path)
        (d / ROOT_KEY_FILE).unlink()
        (d / ROOT_PUB_FILE).chmod(0o644)

        assert load_trust_root(d).public_key == root.public_key

    def test_mismatched_cert_refused(self, root: TrustRoot, tmp_path: Path) -> None:
        """A certificate that does not match the keys is refused, naming the file."""
        d = save_identity(root.issue_identity("bob", now=NOW), tmp_path)
        other = root.issue_identity("bob", now=NOW)
        (d / IDENTITY_CERT_FILE).write_bytes(other.certificate.raw)

        with pytest.raises(InvalidArgument, match="does not match") as ei:
            load_identity(d)

        assert str(d / IDENTITY_CERT_FILE) in ei.value.message

    def test_missing_key_file_names_file(self, tmp_path: Path) -> None:
        """A missing key file is an InvalidArgument naming the file."""
        with pytest.raises(InvalidArgument, match="not found") as ei:
            load_identity(tmp_path)

        assert IDENTITY_KEY_FILE in ei.value.message


class TestNames:
    @pytest.mark.parametrize("name", ["bob", "a", "0x", "web-1", "my_agent", "a" * 63])
    def test_valid_names_accepted(self, name: str) -> None:
        """Lower-case letters, digits, '-' and '_' are accepted and returned unchanged."""
        assert validate_name("agent", name) == name

    @pytest.mark.parametrize(
        "name",
        ["a.b", "*", ">", "a*", "a>", "Bob", "bOB", "", "a b", "-a", "_a", "a" * 64, "é"],
    )
    def test_invalid_names_refused(self, name: str) -> None:
        """Dots, wildcards, upper case, spaces and bad lengths are refused, naming the kind."""
        with pytest.raises(InvalidArgument, match="invalid endpoint name"):
            validate_name("endpoint", name)

    def test_issue_refuses_bad_agent_name(self, root: TrustRoot) -> None:
        """Issuing for an agent name with a dot is refused."""
        with pytest.raises(InvalidArgument, match="invalid agent name"):
            root.issue_identity("a.b")


class TestRepr:
    def test_instance_keys_hide_private_keys(self) -> None:
        """repr(InstanceKeys) contains neither private key in hex."""
        keys = InstanceKeys.generate()

        r = repr(keys)

        assert bytes(keys.signing).hex() not in r
        assert bytes(keys.box).hex() not in r
        assert bytes(keys.signing).hex()[:16] not in r

    def test_trust_root_hides_private_key(self) -> None:
        """repr(TrustRoot) does not contain the root's private key in hex."""
        sk = SigningKey.generate()
        root = TrustRoot(sk, bytes(sk.verify_key))

        r = repr(root)

        assert bytes(sk).hex() not in r
        assert bytes(sk).hex()[:16] not in r
        assert root.key_id in r

    def test_identity_hides_private_keys(self, root: TrustRoot) -> None:
        """repr(Identity) contains neither private key in hex."""
        ident = root.issue_identity("bob", now=NOW)

        r = repr(ident)

        assert bytes(ident.keys.signing).hex()[:16] not in r
        assert bytes(ident.keys.box).hex()[:16] not in r
