"""Query-detector state in Redis, shared by every worker and replica that points at it.

Keys (under ``prefix``, default ``advx:q:``), all bounded:

- ``g:b:<bucket>`` the inverted index: Redis hashes whose fields are window hashes and whose
  values are the sequence numbers of the most recent queries holding them (newest first, at
  most ``posting_cap``); about 64 fields per bucket so that Redis stores them compactly;
  ``g:ring`` the fingerprint of each of the last ``capacity`` queries by slot (so the query a
  new one displaces is unindexed), ``g:seq`` the global query counter;
- the same under ``c:<client digest>:`` for each client's own memory, plus ``n`` (its query
  count) and ``last`` (a digest of its last query), all expiring after ``client_ttl`` seconds
  of silence;
- ``b:<client>`` its token bucket, ``q:<client>:<period>`` its budget spent this period,
  ``c:<client>:alert`` the alert cool-down;
- ``key`` the hash key, set once by the first worker so that all workers hash alike.

Each query is one Lua script (look up both memories, then remember the query), so concurrent
workers never interleave inside a query; the rows of a batch go in one pipeline, in order.
Scripts touch keys they compute, so this needs a single Redis (or a cluster with all keys in
one slot), not a sharded cluster.

When Redis stops answering, the detector carries on with this process's own memory (empty at
first: an attack is caught again after a few more queries), logs it, and sets ``degraded``;
it tries Redis again every ``retry`` seconds and switches back when it answers.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import InputError
from .queries import LocalState

__all__ = ["RedisState", "redact"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_CHUNK = 16  # rows per pipeline round trip

_OBSERVE = """
local p, cid = ARGV[1], ARGV[2]
local cap, ccap = tonumber(ARGV[3]), tonumber(ARGV[4])
local L, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local nb, cnb = tonumber(ARGV[7]), tonumber(ARGV[8])
local FIRST = 10
local cbase = p .. 'c:' .. cid .. ':'
local count = redis.call('INCR', cbase .. 'n')
redis.call('EXPIRE', cbase .. 'n', ttl)
if redis.call('GET', cbase .. 'last') == ARGV[9] then
  return {0, 0, count}
end
redis.call('SET', cbase .. 'last', ARGV[9], 'EX', ttl)
-- the index: hash -> its queries' sequence numbers, newest first, comma-separated, as fields of
-- a few Redis hashes (buckets of about 64 fields, which Redis stores compactly)
local function bucket(base, h, buckets)
  local b1, b2, b3, b4 = string.byte(h, 1, 4)
  return base .. 'b:' .. ((((b1 * 256 + b2) * 256 + b3) * 256 + b4) % buckets)
end
local function scope(base, capacity, buckets, expire)
  local seq = redis.call('INCR', base .. 'seq')
  local oldest = seq - capacity
  local counts, best = {}, 0
  for i = FIRST, #ARGV do
    local v = redis.call('HGET', bucket(base, ARGV[i], buckets), ARGV[i])
    if v then
      local n = 0
      for s in string.gmatch(v, '%d+') do
        n = n + 1
        if n > L then break end
        local q = tonumber(s)
        if q > oldest then
          local c = (counts[q] or 0) + 1
          counts[q] = c
          if c > best then best = c end
        end
      end
    end
  end
  -- unindex the query whose ring slot this one takes
  local ring = base .. 'ring'
  local slot = seq % capacity
  local old = redis.call('HGET', ring, slot)
  if old then
    local gone = tostring(seq - capacity)
    for j = 1, #old, 8 do
      local h = string.sub(old, j, j + 7)
      local k = bucket(base, h, buckets)
      local v = redis.call('HGET', k, h)
      if v then
        local kept = {}
        for s in string.gmatch(v, '%d+') do
          if s ~= gone then kept[#kept + 1] = s end
        end
        if #kept == 0 then
          redis.call('HDEL', k, h)
        else
          redis.call('HSET', k, h, table.concat(kept, ','))
        end
      end
    end
  end
  redis.call('HSET', ring, slot, table.concat(ARGV, '', FIRST))
  for i = FIRST, #ARGV do
    local h = ARGV[i]
    local k = bucket(base, h, buckets)
    local v = redis.call('HGET', k, h)
    local kept = {tostring(seq)}
    if v then
      for s in string.gmatch(v, '%d+') do
        if #kept >= L then break end
        kept[#kept + 1] = s
      end
    end
    redis.call('HSET', k, h, table.concat(kept, ','))
    if expire > 0 then redis.call('EXPIRE', k, expire) end
  end
  if expire > 0 then
    redis.call('EXPIRE', ring, expire)
    redis.call('EXPIRE', base .. 'seq', expire)
  end
  return best
end
local g = scope(p .. 'g:', cap, nb, 0)
local c = scope(cbase, ccap, cnb, ttl)
return {g, c, count}
"""

# KEYS: bucket, budget. ARGV: now, rate (0: none), burst, n, budget (-1: none), seconds left in
# the budget period. Returns nil (admitted) or the seconds to wait, as a string.
_TAKE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n, budget, left = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if budget >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + n > budget then return tostring(left) end
end
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 't', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  local need = math.min(n, burst)
  local ttl = math.ceil((burst + n) / rate) + 1
  if tokens < need then
    redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
    redis.call('EXPIRE', KEYS[1], ttl)
    return tostring((need - tokens) / rate)
  end
  redis.call('HSET', KEYS[1], 't', tostring(tokens - n), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[1], ttl)
end
if budget >= 0 then
  redis.call('INCRBY', KEYS[2], n)
  redis.call('EXPIRE', KEYS[2], math.ceil(left) + 1)
end
return false
"""


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _buckets(capacity: int) -> int:
    # About 64 index entries per Redis hash at 50 hashes per query: small enough for Redis's
    # compact encoding (hash-max-listpack-entries is 128 by default).
    return max(1, capacity * 50 // 64)


def _cid(client: str) -> str:
    # A fixed-length digest: client ids may be long or hold ':' and must not collide with keys.
    return hashlib.blake2b(client.encode(), digest_size=12).hexdigest()


class RedisState:
    """The detector's state in Redis at ``url``; ``fallback`` answers while Redis is away."""

    def __init__(
        self,
        url: str,
        *,
        fallback: LocalState,
        prefix: str = "advx:q:",
        client_ttl: int = 86_400,
        retry: float = 5.0,
        timeout: float = 1.0,
    ) -> None:
        import redis

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.url = redact(url)
        self.fallback = fallback
        self.prefix = prefix
        self.client_ttl = int(client_ttl)
        self.retry = float(retry)
        self.degraded = False
        self._retry_at = 0.0
        self._key: bytes | None = None
        self.redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            self.redis.ping()
        except self._errors as e:
            raise InputError(
                f"state: cannot reach Redis at {self.url} ({type(e).__name__}: {e}); "
                "start it, fix the URL, or leave --state out to keep the state in this process"
            ) from None
        self._observe = self.redis.register_script(_OBSERVE)
        self._take = self.redis.register_script(_TAKE)

    def shared_key(self, key: bytes | None) -> bytes:
        """The hash key all workers use: the first worker's (``key`` or a random one)."""
        mine = key if key is not None else secrets.token_bytes(32)
        self.redis.set(self.prefix + "key", mine, nx=True)
        stored = self.redis.get(self.prefix + "key")
        if key is not None and stored != key:
            raise InputError(
                f"key: Redis at {self.url} already holds another hash key under "
                f"{self.prefix!r}; use the same key in every worker, or another prefix"
            )
        if not isinstance(stored, bytes):
            raise InputError(f"key: Redis at {self.url} lost the hash key just written; retry")
        self._key = stored
        return stored

    def _run(self, op: Callable[[], T], fallback: Callable[[], T]) -> T:
        if self.degraded and time.monotonic() < self._retry_at:
            return fallback()
        try:
            out = op()
        except self._errors as e:
            if not self.degraded:
                log.warning(
                    "query detector: Redis at %s failed (%s: %s); using this process's memory "
                    "until it answers again",
                    self.url,
                    type(e).__name__,
                    e,
                )
            self.degraded = True
            self._retry_at = time.monotonic() + self.retry
            return fallback()
        if self.degraded:
            log.warning("query detector: Redis at %s answers again; state shared again", self.url)
            self.degraded = False
            if self._key is not None:  # a restarted, empty Redis needs the key back
                try:
                    self.redis.set(self.prefix + "key", self._key, nx=True)
                except self._errors:
                    pass
        return out

    def match_add(
        self, client: str, fps: np.ndarray, digests: Sequence[bytes]
    ) -> list[tuple[int, int, int]]:
        cap, ccap = self.fallback.capacity, self.fallback.client_capacity
        head: list[Any] = [
            self.prefix,
            _cid(client),
            cap,
            ccap,
            self.fallback.posting_cap,
            self.client_ttl,
            _buckets(cap),
            _buckets(ccap),
        ]

        def op() -> list[tuple[int, int, int]]:
            out: list[tuple[int, int, int]] = []
            # Redis answers a pipeline once it has run all of it: chunks keep each wait short
            # next to the socket timeout, even for a large batch on a busy server.
            for start in range(0, len(fps), _CHUNK):
                pipe = self.redis.pipeline(transaction=False)
                for fp, digest in zip(
                    fps[start : start + _CHUNK], digests[start : start + _CHUNK], strict=True
                ):
                    fp = fp[fp != 0]
                    self._observe(
                        keys=[], args=[*head, digest, *(h.tobytes() for h in fp)], client=pipe
                    )
                out += [(int(g), int(c), int(n)) for g, c, n in pipe.execute()]
            return out

        return self._run(op, lambda: self.fallback.match_add(client, fps, digests))

    def take(
        self,
        client: str,
        n: int,
        now: float,
        *,
        rate: float | None,
        burst: float,
        budget: int | None,
        period: float,
    ) -> float | None:
        index = int(now // period)
        cid = _cid(client)
        keys = [f"{self.prefix}b:{cid}", f"{self.prefix}q:{cid}:{index}"]
        left = (index + 1) * period - now
        args = [now, rate or 0, burst, n, -1 if budget is None else budget, left]

        def op() -> float | None:
            out = self._take(keys=keys, args=args)
            return None if out is None else float(out)

        def local() -> float | None:
            return self.fallback.take(
                client, n, now, rate=rate, burst=burst, budget=budget, period=period
            )

        return self._run(op, local)

    def should_alert(self, client: str, now: float, cooldown: float) -> bool:
        if cooldown <= 0:
            return True
        key = f"{self.prefix}c:{_cid(client)}:alert"
        return self._run(
            lambda: bool(self.redis.set(key, b"1", nx=True, px=max(1, int(cooldown * 1000)))),
            lambda: self.fallback.should_alert(client, now, cooldown),
        )

    def remembered(self) -> int:
        def op() -> int:
            return min(int(self.redis.get(self.prefix + "g:seq") or 0), self.fallback.capacity)

        return self._run(op, self.fallback.remembered)

    def nbytes(self) -> int:
        """Bytes Redis uses in all (``used_memory``; other data in the same Redis counts)."""
        return self._run(
            lambda: int(self.redis.info("memory")["used_memory"]), self.fallback.nbytes
        )

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "prefix": self.prefix, "degraded": self.degraded}
