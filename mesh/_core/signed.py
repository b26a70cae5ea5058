"""Signed documents: the one format behind certificates, directory records and control-plane
documents (``docs/protocol.md`` sections 5, 19 and 25).

A signed document is ``msgpack([body, signature])``: ``body`` is the msgpack encoding of a map
with string keys, ``signature`` the 64-byte Ed25519 signature over those exact body bytes.
Decoding is strict: exact types (a boolean is not an integer), a bounded nesting depth, and
nothing but ``DecodeError`` for malformed input; verification is a separate step, so the
signer's key can come from the body itself (a directory record carries its certificate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from mesh.errors import DecodeError, Unauthenticated

__all__ = ["SIGNATURE_LEN", "open_document", "sign_document", "typed_field", "verify_document"]

SIGNATURE_LEN = 64


def sign_document(body: dict[str, Any], sign: Callable[[bytes], bytes]) -> bytes:
    """Encode ``body`` and sign it with ``sign`` (raw bytes to a 64-byte signature)."""
    packed = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([packed, sign(packed)], use_bin_type=True)


def open_document(raw: bytes, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Decode a signed document without verifying it.

    Args:
        raw: the document's bytes.
        what: what it is, for error messages (``"certificate"``, ``"directory record"``).

    Returns:
        ``(body map, body bytes, signature)``: verify the signature over the body bytes.

    Raises:
        DecodeError: the bytes are not a well-formed signed document.
    """
    try:
        outer = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        if not (isinstance(outer, list) and len(outer) == 2):
            raise DecodeError(f"{what} must be a 2-element array [body, signature]")
        packed, sig = outer
        if not isinstance(packed, bytes) or not isinstance(sig, bytes) or len(sig) != SIGNATURE_LEN:
            raise DecodeError(f"{what} body and 64-byte signature must be binary")
        body = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises many types on junk (and RecursionError)
        raise DecodeError(f"malformed {what} ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise DecodeError(f"{what} body must be a map")
    return body, packed, sig


def verify_document(packed: bytes, sig: bytes, public_key: bytes, refusal: str) -> None:
    """Check the Ed25519 signature of a document's body bytes.

    Raises:
        Unauthenticated: with ``refusal`` as the message.
    """
    try:
        VerifyKey(public_key).verify(packed, sig)
    except (BadSignatureError, ValueError):
        raise Unauthenticated(refusal) from None


def typed_field(body: dict[str, Any], key: str, typ: type, what: str) -> Any:
    """``body[key]``, which must be present and exactly of type ``typ``.

    Raises:
        DecodeError: naming the document and the field.
    """
    try:
        value = body[key]
    except KeyError:
        raise DecodeError(f"{what} field {key!r} is missing") from None
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise DecodeError(f"{what} field {key!r} must be {typ.__name__}")
    return value
