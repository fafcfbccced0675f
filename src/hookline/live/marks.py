"""Rare news between the processes of one machine that share a SQLite file, told at once.

The processes share no connection to wake each other by (on PostgreSQL, LISTEN/NOTIFY does it:
:mod:`hookline.live.broadcast`). For news that is rare and must count at once, such as a revoked
API key, a :class:`FileMark` is a counter kept as a file's size: :meth:`FileMark.bump` appends a
byte, and :meth:`FileMark.moved` (one ``stat``, about a microsecond) tells a process whether
anyone bumped it since it last looked. The file lives beside the live relay's sockets
(:func:`hookline.live.relay.relay_directory`), and goes when they do.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileMark:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._size()

    def _size(self) -> tuple[int, int]:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return (0, -1)  # removed (with the relay's directory): a change too
        return (found.st_ino, found.st_size)

    def bump(self) -> None:
        """Tell every process watching the mark (this one too, at its next :meth:`moved`)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.path.open("ab") as mark:  # O_APPEND: bumps from many processes all count
            mark.write(b".")

    def moved(self) -> bool:
        """True once per change since this process last asked (or made the mark)."""
        size = self._size()
        if size == self._seen:
            return False
        self._seen = size
        return True
