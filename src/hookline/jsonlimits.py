"""The JSON hookline takes in, from a request body or a batch line: whatever passes can be stored
(JSON text on SQLite, JSONB on PostgreSQL), served and sent on exactly as it came.

orjson's parser already refuses NaN and Infinity, numbers too large for a double and lone
surrogates; :func:`unfit` adds what orjson reads but hookline cannot keep:

- nesting deeper than :data:`MAX_DEPTH` levels: orjson writes at most 254, and a stored value is
  written a few levels further in (the job, the webhook payload, the batch output line); no
  OpenAI-style request nests half as deep, JSON schemas for tools or structured output included;
- an integer outside the signed 64-bit range: orjson writes no larger one (and reads one past
  64 bits as a float, which would change the caller's value);
- a NUL character (U+0000), which PostgreSQL's JSONB cannot hold.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64
_INT_RANGE = (-(2**63), 2**63 - 1)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19  # 19 digits: the shortest integer that can be out of range


def unfit(raw: bytes, value: Any, *, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """Why ``value``, which orjson parsed from ``raw``, cannot be taken, as ``(code, message)``
    with code ``nesting_too_deep``, ``integer_out_of_range`` or ``invalid_character``; None if it
    can. A look at the bytes alone clears most values; none makes this recurse."""
    if raw.count(b"[") + raw.count(b"{") > max_depth or b"\\u0000" in raw:
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if isinstance(node, dict | list) and depth > max_depth:
                return "nesting_too_deep", f"the JSON nests deeper than {max_depth} levels"
            if isinstance(node, dict):
                if any("\x00" in key for key in node):
                    return "invalid_character", "a key contains a NUL character (\\u0000)"
                stack.extend((child, depth + 1) for child in node.values())
            elif isinstance(node, list):
                stack.extend((child, depth + 1) for child in node)
            elif isinstance(node, str) and "\x00" in node:
                return "invalid_character", "a string contains a NUL character (\\u0000)"
    if _LONG_NUMBER in raw.translate(_DIGITS_AS_ZERO):  # maybe digits in a string: parse to see
        try:
            json.loads(raw, parse_int=_int64)  # no deeper than max_depth: checked above
        except _OutOfRange as exc:
            return "integer_out_of_range", f"the integer {exc} is beyond the signed 64-bit range"
    return None


class _OutOfRange(ValueError):
    pass


def _int64(digits: str) -> int:
    if len(digits) > 21:
        raise _OutOfRange(f"{digits[:24]}…")
    value = int(digits)
    if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        raise _OutOfRange(digits)
    return value
