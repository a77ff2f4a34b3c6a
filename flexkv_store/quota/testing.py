"""The conformance suite every :class:`~flexkv_store.quota.Accounting` passes.

Subclass :class:`AccountingTests` in a test module and give it a ``make`` fixture that
returns an async factory ``make(default_quota=None, capacity=None) -> Accounting`` (opened);
the subclass inherits every test (UserLRU's semantics, DESIGN section 4). ``shared`` accountings
also get the tests of pending admissions (``make(same_state=True)`` must then return a
second accounting over the same state, as another process would open it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from flexkv_store.errors import ConcurrentWriteError, QuotaExceededError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.quota._accounting import Accounting
from flexkv_store.quota._userlru import Admission

__all__ = ["AccountingTests", "Make", "k"]

#: ``make(default_quota=None, capacity=None)``: a fresh, opened accounting.
Make = Callable[..., Awaitable[Accounting]]


def k(i: int, salt: str = "alice") -> ObjectKey:
    """The ``i``-th test key of ``salt``."""
    return ObjectKey("m", 0, i.to_bytes(4, "big"), salt)


async def put(acct: Accounting, key: ObjectKey, size: int) -> list[ObjectKey]:
    """Admit and commit one object as the Store does; the victims' keys."""
    out = await acct.admit([(key, size)], each=False)
    await acct.commit(out.admissions)
    return [v for v, _ in out.victims]


class AccountingTests:
    """UserLRU's semantics, for any accounting (``make`` is the subclass's fixture)."""

    async def test_a_salt_evicts_only_its_own_least_recently_used(self, make: Make) -> None:
        acct = await make()
        await acct.set_quota("alice", 100)
        for i in range(3):
            assert await put(acct, k(i), 40) == ([] if i < 2 else [k(0)])
        await put(acct, k(9, "bob"), 1000)  # bob has no quota: unlimited
        assert await acct.usage("alice") == (80, 2)
        assert await acct.usage("bob") == (1000, 1)
        assert await acct.evictions("alice") == (40, 1)
        assert [key for key, _ in await acct.lru_order("alice")] == [k(1), k(2)]

    async def test_an_object_alone_over_its_quota_is_refused(self, make: Make) -> None:
        acct = await make()
        await acct.set_quota("alice", 100)
        await put(acct, k(1), 60)
        with pytest.raises(QuotaExceededError):
            await acct.admit([(k(2), 60), (k(3), 101)], each=False)
        assert await acct.usage("alice") == (60, 1)  # nothing changed
        out = await acct.admit([(k(2), 30), (k(3), 101)], each=True)
        assert [a.key for a in out.admissions] == [k(2)] and set(out.refused) == {k(3)}
        await acct.commit(out.admissions)
        assert await acct.usage("alice") == (90, 2)

    async def test_overwrite_accounts_the_difference(self, make: Make) -> None:
        acct = await make()
        await put(acct, k(1), 10)
        await put(acct, k(1), 25)
        assert await acct.usage("alice") == (25, 1)

    async def test_touch_protects_from_eviction(self, make: Make) -> None:
        acct = await make()
        await acct.set_quota("alice", 30)
        for i in range(3):
            await put(acct, k(i), 10)
        acct.touch([k(0)])
        await acct.flush()
        assert await put(acct, k(3), 10) == [k(1)]

    async def test_rollback_restores_the_previous_size(self, make: Make) -> None:
        acct = await make()
        await put(acct, k(1), 10)
        out = await acct.admit([(k(1), 50), (k(2), 5)], each=False)
        assert await acct.usage("alice") == (55, 2)
        await acct.rollback(out.admissions)
        assert await acct.usage("alice") == (10, 1)
        assert await acct.contains([k(1), k(2)]) == [True, False]

    async def test_abandon_forgets_only_unchanged_entries(self, make: Make) -> None:
        acct = await make()
        first = await acct.admit([(k(1), 10)], each=False)
        await acct.commit(first.admissions)
        again = await acct.admit([(k(1), 20)], each=False)
        await acct.commit(again.admissions)
        await acct.abandon(first.admissions)  # stale: a later write changed it
        assert await acct.usage("alice") == (20, 1)
        await acct.abandon(again.admissions)
        assert await acct.usage("alice") == (0, 0)

    async def test_remove_and_contains(self, make: Make) -> None:
        acct = await make()
        await put(acct, k(1), 10)
        await put(acct, k(2), 10)
        await acct.remove([k(1), k(7)])
        assert await acct.contains([k(1), k(2), k(7)]) == [False, True, False]
        assert await acct.usage("alice") == (10, 1)

    async def test_lowering_a_quota_evicts_down_at_once(self, make: Make) -> None:
        acct = await make()
        for i in range(4):
            await put(acct, k(i), 10)
        victims = await acct.set_quota("alice", 15)
        assert [v for v, _ in victims] == [k(0), k(1), k(2)]
        assert await acct.usage("alice") == (10, 1)

    async def test_runtime_quotas_override_config_ones(self, make: Make) -> None:
        acct = await make(default_quota=1000)
        await acct.apply_config({"alice": 100, "bob": 50})
        assert await acct.quota("alice") == (100, "config")
        await acct.set_quota("alice", 70)
        assert await acct.quota("alice") == (70, "runtime")
        await acct.apply_config({"alice": 200, "bob": 60})  # a config edit
        assert await acct.quota("alice") == (70, "runtime")  # overridden at run time
        assert await acct.quota("bob") == (60, "config")  # applies
        assert await acct.delete_quota("alice") == (True, [])
        assert await acct.quota("alice") == (200, "config")
        assert (await acct.delete_quota("bob"))[0] is False  # no run-time quota to delete
        assert await acct.quotas() == {"alice": (200, "config"), "bob": (60, "config")}
        await acct.apply_config({})
        assert await acct.quota("bob") == (1000, "default")
        assert await acct.quotas() == {}

    async def test_allowlist_mode(self, make: Make) -> None:
        acct = await make(default_quota=0)
        await acct.set_quota("alice", 10)
        await put(acct, k(1), 5)
        with pytest.raises(QuotaExceededError):
            await acct.admit([(k(2, "mallory"), 0)], each=False)

    async def test_capacity_evicts_globally(self, make: Make) -> None:
        acct = await make(capacity=100)
        await put(acct, k(1, "alice"), 60)
        assert await put(acct, k(2, "bob"), 60) == [k(1, "alice")]
        with pytest.raises(QuotaExceededError):
            await acct.admit([(k(3, "bob"), 101)], each=False)

    async def test_a_batch_over_quota_keeps_its_newest(self, make: Make) -> None:
        acct = await make()
        await acct.set_quota("alice", 100)
        out = await acct.admit([(k(i), 40) for i in range(5)], each=True)
        assert [a.key for a in out.admissions] == [k(3), k(4)]
        assert set(out.refused) == {k(0), k(1), k(2)} == out.never_stored
        await acct.commit(out.admissions)
        assert await acct.usage("alice") == (80, 2)

    async def test_record_then_enforce_rebuilds(self, make: Make) -> None:
        acct = await make()
        await acct.set_quota("alice", 25)
        await acct.record([(k(i), 10) for i in range(4)])  # oldest first
        victims = await acct.enforce()
        assert [v for v, _ in victims] == [k(0), k(1)]
        assert await acct.usage("alice") == (20, 2)
        assert not await acct.is_empty()

    async def test_report_lists_salts_with_quota_or_objects(self, make: Make) -> None:
        acct = await make()
        await acct.set_quota("alice", 100)
        await put(acct, k(1, "bob"), 7)
        snap = await acct.report()
        by_salt = {r.salt: r for r in snap.salts}
        assert by_salt["alice"].limit == 100 and by_salt["alice"].source == "runtime"
        assert by_salt["bob"].used == (7, 1) and by_salt["bob"].source == "default"
        assert snap.total == (7, 1)

    async def test_the_unsalted_tenant(self, make: Make) -> None:
        """The empty salt is a tenant like any other (its keys must share a slot too)."""
        acct = await make()
        await acct.set_quota("", 20)
        for i in range(3):
            await put(acct, k(i, ""), 10)
        assert await acct.usage("") == (20, 2)
        assert await acct.contains([k(0, ""), k(2, "")]) == [False, True]
        await acct.remove([k(2, "")])
        assert await acct.usage("") == (10, 1)

    async def test_a_key_written_elsewhere_is_not_taken_over(self, make: Make) -> None:
        """Another process's pending entry for the key stays: its write settles it."""
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting has admissions pending elsewhere")
        other = await make(same_state=True)
        theirs = await other.admit([(k(1), 10)], each=False)
        out = await acct.admit([(k(1), 10), (k(2), 10)], each=True)
        assert set(out.refused) == {k(1)}
        assert isinstance(out.refused[k(1)], ConcurrentWriteError)
        await acct.commit(out.admissions)
        await other.commit(theirs.admissions)
        assert await acct.usage("alice") == (20, 2)
        assert await acct.pending() == []

    async def test_a_refused_item_leaves_its_previous_entry(self, make: Make) -> None:
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting refuses for writes in flight")
        other = await make(same_state=True)
        await acct.set_quota("alice", 100)
        await put(acct, k(1), 30)
        await other.admit([(k(2), 60)], each=False)  # in flight elsewhere
        out = await acct.admit([(k(1), 50)], each=True)  # 50 + 60 pending > 100
        assert set(out.refused) == {k(1)}
        assert await acct.contains([k(1)]) == [True]  # the old value is still accounted
        assert await acct.usage("alice") == (90, 2)

    async def test_reconcile_leaves_an_entry_a_live_writer_replaced(self, make: Make) -> None:
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting keeps pending entries")
        await acct.admit([(k(1), 10)], each=False)
        seen = await acct.pending()
        await acct.abandon([Admission(k(1), 10, None, [], seen[0][4])])
        fresh = await acct.admit([(k(1), 20)], each=False)  # a live writer, again
        # a reconcile that looked before the new admission acts on the old version only
        await acct.commit_any([Admission(k(1), 10, None, [], seen[0][4])])
        assert [p[4] for p in await acct.pending()] == [fresh.admissions[0]._version]

    async def test_pending_admissions_are_never_victims(self, make: Make) -> None:
        """Another process may still be writing them (shared accountings)."""
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting has admissions pending elsewhere")
        other = await make(same_state=True)
        await acct.set_quota("alice", 100)
        pending = await other.admit([(k(1), 60)], each=False)  # not committed yet
        with pytest.raises(QuotaExceededError, match="in flight"):
            await acct.admit([(k(2), 60)], each=False)
        await other.commit(pending.admissions)
        out = await acct.admit([(k(2), 60)], each=False)
        assert [v for v, _ in out.victims] == [k(1)]
        assert [p[0] for p in await acct.pending()] == [k(2)]

    async def test_reconcile_settles_pending_entries_without_losing_objects(
        self, make: Make
    ) -> None:
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting keeps pending entries")
        a = await acct.admit([(k(1), 10), (k(2), 10)], each=False)  # the writer died here
        del a
        await put(acct, k(3), 10)
        present = {k(1): 10, k(3): 10, k(4): 5}  # k(1) was written, k(2) not; k(4) unknown
        assert await acct.reconcile(present, older_than=0) == (1, 1, [])
        assert await acct.contains([k(1), k(2), k(3), k(4)]) == [True, False, True, True]
        assert await acct.pending() == []
        assert await acct.usage("alice") == (25, 3)

    async def test_reconcile_adopts_within_the_quota(self, make: Make) -> None:
        """Objects a scan found that are not accounted join as the least recently used and
        what does not fit is evicted in the same step (it never reads over quota)."""
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting reconciles")
        await acct.set_quota("alice", 30)
        for i in range(3):
            await put(acct, k(i), 10)
        present = {k(i): 10 for i in range(5)}  # k(3), k(4): stored, not accounted
        settled = await acct.reconcile(present, older_than=0)
        assert settled == (0, 0, [(k(3), 10), (k(4), 10)])
        assert await acct.usage("alice") == (30, 3)
        assert await acct.contains([k(i) for i in range(5)]) == [True] * 3 + [False] * 2

    async def test_reconcile_of_a_larger_stored_size_stays_within_the_quota(
        self, make: Make
    ) -> None:
        """A writer died after its admission, before its write: the object stored under
        the key is the previous, larger one, and committing it at that size evicts."""
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting keeps pending entries")
        other = await make(same_state=True)
        await acct.set_quota("alice", 100)
        await put(acct, k(1), 90)
        await other.admit([(k(1), 10)], each=False)  # then it died
        await put(acct, k(2), 90)
        settled = await acct.reconcile({k(1): 90, k(2): 90}, older_than=0)
        assert settled.committed == 1 and len(settled.victims) == 1, settled
        used = await acct.usage("alice")
        assert used == (90, 1)
        gone = settled.victims[0][0]
        assert await acct.contains([gone]) == [False] and gone in (k(1), k(2))
        assert await acct.pending() == []

    async def test_a_refused_batch_over_salts_leaves_things_as_they_were(self, make: Make) -> None:
        """A later salt refuses the batch: the earlier salt's victims and the previous
        value of a key it overwrote are accounted again, its new entries are gone."""
        acct = await make()
        await acct.set_quota("alice", 20)
        await acct.set_quota("bob", 10)
        await put(acct, k(1), 10)
        await put(acct, k(2), 10)
        with pytest.raises(QuotaExceededError):
            await acct.admit([(k(2), 10), (k(3), 10), (k(4, "bob"), 11)], each=False)
        assert await acct.contains([k(1), k(2), k(3)]) == [True, True, False]
        assert await acct.usage("alice") == (20, 2)
        assert await acct.pending() == []
        assert acct.take_orphans() == []

    async def test_adopt_leaves_what_another_process_admitted(self, make: Make) -> None:
        """A scan saw an object that another process then admits again: its pending entry
        stays, and its commit settles it."""
        acct = await make()
        if not acct.shared:
            pytest.skip("only a shared accounting has admissions pending elsewhere")
        other = await make(same_state=True)
        theirs = await other.admit([(k(1), 10)], each=False)
        assert await acct.adopt([(k(1), 10), (k(2), 10)]) == []
        assert [(p[0], p[4]) for p in await acct.pending()] == [
            (k(1), theirs.admissions[0]._version)
        ]
        await other.commit(theirs.admissions)
        assert await acct.pending() == []
        assert await acct.usage("alice") == (20, 2)

    async def test_adopted_objects_are_the_first_victims(self, make: Make) -> None:
        acct = await make()
        if not acct.shared:
            pytest.skip("the local accounting records found objects as most recent")
        await acct.set_quota("alice", 30)
        await put(acct, k(1), 10)
        assert await acct.adopt([(k(2), 10), (k(3), 10)]) == []  # oldest first
        assert await put(acct, k(4), 10) == [k(2)]
        assert await put(acct, k(5), 10) == [k(3)]
        assert [key for key, _ in await acct.lru_order("alice")] == [k(1), k(4), k(5)]

    async def test_adopt_of_many_keeps_the_newest(self, make: Make) -> None:
        """More objects than one step takes (Redis adopts 500 per script): the salt ends
        in scan order and the oldest are evicted."""
        acct = await make()
        await acct.set_quota("alice", 1000)
        items = [(k(i), 1) for i in range(1200)]
        victims = await acct.adopt(items)
        assert sorted(victims, key=lambda v: int.from_bytes(v[0].chunk_hash, "big")) == items[:200]
        assert await acct.lru_order("alice") == items[200:]
        assert await acct.usage("alice") == (1000, 1000)

    async def test_adopt_counts_a_key_given_twice_once(self, make: Make) -> None:
        acct = await make()
        assert await acct.adopt([(k(1), 5), (k(2), 5), (k(1), 7)]) == []
        assert await acct.usage("alice") == (12, 2)

    async def test_a_key_its_own_batch_evicts_is_reported_at_its_stored_size(
        self, make: Make
    ) -> None:
        """k1 is overwritten and then evicted by a later item of the same batch: nothing
        was written yet, so the victim is the value stored, at its size."""
        acct = await make()
        await acct.set_quota("alice", 20)
        await put(acct, k(1), 15)
        out = await acct.admit([(k(1), 5), (k(2), 20)], each=False)
        assert out.victims == [(k(1), 15)]
        assert [a.key for a in out.admissions] == [k(2)]
