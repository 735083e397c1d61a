"""TokenCache against the real Redis and the real MiniLM tokenizer; one extra redis-server for outages."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from model.prompts import encode_pieces, normalize_title
from service.cache import TokenCache

RAW_TITLES = [
    "Anker PowerCore 10000 Portable Charger",
    "Wilson Evolution Indoor Game Basketball",
    "DEWALT 20V MAX Cordless Drill &amp; Driver Kit",
    "LEGO Classic   Medium Creative Brick Box",
    "Café au lait mug, 12 oz",
    "Hot Wheels 20-Car Gift Pack",
]
TITLES = [normalize_title(t) for t in RAW_TITLES]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class CountingEncode:
    """The real tokenizer, recording the titles of each call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, titles: Sequence[str]) -> list[list[int]]:
        self.calls.append(list(titles))
        return encode_pieces(self.tokenizer, titles)


def key(fingerprint: str, title: str) -> str:
    return f"tok:{fingerprint}:{hashlib.sha1(title.encode('utf-8')).hexdigest()}"


def decode(raw: bytes) -> list[int]:
    """The value format, read independently of service.cache: version byte 1, then little-endian int32."""
    assert raw[0] == 1 and len(raw) % 4 == 1
    return list(struct.unpack(f"<{len(raw) // 4}i", raw[1:]))


def nonzero(cache: TokenCache) -> dict[tuple[str, str], int]:
    return {k: v for k, v in cache.stats().items() if v}


@pytest.fixture
def store(redis_url):
    """A plain client on the shared Redis."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def new_fp(store):
    """Makes a unique fingerprint per call; deletes its `tok:{fp}:*` keys after the test."""
    made = []

    def make() -> str:
        made.append(f"test-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield make
    for fp in made:
        keys = list(store.scan_iter(match=f"tok:{fp}:*", count=1000))
        if keys:
            store.delete(*keys)


@pytest.fixture
def make_cache(minilm_tokenizer):
    """Builds TokenCaches with a CountingEncode (`cache.encoder`) and closes them after the test."""
    caches = []

    def make(fingerprint: str, redis_url: str | None, **kw) -> TokenCache:
        encoder = CountingEncode(minilm_tokenizer)
        cache = TokenCache(encoder, fingerprint, redis_url, **kw)
        cache.encoder = encoder
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def expected(minilm_tokenizer):
    return dict(zip(TITLES, encode_pieces(minilm_tokenizer, TITLES), strict=True))


class RedisProcess:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self, workdir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir, self.proc = workdir, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *args, "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.1)
        deadline = time.monotonic() + 5
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
                assert time.monotonic() < deadline, f"redis-server on port {self.port} did not answer in 5 s"
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def spare_redis(tmp_path):
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def timed(cache: TokenCache, titles: Sequence[str]) -> tuple[list[list[int]], float]:
    t0 = time.monotonic()
    ids = cache.get_many(titles)
    return ids, time.monotonic() - t0


def test_tiers_count_hits_and_misses_and_a_replica_reads_redis(make_cache, new_fp, redis_url, expected):
    fp, n = new_fp(), len(TITLES)
    request = [*TITLES, TITLES[0]]  # a duplicate is returned twice but looked up once
    want = [expected[t] for t in request]

    cache = make_cache(fp, redis_url)
    assert cache.get_many(request) == want
    assert cache.encoder.calls == [TITLES]  # one tokenizer call with all misses
    assert nonzero(cache) == {("lru", "miss"): n, ("redis", "miss"): n, ("tokenizer", "call"): n}

    assert cache.get_many(request) == want
    assert cache.encoder.calls == [TITLES]
    assert cache.stats()[("lru", "hit")] == n
    assert cache.redis_ok is True

    replica = make_cache(fp, redis_url)  # another process: empty LRU, same Redis
    assert replica.get_many(request) == want
    assert replica.encoder.calls == []
    assert nonzero(replica) == {("lru", "miss"): n, ("redis", "hit"): n}


def test_fingerprints_never_share_keys(make_cache, new_fp, store, redis_url, expected):
    fp_a, fp_b, title = new_fp(), new_fp(), TITLES[0]
    store.set(key(fp_a, title), struct.pack("<B3i", 1, 7, 8, 9))

    assert make_cache(fp_a, redis_url).get_many([title]) == [[7, 8, 9]]  # A's key is read as written
    cache_b = make_cache(fp_b, redis_url)
    assert cache_b.get_many([title]) == [expected[title]]
    assert nonzero(cache_b) == {("lru", "miss"): 1, ("redis", "miss"): 1, ("tokenizer", "call"): 1}
    assert decode(store.get(key(fp_a, title))) == [7, 8, 9]
    assert decode(store.get(key(fp_b, title))) == expected[title]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xffnot a token array",
        b"\x01abc",
        b"",
        struct.pack("<B2i", 2, 101, 102),
        struct.pack("<B2i", 1, 5, -3),
    ],
    ids=["bad-version", "bad-length", "empty", "future-version", "negative-id"],
)
def test_corrupt_value_is_a_miss_and_is_overwritten(make_cache, new_fp, store, redis_url, expected, garbage):
    fp, title = new_fp(), TITLES[2]
    store.set(key(fp, title), garbage)

    cache = make_cache(fp, redis_url)
    assert cache.get_many([title]) == [expected[title]]
    assert nonzero(cache) == {
        ("lru", "miss"): 1,
        ("redis", "miss"): 1,
        ("redis", "corrupt"): 1,
        ("tokenizer", "call"): 1,
    }
    assert decode(store.get(key(fp, title))) == expected[title]


def test_redis_outage_falls_back_fast_and_recovers(make_cache, new_fp, spare_redis, expected):
    fp, retry_s = new_fp(), 0.2
    first, later, last = TITLES[:3], TITLES[3:5], TITLES[5]
    cache = make_cache(fp, spare_redis.url, retry_s=retry_s)
    assert cache.get_many(first) == [expected[t] for t in first]
    spare_redis.stop()

    replica = make_cache(fp, spare_redis.url, retry_s=retry_s)
    ids, seconds = timed(replica, first)
    assert ids == [expected[t] for t in first]
    assert seconds < 1.0
    assert replica.redis_ok is False
    assert nonzero(replica) == {
        ("lru", "miss"): 3,
        ("redis", "error"): 1,
        ("redis", "fallback"): 3,
        ("tokenizer", "call"): 3,
    }

    ids, seconds = timed(cache, later)  # the old instance, new titles: its pooled connection is dead
    assert ids == [expected[t] for t in later]
    assert seconds < 1.0
    assert cache.stats()[("redis", "error")] == 1 and cache.stats()[("redis", "fallback")] == 2

    ids, seconds = timed(replica, later)  # breaker open: Redis is not tried again yet
    assert ids == [expected[t] for t in later]
    assert seconds < 1.0
    assert replica.stats()[("redis", "error")] == 1 and replica.stats()[("redis", "fallback")] == 5

    spare_redis.start()  # same port, empty
    time.sleep(retry_s + 0.05)
    assert cache.get_many([last]) == [expected[last]]
    assert cache.redis_ok is True and cache.stats()[("redis", "miss")] == 4  # 3 before the outage, 1 now
    with spare_redis.client() as client:
        assert decode(client.get(key(fp, last))) == expected[last]  # writes resumed
    before = replica.stats()
    assert replica.get_many([last]) == [expected[last]]
    assert replica.stats()[("redis", "hit")] == before[("redis", "hit")] + 1
    assert replica.stats()[("tokenizer", "call")] == before[("tokenizer", "call")]
    assert replica.redis_ok is True


def test_slow_redis_times_out_and_falls_back(make_cache, new_fp, spare_redis, expected):
    cache = make_cache(new_fp(), spare_redis.url, timeout_s=0.05)
    assert cache.get_many(TITLES[:1]) == [expected[TITLES[0]]]
    spare_redis.proc.send_signal(signal.SIGSTOP)  # accepts connections (kernel backlog) but never answers
    try:
        ids, seconds = timed(cache, TITLES[1:])
    finally:
        spare_redis.proc.send_signal(signal.SIGCONT)
    assert ids == [expected[t] for t in TITLES[1:]]
    assert seconds < 0.5
    assert cache.stats()[("redis", "error")] == 1 and cache.stats()[("redis", "fallback")] == len(TITLES) - 1


def test_without_redis_only_lru_and_tokenizer(make_cache, new_fp, expected):
    cache = make_cache(new_fp(), None)
    assert cache.get_many(TITLES) == [expected[t] for t in TITLES]
    assert cache.get_many(TITLES[:2]) == [expected[t] for t in TITLES[:2]]
    n = len(TITLES)
    assert cache.stats() == {("lru", "hit"): 2, ("lru", "miss"): n, ("tokenizer", "call"): n}
    assert cache.redis_ok is None


def test_lru_is_bounded_and_evicts_least_recently_used(make_cache, new_fp, expected):
    cache = make_cache(new_fp(), None, lru_size=3)
    for title in TITLES[:5]:
        cache.get_many([title])
    assert cache.get_many([TITLES[4]]) == [expected[TITLES[4]]]
    assert cache.stats()[("lru", "hit")] == 1
    assert cache.get_many([TITLES[0]]) == [expected[TITLES[0]]]
    assert cache.stats()[("lru", "miss")] == 6  # the first title was evicted

    # LRU holds 3, 4, 0 (oldest first); a hit on 3 makes 4 the oldest, so adding 5 evicts 4
    cache.get_many([TITLES[3]])
    cache.get_many([TITLES[5]])
    calls = len(cache.encoder.calls)
    cache.get_many([TITLES[3]])
    assert len(cache.encoder.calls) == calls
    cache.get_many([TITLES[4]])
    assert cache.encoder.calls[-1] == [TITLES[4]]


@pytest.mark.parametrize("ttl_s", [None, 600])
def test_keys_expire_after_ttl(make_cache, new_fp, store, redis_url, ttl_s):
    fp = new_fp()
    cache = make_cache(fp, redis_url, **({} if ttl_s is None else {"ttl_s": ttl_s}))
    cache.get_many(TITLES[:2])
    want = 7 * 24 * 3600 if ttl_s is None else ttl_s
    for title in TITLES[:2]:
        assert want - 5 <= store.ttl(key(fp, title)) <= want


def test_on_event_sees_the_same_counts_as_stats(make_cache, new_fp, store, redis_url):
    fp, events = new_fp(), []
    record = lambda tier, event, n: events.append((tier, event, n))  # noqa: E731
    store.set(key(fp, TITLES[1]), b"junk")
    cache = make_cache(fp, redis_url, on_event=record)
    cache.get_many(TITLES[:3])
    cache.get_many(TITLES)
    replica = make_cache(fp, redis_url, on_event=record)
    replica.get_many(TITLES)

    seen = Counter()
    for tier, event, n in events:
        assert n > 0
        seen[(tier, event)] += n
    both = Counter(nonzero(cache)) + Counter(nonzero(replica))
    assert seen == both
    assert set(both) == set(cache.stats()) - {("redis", "error"), ("redis", "fallback")}


def test_concurrent_callers_get_correct_ids(new_fp, redis_url):
    """Worker threads sharing one cache with a small LRU (a cheap deterministic encoder stands in here)."""
    titles = [f"item {i}" for i in range(40)]
    encode = lambda ts: [[ord(c) for c in t] for t in ts]  # noqa: E731
    cache = TokenCache(encode, new_fp(), redis_url, lru_size=16, timeout_s=1.0)
    try:
        requests = [titles[i % 40 : i % 40 + 7] for i in range(400)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(cache.get_many, requests))
        assert results == [encode(r) for r in requests]
        stats = cache.stats()
        assert stats[("lru", "hit")] + stats[("lru", "miss")] == sum(len(r) for r in requests)
        assert stats[("lru", "miss")] == stats[("redis", "hit")] + stats[("redis", "miss")]
    finally:
        cache.close()
