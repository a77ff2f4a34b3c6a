"""UserLRU: quota rules (DESIGN section 4), rollback, rebuild, persistence, and a model check."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flexkv_store.errors import ConfigError, InvalidKeyError, QuotaExceededError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.quota._userlru import (
    Admission,
    Tally,
    UserLRU,
    Victim,
    load_quotas,
    quotas_from_json,
    quotas_to_json,
    save_quotas,
)


def key(n: int, salt: str = "a") -> ObjectKey:
    return ObjectKey("org/model", 0, n.to_bytes(2, "big"), salt)


def order(lru: UserLRU, salt: str | None = None) -> list[ObjectKey]:
    return [k for k, _ in lru.iter_lru(salt)]


# -- quota(salt) -------------------------------------------------------------------------


def test_quota_is_explicit_else_default() -> None:
    lru = UserLRU(default_quota=500)
    lru.set_quota("a", 100)
    assert lru.quota("a") == 100
    assert lru.quota("b") == 500
    assert lru.get_quota("a") == 100
    assert lru.get_quota("b") is None
    assert lru.quotas() == {"a": 100}
    assert UserLRU().quota("a") is None


def test_unlimited_by_default() -> None:
    lru = UserLRU()
    for n in range(100):
        assert lru.admit(key(n), 10**9).victims == []
    assert lru.usage("a") == Tally(100 * 10**9, 100)


def test_allowlist_mode_refuses_salts_without_quota() -> None:
    lru = UserLRU(default_quota=0)
    with pytest.raises(QuotaExceededError):
        lru.admit(key(1, "guest"), 1)
    # "may not store anything": not even an empty object.
    with pytest.raises(QuotaExceededError):
        lru.admit(key(2, "guest"), 0)
    lru.set_quota("paying", 100)
    lru.admit(key(3, "paying"), 100)
    assert lru.usage("paying") == Tally(100, 1)
    assert lru.salts() == ["paying"]


def test_empty_salt_is_a_normal_salt() -> None:
    lru = UserLRU()
    lru.set_quota("", 100)
    lru.admit(key(1, ""), 60)
    lru.admit(key(1, "a"), 60)
    victims = lru.admit(key(2, ""), 60).victims
    assert victims == [(key(1, ""), 60)]
    assert lru.usage("") == Tally(60, 1)
    assert lru.usage("a") == Tally(60, 1)
    assert sorted(lru.salts()) == ["", "a"]


# -- admit -------------------------------------------------------------------------------


def test_refusal_changes_nothing() -> None:
    lru = UserLRU(capacity=1000)
    lru.set_quota("a", 100)
    lru.admit(key(1), 50)
    lru.admit(key(2), 50)
    before = (order(lru), lru.usage("a"), lru.total_bytes, lru.eviction_totals)
    with pytest.raises(QuotaExceededError) as info:
        lru.admit(key(3), 101)
    assert (info.value.cache_salt, info.value.size, info.value.limit) == ("a", 101, 100)
    # An overwrite that is refused keeps the old size too.
    with pytest.raises(QuotaExceededError):
        lru.admit(key(1), 101)
    with pytest.raises(QuotaExceededError) as info:
        lru.admit(key(4, "b"), 1001)
    assert info.value.limit == 1000
    assert (order(lru), lru.usage("a"), lru.total_bytes, lru.eviction_totals) == before
    assert lru.size_of(key(1)) == 50
    assert lru.salts() == ["a"]


def test_admit_evicts_lru_of_the_same_salt_only() -> None:
    lru = UserLRU()
    lru.set_quota("a", 100)
    lru.admit(key(1, "b"), 1000)
    lru.admit(key(1), 40)
    lru.admit(key(2), 40)
    lru.admit(key(3), 20)
    adm = lru.admit(key(4), 50)
    assert adm.victims == [(key(1), 40), (key(2), 40)]
    assert adm.previous_size is None
    assert order(lru, "a") == [key(3), key(4)]
    assert lru.usage("a") == Tally(70, 2)
    assert lru.usage("b") == Tally(1000, 1)
    assert lru.evictions("a") == Tally(80, 2)
    assert lru.evictions("b") == Tally(0, 0)
    assert lru.eviction_totals == Tally(80, 2)


def test_quota_fits_exactly() -> None:
    lru = UserLRU()
    lru.set_quota("a", 100)
    lru.admit(key(1), 50)
    assert lru.admit(key(2), 50).victims == []
    assert lru.admit(key(3), 1).victims == [(key(1), 50)]


def test_overwrite_accounts_the_difference_and_never_evicts_itself() -> None:
    lru = UserLRU()
    lru.set_quota("a", 100)
    lru.admit(key(1), 60)
    lru.admit(key(2), 30)
    # Key 1 is the LRU, but it is the one being written: key 2 goes instead.
    adm = lru.admit(key(1), 80)
    assert adm.previous_size == 60
    assert adm.victims == [(key(2), 30)]
    assert lru.usage("a") == Tally(80, 1)
    adm = lru.admit(key(1), 100)
    assert adm.victims == []
    assert lru.usage("a") == Tally(100, 1)
    assert lru.admit(key(1), 10).victims == []
    assert lru.usage("a") == Tally(10, 1)
    assert lru.total_objects == 1


def test_overwrite_moves_to_most_recently_used() -> None:
    lru = UserLRU()
    for n in range(3):
        lru.admit(key(n), 1)
    lru.admit(key(0), 1)
    assert order(lru) == [key(1), key(2), key(0)]


def test_capacity_evicts_in_global_lru_order() -> None:
    lru = UserLRU(capacity=100)
    lru.admit(key(1, "a"), 30)
    lru.admit(key(2, "b"), 30)
    lru.admit(key(3, "a"), 30)
    lru.touch(key(1, "a"))
    adm = lru.admit(key(4, "c"), 50)
    assert adm.victims == [(key(2, "b"), 30), (key(3, "a"), 30)]
    assert lru.total_bytes == 80
    assert "b" not in lru.salts()


def test_salt_eviction_comes_before_capacity_eviction() -> None:
    lru = UserLRU(capacity=100)
    lru.set_quota("a", 50)
    lru.admit(key(1, "b"), 40)
    lru.admit(key(1, "a"), 30)
    lru.admit(key(2, "a"), 20)
    # Quota first: a's LRU (30) goes; then the store (90 + 40 - 30 = 80) fits the capacity.
    adm = lru.admit(key(3, "a"), 30)
    assert adm.victims == [(key(1, "a"), 30)]
    adm = lru.admit(key(2, "b"), 50)
    assert adm.victims == [(key(1, "b"), 40)]
    assert lru.total_bytes <= 100


def test_capacity_never_evicts_the_key_being_written() -> None:
    lru = UserLRU(capacity=100)
    lru.admit(key(1), 50)
    lru.admit(key(2, "b"), 50)
    assert lru.admit(key(1), 70).victims == [(key(2, "b"), 50)]
    assert lru.total_bytes == 70


def test_admit_size_validation() -> None:
    lru = UserLRU()
    with pytest.raises(ValueError, match="non-negative"):
        lru.admit(key(1), -1)
    with pytest.raises(TypeError):
        lru.admit(key(1), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        lru.admit(key(1), True)
    lru.admit(key(1), np.int64(7))  # type: ignore[arg-type]
    assert lru.size_of(key(1)) == 7
    assert type(lru.size_of(key(1))) is int


def test_zero_size_objects() -> None:
    lru = UserLRU()
    lru.set_quota("a", 10)
    lru.admit(key(1), 0)
    lru.admit(key(2), 10)
    assert lru.usage("a") == Tally(10, 2)
    assert lru.set_quota("a", 0) == [(key(1), 0), (key(2), 10)]
    assert lru.usage("a") == Tally(0, 0)


# -- touch, remove, lookups --------------------------------------------------------------


def test_touch_moves_to_most_recently_used_in_both_orders() -> None:
    lru = UserLRU(capacity=30)
    lru.set_quota("a", 20)
    lru.admit(key(1), 10)
    lru.admit(key(2, "b"), 10)
    lru.admit(key(2), 10)
    assert lru.touch(key(1))
    assert not lru.touch(key(9))
    assert order(lru, "a") == [key(2), key(1)]
    assert order(lru) == [key(2, "b"), key(2), key(1)]
    assert lru.admit(key(3), 10).victims == [(key(2), 10)]
    assert lru.admit(key(4, "c"), 10).victims == [(key(2, "b"), 10)]


def test_remove_and_lookups() -> None:
    lru = UserLRU()
    lru.admit(key(1), 10)
    lru.admit(key(2), 20)
    assert key(1) in lru
    assert lru.contains(key(2))
    assert len(lru) == 2
    assert lru.size_of(key(2)) == 20
    assert lru.size_of(key(3)) is None
    assert lru.remove(key(1)) == 10
    assert lru.remove(key(1)) is None
    assert key(1) not in lru
    assert lru.usage("a") == Tally(20, 1)
    assert lru.eviction_totals == Tally(0, 0)
    assert lru.remove(key(2)) == 20
    assert lru.salts() == []
    assert (lru.total_bytes, lru.total_objects) == (0, 0)


def test_salts_lists_quotas_and_usage() -> None:
    lru = UserLRU()
    lru.set_quota("q", 10)
    lru.admit(key(1, "u"), 1)
    assert sorted(lru.salts()) == ["q", "u"]
    assert lru.usage("q") == Tally(0, 0)
    assert lru.usage("nobody") == Tally(0, 0)


def test_freed_room_is_reused() -> None:
    lru = UserLRU()
    lru.set_quota("a", 10)
    for n in range(5000):
        lru.admit(key(n, f"s{n % 7}"), 1)
        lru.admit(key(n), 5)
        lru.remove(key(n, f"s{n % 7}"))
    assert lru.total_objects == 2
    # Room freed by evictions, removes and idle salts is reused, not grown past.
    assert list(lru._salts) == ["a"]
    assert sys.getsizeof(lru._global) < 2048


# -- quotas, default, capacity -----------------------------------------------------------


def test_lowering_a_quota_evicts_at_once() -> None:
    lru = UserLRU()
    for n in range(5):
        lru.admit(key(n), 10)
    lru.touch(key(0))
    assert lru.set_quota("a", 25) == [(key(1), 10), (key(2), 10), (key(3), 10)]
    assert lru.usage("a") == Tally(20, 2)
    assert lru.evictions("a") == Tally(30, 3)
    assert lru.set_quota("a", 1000) == []


def test_delete_quota_falls_back_to_default() -> None:
    lru = UserLRU(default_quota=15)
    assert lru.delete_quota("a") == (False, [])
    lru.set_quota("a", 100)
    for n in range(3):
        lru.admit(key(n), 10)
    assert lru.delete_quota("a") == (True, [(key(0), 10), (key(1), 10)])
    assert lru.get_quota("a") is None
    assert lru.quota("a") == 15
    assert lru.delete_quota("a") == (False, [])
    lru.set_quota("empty", 5)
    assert lru.delete_quota("empty") == (True, [])
    assert lru.salts() == ["a"]


def test_set_default_quota_evicts_salts_without_a_quota() -> None:
    lru = UserLRU()
    lru.set_quota("vip", 100)
    for salt in ("vip", "x", "y"):
        for n in range(3):
            lru.admit(key(n, salt), 30)
    victims = lru.set_default_quota(30)
    assert Counter(victims) == Counter(
        [(key(0, "x"), 30), (key(1, "x"), 30), (key(0, "y"), 30), (key(1, "y"), 30)]
    )
    assert lru.default_quota == 30
    assert lru.usage("vip") == Tally(90, 3)
    assert lru.quota("new") == 30
    assert Counter(lru.set_default_quota(0)) == Counter([(key(2, "x"), 30), (key(2, "y"), 30)])
    assert sorted(lru.salts()) == ["vip"]


def test_set_capacity_evicts_in_global_order() -> None:
    lru = UserLRU()
    lru.admit(key(1, "a"), 10)
    lru.admit(key(1, "b"), 10)
    lru.admit(key(2, "a"), 10)
    assert lru.set_capacity(15) == [(key(1, "a"), 10), (key(1, "b"), 10)]
    assert lru.capacity == 15
    assert lru.set_capacity(0) == [(key(2, "a"), 10)]
    assert lru.set_capacity(None) == []
    assert lru.admit(key(3, "a"), 10**12).victims == []


def test_global_order_survives_capacity_being_switched_on_and_off() -> None:
    # Switching the capacity on and off neither loses nor reorders the global order.
    lru = UserLRU()
    for n in range(4):
        lru.admit(key(n, "ab"[n % 2]), 10)
    lru.touch(key(0, "a"))
    lru.admit(key(1, "b"), 10)  # an overwrite is a use too
    expected = [key(2, "a"), key(3, "b"), key(0, "a"), key(1, "b")]
    assert order(lru) == expected
    assert lru.set_capacity(10**6) == []
    assert order(lru) == expected
    lru.touch(key(2, "a"))
    assert lru.set_capacity(None) == []
    expected = [key(3, "b"), key(0, "a"), key(1, "b"), key(2, "a")]
    assert order(lru) == expected
    lru.remove(key(0, "a"))
    assert lru.set_capacity(15) == [(key(3, "b"), 10), (key(1, "b"), 10)]
    assert order(lru) == [key(2, "a")]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10", None])
def test_bad_limits_are_config_errors(bad: object) -> None:
    lru = UserLRU()
    with pytest.raises(ConfigError):
        lru.set_quota("a", bad)  # type: ignore[arg-type]
    if bad is not None:
        with pytest.raises(ConfigError):
            lru.set_capacity(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            lru.set_default_quota(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            UserLRU(default_quota=bad)  # type: ignore[arg-type]
    assert lru.quotas() == {}


@pytest.mark.parametrize("salt", ["a/b", "_default", "x" * 129, "a@b"])
def test_bad_salts_are_invalid_key_errors(salt: str) -> None:
    lru = UserLRU()
    with pytest.raises(InvalidKeyError):
        lru.set_quota(salt, 1)
    with pytest.raises(InvalidKeyError):
        lru.delete_quota(salt)
    with pytest.raises(InvalidKeyError):
        lru.replace_quotas({"ok": 1, salt: 1})
    assert lru.quotas() == {}


def test_replace_quotas() -> None:
    lru = UserLRU(default_quota=10)
    lru.set_quota("a", 100)
    lru.set_quota("b", 100)
    lru.admit(key(1, "a"), 50)
    lru.admit(key(1, "b"), 50)
    victims = lru.replace_quotas({"b": 40, "c": 7})
    assert Counter(victims) == Counter([(key(1, "a"), 50), (key(1, "b"), 50)])
    assert lru.quotas() == {"b": 40, "c": 7}
    with pytest.raises(ConfigError):
        lru.replace_quotas({"d": -1})
    assert lru.quotas() == {"b": 40, "c": 7}


# -- rollback ----------------------------------------------------------------------------


def test_rollback_of_a_new_key_forgets_it_and_keeps_victims_evicted() -> None:
    lru = UserLRU()
    lru.set_quota("a", 10)
    lru.admit(key(1), 10)
    adm = lru.admit(key(2), 10)
    assert adm.victims == [(key(1), 10)]
    assert lru.rollback(adm) == []
    assert key(2) not in lru
    assert key(1) not in lru
    assert lru.usage("a") == Tally(0, 0)
    assert lru.rollback(adm) == []


def test_rollback_of_an_overwrite_restores_the_previous_size() -> None:
    lru = UserLRU()
    lru.admit(key(1), 10)
    lru.admit(key(2), 5)
    adm = lru.admit(key(1), 30)
    assert lru.rollback(adm) == []
    assert lru.size_of(key(1)) == 10
    assert lru.usage("a") == Tally(15, 2)
    assert order(lru) == [key(2), key(1)]
    # Applying it twice would be harmless here, but it must be a no-op.
    lru.admit(key(3), 1)
    assert lru.rollback(adm) == []
    assert order(lru) == [key(2), key(1), key(3)]


def test_rollback_is_a_no_op_after_a_later_write_or_delete() -> None:
    lru = UserLRU()
    first = lru.admit(key(1), 10)
    second = lru.admit(key(1), 20)
    assert lru.rollback(first) == []
    assert lru.size_of(key(1)) == 20
    assert lru.rollback(second) == []
    assert lru.size_of(key(1)) == 10
    third = lru.admit(key(2), 5)
    lru.remove(key(2))
    lru.admit(key(2), 6)
    assert lru.rollback(third) == []
    assert lru.size_of(key(2)) == 6


def test_rollback_evicts_to_keep_the_quota_hard() -> None:
    lru = UserLRU()
    lru.set_quota("a", 100)
    lru.admit(key(1), 60)
    adm = lru.admit(key(1), 10)
    lru.admit(key(2), 50)
    lru.admit(key(3), 40)
    assert lru.rollback(adm) == [(key(2), 50)]
    assert lru.usage("a") == Tally(100, 2)
    assert lru.size_of(key(1)) == 60


def test_rollback_drops_the_key_when_its_previous_size_no_longer_fits() -> None:
    lru = UserLRU()
    lru.admit(key(1), 60)
    adm = lru.admit(key(1), 10)
    lru.admit(key(2), 5)
    lru.set_quota("a", 50)
    assert lru.rollback(adm) == [(key(1), 10)]
    assert key(1) not in lru
    assert lru.usage("a") == Tally(5, 1)


def test_admission_repr_hides_the_token() -> None:
    adm = UserLRU().admit(key(1), 3)
    assert isinstance(adm, Admission)
    assert "slot" not in repr(adm)
    assert "size=3" in repr(adm)


# -- rebuilding from a scan --------------------------------------------------------------


def test_record_then_enforce() -> None:
    lru = UserLRU(capacity=70)
    lru.set_quota("a", 30)
    for n in range(4):
        lru.record(key(n), 10)
        lru.record(key(n, "b"), 10)
    # Recording never evicts, so limits can be exceeded until enforce().
    assert lru.usage("a") == Tally(40, 4)
    lru.record(key(0, "b"), 15)
    assert lru.size_of(key(0, "b")) == 15
    assert order(lru, "b") == [key(1, "b"), key(2, "b"), key(3, "b"), key(0, "b")]
    # Quotas first (a: 40 -> 30), then the capacity (75 -> 65) in global LRU order.
    assert lru.enforce() == [(key(0), 10), (key(1), 10)]
    assert lru.usage("a") == Tally(20, 2)
    assert lru.total_bytes == 65
    assert lru.enforce() == []


# -- persistence -------------------------------------------------------------------------


def test_save_and_load_quotas(tmp_path: Path) -> None:
    path = tmp_path / "quota.json"
    assert load_quotas(path) == {}
    quotas = {"": 5, "alice": 10 * 2**30, "bob": 0}
    save_quotas(path, quotas)
    assert load_quotas(path) == quotas
    save_quotas(path, {"carol": 1})
    assert load_quotas(path) == {"carol": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quota.json"]
    doc = json.loads(path.read_text())
    assert doc == {"version": 1, "quotas": {"carol": 1}}


def test_load_quotas_into_a_userlru(tmp_path: Path) -> None:
    path = tmp_path / "quota.json"
    lru = UserLRU()
    lru.set_quota("a", 7)
    lru.set_quota("", 3)
    save_quotas(path, lru.quotas())
    again = UserLRU()
    assert again.replace_quotas(load_quotas(path)) == []
    assert again.quotas() == {"a": 7, "": 3}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", ConfigError),
        ("[]", ConfigError),
        ('{"version": 2, "quotas": {}}', ConfigError),
        ('{"version": 1}', ConfigError),
        ('{"version": 1, "quotas": {"a": -1}}', ConfigError),
        ('{"version": 1, "quotas": {"a": 1.5}}', ConfigError),
        ('{"version": 1, "quotas": {"a/b": 1}}', InvalidKeyError),
    ],
)
def test_malformed_quota_state_is_refused(
    tmp_path: Path, text: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        quotas_from_json(text)
    path = tmp_path / "quota.json"
    path.write_text(text)
    with pytest.raises(error):
        load_quotas(path)


def test_quotas_json_round_trip() -> None:
    quotas = {"zed": 1, "": 2, "ü": 3}
    assert quotas_from_json(quotas_to_json(quotas)) == quotas


# -- model check -------------------------------------------------------------------------

SALTS = ["", "a", "b"]
KEYS = [key(n, salt) for salt in SALTS for n in range(5)]
sizes = st.integers(0, 120)
limits = st.integers(0, 300)


def _refuses(size: int, limit: int | None) -> bool:
    return limit is not None and (size > limit or limit == 0)


class Model:
    """The rules, written the obvious way: one list in global LRU order (LRU first).

    A salt's LRU order is the global order restricted to its keys, since every operation
    moves a key in both orders at once.
    """

    def __init__(self) -> None:
        self.order: list[ObjectKey] = []
        self.sizes: dict[ObjectKey, int] = {}
        self.quotas: dict[str, int] = {}
        self.default: int | None = None
        self.capacity: int | None = None
        # The admission that last wrote each key: only that one may be rolled back.
        self.latest: dict[ObjectKey, Admission] = {}

    def limit(self, salt: str) -> int | None:
        return self.quotas.get(salt, self.default)

    def used(self, salt: str) -> int:
        return sum(size for k, size in self.sizes.items() if k.cache_salt == salt)

    def count(self, salt: str) -> int:
        return sum(1 for k in self.sizes if k.cache_salt == salt)

    def total(self) -> int:
        return sum(self.sizes.values())

    def evict(self, k: ObjectKey, victims: list[Victim]) -> None:
        self.order.remove(k)
        victims.append((k, self.sizes.pop(k)))
        self.latest.pop(k, None)

    def fit(self, salt: str, size: int, victims: list[Victim]) -> None:
        limit = self.limit(salt)
        if limit is not None:
            while self.used(salt) + size > limit:
                self.evict(next(k for k in self.order if k.cache_salt == salt), victims)
        if self.capacity is not None:
            while self.total() + size > self.capacity:
                self.evict(self.order[0], victims)

    def shrink_salt(self, salt: str, victims: list[Victim]) -> None:
        limit = self.limit(salt)
        if limit is None:
            return
        while self.count(salt) and (self.used(salt) > limit or limit == 0):
            self.evict(next(k for k in self.order if k.cache_salt == salt), victims)

    def shrink_global(self, victims: list[Victim]) -> None:
        cap = self.capacity
        while cap is not None and self.order and (self.total() > cap or cap == 0):
            self.evict(self.order[0], victims)

    def admit(self, k: ObjectKey, size: int) -> list[Victim] | None:
        if _refuses(size, self.limit(k.cache_salt)) or _refuses(size, self.capacity):
            return None
        victims: list[Victim] = []
        if k in self.sizes:
            self.order.remove(k)
            del self.sizes[k]
        self.fit(k.cache_salt, size, victims)
        self.order.append(k)
        self.sizes[k] = size
        return victims

    def rollback(self, adm: Admission) -> list[Victim]:
        k = adm.key
        victims: list[Victim] = []
        if self.latest.get(k) is not adm:
            return victims
        del self.latest[k]
        previous = adm.previous_size
        if previous is None:
            self.order.remove(k)
            del self.sizes[k]
        elif _refuses(previous, self.limit(k.cache_salt)) or _refuses(previous, self.capacity):
            self.evict(k, victims)
        else:
            self.order.remove(k)
            del self.sizes[k]
            self.fit(k.cache_salt, previous, victims)
            self.order.append(k)
            self.sizes[k] = previous
        return victims


class UserLRUMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lru = UserLRU()
        self.model = Model()
        self.pending: list[Admission] = []

    @rule(k=st.sampled_from(KEYS), size=sizes)
    def admit(self, k: ObjectKey, size: int) -> None:
        expected = self.model.admit(k, size)
        if expected is None:
            before = list(self.lru.iter_lru())
            with pytest.raises(QuotaExceededError):
                self.lru.admit(k, size)
            assert list(self.lru.iter_lru()) == before
            return
        adm = self.lru.admit(k, size)
        assert adm.victims == expected
        if self.model.capacity is None:
            # A tenant's quota never evicts another tenant's objects.
            assert all(v.cache_salt == k.cache_salt for v, _ in adm.victims)
        assert k not in {v for v, _ in adm.victims}
        self.model.latest[k] = adm
        self.pending.append(adm)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        adm = data.draw(st.sampled_from(self.pending))
        assert self.lru.rollback(adm) == self.model.rollback(adm)

    @rule(k=st.sampled_from(KEYS))
    def touch(self, k: ObjectKey) -> None:
        hit = k in self.model.sizes
        if hit:
            self.model.order.remove(k)
            self.model.order.append(k)
        assert self.lru.touch(k) == hit

    @rule(k=st.sampled_from(KEYS))
    def remove(self, k: ObjectKey) -> None:
        size = self.model.sizes.pop(k, None)
        if size is not None:
            self.model.order.remove(k)
            self.model.latest.pop(k, None)
        assert self.lru.remove(k) == size

    @rule(salt=st.sampled_from(SALTS), limit=limits)
    def set_quota(self, salt: str, limit: int) -> None:
        self.model.quotas[salt] = limit
        victims: list[Victim] = []
        self.model.shrink_salt(salt, victims)
        assert self.lru.set_quota(salt, limit) == victims

    @rule(salt=st.sampled_from(SALTS))
    def delete_quota(self, salt: str) -> None:
        existed = self.model.quotas.pop(salt, None) is not None
        victims: list[Victim] = []
        self.model.shrink_salt(salt, victims)
        assert self.lru.delete_quota(salt) == (existed, victims)

    @rule(limit=st.none() | limits)
    def set_default_quota(self, limit: int | None) -> None:
        self.model.default = limit
        victims: list[Victim] = []
        for salt in SALTS:
            if salt not in self.model.quotas:
                self.model.shrink_salt(salt, victims)
        # Salts are visited in no promised order; each salt's victims are in LRU order.
        assert Counter(self.lru.set_default_quota(limit)) == Counter(victims)

    @rule(limit=st.none() | st.integers(0, 600))
    def set_capacity(self, limit: int | None) -> None:
        self.model.capacity = limit
        victims: list[Victim] = []
        self.model.shrink_global(victims)
        assert self.lru.set_capacity(limit) == victims

    @rule()
    def rebuild(self) -> None:
        """A restart: quotas from their saved form, objects from a scan in LRU order."""
        lru = UserLRU(default_quota=self.model.default, capacity=self.model.capacity)
        assert lru.replace_quotas(quotas_from_json(quotas_to_json(self.lru.quotas()))) == []
        for k in self.model.order:
            lru.record(k, self.model.sizes[k])
        assert lru.enforce() == []
        self.lru = lru
        self.pending.clear()
        self.model.latest.clear()

    @invariant()
    def matches_model(self) -> None:
        lru, model = self.lru, self.model
        assert list(lru.iter_lru()) == [(k, model.sizes[k]) for k in model.order]
        for salt in SALTS:
            used, count = lru.usage(salt)
            assert (used, count) == (model.used(salt), model.count(salt))
            assert list(lru.iter_lru(salt)) == [
                (k, model.sizes[k]) for k in model.order if k.cache_salt == salt
            ]
            limit = model.limit(salt)
            assert lru.quota(salt) == limit
            if limit is not None:
                assert used <= limit
                assert limit or not count
        assert lru.total_bytes == model.total() == sum(lru.usage(s).nbytes for s in SALTS)
        assert lru.total_objects == len(model.sizes) == len(lru)
        if model.capacity is not None:
            assert lru.total_bytes <= model.capacity
        assert lru.quotas() == model.quotas
        assert set(lru.salts()) == set(model.quotas) | {k.cache_salt for k in model.sizes}
        for k in KEYS:
            assert lru.size_of(k) == model.sizes.get(k)


UserLRUMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestUserLRUMachine = UserLRUMachine.TestCase
