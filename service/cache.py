"""Tokenization cache (DESIGN 3): in-process LRU, then Redis, then the tokenizer.

`TokenCache.get_many(titles)` returns the token ids of each title, always equal to `encode(titles)`:

1. LRU: title -> ids in an `OrderedDict` of at most `lru_size` entries, guarded by a lock (the service
   calls the cache from worker threads).
2. Redis (optional): one `MGET` for all LRU misses of a call.
   key   = `tok:{fingerprint}:{sha1(title as UTF-8).hexdigest()}`; the tokenizer fingerprint
           (`model.backbone.tokenizer_fingerprint`) keeps backbones with different vocabularies apart.
   value = 1 format-version byte (`FORMAT_VERSION`) + the ids as little-endian int32.
   A value with another version byte, a length that is not 1 + 4k, or a negative id is corrupt: it is
   counted, treated as a miss, and overwritten.
3. Tokenizer: one `encode` call for the remaining titles; the results go to the LRU and to Redis (a
   non-transactional pipeline of `SET key value EX ttl_s`).

Redis never makes a call fail. Any Redis error or timeout (`timeout_s`) opens a circuit breaker: the call
falls back to the tokenizer, and Redis is skipped until `retry_s` seconds have passed, then tried again.

Counters (`stats()`, and `on_event(tier, event, n)` for each increment), keyed by (tier, event):
  lru: hit, miss          redis: hit, miss, corrupt, error, fallback          tokenizer: call
They count distinct titles of a call, except redis/error, which counts failed Redis round trips. A corrupt
value counts as corrupt and as miss; fallback counts titles tokenized because Redis was unavailable or
skipped. Redis counters exist only when a Redis URL is given.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

FORMAT_VERSION = 1
REDIS_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)

_COUNTERS = [
    ("lru", "hit"),
    ("lru", "miss"),
    ("redis", "hit"),
    ("redis", "miss"),
    ("redis", "corrupt"),
    ("redis", "error"),
    ("redis", "fallback"),
    ("tokenizer", "call"),
]

Encode = Callable[[Sequence[str]], list[list[int]]]
OnEvent = Callable[[str, str, int], None]
Ids = tuple[int, ...]


def pack_ids(ids: Sequence[int]) -> bytes:
    """A Redis value: the version byte, then the ids as little-endian int32."""
    return struct.pack(f"<B{len(ids)}i", FORMAT_VERSION, *ids)


def unpack_ids(raw: bytes) -> Ids | None:
    """The ids in a Redis value, or None when the value is corrupt or of another format."""
    if len(raw) % 4 != 1 or raw[0] != FORMAT_VERSION:
        return None
    ids = struct.unpack_from(f"<{len(raw) // 4}i", raw, 1)
    return ids if all(i >= 0 for i in ids) else None


class TokenCache:
    """Token ids of titles from an LRU, then Redis, then `encode`; thread-safe."""

    def __init__(
        self,
        encode: Encode,
        fingerprint: str,
        redis_url: str | None = None,
        *,
        lru_size: int = 100_000,  # entries (titles) kept in process
        ttl_s: int = 7 * 24 * 3600,  # expiry of the Redis keys
        timeout_s: float = 0.05,  # Redis connect and socket timeout
        retry_s: float = 5.0,  # after a Redis failure, skip Redis for this long
        on_event: OnEvent | None = None,  # called as on_event(tier, event, n) with every counter increment
    ):
        if lru_size < 0 or ttl_s <= 0 or timeout_s <= 0 or retry_s < 0:
            raise ValueError(
                f"bad TokenCache settings lru_size={lru_size}, ttl_s={ttl_s}, timeout_s={timeout_s}, "
                f"retry_s={retry_s}; need lru_size >= 0, ttl_s > 0, timeout_s > 0, retry_s >= 0"
            )
        self._encode, self._prefix = encode, f"tok:{fingerprint}:"
        self._lru_size, self._ttl_s, self._retry_s = lru_size, ttl_s, retry_s
        self._on_event = on_event
        self._lru: OrderedDict[str, Ids] = OrderedDict()
        self._lock = threading.Lock()
        tiers = ["lru", "tokenizer"] + (["redis"] if redis_url is not None else [])
        self._stats = {key: 0 for key in _COUNTERS if key[0] in tiers}
        self._redis = None if redis_url is None else _client(redis_url, timeout_s)
        self._redis_healthy = True  # the last Redis round trip succeeded (or none was made yet)
        self._retry_at = 0.0  # time.monotonic() before which Redis is skipped

    def get_many(self, titles: Sequence[str]) -> list[list[int]]:
        """Token ids of each title, in order (duplicates allowed); equal to `encode(titles)`."""
        unique = list(dict.fromkeys(titles))
        found = self._lru_get(unique)
        missing = [t for t in unique if t not in found]
        if missing:
            found.update(self._load(missing))
        return [list(found[t]) for t in titles]

    def stats(self) -> dict[tuple[str, str], int]:
        """A copy of the counters, keyed by (tier, event)."""
        with self._lock:
            return dict(self._stats)

    @property
    def redis_ok(self) -> bool | None:
        """None without Redis; False after a Redis failure until a round trip succeeds again; else True."""
        return None if self._redis is None else self._redis_healthy

    def close(self) -> None:
        """Close the Redis connections (the LRU stays usable)."""
        if self._redis is not None:
            self._redis.close()

    # --- tiers ------------------------------------------------------------------------------------------

    def _lru_get(self, titles: Iterable[str]) -> dict[str, Ids]:
        found: dict[str, Ids] = {}
        misses = 0
        with self._lock:
            for title in titles:
                ids = self._lru.get(title)
                if ids is None:
                    misses += 1
                else:
                    self._lru.move_to_end(title)
                    found[title] = ids
        self._count("lru", "hit", len(found))
        self._count("lru", "miss", misses)
        return found

    def _lru_put(self, items: dict[str, Ids]) -> None:
        if self._lru_size == 0:
            return
        with self._lock:
            for title, ids in items.items():
                self._lru[title] = ids
                self._lru.move_to_end(title)
            while len(self._lru) > self._lru_size:
                self._lru.popitem(last=False)

    def _load(self, titles: list[str]) -> dict[str, Ids]:
        """Ids of LRU misses: from Redis where it has them, else tokenized and written back to both tiers."""
        from_redis = self._redis_get(titles)
        found = dict(from_redis or {})
        encoded = self._tokenize([t for t in titles if t not in found])
        if from_redis is not None:
            self._redis_set(encoded)
        found.update(encoded)
        self._lru_put(found)
        return found

    def _redis_get(self, titles: list[str]) -> dict[str, Ids] | None:
        """Valid values found in Redis; None when there is no Redis or it is unavailable (a fallback)."""
        if self._redis is None:
            return None
        if time.monotonic() < self._retry_at:
            self._count("redis", "fallback", len(titles))
            return None
        try:
            raws = self._redis.mget([self._key(t) for t in titles])
        except REDIS_ERRORS:
            self._redis_failed()
            self._count("redis", "fallback", len(titles))
            return None
        self._redis_healthy = True
        found: dict[str, Ids] = {}
        corrupt = 0
        for title, raw in zip(titles, raws, strict=True):
            ids = None if raw is None else unpack_ids(raw)
            if ids is not None:
                found[title] = ids
            corrupt += raw is not None and ids is None
        self._count("redis", "hit", len(found))
        self._count("redis", "miss", len(titles) - len(found))
        self._count("redis", "corrupt", corrupt)
        return found

    def _redis_set(self, items: dict[str, Ids]) -> None:
        if not items or self._redis is None:
            return
        pipe = self._redis.pipeline(transaction=False)
        for title, ids in items.items():
            pipe.set(self._key(title), pack_ids(ids), ex=self._ttl_s)
        try:
            pipe.execute()
        except REDIS_ERRORS:
            self._redis_failed()

    def _tokenize(self, titles: list[str]) -> dict[str, Ids]:
        if not titles:
            return {}
        ids = self._encode(titles)
        if len(ids) != len(titles):
            raise ValueError(
                f"encode returned {len(ids)} id lists for {len(titles)} titles; need one per title"
            )
        self._count("tokenizer", "call", len(titles))
        return {title: tuple(i) for title, i in zip(titles, ids, strict=True)}

    # --- bookkeeping ------------------------------------------------------------------------------------

    def _key(self, title: str) -> str:
        return self._prefix + hashlib.sha1(title.encode("utf-8")).hexdigest()

    def _redis_failed(self) -> None:
        self._redis_healthy = False
        self._retry_at = time.monotonic() + self._retry_s
        self._count("redis", "error", 1)

    def _count(self, tier: str, event: str, n: int) -> None:
        if n == 0:
            return
        with self._lock:
            self._stats[(tier, event)] += n
        if self._on_event is not None:
            self._on_event(tier, event, n)


def _client(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails fast: short timeouts and no retries (the circuit breaker decides when to retry)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
