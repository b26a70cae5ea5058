"""The test vectors and wire constants of ``docs/protocol.md``, recomputed with the code.

The vectors are read from the document itself (section 35, the ``vector`` blocks, and the
request's byte-layout table), so the test fails when the document or the code changes alone.
Every entry of every block must be checked: an entry the test does not read fails it too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt, crypto_scalarmult
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

import mesh._core.crypto as crypto_mod
import mesh._core.delegation as delegation_mod
import mesh._core.identity as identity_mod
from mesh._core.beats import BEAT_CONTEXT, decode_beat, encode_beat
from mesh._core.config import Limits, MeshConfig
from mesh._core.crypto import (
    NONCE_LEN,
    SIG_LEN,
    TAG_LEN,
    derive_pair_key,
    open_body,
    seal_body,
    sign_frame,
    signed_event_bytes,
    verify_frame,
)
from mesh._core.delegation import (
    LINK_TYPE,
    Delegate,
    LinkCache,
    encode_chain,
    link_digest,
    start,
    verify_chain,
)
from mesh._core.envelope import (
    FRAME_OVERHEAD,
    HDR_DEADLINE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    MAGIC,
    MAX_HEADER,
    PREFIX,
    PREFIX_LEN,
    Header,
    Kind,
    control_header,
    decode_frame,
    encode_frame,
    reply_header,
    request_header,
)
from mesh._core.gateway_keys import (
    KEY_TYPE,
    GatewayKey,
    decode_gateway_key,
    encode_gateway_key,
    key_digest,
    key_id_of,
    new_gateway_key,
)
from mesh._core.identity import Certificate, CertificateVerifier, TrustRoot, new_instance_id
from mesh._core.names import beat_subject, event_subject, rpc_subject
from mesh._core.records import EndpointInfo, decode_record, encode_record
from mesh._core.schemas import canonical_json, schema_hash
from mesh._runtime.control import ControlStore
from mesh._runtime.enrol import _proof_bytes
from mesh.errors import DecodeError, Unauthenticated
from mesh.testing import FakeClock

PROTOCOL = Path(__file__).parents[2] / "docs" / "protocol.md"

# How many expected values (entries after "# expected") each block of section 35 holds. A block
# that loses or gains one fails the count: update this table with the document.
EXPECTED_VALUES = {
    "keys": 8,
    "certificate": 2,
    "request": 4,
    "routed": 2,
    "reply": 2,
    "chunk": 2,
    "control": 2,
    "delegation": 5,
    "refusal": 1,
    "event": 6,
    "enrolment": 3,
    "beat": 4,
    "schema": 3,
    "gateway-key": 5,
}
LAYOUT_ROWS = 18  # rows of the request's byte-layout table


# --- reading the document --------------------------------------------------------------------


def sections(text: str) -> dict[str, str]:
    """``{"35": "<the text of section 35>", ...}`` by the ``## N. Title`` headings."""
    heads = list(re.finditer(r"^## (\d+)\. ", text, re.M))
    ends = [m.start() for m in heads[1:]] + [len(text)]
    return {m.group(1): text[m.start() : end] for m, end in zip(heads, ends, strict=True)}


def find(pattern: str, text: str, what: str) -> re.Match[str]:
    """The first match of ``pattern`` (multi-line mode), failing with ``what`` when none."""
    m = re.search(pattern, text, re.M)
    assert m, f"docs/protocol.md no longer gives {what} in the form this test reads"
    return m


def number(text: str) -> int:
    """An integer written in groups of three digits, as the document does (``1 044 548``)."""
    return int(text.replace(" ", ""))


@dataclass
class Entry:
    name: str
    value: str  # the value's text, continuation lines joined with single spaces
    comment: str
    expected: bool
    line: int


@dataclass
class Block:
    """One ``vector`` block: its entries by name, and which of them a test has read."""

    name: str
    entries: dict[str, Entry]
    resolve: Callable[[str], bytes]
    read: set[str] = field(default_factory=set)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise AssertionError(f"vector block {self.name!r} has no entry {name!r}")
        self.read.add(name)
        return self.entries[name]

    def bytes(self, name: str) -> bytes:
        """Hex bytes (with ``<references>``), JSON text as written, or a string's UTF-8."""
        e = self.entry(name)
        data = self.resolve(f"{self.name}.{name}")
        declared = re.match(r"(\d+) bytes\b", e.comment)
        if declared:
            assert len(data) == int(declared.group(1)), (
                f"{self.name}.{name} (line {e.line}) is {len(data)} bytes, its comment says "
                f"{declared.group(0)}"
            )
        return data

    def integer(self, name: str) -> int:
        e = self.entry(name)
        assert re.fullmatch(r"-?\d+", e.value), f"{self.name}.{name}: not an integer: {e.value}"
        return int(e.value)

    def text(self, name: str) -> str:
        e = self.entry(name)
        value = json.loads(e.value) if e.value.startswith('"') else None
        assert isinstance(value, str), f"{self.name}.{name}: not a quoted string: {e.value}"
        return value

    def json(self, name: str) -> Any:
        return json.loads(self.entry(name).value)

    def header(self, types: dict[str, type]) -> dict[str, Any]:
        """The header fields (names that are keys of section 4) in document order, typed."""
        out: dict[str, Any] = {}
        for name in self.entries:
            typ = types.get(name)
            if typ is int:
                out[name] = self.integer(name)
            elif typ is str:
                out[name] = self.text(name)
            elif typ is bytes:
                out[name] = self.bytes(name)
            elif typ is bool:
                raw = self.entry(name).value
                assert raw in ("true", "false"), f"{self.name}.{name}: not a bool: {raw}"
                out[name] = raw == "true"
            elif typ is dict:
                out[name] = self.json(name)
        return out

    def expected_count(self) -> int:
        return sum(e.expected for e in self.entries.values())

    def unread(self) -> list[str]:
        return [name for name in self.entries if name not in self.read]


_JSON_START = ('"', "{", "[")


def _split_value(text: str, where: str) -> tuple[str, str]:
    """``(value, comment)`` of the text after ``name:``: JSON values end where JSON says,
    anything else at ``#``."""
    text = text.strip()
    if text.startswith(_JSON_START):
        try:
            _, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{where}: bad JSON value {text!r}: {exc}") from None
        rest = text[end:].strip()
        if rest and not rest.startswith("#"):
            raise AssertionError(f"{where}: text after the value: {rest!r}")
        return text[:end], rest[1:].strip()
    value, _, comment = text.partition("#")
    return value.strip(), comment.strip()


def parse_blocks(text: str) -> dict[str, Block]:
    """Every ``vector`` block of the document."""
    raw: dict[str, dict[str, Entry]] = {}
    for m in re.finditer(r"^```vector (\S+)\n(.*?)^```$", text, re.M | re.S):
        name = m.group(1)
        assert name not in raw, f"two vector blocks named {name!r}"
        first_line = text.count("\n", 0, m.start(2)) + 1
        entries: dict[str, Entry] = {}
        expected = False
        current: Entry | None = None
        for i, line in enumerate(m.group(2).splitlines()):
            where = f"docs/protocol.md:{first_line + i}"
            if not line.strip():
                current = None
            elif line.startswith("#"):
                expected = expected or line.strip() == "# expected"
                current = None
            elif line[0].isspace():
                assert current is not None, f"{where}: continuation line without an entry"
                value, _ = _split_value(line, where)
                current.value = f"{current.value} {value}".strip()
            else:
                key, sep, rest = line.partition(":")
                assert sep, f"{where}: expected 'name: value', got {line!r}"
                value, comment = _split_value(rest, where)
                assert key not in entries, f"{where}: {key!r} given twice in block {name!r}"
                current = entries[key] = Entry(key, value, comment, expected, first_line + i)
        raw[name] = entries

    def resolve(ref: str, seen: tuple[str, ...] = ()) -> bytes:
        block, _, key = ref.partition(".")
        assert ref not in seen, f"circular reference {' -> '.join((*seen, ref))}"
        assert block in raw and key in raw[block], f"reference to a missing entry <{ref}>"
        value = raw[block][key].value
        if value.startswith(("{", "[")):
            return value.encode()
        if value.startswith('"'):
            return str(json.loads(value)).encode()
        out = bytearray()
        for part in re.split(r"(<[^>]*>)", value):  # hex runs and <references>, alternately
            if part.startswith("<"):
                target = part[1:-1]
                out += resolve(target if "." in target else f"{block}.{target}", (*seen, ref))
            else:
                digits = "".join(part.split())
                assert re.fullmatch(r"(?:[0-9a-f]{2})*", digits), f"{ref}: not hex: {part!r}"
                out += bytes.fromhex(digits)
        return bytes(out)

    return {name: Block(name, entries, resolve) for name, entries in raw.items()}


def header_types(section4: str) -> dict[str, type]:
    """Header keys and their types from the table of section 4."""
    types = {"int": int, "str": str, "bin": bytes, "bin16": bytes, "bool": bool, "map": dict}
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", section4, re.M)
    assert len(rows) >= 20, f"section 4 lists {len(rows)} header fields"
    return {key: types[typ] for key, typ in rows}


@dataclass(frozen=True)
class Layout:
    offset: int
    shown: bytes  # the bytes the row spells out
    skipped: int  # the "+ N bytes" (or "N bytes") it does not


def layout_rows(section35: str) -> tuple[int, list[Layout]]:
    """The frame length and rows of the request's byte-layout table."""
    m = find(r"^Byte layout \(frame of (\d+) bytes\):\n\n((?:\|.*\n)+)", section35, "the layout")
    rows = []
    for line in m.group(2).splitlines()[2:]:  # skip the heading and the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        shown = bytes.fromhex("".join(re.findall(r"`([0-9a-f ]+)`", cells[1])))
        more = re.search(r"(?:^|\+ )(\d+) bytes", cells[1])
        rows.append(Layout(int(cells[0]), shown, int(more.group(1)) if more else 0))
    return int(m.group(1)), rows


TEXT = PROTOCOL.read_text(encoding="utf-8")
SECTIONS = sections(TEXT)
TYPES = header_types(SECTIONS["4"])


class Vectors(dict[str, Block]):
    """The blocks by name. ``check(name)`` is a block the test checks, all of it: ``done()``
    at the end of the test fails if any of its entries went unread (so an entry added to the
    document cannot be skipped silently)."""

    def __init__(self, blocks: dict[str, Block]) -> None:
        super().__init__(blocks)
        self.checked: list[Block] = []

    def check(self, name: str) -> Block:
        assert name in self, f"docs/protocol.md section 35 has no vector block {name!r}"
        self.checked.append(self[name])
        return self[name]

    def done(self) -> None:
        unread = {b.name: b.unread() for b in self.checked if b.unread()}
        assert not unread, f"entries of docs/protocol.md section 35 that no test checks: {unread}"


@pytest.fixture
def vectors() -> Vectors:
    """The blocks of section 35, read afresh for each test."""
    return Vectors(parse_blocks(SECTIONS["35"]))


# --- the vectors ---------------------------------------------------------------------------


def test_section_35_has_every_vector(vectors: Vectors) -> None:
    """Every block, each with as many expected values as counted here, and the layout table."""
    counts = {name: b.expected_count() for name, b in vectors.items()}
    assert counts == EXPECTED_VALUES
    frame_len, rows = layout_rows(SECTIONS["35"])
    assert len(rows) == LAYOUT_ROWS
    assert frame_len > 0


def test_keys_from_seeds_and_the_pair_key(vectors: Vectors) -> None:
    """Ed25519 and X25519 keys from the seeds, the root's key id, and the pair key of
    section 6 under the subject prefix, computed by the code and by the formula of section 6
    with raw libsodium; another prefix gives another key."""
    v = vectors.check("keys")
    root = SigningKey(v.bytes("root seed"))
    caller_sign = SigningKey(v.bytes("caller sign seed"))
    caller_box = PrivateKey(v.bytes("caller box secret"))
    callee_box = PrivateKey(v.bytes("callee box secret"))
    root_pk = v.bytes("root public key")

    assert bytes(root.verify_key) == root_pk
    assert TrustRoot(root, root_pk).key_id == v.bytes("key id").hex()
    assert hashlib.blake2b(root_pk).digest()[:8] == v.bytes("not the key id")
    assert v.bytes("not the key id") != v.bytes("key id")
    assert bytes(caller_sign.verify_key) == v.bytes("caller sign_pk")
    assert bytes(caller_box.public_key) == v.bytes("caller box_pk")
    assert bytes(callee_box.public_key) == v.bytes("callee box_pk")

    shared = v.bytes("X25519 shared")
    assert crypto_scalarmult(bytes(caller_box), bytes(callee_box.public_key)) == shared
    assert crypto_scalarmult(bytes(callee_box), bytes(caller_box.public_key)) == shared
    person = find(r'person=b"([^"]+)"', SECTIONS["6"], "the pair key's personalization")
    find(r"K += BLAKE2b\(shared \|\| lo \|\| hi \|\| p,", SECTIONS["6"], "the pair key's input")
    prefix = v.text("subject prefix")
    assert prefix == MeshConfig().prefix
    lo, hi = sorted((bytes(caller_box.public_key), bytes(callee_box.public_key)))
    by_formula = blake2b(
        shared + lo + hi + prefix.encode(),
        digest_size=32,
        person=person.group(1).encode(),
        encoder=RawEncoder,
    )
    k = v.bytes("pair key K")
    assert by_formula == k
    assert derive_pair_key(caller_box, bytes(callee_box.public_key), prefix) == k
    assert derive_pair_key(callee_box, bytes(caller_box.public_key), prefix) == k
    assert derive_pair_key(caller_box, bytes(callee_box.public_key), f"{prefix}2") != k
    vectors.done()


def test_certificate_issued_and_decoded(vectors: Vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root issues exactly the document's wire bytes; they decode to the given fields, in
    canonical key order, and verify at the issuance time."""
    keys, v = vectors["keys"], vectors.check("certificate")
    root_pk = keys.bytes("root public key")
    root = TrustRoot(SigningKey(keys.bytes("root seed")), root_pk)
    wire = v.bytes("wire")
    serial = v.text("serial")

    def token_hex(n: int) -> str:
        assert n * 2 == len(serial)
        return serial

    monkeypatch.setattr(identity_mod, "secrets", SimpleNamespace(token_hex=token_hex))
    issued = root.issue(
        v.text("agent"),
        sign_pk=v.bytes("sign_pk"),
        box_pk=v.bytes("box_pk"),
        instance=v.text("instance"),
        roles=v.json("roles"),
        ttl=v.integer("lifetime"),
        now=v.integer("issued at"),
    )
    assert issued.raw == wire

    cert, body, sig = Certificate.decode(wire)
    assert len(body) == v.integer("body length")
    fields = {
        "agent": v.text("agent"),
        "box_pk": v.bytes("box_pk"),
        "instance": v.text("instance"),
        "issuer": v.text("issuer"),
        "not_after": v.integer("not_after"),
        "not_before": v.integer("not_before"),
        "roles": v.json("roles"),
        "serial": serial,
        "sign_pk": v.bytes("sign_pk"),
        "version": v.integer("version"),
    }
    assert list(fields) == [n for n in v.entries if n in fields]  # listed in canonical order
    assert msgpack.unpackb(body, raw=False) == fields
    assert list(msgpack.unpackb(body, raw=False)) == sorted(fields)
    assert (cert.agent, cert.instance, cert.roles, cert.serial) == (
        fields["agent"],
        fields["instance"],
        tuple(fields["roles"]),
        serial,
    )
    assert (cert.not_before, cert.not_after, cert.issuer) == (
        fields["not_before"],
        fields["not_after"],
        keys.bytes("key id").hex(),
    )
    VerifyKey(root_pk).verify(body, sig)
    verifier = CertificateVerifier(root_pk, clock=FakeClock(v.integer("issued at")))
    assert verifier.verify(wire).serial == serial
    vectors.done()


def test_request_frame(vectors: Vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's header bytes (the associated data), its seal with the given nonce, the
    frame it makes, its subject and its readable NATS headers."""
    v, k = vectors.check("request"), vectors["keys"].bytes("pair key K")
    hdr = v.header(TYPES)
    assert hdr["k"] == Kind.REQUEST
    aad = request_header(
        hdr["id"],
        hdr["ts"],
        hdr["fa"],
        hdr["fi"],
        hdr["ta"],
        hdr["ti"],
        hdr["ep"],
        hdr["dl"],
        hdr["at"],
        hdr["ct"],
        hdr.get("ik"),
        hdr.get("tp"),
        hdr.get("tst"),
    )
    assert aad == v.bytes("associated data")
    assert len(aad) == PREFIX_LEN + v.integer("hlen")
    assert list(msgpack.unpackb(aad[PREFIX_LEN:], raw=False)) == list(hdr)  # v1 key order

    body, nonce, sealed = v.bytes("body"), v.bytes("nonce"), v.bytes("sealed body")
    assert nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(body, aad, nonce, k) == sealed
    monkeypatch.setattr(crypto_mod, "os", SimpleNamespace(urandom=lambda n: nonce[:n]))
    assert seal_body(k, aad, body) == sealed
    assert open_body(k, aad, sealed) == body

    frame = aad + sealed
    assert len(frame) == v.integer("frame length")
    decoded, end = decode_frame(frame)
    assert decoded.to_map() == hdr
    assert end == len(aad)

    prefix = vectors["keys"].text("subject prefix")
    assert rpc_subject(prefix, hdr["ta"], hdr["ti"], hdr["ep"]) == v.text("subject")
    assert v.text(HDR_DEADLINE) == str(hdr["dl"])
    assert v.text(HDR_TRACEPARENT) == hdr["tp"]
    vectors.done()


def test_request_byte_layout_table(vectors: Vectors) -> None:
    """Each row of the byte-layout table spells the frame's bytes at its offset, and the rows
    follow each other up to the end of the frame."""
    v = vectors["request"]
    frame = v.bytes("associated data") + v.bytes("sealed body")
    length, rows = layout_rows(SECTIONS["35"])
    assert length == len(frame) == v.integer("frame length")
    offset = 0
    for row in rows:
        assert row.offset == offset, f"row at {row.offset}: the previous one ends at {offset}"
        assert frame[offset : offset + len(row.shown)] == row.shown, f"row at {row.offset}"
        offset += len(row.shown) + row.skipped
    assert offset == len(frame)


def test_reply_frame(vectors: Vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply's prefix and header, and its body sealed with the same pair key."""
    v, k = vectors.check("reply"), vectors["keys"].bytes("pair key K")
    hdr = v.header(TYPES)
    assert hdr["k"] == Kind.REPLY
    assert hdr["re"] == vectors["request"].bytes("id")
    aad = reply_header(
        hdr["id"], hdr["ts"], hdr["fa"], hdr["fi"], hdr["ta"], hdr["ti"], hdr["re"], hdr["st"]
    )
    assert aad == v.bytes("prefix and header")
    assert list(msgpack.unpackb(aad[PREFIX_LEN:], raw=False)) == list(hdr)

    body, nonce, sealed = v.bytes("body"), v.bytes("nonce"), v.bytes("sealed body")
    assert nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(body, aad, nonce, k) == sealed
    monkeypatch.setattr(crypto_mod, "os", SimpleNamespace(urandom=lambda n: nonce[:n]))
    assert seal_body(k, aad, body) == sealed
    assert open_body(k, aad, sealed) == body
    decoded, end = decode_frame(aad + sealed)
    assert decoded.to_map() == hdr
    assert end == len(aad)
    vectors.done()


def test_chunk_frame(vectors: Vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed chunk: a REPLY numbered 1, not the end, sealed with the pair key."""
    v, k = vectors.check("chunk"), vectors["keys"].bytes("pair key K")
    hdr = v.header(TYPES)
    assert hdr["k"] == Kind.REPLY and hdr["end"] is False
    assert hdr["re"] == vectors["request"].bytes("id")
    aad = reply_header(
        hdr["id"], hdr["ts"], hdr["fa"], hdr["fi"], hdr["ta"], hdr["ti"], hdr["re"], hdr["st"],
        hdr["sq"], hdr["end"],
    )  # fmt: skip
    assert aad == v.bytes("prefix and header")
    assert list(msgpack.unpackb(aad[PREFIX_LEN:], raw=False)) == list(hdr)
    body, nonce, sealed = v.bytes("body"), v.bytes("nonce"), v.bytes("sealed body")
    monkeypatch.setattr(crypto_mod, "os", SimpleNamespace(urandom=lambda n: nonce[:n]))
    assert seal_body(k, aad, body) == sealed
    decoded, _ = decode_frame(aad + sealed)
    assert (decoded.seq, decoded.end) == (1, False)
    assert open_body(k, aad, sealed) == body
    vectors.done()


def test_control_frame(vectors: Vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CONTROL frame granting credit: its header, and an empty body sealed (nonce and tag)."""
    v, k = vectors.check("control"), vectors["keys"].bytes("pair key K")
    hdr = v.header(TYPES)
    assert hdr["k"] == Kind.CONTROL
    aad = control_header(
        hdr["id"], hdr["ts"], hdr["fa"], hdr["fi"], hdr["ta"], hdr["ti"], hdr["re"], hdr["op"],
        hdr["cr"],
    )  # fmt: skip
    assert aad == v.bytes("prefix and header")
    assert list(msgpack.unpackb(aad[PREFIX_LEN:], raw=False)) == list(hdr)
    nonce, sealed = v.bytes("nonce"), v.bytes("sealed body")
    assert len(sealed) == NONCE_LEN + TAG_LEN
    monkeypatch.setattr(crypto_mod, "os", SimpleNamespace(urandom=lambda n: nonce[:n]))
    assert seal_body(k, aad, b"") == sealed
    decoded, _ = decode_frame(aad + sealed)
    assert (decoded.op, decoded.credit, decoded.reply_to) == ("credit", 20, hdr["re"])
    assert open_body(k, aad, sealed) == b""
    vectors.done()


def test_delegation_chain(vectors: Vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain's first link: its body, signature, link and chain bytes, the digest the next
    link names; and the callee verifies it for the request it travels with."""
    v = vectors.check("delegation")
    keys, request = vectors["keys"], vectors["request"]
    cert = Certificate.decode(vectors["certificate"].bytes("wire"))[0]
    assert v.bytes("cert") == cert.raw and v.text("type") == LINK_TYPE
    signing = SigningKey(keys.bytes("caller sign seed"))
    chain_id = v.bytes("chain")
    monkeypatch.setattr(delegation_mod, "os", SimpleNamespace(urandom=lambda n: chain_id[:n]))
    narrowing = Delegate(
        calls=tuple(v.json("calls")), scopes=tuple(v.json("scopes")), depth=v.integer("depth"),
        budget=v.integer("budget"),
    )  # fmt: skip
    link = start(
        signing, cert, to=v.text("to"), endpoint=v.text("ep"), req=v.bytes("req"),
        exp_ms=v.integer("exp"), narrowing=narrowing,
    )  # fmt: skip
    body, signature = msgpack.unpackb(link)
    assert body == v.bytes("body") and signature == v.bytes("signature")
    assert link == v.bytes("link")
    chain = encode_chain((link,))
    assert chain == v.bytes("chain bytes")
    assert link_digest(link) == v.bytes("prev of the next link")
    root = TrustRoot.from_public(keys.bytes("root public key"))
    verifier = CertificateVerifier(root.public_key, clock=lambda: 1767225600.0)
    seen = verify_chain(
        chain, verifier=verifier, cache=LinkCache(), now_ms=1767225600000, agent="researcher",
        endpoint="answer", request_id=request.bytes("id"), sender=("planner", cert.instance),
        deadline_ms=request.integer("dl"),
    )  # fmt: skip
    assert (seen.origin, seen.path, seen.depth, seen.budget) == ("planner", ("planner",), 1, 20)
    vectors.done()


def test_routed_request_header(vectors: Vectors) -> None:
    """A request with metadata and the mirror mark: its header bytes, in v1 key order, and
    the decoder gives both fields back."""
    v = vectors.check("routed")
    hdr = v.header(TYPES)
    aad = request_header(
        hdr["id"], hdr["ts"], hdr["fa"], hdr["fi"], hdr["ta"], hdr["ti"], hdr["ep"], hdr["dl"],
        hdr["at"], hdr["ct"], None, None, None, hdr["md"], hdr["mr"],
    )  # fmt: skip
    assert aad == v.bytes("associated data")
    assert len(aad) == PREFIX_LEN + v.integer("hlen")
    assert list(msgpack.unpackb(aad[PREFIX_LEN:], raw=False)) == list(hdr)  # v1 key order
    decoded, _ = decode_frame(aad + b"\x00" * 40)
    assert decoded.metadata == hdr["md"] and decoded.mirror is True
    vectors.done()


def test_refusal_frame(vectors: Vectors) -> None:
    """The refusal's whole frame: prefix and header, no body."""
    v = vectors.check("refusal")
    hdr = v.header(TYPES)
    assert hdr["re"] == vectors["request"].bytes("id")
    header = Header(
        kind=hdr["k"],
        id=hdr["id"],
        ts=hdr["ts"],
        reply_to=hdr["re"],
        status=hdr["st"],
        message=hdr["msg"],
        retry_after_ms=hdr["ra"],
    )
    frame, end = encode_frame(header)
    assert frame == v.bytes("frame")
    assert end == len(frame)
    decoded, _ = decode_frame(frame)
    assert decoded.kind == Kind.REFUSAL
    assert decoded.to_map() == hdr
    vectors.done()


def test_event_frame(vectors: Vectors) -> None:
    """The event's frame bytes, the signed bytes (subject prefix, then the frame bytes), their
    digest, the caller's signature over them, the frame and its subject; the frame does not
    verify under another prefix."""
    v, keys = vectors.check("event"), vectors["keys"]
    prefix = keys.text("subject prefix")
    hdr = v.header(TYPES)
    assert hdr["k"] == Kind.EVENT
    assert hdr["ct"] == vectors["certificate"].bytes("wire")
    header = Header(
        kind=hdr["k"],
        id=hdr["id"],
        ts=hdr["ts"],
        from_agent=hdr["fa"],
        from_instance=hdr["fi"],
        name=hdr["ep"],
        cert=hdr["ct"],
    )
    body = v.bytes("body")
    unsigned, end = encode_frame(header, body)
    assert unsigned == v.bytes("frame bytes")
    assert end == PREFIX_LEN + v.integer("hlen")
    assert unsigned[end:] == body
    assert list(msgpack.unpackb(unsigned[PREFIX_LEN:end], raw=False)) == list(hdr)
    signed = v.bytes("signed bytes")
    assert signed_event_bytes(prefix, unsigned) == signed
    assert signed == bytes([len(prefix)]) + prefix.encode() + unsigned  # the formula of §8
    assert hashlib.sha256(signed).digest() == v.bytes("signed bytes SHA-256")

    signature = sign_frame(SigningKey(keys.bytes("caller sign seed")), unsigned, prefix)
    assert signature == v.bytes("signature")
    VerifyKey(keys.bytes("caller sign_pk")).verify(signed, signature)
    frame = unsigned + signature
    assert len(frame) == v.integer("frame length")
    assert verify_frame(keys.bytes("caller sign_pk"), frame, prefix) == unsigned
    with pytest.raises(Unauthenticated):
        verify_frame(keys.bytes("caller sign_pk"), frame, f"{prefix}2")
    decoded, _ = decode_frame(frame)
    assert decoded.to_map() == hdr
    assert event_subject(prefix, hdr["fa"], hdr["ep"]) == v.text("subject")
    vectors.done()


def test_enrolment_proof(vectors: Vectors) -> None:
    """The proof bytes (by the code and by the formula of section 28), their signature and the
    token's key in the tokens bucket."""
    v, keys = vectors.check("enrolment"), vectors["keys"]
    assert v.bytes("sign_pk") == keys.bytes("caller sign_pk")
    assert v.bytes("box_pk") == keys.bytes("caller box_pk")
    agent, token, ts = v.text("agent"), v.text("token"), v.integer("ts")
    proof = v.bytes("proof bytes")
    assert _proof_bytes(agent, token, v.bytes("sign_pk"), v.bytes("box_pk"), ts) == proof
    context = find(r'^proof bytes = msgpack\(\[b"([^"]+)" \(bin\)', SECTIONS["28"], "the proof")
    by_formula = msgpack.packb(
        [context.group(1).encode(), agent, token, v.bytes("sign_pk"), v.bytes("box_pk"), ts],
        use_bin_type=True,
    )
    assert by_formula == proof
    assert SigningKey(keys.bytes("caller sign seed")).sign(proof).signature == v.bytes("sig")
    assert ControlStore.token_key(token) == v.bytes("token key").hex()
    assert hashlib.sha256(token.encode()).digest() == v.bytes("token key")
    vectors.done()


def test_beat(vectors: Vectors) -> None:
    """The beat's body (by the code and by the element table of section 36), its signature,
    its wire form and its subject; it decodes and verifies with the caller's key only."""
    v, keys = vectors.check("beat"), vectors["keys"]
    agent, instance, ts, up = v.text("agent"), v.text("instance"), v.integer("ts"), v.integer("up")
    prefix = v.bytes("prefix").decode()
    assert prefix == keys.text("subject prefix")
    body, signature, wire = v.bytes("body"), v.bytes("signature"), v.bytes("wire")
    signing = SigningKey(keys.bytes("caller sign seed"))
    assert encode_beat(signing, prefix, agent, instance, ts, up) == wire
    context = find(r'^\| 0 \| str \| `"([^"]+)"`', SECTIONS["36"], "the beat context")
    assert context.group(1) == BEAT_CONTEXT
    by_table = msgpack.packb([context.group(1), prefix, agent, instance, ts, up], use_bin_type=True)
    assert by_table == body
    assert signing.sign(body).signature == signature
    assert msgpack.packb([body, signature], use_bin_type=True) == wire
    beat = decode_beat(wire)
    assert (beat.prefix, beat.agent, beat.instance) == (prefix, agent, instance)
    assert (beat.ts, beat.up) == (ts / 1000, up)
    beat.verify(keys.bytes("caller sign_pk"))
    with pytest.raises(Unauthenticated):
        beat.verify(bytes(32))
    assert beat_subject(prefix, agent, instance) == v.text("subject")
    vectors.done()


def test_endpoint_schema_hash(vectors: Vectors) -> None:
    """The canonical JSON (RFC 8785) of the schemas, its hash, and the endpoint's element of
    a directory record carrying it; what the record's reader decodes from it."""
    v = vectors.check("schema")
    given, answered = v.json("input"), v.json("output")
    canonical, digest = v.bytes("canonical"), v.text("hash")
    name, idempotent = v.text("endpoint"), v.entry("idempotent").value == "true"
    assert canonical_json({"input": given, "output": answered}) == canonical
    assert digest == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert schema_hash(given, answered) == digest
    # The same schemas with their members in another order hash alike.
    assert schema_hash(dict(reversed(given.items())), dict(reversed(answered.items()))) == digest
    element = msgpack.packb(
        {"name": name, "idempotent": idempotent, "schema": digest}, use_bin_type=True
    )
    assert element == v.bytes("endpoint map")
    # The record writer puts exactly that element, and the reader takes the hash back.
    root = TrustRoot.generate()
    ident = root.issue_identity("researcher")
    raw = encode_record(
        ident.keys.signing,
        ident.certificate,
        endpoints=[EndpointInfo(name, idempotent, schema=digest)],
        version="1.0.0",
        labels={},
        ts=1767225600.0,
    )
    body = msgpack.unpackb(msgpack.unpackb(raw)[0])
    assert msgpack.packb(body["endpoints"][0], use_bin_type=True) == element
    record = decode_record(raw, CertificateVerifier(root.public_key))
    assert record.endpoints[name] == EndpointInfo(name, True, False, digest)
    vectors.done()


def test_gateway_key_entry(vectors: Vectors) -> None:
    """The key made from the given random bytes, its id and hash, and the entry the registry
    signs: its body (by the code and by the key table of section 38), signature and wire
    form; the entry decodes back, under its id only."""
    v, keys = vectors.check("gateway-key"), vectors["keys"]
    key = v.text("key")
    key_id = v.text("id")
    assert new_gateway_key(lambda n: bytes([0x11 if n == 12 else 0x22]) * n) == (key_id, key)
    assert key_id_of(key) == key_id
    digest = v.bytes("sha256")
    assert key_digest(key) == digest == hashlib.sha256(key.encode()).digest()
    prefix = v.bytes("prefix").decode()
    assert prefix == keys.text("subject prefix")
    issued, expires = v.integer("issued_at"), v.integer("expires_at")
    entry = GatewayKey(
        id=key_id,
        sha256=digest.hex(),
        principal=v.text("principal"),
        roles=tuple(v.json("roles")),
        issued_at=issued / 1000,
        expires_at=expires / 1000,
        issued_by=v.text("issued_by"),
    )
    root = SigningKey(keys.bytes("root seed"))
    wire = encode_gateway_key(entry, prefix, lambda data: root.sign(data).signature)
    assert wire == v.bytes("wire")
    names = re.findall(r"^\| `(\w+)` \| (?:str|int|array of str) \|", SECTIONS["38"], re.M)
    by_table = msgpack.packb(
        dict(zip(names, [KEY_TYPE, prefix, key_id, digest.hex(), entry.principal,
                         list(entry.roles), issued, expires, entry.issued_by], strict=True)),
        use_bin_type=True,
    )  # fmt: skip
    assert by_table == v.bytes("body")
    assert root.sign(by_table).signature == v.bytes("signature")
    assert msgpack.packb([by_table, v.bytes("signature")], use_bin_type=True) == wire
    root_pk = keys.bytes("root public key")
    assert decode_gateway_key(wire, root_pk, prefix, key_id) == entry
    with pytest.raises(Unauthenticated):
        decode_gateway_key(wire, root_pk, prefix, "0" * 24)
    vectors.done()


# --- wire constants -----------------------------------------------------------------------


def test_kind_values() -> None:
    """The frame kinds of section 4 (the `k` row and the table's column headings)."""
    row = find(r"^\| `k` \|.*\| kind: (.*) \|$", SECTIONS["4"], "the kinds in the `k` row")
    heading = find(r"^\| Key \| Type \|(.*)\|$", SECTIONS["4"], "the header table's heading")
    kinds = {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", row.group(1))}
    columns = {name.lower(): int(n) for name, n in re.findall(r"(\w+) \((\d+)\)", heading[1])}
    assert kinds == columns == {kind.name.lower(): kind.value for kind in Kind}


def test_frame_prefix_layout_and_max_header() -> None:
    """Section 3's prefix: magic at 0, version at 1, a big-endian uint16 `hlen` at 2, the
    header at 4 and at most 16 384 bytes long (also in the defaults of section 34)."""
    s3 = SECTIONS["3"]
    magic = find(r"^\| 0 \| 1 \| magic \| `0x([0-9A-Fa-f]{2})`", s3, "the magic byte")
    version = find(r"^\| 1 \| 1 \| version \| `0x([0-9A-Fa-f]{2})`", s3, "the version byte")
    hlen = find(
        r"^\| 2 \| 2 \| `hlen` \| header length, uint16 big-endian, `1 ≤ hlen ≤ (\d+)`",
        s3,
        "the header length field",
    )
    header = find(r"^\| (\d+) \| `hlen` \| header \|", s3, "the header's offset")
    assert bytes.fromhex(magic[1] + version[1]) == MAGIC
    assert int(header[1]) == PREFIX_LEN == PREFIX.size == 4
    assert PREFIX.pack(MAGIC, 0x0102) == MAGIC + b"\x01\x02"  # big-endian
    assert int(hlen[1]) == MAX_HEADER
    for n in (0, MAX_HEADER + 1):
        with pytest.raises(DecodeError, match="header length"):
            decode_frame(PREFIX.pack(MAGIC, n) + b"\x80" * (MAX_HEADER + 1))
    defaults = find(
        r"^\| max body / max header / max frame \| ([\d ]+) B / ([\d ]+) B / ([\d ]+) B \|$",
        SECTIONS["34"],
        "the default size limits",
    )
    assert number(defaults[2]) == MAX_HEADER
    assert number(defaults[1]) == Limits().max_body
    assert number(defaults[3]) == Limits().max_body + FRAME_OVERHEAD


def test_frame_size_limits() -> None:
    """Section 3's default `max_body` and `max_frame`; the nonce and tag of section 7 and the
    signature of section 8, which the frame overhead counts."""
    s3 = SECTIONS["3"]
    body = find(r"default 1 MiB . 20 KiB = \*\*([\d ]+)\*\* bytes", s3, "the default max_body")
    frame = find(r"^max_frame = max_body \+ 4 \+ (\d+) \+ (\d+) = ([\d ]+) bytes", s3, "max_frame")
    assert Limits().max_body == number(body[1])
    assert (int(frame[1]), int(frame[2])) == (MAX_HEADER, max(NONCE_LEN + TAG_LEN, SIG_LEN))
    assert Limits().max_body + FRAME_OVERHEAD == number(frame[3])
    s7 = SECTIONS["7"]
    assert int(find(r"^\| Nonce \| (\d+) random bytes", s7, "the nonce length")[1]) == NONCE_LEN
    assert int(find(r"tag \((\d+)\)", s7, "the tag length")[1]) == TAG_LEN
    sig = find(r"the (\d+)-byte Ed25519 signature", SECTIONS["8"], "the signature length")
    assert int(sig[1]) == SIG_LEN


def test_key_id_digest_size() -> None:
    """Section 5: the key id is hex of BLAKE2b with an 8-byte output, not a truncation."""
    size = int(
        find(
            r"issuer = hex\(BLAKE2b\(root_public_key, digest_size=(\d+)\)\)",
            SECTIONS["5"],
            "the key-id formula",
        )[1]
    )
    pk = bytes(range(32))
    root = TrustRoot.from_public(pk)
    assert root.key_id == hashlib.blake2b(pk, digest_size=size).hexdigest()
    assert len(root.key_id) == 2 * size


def test_instance_and_message_id_lengths() -> None:
    """Section 1: v1 instance ids are 16 lowercase hex characters (8 random bytes); message
    ids are 16 bytes, and the decoder refuses any other length."""
    s1 = SECTIONS["1"]
    row = find(
        r"^\| Instance ids \|.*?(\d+) lowercase hex characters \((\d+) random bytes\)",
        s1,
        "the instance-id length",
    )
    chars, raw = int(row[1]), int(row[2])
    assert chars == 2 * raw
    assert all(re.fullmatch(f"[0-9a-f]{{{chars}}}", new_instance_id()) for _ in range(20))

    n = int(find(r"^\| Message ids \| (\d+) random bytes", s1, "the message-id length")[1])
    fields = {"k": 4, "ts": 0, "re": b"", "st": "OK"}
    for length in (n - 1, n, n + 1):
        hb = msgpack.packb({**fields, "id": b"\x00" * length}, use_bin_type=True)
        frame = PREFIX.pack(MAGIC, len(hb)) + hb
        if length == n:
            assert decode_frame(frame)[0].id == b"\x00" * n
        else:
            with pytest.raises(DecodeError, match="message id"):
                decode_frame(frame)


def test_header_field_types() -> None:
    """Section 4's types, by the decoder: a field of another type is refused, and every key of
    the table is known to it (a request with the field's right type still decodes)."""
    right: dict[type, Any] = {int: 1, str: "x", bytes: b"\x00" * 16, bool: True, dict: {"a": "b"}}
    wrong: dict[type, Any] = {int: True, str: b"x", bytes: "x", bool: 1, dict: ["a"]}
    base = {
        "k": 1,
        "id": b"\x00" * 16,
        "ts": 0,
        "fa": "a",
        "fi": "i",
        "ta": "b",
        "ti": "j",
        "ep": "e",
        "dl": 0,
        "at": 1,
        "ct": b"",
    }

    def frame(hdr: dict[str, Any]) -> bytes:
        hb = msgpack.packb(hdr, use_bin_type=True)
        return PREFIX.pack(MAGIC, len(hb)) + hb

    for key, typ in TYPES.items():
        assert decode_frame(frame({**base, key: right[typ]}))[0].to_map()[key] == right[typ]
        with pytest.raises(DecodeError, match=f"'{key}'"):
            decode_frame(frame({**base, key: wrong[typ]}))


def test_readable_header_names() -> None:
    """Section 9's NATS header names, exactly as spelled (case-sensitive)."""
    table = find(
        r"^\| NATS header \| Copy of \|.*\n\|[-|]+\n((?:\|.*\n)+)", SECTIONS["9"], "the table"
    )
    names = re.findall(r"^\| `([\w-]+)` \|", table[1], re.M)
    assert names == [HDR_DEADLINE, HDR_TRACEPARENT, HDR_TRACESTATE]
