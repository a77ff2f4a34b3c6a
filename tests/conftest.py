"""Shared test set-up: hypothesis profiles, vectors, and the real servers tests start."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI runs on 2 cores with real servers: no per-example deadline, bounded example counts.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

#: Under CI a missing server or binary fails the run instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
