"""The one codec for paging cursors: opaque to clients, checked on the way back in.

A cursor is a short URL-safe token holding a kind (which list it pages) and a key tuple
(the last row's sort key). Clients must treat it as opaque. Decoding checks the kind, the
arity and every value's type and range before any of it reaches SQL, so a forged or
mangled cursor is a 422 `invalid_cursor`, never an integer overflow in the database.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence

from app.core.errors import InvalidRequest

_INT64_MAX = 2**63 - 1
MAX_CURSOR_CHARS = 512

Key = tuple[int | float | str, ...]
_MAX_TEXT = 256


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__("The cursor is not valid; pass `next_cursor` back as it was returned.")


def encode_cursor(kind: str, key: Sequence[int | float | str]) -> str:
    """A token for `key` (ints, finite floats and short strings) in the list `kind`."""
    values: list[int | str | list[str]] = [
        v if isinstance(v, int) else [v] if isinstance(v, str) else repr(float(v)) for v in key
    ]
    raw = json.dumps([kind, *values], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str, kind: str, types: Sequence[type]) -> Key:
    """The key in `token`, which must be of `kind` with values of `types` (int: 0..2**63-1,
    float: finite, str: at most 256 characters), else `InvalidCursor`."""
    if not token or len(token) > MAX_CURSOR_CHARS:
        raise InvalidCursor()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidCursor() from None
    if not isinstance(decoded, list) or len(decoded) != len(types) + 1 or decoded[0] != kind:
        raise InvalidCursor()
    key: list[int | float | str] = []
    for value, wanted in zip(decoded[1:], types, strict=True):
        if wanted is str:  # wrapped in a list, so it cannot pass for a float's text
            if (
                not isinstance(value, list)
                or len(value) != 1
                or not isinstance(value[0], str)
                or len(value[0]) > _MAX_TEXT
            ):
                raise InvalidCursor()
            key.append(value[0])
        elif wanted is int:
            if type(value) is not int or not 0 <= value <= _INT64_MAX:
                raise InvalidCursor()
            key.append(value)
        else:
            try:
                number = float(value) if isinstance(value, str) else math.nan
            except ValueError:
                raise InvalidCursor() from None
            if not math.isfinite(number):
                raise InvalidCursor()
            key.append(number)
    return tuple(key)
