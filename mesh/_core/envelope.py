"""The envelope: frame layout, header fields and their encoding (normative: ``docs/protocol.md``).

A frame is::

    0x4D 0x01 | header length (uint16, big-endian) | header (msgpack map) | body

The header bytes (with the 4-byte prefix) are the associated data of the seal (requests and
replies) or the start of the signed bytes (events). Decoding never raises anything but
``DecodeError``. Pure core: no I/O.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh._core.crypto import NONCE_LEN, SIG_LEN, TAG_LEN
from mesh.errors import DecodeError, InvalidArgument

__all__ = [
    "FRAME_OVERHEAD",
    "HDR_DEADLINE",
    "HDR_TRACEPARENT",
    "HDR_TRACESTATE",
    "MAGIC",
    "MAX_CREDIT",
    "MAX_HEADER",
    "MAX_METADATA",
    "MAX_METADATA_VALUE",
    "OP_CANCEL",
    "OP_CREDIT",
    "PREFIX",
    "PREFIX_LEN",
    "PROGRESS",
    "Header",
    "Kind",
    "check_metadata",
    "check_trace_context",
    "control_header",
    "decode_frame",
    "encode_frame",
    "encode_header",
    "reply_header",
    "request_header",
]

MAGIC = b"\x4d\x01"
PREFIX = struct.Struct(">2sH")
PREFIX_LEN = PREFIX.size
MAX_HEADER = 16 * 1024
MAX_METADATA = 16
"""The most request metadata entries a caller may set."""
MAX_METADATA_VALUE = 256
"""The longest request metadata value, in characters."""
FRAME_OVERHEAD = PREFIX_LEN + MAX_HEADER + max(NONCE_LEN + TAG_LEN, SIG_LEN)
"""The most a frame adds to its body: prefix, largest header, and a seal's nonce and tag or an
event's signature."""

# Readable copies of sealed header fields, for standard tooling; a receiver refuses a message
# whose NATS header differs from the sealed value.
HDR_TRACEPARENT = "traceparent"
HDR_TRACESTATE = "tracestate"
HDR_DEADLINE = "Mesh-Deadline"


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[0-9a-f-]+)?")
_TRACESTATE = re.compile(r"[\x21-\x7e]([\x20-\x7e]{0,510}[\x21-\x7e])?")


def check_trace_context(traceparent: str | None, tracestate: str | None) -> None:
    """Refuse trace context that NATS headers cannot carry unchanged (W3C grammar, no
    surrounding whitespace, no control characters).

    Raises:
        InvalidArgument: naming the field.
    """
    if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent):
        raise InvalidArgument(f"traceparent {traceparent!r} is not a W3C traceparent")
    if tracestate is not None and not _TRACESTATE.fullmatch(tracestate):
        raise InvalidArgument("tracestate must be 1-512 printable ASCII characters")


_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_metadata(metadata: dict[str, str], refuse: type[Exception] = InvalidArgument) -> None:
    """Refuse request metadata the protocol does not carry: at most ``MAX_METADATA`` entries,
    keys like names (``[a-z0-9][a-z0-9_-]{0,62}``), values strings of at most
    ``MAX_METADATA_VALUE`` characters.

    Raises:
        InvalidArgument: naming what is wrong (``refuse``: the class raised instead, e.g.
            ``DecodeError`` for a received header).
    """
    if len(metadata) > MAX_METADATA:
        raise refuse(f"request metadata has {len(metadata)} entries, at most {MAX_METADATA}")
    for key, value in metadata.items():
        if type(key) is not str or not _METADATA_KEY.fullmatch(key):
            raise refuse(f"request metadata key {key!r} must match [a-z0-9][a-z0-9_-]{{0,62}}")
        if type(value) is not str or len(value) > MAX_METADATA_VALUE:
            raise refuse(
                f"request metadata value of {key!r} must be a string of at most "
                f"{MAX_METADATA_VALUE} characters"
            )


class Kind(enum.IntEnum):
    """What a frame carries."""

    REQUEST = 1
    REPLY = 2
    EVENT = 3
    REFUSAL = 4  # unsealed error reply, sent when the request could not be authenticated
    CONTROL = 5  # sealed, caller to callee about a call in progress: cancel it, grant credit


OP_CANCEL = "cancel"
OP_CREDIT = "credit"
PROGRESS = "PROGRESS"
"""The status of a REPLY frame that reports progress (``end`` false, never the last)."""
MAX_CREDIT = 1024
"""The most chunks a caller may grant at once (``sm``), and ahead of what it consumed."""


# field name -> (header key, python type). Keys are short to keep frames small.
_FIELDS: dict[str, tuple[str, type]] = {
    "kind": ("k", int),
    "id": ("id", bytes),
    "ts": ("ts", int),
    "from_agent": ("fa", str),
    "from_instance": ("fi", str),
    "to_agent": ("ta", str),
    "to_instance": ("ti", str),
    "name": ("ep", str),
    "deadline": ("dl", int),
    "attempt": ("at", int),
    "idempotency_key": ("ik", str),
    "traceparent": ("tp", str),
    "tracestate": ("tst", str),
    "cert": ("ct", bytes),
    "reply_to": ("re", bytes),
    "status": ("st", str),
    "message": ("msg", str),
    "retry_after_ms": ("ra", int),
    "rule": ("ru", str),
    "seq": ("sq", int),
    "end": ("end", bool),
    "metadata": ("md", dict),
    "mirror": ("mr", bool),
    "stream": ("sm", int),
    "progress": ("pg", bool),
    "op": ("op", str),
    "credit": ("cr", int),
    "delegation": ("dc", int),
    "chain": ("dg", bytes),
}
_REQUIRED: dict[int, tuple[str, ...]] = {
    Kind.REQUEST: (
        "id",
        "ts",
        "from_agent",
        "from_instance",
        "to_agent",
        "to_instance",
        "name",
        "deadline",
        "attempt",
        "cert",
    ),
    Kind.REPLY: (
        "id",
        "ts",
        "from_agent",
        "from_instance",
        "to_agent",
        "to_instance",
        "reply_to",
        "status",
    ),
    Kind.EVENT: ("id", "ts", "from_agent", "from_instance", "name", "cert"),
    Kind.REFUSAL: ("id", "ts", "reply_to", "status"),
    Kind.CONTROL: (
        "id",
        "ts",
        "from_agent",
        "from_instance",
        "to_agent",
        "to_instance",
        "reply_to",
        "op",
    ),
}


_KEYS = tuple(key for key, _typ in _FIELDS.values())
_TYPE_OF = dict(_FIELDS.values())
_ORDER = list(_FIELDS)
_METADATA_AT = _ORDER.index("metadata")
_REQUIRED_AT = {kind: tuple(_ORDER.index(a) for a in attrs) for kind, attrs in _REQUIRED.items()}


@dataclass(slots=True)
class Header:
    """Decoded header fields; absent optional fields are ``None``.

    Times (``ts``, ``deadline``) are unix milliseconds. ``name`` is the endpoint of a request or
    the topic of an event.
    """

    kind: int
    id: bytes
    ts: int
    from_agent: str | None = None
    from_instance: str | None = None
    to_agent: str | None = None
    to_instance: str | None = None
    name: str | None = None
    deadline: int | None = None
    attempt: int | None = None
    idempotency_key: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    cert: bytes | None = None
    reply_to: bytes | None = None
    status: str | None = None
    message: str | None = None
    retry_after_ms: int | None = None
    rule: str | None = None
    seq: int | None = None
    end: bool | None = None
    metadata: dict[str, str] | None = None
    mirror: bool | None = None
    stream: int | None = None
    progress: bool | None = None
    op: str | None = None
    credit: int | None = None
    delegation: int | None = None
    chain: bytes | None = None

    def to_map(self) -> dict[str, Any]:
        """The wire map: short keys, ``None`` fields left out."""
        out: dict[str, Any] = {}
        for attr, (key, _typ) in _FIELDS.items():
            value = getattr(self, attr)
            if value is not None:
                out[key] = value
        return out


def encode_frame(header: Header, body: bytes = b"") -> tuple[bytes, int]:
    """Encode a frame whose body is known (events: the body before the signature).

    Returns:
        ``(frame, header_end)``: the frame bytes and the offset where the body starts.
    """
    hb = _pack(header.to_map())
    return PREFIX.pack(MAGIC, len(hb)) + hb + body, PREFIX_LEN + len(hb)


def encode_header(header: Header) -> bytes:
    """The prefix and header bytes alone: the associated data of a seal."""
    hb = _pack(header.to_map())
    return PREFIX.pack(MAGIC, len(hb)) + hb


# The request and reply headers are built as wire maps directly: they are on every call's path,
# and ``Header.to_map`` walks all 23 fields. The keys are the ones in ``_FIELDS``.


def request_header(
    id: bytes,
    ts: int,
    from_agent: str,
    from_instance: str,
    to_agent: str,
    to_instance: str,
    endpoint: str,
    deadline: int,
    attempt: int,
    cert: bytes,
    idempotency_key: str | None,
    traceparent: str | None,
    tracestate: str | None,
    metadata: dict[str, str] | None = None,
    mirror: bool = False,
    stream: int | None = None,
    progress: bool = False,
    delegation: int | None = None,
) -> bytes:
    """The prefix and header of a request: the associated data of its seal. ``stream``: the
    initial credit of a streamed reply; ``progress``: the caller accepts progress frames;
    ``delegation``: the length of the delegation chain that starts the sealed plaintext.

    Raises:
        InvalidArgument: the header would exceed ``MAX_HEADER``.
    """
    hdr: dict[str, Any] = {
        "k": 1,  # Kind.REQUEST
        "id": id,
        "ts": ts,
        "fa": from_agent,
        "fi": from_instance,
        "ta": to_agent,
        "ti": to_instance,
        "ep": endpoint,
        "dl": deadline,
        "at": attempt,
        "ct": cert,
    }
    if idempotency_key is not None:
        hdr["ik"] = idempotency_key
    if traceparent is not None:
        hdr["tp"] = traceparent
    if tracestate is not None:
        hdr["tst"] = tracestate
    if metadata:
        hdr["md"] = metadata
    if mirror:
        hdr["mr"] = True
    if stream is not None:
        hdr["sm"] = stream
    if progress:
        hdr["pg"] = True
    if delegation is not None:
        hdr["dc"] = delegation
    hb = msgpack.packb(hdr, use_bin_type=True)
    if len(hb) > MAX_HEADER:
        raise InvalidArgument(f"request header of {len(hb)} bytes exceeds {MAX_HEADER}")
    return PREFIX.pack(MAGIC, len(hb)) + hb


def reply_header(
    id: bytes,
    ts: int,
    from_agent: str,
    from_instance: str,
    to_agent: str | None,
    to_instance: str | None,
    reply_to: bytes,
    status: str,
    seq: int = 0,
    end: bool = True,
) -> bytes:
    """The prefix and header of a reply frame: the associated data of its seal. A whole reply
    is ``seq`` 0 and ``end``; a streamed one's frames count up from 0, the last has ``end``."""
    hb = msgpack.packb(
        {
            "k": 2,  # Kind.REPLY
            "id": id,
            "ts": ts,
            "fa": from_agent,
            "fi": from_instance,
            "ta": to_agent,
            "ti": to_instance,
            "re": reply_to,
            "st": status,
            "sq": seq,
            "end": end,
        },
        use_bin_type=True,
    )
    return PREFIX.pack(MAGIC, len(hb)) + hb


def control_header(
    id: bytes,
    ts: int,
    from_agent: str,
    from_instance: str,
    to_agent: str,
    to_instance: str,
    request_id: bytes,
    op: str,
    credit: int | None = None,
) -> bytes:
    """The prefix and header of a CONTROL frame about the call ``request_id``: ``cancel`` it,
    or grant ``credit`` (the total number of chunks the caller accepts so far)."""
    hdr: dict[str, Any] = {
        "k": 5,  # Kind.CONTROL
        "id": id,
        "ts": ts,
        "fa": from_agent,
        "fi": from_instance,
        "ta": to_agent,
        "ti": to_instance,
        "re": request_id,
        "op": op,
    }
    if credit is not None:
        hdr["cr"] = credit
    hb = msgpack.packb(hdr, use_bin_type=True)
    return PREFIX.pack(MAGIC, len(hb)) + hb


def _pack(hdr: dict[str, Any]) -> bytes:
    return msgpack.packb(hdr, use_bin_type=True)


def decode_frame(frame: bytes) -> tuple[Header, int]:
    """Parse a frame's prefix and header, validating every field's type.

    Returns:
        ``(header, header_end)``; the body is ``frame[header_end:]``.

    Raises:
        DecodeError: for anything that is not a well-formed frame.
    """
    if len(frame) < PREFIX_LEN:
        raise DecodeError("frame shorter than its 4-byte prefix")
    magic, hlen = PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise DecodeError("not a mesh v1 frame (bad magic or version)")
    end = PREFIX_LEN + hlen
    if hlen == 0 or hlen > MAX_HEADER or end > len(frame):
        raise DecodeError("header length out of range")
    try:
        raw = msgpack.unpackb(
            memoryview(frame)[PREFIX_LEN:end],
            raw=False,
            strict_map_key=True,
            max_bin_len=hlen,
            max_str_len=hlen,
            max_array_len=hlen,
            max_map_len=hlen,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types on junk; all mean the same here
        raise DecodeError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if type(raw) is not dict:
        raise DecodeError("header must be a msgpack map")
    # Known keys only: unknown ones are ignored, so later minor versions can add fields.
    for key, value in raw.items():
        typ = _TYPE_OF.get(key)
        if typ is not None and type(value) is not typ and value is not None:
            raise DecodeError(f"header field {key!r} must be {typ.__name__}")
    values = list(map(raw.get, _KEYS))
    required = _REQUIRED_AT.get(values[0])  # type: ignore[arg-type]
    if required is None:
        raise DecodeError(f"unknown frame kind {values[0]!r}")
    for i in required:
        if values[i] is None:
            raise DecodeError(f"header field {_KEYS[i]!r} missing for kind {values[0]}")
    if len(values[1]) != 16:  # type: ignore[arg-type]
        raise DecodeError("message id must be 16 bytes")
    if values[_METADATA_AT] is not None:
        check_metadata(values[_METADATA_AT], DecodeError)  # type: ignore[arg-type]
    return Header(*values), end  # type: ignore[arg-type]
