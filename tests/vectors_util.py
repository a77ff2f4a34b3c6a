"""Load the shared golden vectors (from ../shared/vectors, or the copy in tests/vectors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "vectors"
LOCAL = HERE / "vectors"


def vectors_dir() -> Path:
    """The shared vectors when the checkout has them beside it, else the committed copy."""
    return SHARED if (SHARED / "keyformat.json").exists() else LOCAL


def load(name: str) -> Any:
    return json.loads((vectors_dir() / name).read_text(encoding="utf-8"))


def load_local(name: str) -> Any:
    """Vectors of our own, made with the peers' code (tests/vectors only)."""
    return json.loads((LOCAL / name).read_text(encoding="utf-8"))
