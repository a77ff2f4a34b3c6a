"""``quota.accounting: redis://...``: the accounting in Redis, shared by many nodes.

Each salt's state lives under one hash tag, ``{key_prefix}acct:{s:<salt hex>}:...``, so a
salt is one Redis Cluster slot and every change of it is one Lua script, atomic: the quota
check, the choice of victims, their removal and the new entries of an admission happen in
one step. Per salt:

* ``z``: committed objects, a sorted set scored by last use (Redis ``TIME`` in µs); only
  these are victims;
* ``s`` / ``v`` / ``p``: hashes of every entry's size, admission version and, while
  pending, ``owner\\tadmitted_at``;
* ``st``: usage, objects, pending bytes, evictions, run-time (``rq``) and config (``cq``)
  quotas;
* ``n``: the version counter.

A global capacity needs a global LRU order (``acct:g:z``) and totals (``acct:g:t``) that
scripts of every salt update, so it is only available on standalone Redis; on a Cluster
it is refused with a :class:`ConfigError`. ``acct:salts`` lists the salts (for reports).
"""

# ruff: noqa: E501  (the Lua scripts keep their lines whole)
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import redis.exceptions as rexc

from flexkv_store.backends._redis import RedisAdapter
from flexkv_store.backends.config import RedisConfig
from flexkv_store.errors import (
    BackendUnavailableError,
    ConcurrentWriteError,
    ConfigError,
    QuotaExceededError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey, check_cache_salt
from flexkv_store.quota._accounting import (
    Accounting,
    Admitted,
    QuotaSource,
    SaltReport,
    Snapshot,
    new_owner,
)
from flexkv_store.quota._local import superseded_error
from flexkv_store.quota._userlru import Admission, Tally, Victim

__all__ = ["RedisAccounting"]

# Shared Lua helpers. KEYS[1..6] are the salt's z, p, s, v, st, n; KEYS[7], KEYS[8] the
# global z and totals when a capacity is kept (standalone Redis), else absent.
_LIB = r"""
local z, p, s, v, st, n = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local gz, gt = KEYS[7], KEYS[8]
local function num(x) if x == false or x == nil or x == '' then return nil end return tonumber(x) end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function limit_of(def)
  local rq = num(redis.call('HGET', st, 'rq'))
  if rq ~= nil then return rq, 'runtime' end
  local cq = num(redis.call('HGET', st, 'cq'))
  if cq ~= nil then return cq, 'config' end
  return num(def), 'default'
end
local function field(name) return num(redis.call('HGET', st, name)) or 0 end
local function gbump(name, d) if gt then redis.call('HINCRBY', gt, name, d) end end
-- drop an entry of this salt (any state); returns its size or nil
local function drop(wire)
  local size = num(redis.call('HGET', s, wire))
  if size == nil then return nil end
  if redis.call('HEXISTS', p, wire) == 1 then
    redis.call('HDEL', p, wire)
    redis.call('HINCRBY', st, 'pend', 0 - size)
    gbump('pend', 0 - size)
  end
  redis.call('HDEL', s, wire)
  redis.call('HDEL', v, wire)
  redis.call('ZREM', z, wire)
  if gz then redis.call('ZREM', gz, wire) end
  redis.call('HINCRBY', st, 'used', 0 - size)
  redis.call('HINCRBY', st, 'objects', -1)
  gbump('bytes', 0 - size)
  gbump('objects', -1)
  return size
end
local function evicted(wire, size, out)
  redis.call('HINCRBY', st, 'eb', size)
  redis.call('HINCRBY', st, 'eo', 1)
  gbump('eb', size)
  gbump('eo', 1)
  out[#out + 1] = 'V'; out[#out + 1] = wire; out[#out + 1] = tostring(size)
end
-- evict committed objects, oldest first, until used <= budget; false if they ran out
local function shrink(budget, out)
  while field('used') > budget do
    local first = redis.call('ZRANGE', z, 0, 0)
    if #first == 0 then return false end
    local size = drop(first[1])
    evicted(first[1], size, out)
  end
  return true
end
local function add_committed(wire, size, score)
  redis.call('HSET', s, wire, size)
  redis.call('HSET', v, wire, redis.call('INCR', n))
  redis.call('ZADD', z, score, wire)
  if gz then redis.call('ZADD', gz, score, wire) end
  redis.call('HINCRBY', st, 'used', size)
  redis.call('HINCRBY', st, 'objects', 1)
  gbump('bytes', size)
  gbump('objects', 1)
end
"""

# Global (capacity) eviction, standalone only: a victim of another salt updates that salt's
# keys, named from the salt in its wire string (model@rank@hash[@salt]).
_GLOBAL = r"""
local prefix = ARGV[1]
local function hex(str) return (str:gsub('.', function(c) return string.format('%02x', string.byte(c)) end)) end
local function salt_of(wire)
  local parts = {}
  for piece in string.gmatch(wire, '([^@]*)') do parts[#parts + 1] = piece end
  local clean = {}
  for _, x in ipairs(parts) do if x ~= '' then clean[#clean + 1] = x end end
  if #clean >= 4 then return clean[4] end
  return ''
end
local function shrink_global(budget, out)
  while num(redis.call('HGET', gt, 'bytes')) ~= nil and num(redis.call('HGET', gt, 'bytes')) > budget do
    local first = redis.call('ZRANGE', gz, 0, 0)
    if #first == 0 then return false end
    local wire = first[1]
    local base = prefix .. 'acct:{s:' .. hex(salt_of(wire)) .. '}:'
    local saved = {z, p, s, v, st}
    z, p, s, v, st = base .. 'z', base .. 'p', base .. 's', base .. 'v', base .. 'st'
    local size = drop(wire)
    if size == nil then redis.call('ZREM', gz, wire) else evicted(wire, size, out) end
    z, p, s, v, st = saved[1], saved[2], saved[3], saved[4], saved[5]
  end
  return true
end
-- evict the salt down to limit and everything down to cap (nil: none; 0 admits nothing)
local function fit(limit, cap, out)
  if limit ~= nil then if limit == 0 then shrink(-1, out) else shrink(limit, out) end end
  if cap ~= nil then if cap == 0 then shrink_global(-1, out) else shrink_global(cap, out) end end
end
-- add {wire, size} items (oldest first) as committed, below every entry's LRU score
local function add_oldest(items)
  if #items == 0 then return end
  local low = now()
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if #first > 0 then low = math.min(low, tonumber(first[2])) end
  if gz then
    local gfirst = redis.call('ZRANGE', gz, 0, 0, 'WITHSCORES')
    if #gfirst > 0 then low = math.min(low, tonumber(gfirst[2])) end
  end
  for k, it in ipairs(items) do add_committed(it[1], it[2], low - #items - 1 + k) end
end
"""

# ARGV: prefix, default quota, capacity, owner, admitted_at, each (0/1), then wire, size...
_ADMIT = (
    _LIB
    + _GLOBAL
    + r"""
local def, cap, owner, at, each = ARGV[2], num(ARGV[3]), ARGV[4], ARGV[5], ARGV[6] == '1'
local limit = limit_of(def)
local items = {}
for i = 7, #ARGV, 2 do items[#items + 1] = {ARGV[i], tonumber(ARGV[i + 1])} end
local function refuses(size, b) return b ~= nil and (size > b or b == 0) end
local out = {}
-- Every check before any change: a script cannot roll back what it did.
local pend_other = field('pend')
local gpend = 0
if gt then gpend = num(redis.call('HGET', gt, 'pend')) or 0 end
local function int(x) if x == nil then return '' end return string.format('%.0f', x) end
for _, it in ipairs(items) do
  local wire, size = it[1], it[2]
  local mine = 0
  local pend = redis.call('HGET', p, wire)
  local why, bound = nil, nil
  if pend then
    mine = num(redis.call('HGET', s, wire)) or 0
    if string.sub(pend, 1, #owner + 1) ~= owner .. '\t' then why, bound = 'elsewhere', 0 end
  end
  if why then
  elseif refuses(size, limit) then why, bound = 'alone', limit
  elseif refuses(size, cap) then why, bound = 'alone', cap
  elseif limit ~= nil and size + pend_other - mine > limit then why, bound = 'inflight', limit
  elseif cap ~= nil and size + gpend - mine > cap then why, bound = 'inflight', cap end
  if why then
    if not each then return {'X', wire, why, int(bound)} end
    it.refused = true
    out[#out + 1] = 'R'; out[#out + 1] = wire; out[#out + 1] = why; out[#out + 1] = int(bound)
  end
end
local t = now()
local batch = {}  -- wires admitted by this call, oldest first (evictable here)
for _, it in ipairs(items) do
  if not it.refused then
    local wire, size = it[1], it[2]
    local prev = -1
    if redis.call('HEXISTS', p, wire) == 0 then prev = num(redis.call('HGET', s, wire)) or -1 end
    drop(wire)
    for j = #batch, 1, -1 do if batch[j] == wire then table.remove(batch, j) end end
    -- committed victims first, then this call's own earlier items
    local function fits()
      return (limit == nil or field('used') + size <= limit)
        and (cap == nil or (num(redis.call('HGET', gt, 'bytes')) or 0) + size <= cap)
    end
    if limit ~= nil then shrink(limit - size, out) end
    if cap ~= nil then shrink_global(cap - size, out) end
    while not fits() and #batch > 0 do
      local victim = table.remove(batch, 1)
      local vsize = drop(victim)
      if vsize ~= nil then
        evicted(victim, vsize, out)
        out[#out + 1] = 'B'; out[#out + 1] = victim
      end
    end
    local version = redis.call('INCR', n)
    redis.call('HSET', s, wire, size)
    redis.call('HSET', v, wire, version)
    redis.call('HSET', p, wire, owner .. '\t' .. at)
    redis.call('HINCRBY', st, 'pend', size)
    gbump('pend', size)
    redis.call('HINCRBY', st, 'used', size)
    redis.call('HINCRBY', st, 'objects', 1)
    gbump('bytes', size)
    gbump('objects', 1)
    batch[#batch + 1] = wire
    out[#out + 1] = 'A'; out[#out + 1] = wire; out[#out + 1] = tostring(version)
    out[#out + 1] = tostring(prev)
  end
end
return out
"""
)

# ARGV: prefix, default quota, capacity, then wire, version, size ('' keeps the admitted
# one)...: pending entries of that version become committed (at the size given: reconcile's
# size found stored). A larger size that takes the salt (or the capacity) over its limit
# evicts down to it: victims.
_COMMIT = (
    _LIB
    + _GLOBAL
    + r"""
local t = now()
local grew = false
for i = 4, #ARGV, 3 do
  local wire, version, fix = ARGV[i], ARGV[i + 1], num(ARGV[i + 2])
  if redis.call('HEXISTS', p, wire) == 1 and redis.call('HGET', v, wire) == version then
    local size = num(redis.call('HGET', s, wire))
    redis.call('HDEL', p, wire)
    redis.call('HINCRBY', st, 'pend', 0 - size)
    gbump('pend', 0 - size)
    if fix ~= nil and fix ~= size then
      redis.call('HSET', s, wire, fix)
      redis.call('HINCRBY', st, 'used', fix - size)
      gbump('bytes', fix - size)
      if fix > size then grew = true end
    end
    redis.call('ZADD', z, t, wire)
    if gz then redis.call('ZADD', gz, t, wire) end
  end
end
local out = {}
if grew then fit(limit_of(ARGV[2]), num(ARGV[3]), out) end
return out
"""
)

# ARGV: prefix, default quota, then wire, version, previous size (-1: none)...
_ROLLBACK = (
    _LIB
    + r"""
local limit = limit_of(ARGV[2])
local out = {}
local t = now()
for i = 3, #ARGV, 3 do
  local wire, version, prev = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if redis.call('HGET', v, wire) == version then
    drop(wire)
    if prev >= 0 then
      add_committed(wire, prev, t)
      if limit ~= nil then shrink(limit, out) end
    end
  end
end
return out
"""
)

# ARGV: prefix, version check (1: only if version matches), owner, pending_too, then wire, version...
_REMOVE = (
    _LIB
    + r"""
local check, owner, pending_too = ARGV[2] == '1', ARGV[3], ARGV[4] == '1'
local gone = 0
for i = 5, #ARGV, 2 do
  local wire, version = ARGV[i], ARGV[i + 1]
  local ok = true
  if check and redis.call('HGET', v, wire) ~= version then ok = false end
  if ok and not pending_too and not check then
    local pend = redis.call('HGET', p, wire)
    if pend and string.sub(pend, 1, #owner + 1) ~= owner .. '\t' then ok = false end
  end
  if ok and drop(wire) then gone = gone + 1 end
end
return gone
"""
)

# ARGV: prefix, then wire, size... (scan order, oldest first): committed, never evicts.
_RECORD = (
    _LIB
    + r"""
local t = now()
local count = (#ARGV - 1) / 2
for i = 2, #ARGV, 2 do
  local wire, size = ARGV[i], tonumber(ARGV[i + 1])
  drop(wire)
  local k = (i - 2) / 2
  add_committed(wire, size, t - count + k)
end
return count
"""
)

# ARGV: prefix, default quota, capacity, then wire, size... (oldest first): the objects a
# scan found that no entry names (one accounted since is left as it is) become committed as
# the least recently used; then the salt and the capacity are enforced: victims.
_ADOPT = (
    _LIB
    + _GLOBAL
    + r"""
local cap = num(ARGV[3])
local new = {}
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', s, ARGV[i]) == 0 then new[#new + 1] = {ARGV[i], tonumber(ARGV[i + 1])} end
end
local out = {}
if #new == 0 then return out end
add_oldest(new)
fit(limit_of(ARGV[2]), cap, out)
return out
"""
)

# ARGV: prefix, default quota, capacity, count of admissions, then per admission wire,
# version, previous size (-1: none), then per victim wire, size: a batch refused after this
# salt's admission is undone in one step: its entries go (previous values come back), its
# victims (not deleted) come back as the least recently used where no entry appeared since,
# and the salt is evicted down to its quota if others took the room meanwhile: victims.
_UNADMIT = (
    _LIB
    + _GLOBAL
    + r"""
local limit, cap, na = limit_of(ARGV[2]), num(ARGV[3]), tonumber(ARGV[4])
local t = now()
local j = 5
for _ = 1, na do
  local wire, version, prev = ARGV[j], ARGV[j + 1], tonumber(ARGV[j + 2])
  j = j + 3
  if redis.call('HGET', v, wire) == version then
    drop(wire)
    if prev >= 0 then add_committed(wire, prev, t) end
  end
end
local back = {}
while j <= #ARGV do
  if redis.call('HEXISTS', s, ARGV[j]) == 0 then back[#back + 1] = {ARGV[j], tonumber(ARGV[j + 1])} end
  j = j + 2
end
add_oldest(back)
local out = {}
fit(limit, cap, out)
return out
"""
)

# ARGV: prefix, default quota, field to set ('rq' / 'cq' / ''), value ('' deletes)
_LIMIT = (
    _LIB
    + r"""
if ARGV[3] ~= '' then
  if ARGV[4] == '' then redis.call('HDEL', st, ARGV[3]) else redis.call('HSET', st, ARGV[3], ARGV[4]) end
end
local limit = limit_of(ARGV[2])
local out = {}
if limit ~= nil then
  if limit == 0 then shrink(-1, out) else shrink(limit, out) end
end
return out
"""
)

# ARGV: prefix, capacity: evict globally down to it (standalone only)
_CAPACITY = (
    _LIB
    + _GLOBAL
    + r"""
local out = {}
local cap = num(ARGV[2])
if cap ~= nil then if cap == 0 then shrink_global(-1, out) else shrink_global(cap, out) end end
return out
"""
)

# ARGV: prefix, then wire...: the version of each committed entry ('' when pending or absent)
_VERSIONS = (
    _LIB
    + r"""
local out = {}
for i = 2, #ARGV do
  local wire = ARGV[i]
  if redis.call('HEXISTS', p, wire) == 1 then out[#out + 1] = ''
  else out[#out + 1] = redis.call('HGET', v, wire) or '' end
end
return out
"""
)

# ARGV: prefix, then wire...: hits
_TOUCH = (
    _LIB
    + r"""
local t = now()
for i = 2, #ARGV do
  redis.call('ZADD', z, 'XX', t, ARGV[i])
  if gz then redis.call('ZADD', gz, 'XX', t, ARGV[i]) end
end
return #ARGV - 1
"""
)


class RedisAccounting(Accounting):
    """Accounting in Redis (standalone, TLS or Cluster), shared by processes on many nodes."""

    kind: ClassVar[str] = "redis"
    shared: ClassVar[bool] = True

    def __init__(
        self,
        config: RedisConfig,
        *,
        default_quota: int | None = None,
        capacity: int | None = None,
        touch_interval: float = 0.1,
    ) -> None:
        if capacity is not None and config.cluster:
            raise ConfigError(
                "quota.capacity_bytes is not available with a Redis Cluster accounting: a "
                "global LRU order would live in one slot (use per-salt quotas, or a "
                "standalone Redis for the accounting)"
            )
        self.config = config
        self._adapter = RedisAdapter(config)
        self._client: Any = self._adapter.client
        self._prefix = config.key_prefix
        self._default = default_quota
        self._capacity = capacity
        self._touch_interval = touch_interval
        self._owner = new_owner()
        self._touched: dict[ObjectKey, None] = {}
        self._touch_task: asyncio.Task[None] | None = None
        self._snapshot: Snapshot | None = None
        self._scripts: dict[str, Any] = {}
        self._registered: set[str] = set()
        self._orphans: list[Victim] = []
        self._closed = False

    def describe(self) -> str:
        where = "cluster" if self.config.cluster else "standalone"
        return f"redis ({where}, prefix {self._prefix!r})"

    # -- plumbing ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._scripts:
            return
        for name, body in (
            ("admit", _ADMIT),
            ("commit", _COMMIT),
            ("rollback", _ROLLBACK),
            ("remove", _REMOVE),
            ("record", _RECORD),
            ("adopt", _ADOPT),
            ("unadmit", _UNADMIT),
            ("limit", _LIMIT),
            ("capacity", _CAPACITY),
            ("touch", _TOUCH),
            ("versions", _VERSIONS),
        ):
            self._scripts[name] = self._client.register_script(body)
        self._touch_task = asyncio.get_running_loop().create_task(self._touch_loop())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._touch_task is not None:
            self._touch_task.cancel()
            try:
                await self._touch_task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self.flush()
        finally:
            await self._adapter.aclose()

    def _keys(self, salt: str) -> list[str]:
        # "s:" keeps the tag non-empty for the empty salt ("{}" is no hash tag at all)
        base = f"{self._prefix}acct:{{s:{salt.encode('utf-8').hex()}}}:"
        keys = [base + x for x in ("z", "p", "s", "v", "st", "n")]
        if not self.config.cluster:
            keys += [f"{self._prefix}acct:g:z", f"{self._prefix}acct:g:t"]
        return keys

    @property
    def _salts_key(self) -> str:
        return f"{self._prefix}acct:salts"

    async def _call(self, name: str, salt: str, args: Sequence[Any]) -> Any:
        try:
            return await self._scripts[name](keys=self._keys(salt), args=[self._prefix, *args])
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            raise BackendUnavailableError(f"redis accounting: {exc}") from exc
        except rexc.RedisError as exc:
            raise StorageError(f"redis accounting: {exc}") from exc

    async def _redis(self, fn: str, *args: Any) -> Any:
        try:
            return await getattr(self._client, fn)(*args)
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            raise BackendUnavailableError(f"redis accounting: {exc}") from exc
        except rexc.RedisError as exc:
            raise StorageError(f"redis accounting: {exc}") from exc

    async def _register(self, salts: Iterable[str]) -> None:
        """List salts for reports (once per salt and process: a set that only grows)."""
        new = [s for s in salts if s not in self._registered]
        if new:
            await self._redis("sadd", self._salts_key, *(s.encode("utf-8").hex() for s in new))
            self._registered.update(new)

    async def _all_salts(self) -> list[str]:
        raw = await self._redis("smembers", self._salts_key)
        return sorted(
            bytes.fromhex(x.decode() if isinstance(x, bytes) else x).decode() for x in raw
        )

    @staticmethod
    def _victims(reply: Sequence[Any]) -> tuple[list[Victim], list[tuple[str, str, str]], set[str]]:
        """Parse a script's flat reply: victims (V wire size), refusals (R wire why bound),
        and the victims that were this call's own admissions (B wire)."""
        victims: list[Victim] = []
        refused: list[tuple[str, str, str]] = []
        own: set[str] = set()
        i = 0
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
        while i < len(items):
            tag = items[i]
            if tag == "V":
                victims.append((ObjectKey.from_wire(items[i + 1]), int(items[i + 2])))
                i += 3
            elif tag == "R":
                refused.append((items[i + 1], items[i + 2], items[i + 3]))
                i += 4
            elif tag == "B":
                own.add(items[i + 1])
                i += 2
            elif tag == "A":
                i += 4
            else:
                i += 1
        return victims, refused, own

    # -- limits ------------------------------------------------------------------------

    @property
    def default_quota(self) -> int | None:
        return self._default

    @property
    def capacity(self) -> int | None:
        return self._capacity

    def _arg(self, value: int | None) -> str:
        return "" if value is None else str(int(value))

    async def _limit_change(self, salt: str, fld: str, value: int | None) -> list[Victim]:
        await self._register([salt])
        reply = await self._call("limit", salt, [self._arg(self._default), fld, self._arg(value)])
        return self._victims(reply)[0]

    async def set_default_quota(self, limit: int | None) -> list[Victim]:
        self._default = limit
        return await self.enforce()

    async def set_capacity(self, limit: int | None) -> list[Victim]:
        if limit is not None and self.config.cluster:
            raise ConfigError("a capacity is not available with a Redis Cluster accounting")
        self._capacity = limit
        if limit is None:
            return []
        return self._victims(await self._call("capacity", "", [str(limit)]))[0]

    async def _stats(self, salt: str) -> dict[str, int]:
        raw = await self._redis("hgetall", self._keys(salt)[4])
        return {(k.decode() if isinstance(k, bytes) else k): int(val) for k, val in raw.items()}

    def _effective(self, st: Mapping[str, int]) -> tuple[int | None, QuotaSource]:
        if "rq" in st:
            return st["rq"], "runtime"
        if "cq" in st:
            return st["cq"], "config"
        return self._default, "default"

    async def quota(self, salt: str) -> tuple[int | None, QuotaSource]:
        return self._effective(await self._stats(salt))

    async def quotas(self) -> dict[str, tuple[int, QuotaSource]]:
        out: dict[str, tuple[int, QuotaSource]] = {}
        for salt in await self._all_salts():
            limit, source = self._effective(await self._stats(salt))
            if source != "default" and limit is not None:
                out[salt] = (limit, source)
        return out

    async def set_quota(self, salt: str, limit: int) -> list[Victim]:
        return await self._limit_change(check_cache_salt(salt), "rq", int(limit))

    async def delete_quota(self, salt: str) -> tuple[bool, list[Victim]]:
        salt = check_cache_salt(salt)
        if "rq" not in await self._stats(salt):
            return False, []
        return True, await self._limit_change(salt, "rq", None)

    async def apply_config(self, quotas: Mapping[str, int]) -> list[Victim]:
        checked = {check_cache_salt(s): int(n) for s, n in quotas.items()}
        victims: list[Victim] = []
        for salt in await self._all_salts():
            if salt not in checked and "cq" in await self._stats(salt):
                victims += await self._limit_change(salt, "cq", None)
        for salt, n in checked.items():
            victims += await self._limit_change(salt, "cq", n)
        return victims

    # -- objects -----------------------------------------------------------------------

    async def admit(self, items: Sequence[tuple[ObjectKey, int]], *, each: bool) -> Admitted:
        batch: dict[ObjectKey, int] = {}
        for key, size in items:
            batch[key] = int(size)
        by_salt: dict[str, list[ObjectKey]] = {}
        for key in batch:
            by_salt.setdefault(key.cache_salt, []).append(key)
        await self._register(by_salt)
        out = Admitted()
        wires = {key.to_wire(): key for key in batch}
        for salt, keys in by_salt.items():
            args: list[Any] = [
                self._arg(self._default),
                self._arg(self._capacity),
                self._owner,
                repr(time.time()),
                "1" if each else "0",
            ]
            for key in keys:
                args += [key.to_wire(), batch[key]]
            try:
                reply = await self._call("admit", salt, args)
            except BaseException:
                await self._undo_partial(out)
                raise
            items_s = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
            if items_s and items_s[0] == "X":
                # Refused before any change; undo what earlier salts of this batch did.
                await self._undo_partial(out)
                key = wires[items_s[1]]
                raise self._refusal(key, batch[key], items_s[2], items_s[3])
            victims, refused, own = self._victims(reply)
            out.victims += victims
            admitted: dict[ObjectKey, Admission] = {}
            i = 0
            while i < len(items_s):
                if items_s[i] == "A":
                    key = wires[items_s[i + 1]]
                    prev = int(items_s[i + 3])
                    admitted[key] = Admission(
                        key, batch[key], None if prev < 0 else prev, [], int(items_s[i + 2])
                    )
                    i += 4
                elif items_s[i] == "R":
                    i += 4
                elif items_s[i] == "V":
                    i += 3
                else:
                    i += 2
            for wire in own:
                key = wires[wire]
                popped = admitted.pop(key, None)
                if popped is not None and popped.previous_size is None:
                    out.never_stored.add(key)
                elif popped is not None and popped.previous_size is not None:
                    # nothing of this batch was written yet: what is stored is the value
                    # it replaced, and that is what an undo or a failed delete accounts
                    stored = popped.previous_size
                    out.victims = [(v, stored if v == key else n) for v, n in out.victims]
                if each:
                    out.refused[key] = superseded_error(
                        key, batch[key], (await self.quota(salt))[0]
                    )
            for wire, why, bound in refused:
                key = wires[wire]
                out.refused[key] = self._refusal(key, batch[key], why, bound)
            out.admissions += admitted.values()
        return out

    @staticmethod
    def _refusal(key: ObjectKey, size: int, why: str, bound: str) -> Exception:
        limit = int(float(bound)) if bound not in ("", "nil") else 0
        if why == "elsewhere":
            return ConcurrentWriteError(
                f"{key.to_wire()} is being written by another process (its write settles it)"
            )
        if why == "inflight":
            return QuotaExceededError(
                key.cache_salt,
                size,
                limit,
                detail="the quota is taken by writes in flight in other processes",
            )
        return QuotaExceededError(key.cache_salt, size, limit)

    async def _undo_partial(self, out: Admitted) -> None:
        """Undo the salts of a batch already admitted when a later salt is refused or
        fails, one script per salt: their admissions go (previous values come back), their
        victims (not deleted yet) come back unless an entry for the key appeared since.
        What that takes over a quota (others used the room meanwhile) is evicted: orphans,
        for the caller to delete (:meth:`take_orphans`)."""
        adms = _by_salt(out.admissions)
        back: dict[str, list[Victim]] = {}
        for key, size in out.victims:
            if key not in out.never_stored:
                back.setdefault(key.cache_salt, []).append((key, size))
        first: BaseException | None = None
        for salt in dict.fromkeys([*adms, *back]):
            group = adms.get(salt, [])
            args: list[Any] = [self._arg(self._default), self._arg(self._capacity), len(group)]
            for a in group:
                prev = -1 if a.previous_size is None else a.previous_size
                args += [a.key.to_wire(), a._version, prev]
            for key, size in back.get(salt, []):
                args += [key.to_wire(), size]
            try:  # every salt, even when one fails (its entries then wait for reconcile)
                self._orphans += self._victims(await self._call("unadmit", salt, args))[0]
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    def take_orphans(self) -> list[Victim]:
        orphans, self._orphans = self._orphans, []
        return orphans

    async def commit(self, admissions: Sequence[Admission]) -> None:
        for salt, group in _by_salt(admissions).items():
            args: list[Any] = ["", ""]  # sizes as admitted: nothing grows
            for a in group:
                args += [a.key.to_wire(), a._version, ""]
            await self._call("commit", salt, args)

    async def commit_any(self, admissions: Sequence[Admission]) -> list[Victim]:
        victims: list[Victim] = []
        for salt, group in _by_salt(admissions).items():
            args: list[Any] = [self._arg(self._default), self._arg(self._capacity)]
            for a in group:  # only the entry reconcile saw, at the size found stored
                args += [a.key.to_wire(), a._version, a.size]
            victims += self._victims(await self._call("commit", salt, args))[0]
        return victims

    async def rollback(self, admissions: Sequence[Admission]) -> list[Victim]:
        victims: list[Victim] = []
        for salt, group in _by_salt(list(reversed(admissions))).items():
            args: list[Any] = [self._arg(self._default)]
            for a in group:
                args += [
                    a.key.to_wire(),
                    a._version,
                    -1 if a.previous_size is None else a.previous_size,
                ]
            victims += self._victims(await self._call("rollback", salt, args))[0]
        return victims

    async def abandon(self, admissions: Sequence[Admission]) -> None:
        for salt, group in _by_salt(admissions).items():
            args: list[Any] = ["1", self._owner, "0"]
            for a in group:
                args += [a.key.to_wire(), a._version]
            await self._call("remove", salt, args)

    async def remove(self, keys: Sequence[ObjectKey], *, pending_too: bool = False) -> None:
        groups: dict[str, list[ObjectKey]] = {}
        for k in keys:
            groups.setdefault(k.cache_salt, []).append(k)
        for salt, group in groups.items():
            args: list[Any] = ["0", self._owner, "1" if pending_too else "0"]
            for k in group:
                args += [k.to_wire(), 0]
            await self._call("remove", salt, args)

    async def restore(self, victims: Sequence[Victim]) -> None:
        await self.record(victims)

    async def record(self, items: Sequence[tuple[ObjectKey, int]]) -> None:
        groups: dict[str, list[tuple[ObjectKey, int]]] = {}
        for k, n in items:
            groups.setdefault(k.cache_salt, []).append((k, n))
        await self._register(groups)
        for salt, group in groups.items():
            for i in range(0, len(group), 500):
                part = group[i : i + 500]
                await self._call("record", salt, [x for k, n in part for x in (k.to_wire(), n)])

    async def adopt(self, items: Sequence[tuple[ObjectKey, int]]) -> list[Victim]:
        groups: dict[str, list[tuple[ObjectKey, int]]] = {}
        for k, n in dict(items).items():  # a key given twice: once, its last size
            groups.setdefault(k.cache_salt, []).append((k, n))
        await self._register(groups)
        victims: list[Victim] = []
        for salt, group in groups.items():
            # One script per part, each atomic; newest part first, as each goes below
            # every entry, so the salt's LRU order ends oldest first.
            starts = range(0, len(group), 500)
            for i in reversed(starts):
                part = group[i : i + 500]
                args: list[Any] = [self._arg(self._default), self._arg(self._capacity)]
                args += [x for k, n in part for x in (k.to_wire(), n)]
                victims += self._victims(await self._call("adopt", salt, args))[0]
        return victims

    async def enforce(self) -> list[Victim]:
        victims: list[Victim] = []
        for salt in await self._all_salts():
            victims += await self._limit_change(salt, "", None)
        if self._capacity is not None:
            victims += self._victims(await self._call("capacity", "", [str(self._capacity)]))[0]
        return victims

    async def committed_versions(self, keys: Sequence[ObjectKey]) -> dict[ObjectKey, int]:
        out: dict[ObjectKey, int] = {}
        groups: dict[str, list[ObjectKey]] = {}
        for k in keys:
            groups.setdefault(k.cache_salt, []).append(k)
        for salt, group in groups.items():
            reply = await self._call("versions", salt, [k.to_wire() for k in group])
            for k, version in zip(group, reply, strict=True):
                text = version.decode() if isinstance(version, bytes) else str(version)
                if text:  # '' = pending (a write in flight) or gone
                    out[k] = int(text)
        return out

    async def lru_order_of(self, keys: Sequence[ObjectKey]) -> list[Victim]:
        out: list[Victim] = []
        for k in keys:
            size = await self._redis("hget", self._keys(k.cache_salt)[2], k.to_wire())
            if size is not None:
                out.append((k, int(size)))
        return out

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        out = []
        for k in keys:
            out.append(bool(await self._redis("hexists", self._keys(k.cache_salt)[2], k.to_wire())))
        return out

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        for key in keys:
            self._touched[key] = None

    async def _touch_loop(self) -> None:
        last_listed = time.monotonic()
        # Not `while True`: redis-py can swallow the CancelledError of close() when it
        # arrives during a command (seen: a worker's close() waited forever on this loop),
        # so the loop also ends on the flag close() sets first.
        while not self._closed:
            await asyncio.sleep(self._touch_interval)
            try:
                await self.flush()
                if time.monotonic() - last_listed > 10 and self._registered:
                    # the list of salts is lost with the server's data (a restart without
                    # persistence, a failover): list ours again now and then
                    await self._redis(
                        "sadd", self._salts_key, *(s.encode().hex() for s in self._registered)
                    )
                    last_listed = time.monotonic()
            except Exception:  # a touch is a hint: the next batch carries on
                pass

    async def flush(self) -> None:
        if not self._touched:
            return
        keys, self._touched = list(self._touched), {}
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(k.cache_salt, []).append(k.to_wire())
        for salt, wires in groups.items():
            await self._call("touch", salt, wires)

    async def usage(self, salt: str) -> Tally:
        st = await self._stats(salt)
        return Tally(st.get("used", 0), st.get("objects", 0))

    async def evictions(self, salt: str) -> Tally:
        st = await self._stats(salt)
        return Tally(st.get("eb", 0), st.get("eo", 0))

    async def lru_order(self, salt: str | None = None) -> list[Victim]:
        salts = [salt] if salt is not None else await self._all_salts()
        out: list[tuple[float, ObjectKey, int]] = []
        for s in salts:
            keys = self._keys(s)
            sizes = {
                (w.decode() if isinstance(w, bytes) else w): int(n)
                for w, n in (await self._redis("hgetall", keys[2])).items()
            }
            committed = await self._redis("zrange", keys[0], 0, -1, False, True)
            seen = set()
            for w, score in committed:
                wire = w.decode() if isinstance(w, bytes) else w
                seen.add(wire)
                out.append((float(score), ObjectKey.from_wire(wire), sizes.get(wire, 0)))
            for wire, n in sizes.items():  # pending: newest of all
                if wire not in seen:
                    out.append((float("inf"), ObjectKey.from_wire(wire), n))
        out.sort(key=lambda t: t[0])
        return [(k, n) for _, k, n in out]

    async def report(self) -> Snapshot:
        salts = []
        total_b = total_o = ev_b = ev_o = 0
        for salt in await self._all_salts():
            st = await self._stats(salt)
            limit, source = self._effective(st)
            used = Tally(st.get("used", 0), st.get("objects", 0))
            ev = Tally(st.get("eb", 0), st.get("eo", 0))
            total_b += used.nbytes
            total_o += used.objects
            ev_b += ev.nbytes
            ev_o += ev.objects
            if used.objects or source != "default":
                salts.append(SaltReport(salt, used, ev, limit, source))
        snap = Snapshot(
            salts=tuple(salts),
            total=Tally(total_b, total_o),
            evicted=Tally(ev_b, ev_o),
            default_quota=self._default,
            capacity=self._capacity,
        )
        self._snapshot = snap
        return snap

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def is_empty(self) -> bool:
        for salt in await self._all_salts():
            if (await self._stats(salt)).get("objects", 0):
                return False
        return True

    async def pending(self) -> list[tuple[ObjectKey, int, str, float, int]]:
        out = []
        for salt in await self._all_salts():
            keys = self._keys(salt)
            raw = await self._redis("hgetall", keys[1])
            for w, val in raw.items():
                wire = w.decode() if isinstance(w, bytes) else w
                text = val.decode() if isinstance(val, bytes) else val
                owner, _, at = text.partition("\t")
                size = await self._redis("hget", keys[2], wire)
                version = await self._redis("hget", keys[3], wire)
                out.append(
                    (
                        ObjectKey.from_wire(wire),
                        int(size or 0),
                        owner,
                        float(at or 0),
                        int(version or -2),
                    )
                )
        return out


def _by_salt(admissions: Sequence[Admission]) -> dict[str, list[Admission]]:
    groups: dict[str, list[Admission]] = {}
    for a in admissions:
        groups.setdefault(a.key.cache_salt, []).append(a)
    return groups
