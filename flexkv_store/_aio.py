"""Small asyncio helpers the store and the adapters share.

:func:`settle` is how a coroutine that lends a buffer to other threads (or to a write that
must finish) stays cancellation-safe: the caller's cancellation is held back until the work
is done, so nothing touches the caller's memory after it got control back.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup, ExceptionGroup
else:  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

__all__ = ["BaseExceptionGroup", "ExceptionGroup", "settle"]

_T = TypeVar("_T")


async def settle(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end, even if the calling task is cancelled meanwhile.

    A cancellation of the caller is re-raised only once ``aw`` has finished (its own
    result or error is then dropped, after being retrieved). Work that reads or fills a
    caller's buffer in a worker thread must be awaited like this: a plain ``await`` would
    return on cancellation while the thread still uses the buffer.
    """
    fut = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if fut.done():
            raise  # the work itself was cancelled
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue  # cancelled again while waiting: keep waiting
            except BaseException:
                break
        raise
