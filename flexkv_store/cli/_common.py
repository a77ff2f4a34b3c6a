"""What every ``flexkv-store`` command shares: exit codes, errors, output, config.

Command modules import from here; nothing here imports a command module or
:mod:`flexkv_store.cli` itself, so the package has no import circle.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "MIB",
    "AddCommand",
    "CliError",
    "console",
    "emit_json",
    "human",
    "store_config",
]

MIB = 1 << 20

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


#: What a command module's ``register(add)`` gets: ``add(name, help, example)`` returns the
#: subcommand's parser (with the common ``--config``/``--backend``/``--json`` options).
AddCommand = Callable[[str, str, str], argparse.ArgumentParser]


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def human(n: float | int | None) -> str:
    if n is None:
        return "unlimited"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def store_config(args: argparse.Namespace) -> Any:
    from flexkv_store.config import load_config

    source: Any = args.config
    cfg = load_config(source)
    if getattr(args, "backend", None):
        data = cfg.model_dump(exclude={"backend", "backends"})
        data["admin"]["token"] = cfg.admin.token.get_secret_value() if cfg.admin.token else None
        data["backend"] = args.backend
        cfg = load_config(data)
    return cfg


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
