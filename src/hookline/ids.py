"""Sortable, prefixed identifiers (``job_01J…``).

The 26-character body is a ULID: 48 bits of milliseconds then 80 random bits, Crockford base32. Ids made
in one process are strictly increasing even within a millisecond (the random part is incremented), so
ordering by id is submission order: the queue's FIFO and the list cursor both rely on it.
"""

from __future__ import annotations

import random
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_random = random.Random()  # seeded from os.urandom at import
_lock = threading.Lock()
_last_ms = 0
_last_random = 0


def _encode(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """Return ``prefix_`` plus a new ULID, greater than every id this process made before."""
    global _last_ms, _last_random
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            now_ms = _last_ms
            _last_random += 1
        else:
            # Uniqueness, not secrecy, is what ids need (access is by API key), and
            # os.urandom costs a system call per millisecond on the accept path.
            _last_random = _random.getrandbits(_RANDOM_BITS - 1)  # room to increment
        _last_ms = now_ms
        value = (now_ms << _RANDOM_BITS) | (_last_random & ((1 << _RANDOM_BITS) - 1))
    return f"{prefix}_{_encode(value)}"


def id_floor(prefix: str, ms: int) -> str:
    """The least id ``new_id(prefix)`` can make at epoch millisecond ``ms``: ids made from then
    on are at least this, in string order."""
    return f"{prefix}_{_encode(ms << _RANDOM_BITS)}"


def has_prefix(value: str, prefix: str) -> bool:
    """True when ``value`` looks like an id this module made with ``prefix``."""
    body = value.removeprefix(f"{prefix}_")
    return body != value and len(body) == 26 and all(c in _ALPHABET for c in body)
