"""The body every system sends: one pydantic model whose JSON form has an exact size."""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["SIZES", "Body", "body_of", "size_label"]

SIZES = {"256B": 256, "4KiB": 4096, "64KiB": 65536}
"""Body sizes by scenario label, in bytes of the JSON form."""

_EMPTY = len(b'{"text":""}')


class Body(BaseModel):
    """Request, reply and event body of every scenario."""

    text: str


def body_of(size: int) -> Body:
    """A ``Body`` whose compact JSON encoding is exactly ``size`` bytes."""
    body = Body(text="x" * (size - _EMPTY))
    assert len(body.model_dump_json()) == size
    return body


def size_label(size: int) -> str:
    for label, n in SIZES.items():
        if n == size:
            return label
    return f"{size}B"
