"""The package's public surface: light imports and an honest, sorted ``__all__``."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types

import pytest

import flexkv_store

PUBLIC_MODULES = [
    "flexkv_store",
    "flexkv_store.errors",
    "flexkv_store.keyformat",
    "flexkv_store.backends",
    "flexkv_store.quota",
    "flexkv_store.transfer",
]


def test_bare_import_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, json, flexkv_store, flexkv_store.keyformat, flexkv_store.backends;"
        "print(json.dumps(sorted(m for m in ('torch', 'redis', 'boto3', 'botocore', 'kvikio',"
        " 'fastapi', 'uvicorn') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_complete_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr!r}"
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, types.ModuleType)
        and attr not in {"annotations", "TYPE_CHECKING"}
        and (getattr(value, "__module__", name) or name).startswith("flexkv_store")
    }
    assert public <= set(exported) | {"log"}, f"not in {name}.__all__: {public - set(exported)}"


def test_errors_tree() -> None:
    e = flexkv_store
    assert issubclass(e.KeyFormatError, e.InvalidKeyError)
    assert issubclass(e.InvalidKeyError, ValueError)
    assert issubclass(e.ConfigError, ValueError)
    storage: list[type[Exception]] = [
        e.BackendUnavailableError,
        e.CorruptObjectError,
        e.BufferTooSmallError,
    ]
    for cls in storage:
        assert issubclass(cls, e.StorageError)
    top: list[type[Exception]] = [e.InvalidKeyError, e.StorageError, e.QuotaExceededError]
    for cls in [*top, e.ConfigError]:
        assert issubclass(cls, e.FlexKVStoreError)
    doc = flexkv_store.errors.__doc__ or ""
    for name in flexkv_store.errors.__all__:
        assert name in doc, f"{name} missing from the tree drawn in errors' docstring"
