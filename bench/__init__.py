"""Benchmarks: each prints its figures beside a baseline measured in the same run; ``--json FILE``
also writes them for ``scripts/bench`` (bench/quick.py), which checks them against their targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_figures(path: Path, figures: dict[str, Any]) -> None:
    """Write a benchmark's figures (plain JSON: names to numbers or to dicts of them)."""
    path.write_text(json.dumps(figures, indent=2, sort_keys=True))
