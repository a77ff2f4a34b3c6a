"""Where the C and CUDA sources built at run time live."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["csrc_dir"]


def csrc_dir() -> Path:
    """``$FLEXKV_STORE_CSRC``, else the copy shipped in the package (``flexkv_store/_csrc``,
    a link to the repository's ``csrc/`` in a checkout), else the repository's ``csrc/``."""
    override = os.environ.get("FLEXKV_STORE_CSRC")
    if override:
        return Path(override)
    shipped = Path(__file__).resolve().parent / "_csrc"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parents[1] / "csrc"
