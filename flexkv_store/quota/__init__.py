"""Per-tenant quotas: the UserLRU policy, the store's quota manager, and the admin API.

See DESIGN section 4 and ``docs/quotas.md``. The admin HTTP API lives in
:mod:`flexkv_store.quota.api` (it needs the ``server`` extra, so it is not imported here).
"""

from __future__ import annotations

from flexkv_store.quota._accounting import (
    Accounting,
    Admitted,
    QuotaSource,
    Reconciled,
    SaltReport,
    Snapshot,
)
from flexkv_store.quota._local import LocalAccounting, SupersededError
from flexkv_store.quota._manager import JsonQuotaState, QuotaInfo, QuotaManager, QuotaState
from flexkv_store.quota._userlru import (
    Admission,
    Tally,
    UserLRU,
    Victim,
    load_quotas,
    save_quotas,
)

__all__ = [
    "Accounting",
    "Admission",
    "Admitted",
    "JsonQuotaState",
    "LocalAccounting",
    "QuotaInfo",
    "QuotaManager",
    "QuotaSource",
    "QuotaState",
    "Reconciled",
    "SaltReport",
    "Snapshot",
    "SupersededError",
    "Tally",
    "UserLRU",
    "Victim",
    "load_quotas",
    "save_quotas",
]
