"""The HTTP gateway's API keys: their format, the signed entry that maps one to a principal, and
the gateway's check of a presented key (revoked through the head, fail closed when stale)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from mesh._core.gateway_keys import (
    KEY_TYPE,
    GatewayKey,
    check_grant,
    decode_gateway_key,
    encode_gateway_key,
    key_digest,
    key_id_of,
    new_gateway_key,
)
from mesh._core.head import Head
from mesh._core.signed import sign_document
from mesh.bridges.apikeys import KeyRing, presented_key
from mesh.control_plane import GatewayKeyIssueRequest, GatewayKeyRevokeRequest, TrustRoot
from mesh.errors import DecodeError, InvalidArgument, Unauthenticated, Unavailable

NOW = 1_767_225_600.0


@pytest.fixture
def root() -> TrustRoot:
    return TrustRoot.generate()


def entry_for(key: str, **changes: Any) -> GatewayKey:
    base = GatewayKey(
        id=key_id_of(key) or "",
        sha256=key_digest(key).hex(),
        principal="user:alice",
        roles=("reader",),
        issued_at=NOW,
        expires_at=NOW + 3600,
        issued_by="admin/0123456789abcdef",
    )
    return replace(base, **changes)


# --- keys -------------------------------------------------------------------------------------


def test_a_new_key_is_mgk_id_secret_with_256_random_bits() -> None:
    key_id, key = new_gateway_key()
    prefix, kid, secret = key.split("_", 2)
    assert (prefix, kid) == ("mgk", key_id)
    assert len(key_id) == 24 and int(key_id, 16) >= 0
    assert len(secret) == 43  # 32 bytes, URL-safe base64 without padding
    assert key_id_of(key) == key_id
    assert new_gateway_key()[1] != key


def test_a_key_is_made_from_the_random_source_given() -> None:
    key_id, key = new_gateway_key(lambda n: bytes(range(n)))
    assert key_id == "000102030405060708090a0b"
    assert key == f"mgk_{key_id}_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


@pytest.mark.parametrize(
    "text",
    ["", "mgk_", "mgk_0011_abc", "sk_" + "0" * 24 + "_" + "A" * 43,
     "mgk_" + "G" * 24 + "_" + "A" * 43, "mgk_" + "0" * 24 + "_" + "A" * 42,
     "mgk_" + "0" * 24 + "_" + "A" * 42 + "=", " mgk_" + "0" * 24 + "_" + "A" * 43],
)  # fmt: skip
def test_anything_else_is_not_a_key(text: str) -> None:
    assert key_id_of(text) is None


def test_the_digest_is_sha256_of_the_whole_key() -> None:
    _, key = new_gateway_key()
    assert key_digest(key) == hashlib.sha256(key.encode()).digest()


def test_an_entry_matches_only_its_own_key() -> None:
    _, key = new_gateway_key()
    entry = entry_for(key)
    assert entry.matches(key_digest(key))
    assert not entry.matches(key_digest(key[:-1] + ("A" if key[-1] != "A" else "B")))
    assert not entry.matches(b"")
    assert not replace(entry, sha256="not hex").matches(key_digest(key))


# --- grants -----------------------------------------------------------------------------------


def test_a_grant_is_a_kind_name_principal_and_scope_roles() -> None:
    check_grant("user:alice", ["reader", "library.read"])
    check_grant("svc-1:ci@example.com", [])
    with pytest.raises(InvalidArgument, match="must look like kind:name"):
        check_grant("alice", [])
    with pytest.raises(InvalidArgument, match=r"INVALID_ARGUMENT: role 'Admin' must match"):
        check_grant("user:alice", ["Admin"])
    with pytest.raises(InvalidArgument, match="at most 32 roles"):
        check_grant("user:alice", [f"r{i}" for i in range(33)])


def test_the_registry_requests_check_their_fields() -> None:
    assert GatewayKeyIssueRequest(principal="user:bob").ttl == 90 * 86400
    with pytest.raises(ValueError, match="must look like kind:name"):
        GatewayKeyIssueRequest(principal="bob")
    with pytest.raises(ValueError):
        GatewayKeyIssueRequest(principal="user:bob", ttl=400 * 86400)
    with pytest.raises(ValueError, match="24 lowercase hex"):
        GatewayKeyRevokeRequest(id="0" * 32)
    assert GatewayKeyRevokeRequest(id="ab" * 12).id == "ab" * 12


# --- entries ----------------------------------------------------------------------------------


def test_an_entry_round_trips_signed_by_the_root(root: TrustRoot) -> None:
    _, key = new_gateway_key()
    entry = entry_for(key, roles=("writer", "reader"))
    raw = encode_gateway_key(entry, "mesh", root.sign)
    got = decode_gateway_key(raw, root.public_key, "mesh", entry.id)
    assert got == replace(entry, roles=("reader", "writer"))
    body = msgpack.unpackb(msgpack.unpackb(raw)[0])
    assert list(body) == ["type", "prefix", "id", "sha256", "principal", "roles", "issued_at",
                          "expires_at", "issued_by"]  # fmt: skip
    assert body["type"] == KEY_TYPE and body["roles"] == ["reader", "writer"]
    assert (body["issued_at"], body["expires_at"]) == (int(NOW * 1000), int((NOW + 3600) * 1000))
    assert not got.expired(NOW + 3599) and got.expired(NOW + 3600)


def test_an_entry_signed_by_another_root_is_refused(root: TrustRoot) -> None:
    _, key = new_gateway_key()
    raw = encode_gateway_key(entry_for(key), "mesh", TrustRoot.generate().sign)
    with pytest.raises(Unauthenticated, match="not signed by the trust root"):
        decode_gateway_key(raw, root.public_key, "mesh")


def test_an_entry_of_another_prefix_or_stored_under_another_id_is_refused(
    root: TrustRoot,
) -> None:
    _, key = new_gateway_key()
    raw = encode_gateway_key(entry_for(key), "other", root.sign)
    with pytest.raises(Unauthenticated, match="for the mesh prefix 'other', not 'mesh'"):
        decode_gateway_key(raw, root.public_key, "mesh")
    raw = encode_gateway_key(entry_for(key), "mesh", root.sign)
    with pytest.raises(Unauthenticated, match="stored under another id"):
        decode_gateway_key(raw, root.public_key, "mesh", "f" * 24)


def _signed(root: TrustRoot, **fields: Any) -> bytes:
    _, key = new_gateway_key()
    body: dict[str, Any] = {
        "type": KEY_TYPE,
        "prefix": "mesh",
        "id": key_id_of(key),
        "sha256": key_digest(key).hex(),
        "principal": "user:alice",
        "roles": [],
        "issued_at": 1,
        "expires_at": 2,
        "issued_by": "admin/x",
    }
    body.update(fields)
    return sign_document({k: v for k, v in body.items() if v is not None}, root.sign)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "mesh.head.v1"}, "not a gateway key"),
        ({"id": "ABC"}, "'id' must be 24 lowercase hex"),
        ({"id": None}, "field 'id' is missing"),
        ({"sha256": "00"}, "'sha256' must be 64 lowercase hex"),
        ({"principal": "alice"}, "must look like kind:name"),
        ({"roles": [1]}, "'roles' must be a list of strings"),
        ({"roles": ["Bad Role"]}, "role 'Bad Role' must match"),
        ({"roles": "reader"}, "field 'roles' must be list"),
        ({"issued_at": True}, "field 'issued_at' must be int"),
        ({"expires_at": 0}, "expires before it was issued"),
        ({"issued_by": None}, "field 'issued_by' is missing"),
    ],
)
def test_a_malformed_entry_is_refused_naming_the_field(
    root: TrustRoot, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_gateway_key(_signed(root, **fields), root.public_key, "mesh")


def test_junk_is_a_decode_error(root: TrustRoot) -> None:
    with pytest.raises(DecodeError):
        decode_gateway_key(b"\x00junk", root.public_key, "mesh")


# --- the gateway's check ------------------------------------------------------------------------


def test_the_key_comes_from_bearer_or_x_api_key() -> None:
    assert presented_key("Bearer mgk_x", None) == "mgk_x"
    assert presented_key("bearer  mgk_x ", "other") == "mgk_x"
    assert presented_key(None, " mgk_y ") == "mgk_y"
    assert presented_key("Basic dXNlcg==", "mgk_y") is None  # another scheme is not a key
    assert presented_key("Bearer", None) is None
    assert presented_key(None, "") is None
    assert presented_key(None, None) is None


class World:
    """A key ring over a fake mesh: its control store's root and prefix, and a head."""

    def __init__(self, root: TrustRoot, *, allow_stale: bool = False) -> None:
        self.root = root
        self.now = NOW
        self.head: Head | None = Head("mesh", 1, NOW - 1, NOW + 120)
        fake = SimpleNamespace(control=SimpleNamespace(root=root, prefix="mesh"), head=None)
        self.mesh = fake
        self.ring = KeyRing(fake, allow_stale=allow_stale, clock=lambda: self.now)  # type: ignore[arg-type]
        self._sync()

    def _sync(self) -> None:
        self.mesh.head = self.head

    def add(self, **changes: Any) -> str:
        _, key = new_gateway_key()
        entry = entry_for(key, **changes)
        self.ring._apply(entry.id, encode_gateway_key(entry, "mesh", self.root.sign))
        return key

    def revoke(self, key: str) -> None:
        assert self.head is not None
        self.head = replace(self.head, version=self.head.version + 1,
                            revoked=((key_id_of(key) or "", int(NOW) + 3600),))  # fmt: skip
        self._sync()


def test_a_valid_key_names_its_principal_and_roles(root: TrustRoot) -> None:
    w = World(root)
    key = w.add()
    who = w.ring.authenticate(key)
    assert (who.name, who.roles, who.key_id) == ("user:alice", ("reader",), key_id_of(key))
    assert len(w.ring) == 1


@pytest.mark.parametrize(
    ("presented", "message"),
    [
        (None, "an API key is required"),
        ("not-a-key", "malformed"),
        ("mgk_" + "0" * 24 + "_" + "A" * 43, "is not valid"),
    ],
)
def test_no_key_a_malformed_or_an_unknown_one_is_refused(
    root: TrustRoot, presented: str | None, message: str
) -> None:
    w = World(root)
    w.add()
    with pytest.raises(Unauthenticated, match=message):
        w.ring.authenticate(presented)


def test_a_known_id_with_another_secret_is_refused(root: TrustRoot) -> None:
    w = World(root)
    key = w.add()
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated, match="is not valid"):
        w.ring.authenticate(forged)


def test_an_expired_key_is_refused(root: TrustRoot) -> None:
    w = World(root)
    key = w.add(expires_at=NOW + 10)
    w.ring.authenticate(key)
    w.now = NOW + 10
    w.head = replace(w.head, expires_at=NOW + 200)  # type: ignore[arg-type]
    w._sync()
    with pytest.raises(Unauthenticated, match="has expired"):
        w.ring.authenticate(key)


def test_a_key_the_head_revokes_is_refused(root: TrustRoot) -> None:
    w = World(root)
    key = w.add()
    w.ring.authenticate(key)
    w.revoke(key)
    with pytest.raises(Unauthenticated, match="was revoked"):
        w.ring.authenticate(key)


def test_without_a_fresh_head_every_key_is_refused_unless_stale_is_allowed(
    root: TrustRoot,
) -> None:
    for allow_stale in (False, True):
        w = World(root, allow_stale=allow_stale)
        key = w.add()
        w.now = NOW + 121  # the head expired
        if allow_stale:
            assert w.ring.authenticate(key).name == "user:alice"
        else:
            with pytest.raises(Unavailable, match="expired, so a recent revocation"):
                w.ring.authenticate(key)
        w.head = None
        w._sync()
        with pytest.raises(Unavailable, match="no signed head"):
            w.ring.authenticate(key)


def test_entries_that_do_not_verify_are_ignored_and_deleted_ones_forgotten(
    root: TrustRoot,
) -> None:
    w = World(root)
    key = w.add()
    key_id = key_id_of(key) or ""
    other = TrustRoot.generate()
    _, forged_key = new_gateway_key()
    forged = entry_for(forged_key)
    w.ring._apply(forged.id, encode_gateway_key(forged, "mesh", other.sign))
    with pytest.raises(Unauthenticated):
        w.ring.authenticate(forged_key)
    # A forged rewrite of a genuine entry leaves the genuine one in place.
    w.ring._apply(key_id, encode_gateway_key(entry_for(key, principal="user:root"), "mesh",
                                             other.sign))  # fmt: skip
    assert w.ring.authenticate(key).name == "user:alice"
    w.ring._apply(key_id, None)
    with pytest.raises(Unauthenticated, match="is not valid"):
        w.ring.authenticate(key)


def test_checking_a_key_takes_microseconds(root: TrustRoot) -> None:
    """One SHA-256 and a dict lookup: nothing slow on the request path."""
    w = World(root)
    key = w.add()
    start = time.perf_counter()
    for _ in range(2000):
        w.ring.authenticate(key)
    assert (time.perf_counter() - start) / 2000 < 200e-6
