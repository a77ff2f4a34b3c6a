"""Log lines that repeat while a backend is down, at most one per topic and interval.

A backend that is down fails every operation; inside an engine that is hundreds of log
lines a second. :class:`Throttle` keeps the first one of a topic and then one per
``every`` seconds, saying how many it held back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class Throttle:
    """``warn(topic, msg, *args)``: log now, or count it until ``every`` seconds passed."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()  # callers on the engine's and the store's threads

    def warn(self, topic: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(topic)
            if last is not None and now - last < self._every:
                self._held[topic] = self._held.get(topic, 0) + 1
                return
            held = self._held.pop(topic, 0)
            self._last[topic] = now
        if held:
            msg += f" ({held} more like it in the last {self._every:g} s)"
        self._log.warning(msg, *args)
