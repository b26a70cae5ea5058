"""Identities: the trust root, per-instance keys, certificates, their verification and key files.

A certificate binds an agent name, an instance id and roles to the instance's Ed25519 signing
key and X25519 box key, signed by the trust root. Its wire form is the msgpack array
``[body, signature]`` where ``body`` is the canonical msgpack map documented in
``docs/protocol.md`` and ``signature`` is the issuer's Ed25519 signature over ``body``.

Pure core: no I/O except the explicit key-file functions at the bottom.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from mesh._core.names import RESERVED_INSTANCES, validate_name
from mesh._core.signed import open_document, typed_field
from mesh.errors import CertificateError, DecodeError, InvalidArgument

__all__ = [
    "Certificate",
    "CertificateVerifier",
    "Identity",
    "InstanceKeys",
    "TrustRoot",
    "load_identity",
    "load_trust_root",
    "new_instance_id",
    "save_identity",
    "save_trust_root",
]

CERT_VERSION = 1
DEFAULT_CERT_TTL = 24 * 3600.0
Clock = Callable[[], float]


def new_instance_id() -> str:
    """A fresh random instance id (16 hex characters)."""
    return secrets.token_hex(8)


def key_id(public_key: bytes) -> str:
    """Short stable id of a public key: hex of BLAKE2b with an 8-byte digest over the key."""
    return hashlib.blake2b(public_key, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Certificate:
    """A verified or freshly issued certificate (see ``docs/protocol.md``, Certificates)."""

    serial: str
    agent: str
    instance: str
    roles: tuple[str, ...]
    sign_pk: bytes
    box_pk: bytes
    not_before: int
    not_after: int
    issuer: str
    raw: bytes = field(repr=False)
    version: int = CERT_VERSION

    @property
    def fingerprint(self) -> str:
        """Hex BLAKE2b-128 of the certificate's wire bytes."""
        return hashlib.blake2b(self.raw, digest_size=16).hexdigest()

    @classmethod
    def decode(cls, raw: bytes) -> tuple[Certificate, bytes, bytes]:
        """Parse wire bytes without verifying them.

        Returns:
            ``(certificate, body, signature)``.

        Raises:
            DecodeError: when the bytes are not a well-formed certificate.
        """
        m, body, sig = open_document(raw, "certificate")
        roles = typed_field(m, "roles", list, "certificate")
        if not all(isinstance(r, str) for r in roles):
            raise DecodeError("certificate roles must be a list of strings")
        cert = cls(
            version=typed_field(m, "version", int, "certificate"),
            serial=typed_field(m, "serial", str, "certificate"),
            agent=typed_field(m, "agent", str, "certificate"),
            instance=typed_field(m, "instance", str, "certificate"),
            roles=tuple(roles),
            sign_pk=typed_field(m, "sign_pk", bytes, "certificate"),
            box_pk=typed_field(m, "box_pk", bytes, "certificate"),
            not_before=typed_field(m, "not_before", int, "certificate"),
            not_after=typed_field(m, "not_after", int, "certificate"),
            issuer=typed_field(m, "issuer", str, "certificate"),
            raw=raw,
        )
        if cert.version != CERT_VERSION:
            raise DecodeError(f"unsupported certificate version {cert.version}")
        if len(cert.sign_pk) != 32 or len(cert.box_pk) != 32:
            raise DecodeError("certificate keys must be 32 bytes")
        return cert, body, sig


def _encode_cert_body(
    *,
    serial: str,
    agent: str,
    instance: str,
    roles: Sequence[str],
    sign_pk: bytes,
    box_pk: bytes,
    not_before: int,
    not_after: int,
    issuer: str,
) -> bytes:
    # Canonical form: a map with keys in sorted order, shortest msgpack encodings.
    body = {
        "agent": agent,
        "box_pk": box_pk,
        "instance": instance,
        "issuer": issuer,
        "not_after": not_after,
        "not_before": not_before,
        "roles": sorted(set(roles)),
        "serial": serial,
        "sign_pk": sign_pk,
        "version": CERT_VERSION,
    }
    return msgpack.packb(body, use_bin_type=True)


@dataclass(frozen=True, slots=True)
class InstanceKeys:
    """One instance's private keys: Ed25519 for signing, X25519 for sealing."""

    signing: SigningKey
    box: PrivateKey

    @classmethod
    def generate(cls) -> InstanceKeys:
        """Make fresh keys locally; they never leave the process unless saved by the owner."""
        return cls(SigningKey.generate(), PrivateKey.generate())

    @property
    def sign_pk(self) -> bytes:
        return bytes(self.signing.verify_key)

    @property
    def box_pk(self) -> bytes:
        return bytes(self.box.public_key)

    def __repr__(self) -> str:  # never print private material
        return f"InstanceKeys(sign_pk={self.sign_pk.hex()[:16]}…)"


class TrustRoot:
    """The trust root: an Ed25519 key pair that signs certificates.

    Agents hold only ``public_key``; the private half lives with the registry / operator.
    """

    def __init__(
        self, signing: SigningKey | None, public_key: bytes, not_after: float | None = None
    ) -> None:
        self._signing = signing
        self.public_key = public_key
        self.key_id = key_id(public_key)
        # When operators should have rotated to a new root (advisory: kept in root.json beside
        # the key; the registry warns and exports it as a metric well before).
        self.not_after = not_after

    @classmethod
    def generate(cls) -> TrustRoot:
        """A new root key pair."""
        sk = SigningKey.generate()
        return cls(sk, bytes(sk.verify_key))

    @classmethod
    def from_public(cls, public_key: bytes) -> TrustRoot:
        """A verify-only root from its 32-byte public key."""
        if len(public_key) != 32:
            raise InvalidArgument("trust root public key must be 32 bytes")
        return cls(None, public_key)

    @property
    def can_sign(self) -> bool:
        return self._signing is not None

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the root key (policy revisions, registry records)."""
        if self._signing is None:
            raise InvalidArgument("this trust root holds only the public key; cannot sign")
        return self._signing.sign(data).signature

    def issue(
        self,
        agent: str,
        *,
        sign_pk: bytes,
        box_pk: bytes,
        instance: str | None = None,
        roles: Iterable[str] = (),
        ttl: float = DEFAULT_CERT_TTL,
        now: float | None = None,
    ) -> Certificate:
        """Issue a certificate for an instance's public keys.

        Args:
            agent: the agent name.
            sign_pk: the instance's Ed25519 public key.
            box_pk: the instance's X25519 public key.
            instance: the instance id (fresh random when omitted).
            roles: role names granted.
            ttl: lifetime in seconds (default 24 h).
            now: issuance time (unix seconds), for tests.

        Returns:
            The signed certificate.

        Raises:
            InvalidArgument: for a bad name or a verify-only root.
        """
        validate_name("agent", agent)
        instance = validate_name("instance", instance or new_instance_id())
        if instance in RESERVED_INSTANCES:
            raise InvalidArgument(f"instance name {instance!r} is reserved")
        roles = [validate_name("role", r) for r in roles]
        t = int(time.time() if now is None else now)
        body = _encode_cert_body(
            serial=secrets.token_hex(16),
            agent=agent,
            instance=instance,
            roles=roles,
            sign_pk=sign_pk,
            box_pk=box_pk,
            not_before=t - 60,  # tolerate small clock skew between issuer and peers
            not_after=t + int(ttl),
            issuer=self.key_id,
        )
        raw = msgpack.packb([body, self.sign(body)], use_bin_type=True)
        return Certificate.decode(raw)[0]

    def reissue(self, cert: Certificate, ttl: float | None = None) -> Certificate:
        """A fresh certificate (new serial) for the same agent, instance, roles and keys.

        Args:
            cert: the certificate to renew.
            ttl: the new lifetime (default: the old one's).
        """
        life = cert.not_after - cert.not_before - 60 if ttl is None else ttl
        return self.issue(
            cert.agent,
            sign_pk=cert.sign_pk,
            box_pk=cert.box_pk,
            instance=cert.instance,
            roles=cert.roles,
            ttl=max(life, 60.0),
        )

    def issue_identity(
        self,
        agent: str,
        *,
        roles: Iterable[str] = (),
        ttl: float = DEFAULT_CERT_TTL,
        instance: str | None = None,
        now: float | None = None,
    ) -> Identity:
        """Make keys and a certificate in one step (offline issuance, tests, the demo)."""
        keys = InstanceKeys.generate()
        cert = self.issue(
            agent,
            sign_pk=keys.sign_pk,
            box_pk=keys.box_pk,
            instance=instance,
            roles=roles,
            ttl=ttl,
            now=now,
        )
        return Identity(keys=keys, certificate=cert, root_public_key=self.public_key)

    def __repr__(self) -> str:
        return f"TrustRoot(key_id={self.key_id}, can_sign={self.can_sign})"


@dataclass(frozen=True, slots=True)
class Identity:
    """What an instance needs to take part: its keys, its certificate and the root it trusts."""

    keys: InstanceKeys
    certificate: Certificate
    root_public_key: bytes

    @property
    def agent(self) -> str:
        return self.certificate.agent

    @property
    def instance(self) -> str:
        return self.certificate.instance


class CertificateVerifier:
    """Verifies certificates against the trust root, caching results by the certificate bytes.

    A cached certificate is still checked for expiry and revocation on every use; only the
    signature check and decoding are skipped.
    """

    def __init__(
        self,
        root_public_key: bytes,
        *,
        clock: Clock = time.time,
        max_entries: int = 4096,
    ) -> None:
        self._root = VerifyKey(root_public_key)
        self._root_id = key_id(root_public_key)
        self._clock = clock
        self._cache: OrderedDict[bytes, Certificate] = OrderedDict()
        self._max = max_entries
        self.revoked: set[str] = set()

    def verify(self, raw: bytes) -> Certificate:
        """Return the certificate if it is validly signed by the root, current and not revoked.

        Raises:
            DecodeError: malformed bytes.
            CertificateError: wrong issuer, bad signature, expired, not yet valid, or revoked.
        """
        cert = self._signed(raw)
        now = self._clock()
        if now >= cert.not_after:
            raise CertificateError(
                f"certificate {cert.serial} of {cert.agent!r} expired at {cert.not_after}"
            )
        if now < cert.not_before:
            raise CertificateError(
                f"certificate {cert.serial} of {cert.agent!r} is not valid before {cert.not_before}"
            )
        if cert.serial in self.revoked:
            raise CertificateError(f"certificate {cert.serial} of {cert.agent!r} is revoked")
        return cert

    def verify_for_renewal(self, raw: bytes, grace: float) -> tuple[Certificate, float]:
        """Like ``verify``, but accept a certificate up to ``grace`` seconds past its expiry:
        only the registry's grace renewal may use this, never an ordinary request.

        Returns:
            The certificate and how many seconds past its expiry it is (``0.0`` if not).

        Raises:
            DecodeError: malformed bytes.
            CertificateError: wrong issuer, bad signature, not yet valid, revoked, or expired
                for longer than ``grace`` (the message says a new join token is needed).
        """
        cert = self._signed(raw)
        now = self._clock()
        expired_for = max(0.0, now - cert.not_after)
        if now >= cert.not_after + grace:
            raise CertificateError(
                f"certificate {cert.serial} of {cert.agent!r} expired {expired_for:.0f} s ago, "
                f"beyond the renewal grace of {grace:.0f} s: the agent needs a new join token "
                f"(mesh-policy identity token {cert.agent})"
            )
        if now < cert.not_before:
            raise CertificateError(
                f"certificate {cert.serial} of {cert.agent!r} is not valid before {cert.not_before}"
            )
        if cert.serial in self.revoked:
            raise CertificateError(f"certificate {cert.serial} of {cert.agent!r} is revoked")
        return cert, expired_for

    def _signed(self, raw: bytes) -> Certificate:
        """Decode ``raw`` and check issuer and signature (cached by the bytes)."""
        cert = self._cache.get(raw)
        if cert is None:
            cert, body, sig = Certificate.decode(raw)
            if cert.issuer != self._root_id:
                raise CertificateError(
                    f"certificate of {cert.agent!r} was issued by {cert.issuer}, not by this "
                    f"mesh's trust root {self._root_id}"
                )
            try:
                self._root.verify(body, sig)
            except BadSignatureError as exc:
                raise CertificateError(
                    f"certificate of {cert.agent!r} has a bad signature"
                ) from exc
            self._cache[raw] = cert
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return cert


# --- key files -------------------------------------------------------------------------------

ROOT_KEY_FILE = "root.key"
ROOT_PUB_FILE = "root.pub"
ROOT_META_FILE = "root.json"
IDENTITY_KEY_FILE = "identity.key"
IDENTITY_CERT_FILE = "identity.cert"


def write_private_file(path: Path, data: bytes) -> None:
    # A fresh file created 0600 and renamed over the target: the key is never in a file that
    # others can read, even when the target existed with a looser mode.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _check_private_mode(path: Path) -> None:
    """Refuse a private key file with any group or other permission bit (``stat`` errors
    propagate: the caller maps them).

    Raises:
        InvalidArgument: naming the file, its mode and the fix.
    """
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InvalidArgument(
            f"{path}: private key file is accessible to group or others (mode {mode:04o}); "
            f"fix it with: chmod 600 {path}"
        )


def save_trust_root(root: TrustRoot, directory: str | Path) -> Path:
    """Write ``root.key`` (0600) and ``root.pub`` into ``directory``.

    Raises:
        InvalidArgument: for a verify-only root.
    """
    if root._signing is None:
        raise InvalidArgument("cannot save a verify-only trust root")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_private_file(d / ROOT_KEY_FILE, bytes(root._signing).hex().encode() + b"\n")
    (d / ROOT_PUB_FILE).write_text(root.public_key.hex() + "\n")
    if root.not_after is not None:
        meta = {"key_id": root.key_id, "not_after": int(root.not_after)}
        (d / ROOT_META_FILE).write_text(json.dumps(meta) + "\n")
    return d


def load_trust_root(path: str | Path) -> TrustRoot:
    """Load a trust root: a directory with ``root.key`` (full) or ``root.pub`` (verify-only),
    or a path to either file.

    Raises:
        InvalidArgument: naming the file and what is wrong with it.
    """
    p = Path(path)
    if p.is_dir():
        p = p / ROOT_KEY_FILE if (p / ROOT_KEY_FILE).exists() else p / ROOT_PUB_FILE
    try:
        if p.name == ROOT_KEY_FILE:
            _check_private_mode(p)
        text = p.read_text().strip()
        raw = bytes.fromhex(text)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{p}: trust root file not found") from exc
    except OSError as exc:
        raise InvalidArgument(f"{p}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise InvalidArgument(f"{p}: expected 64 hex characters") from exc
    if len(raw) != 32:
        raise InvalidArgument(f"{p}: expected a 32-byte key in hex, got {len(raw)} bytes")
    not_after = None
    meta_file = p.with_name(ROOT_META_FILE)
    if meta_file.exists():
        try:
            not_after = float(json.loads(meta_file.read_text())["not_after"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{meta_file}: not a valid trust root metadata file") from exc
    if p.name == ROOT_KEY_FILE:
        sk = SigningKey(raw)
        return TrustRoot(sk, bytes(sk.verify_key), not_after)
    return TrustRoot(None, raw, not_after)


def save_keys(keys: InstanceKeys, path: Path) -> None:
    """Write an instance's private keys to ``path`` (JSON, mode 0600)."""
    saved = {"sign_seed": bytes(keys.signing).hex(), "box_sk": bytes(keys.box).hex()}
    write_private_file(path, json.dumps(saved).encode() + b"\n")


def load_keys(path: Path, what: str = "identity key file") -> InstanceKeys:
    """Read keys written by ``save_keys``, refusing a file group or others can access.

    Raises:
        FileNotFoundError: there is no such file (the caller says what that means).
        InvalidArgument: naming the file and the problem (mode, unreadable, malformed).
    """
    try:
        _check_private_mode(path)
        saved = json.loads(path.read_text())
        return InstanceKeys(
            SigningKey(bytes.fromhex(saved["sign_seed"])),
            PrivateKey(bytes.fromhex(saved["box_sk"])),
        )
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{path}: not a valid {what}") from exc


def save_identity(identity: Identity, directory: str | Path) -> Path:
    """Write ``identity.key`` (0600), ``identity.cert`` and ``root.pub`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_keys(identity.keys, d / IDENTITY_KEY_FILE)
    (d / IDENTITY_CERT_FILE).write_bytes(identity.certificate.raw)
    (d / ROOT_PUB_FILE).write_text(identity.root_public_key.hex() + "\n")
    return d


def load_identity(directory: str | Path, *, root_public_key: bytes | None = None) -> Identity:
    """Load an identity directory written by ``save_identity`` or ``mesh-policy identity issue``.

    The certificate must match the keys. Its signature is checked by whoever uses it.

    Args:
        directory: the identity directory.
        root_public_key: overrides the ``root.pub`` kept beside the identity.

    Raises:
        InvalidArgument: naming the file and the problem (missing, unreadable, mismatched keys).
    """
    d = Path(directory)
    key_file, cert_file = d / IDENTITY_KEY_FILE, d / IDENTITY_CERT_FILE
    try:
        keys = load_keys(key_file)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{key_file}: identity key file not found") from exc
    try:
        cert = Certificate.decode(cert_file.read_bytes())[0]
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{cert_file}: certificate file not found") from exc
    except OSError as exc:
        raise InvalidArgument(f"{cert_file}: cannot read ({exc.strerror})") from exc
    except DecodeError as exc:
        raise InvalidArgument(f"{cert_file}: {exc.message}") from exc
    if cert.sign_pk != keys.sign_pk or cert.box_pk != keys.box_pk:
        raise InvalidArgument(f"{cert_file}: certificate does not match the keys in {key_file}")
    if root_public_key is None:
        root_public_key = load_trust_root(d / ROOT_PUB_FILE).public_key
    return Identity(keys=keys, certificate=cert, root_public_key=root_public_key)
