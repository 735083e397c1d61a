"""Batcher: merging per domain within prompt/token budgets, bounded queue, deadlines, draining, real-model equality."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import Batcher, BatcherClosed, DeadlineExceeded, QueueFull
from service.schemas import RecommendRequest


class FakeForward:
    """Scores = a function of (domain, prompt); records every forward; can be held until released."""

    def __init__(self, hold: bool = False, delay: float = 0.0):
        self.calls: list[tuple[str, list[list[int]]]] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.delay = delay

    def __call__(self, domain: str, prompts: list[list[int]]) -> list[float]:
        self.release.wait(10)
        time.sleep(self.delay)
        self.calls.append((domain, [list(p) for p in prompts]))
        return [score(domain, p) for p in prompts]

    @property
    def sizes(self) -> list[int]:
        return [len(p) for _, p in self.calls]


def score(domain: str, prompt) -> float:
    return float(sum(prompt) + 1000 * len(domain))


def prompts(tag: int, n: int, length: int = 5) -> list[list[int]]:
    return [[tag, i] + [0] * (length - 2) for i in range(n)]


class Observer:
    def __init__(self):
        self.waits, self.forwards, self.depths = [], [], []

    def queue_wait(self, domain, seconds):
        self.waits.append((domain, seconds))

    def queue_depth(self, n):
        self.depths.append(n)

    def forward(self, domain, n, tokens, seconds):
        self.forwards.append((domain, n, tokens))


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_of_one_domain_share_a_forward():
    fwd, obs = FakeForward(), Observer()

    async def go():
        b = Batcher(fwd, max_prompts=30, wait_ms=100, observer=obs)
        jobs = [prompts(t, 10) for t in range(3)]
        out = await asyncio.gather(*(b.submit("Tools", j) for j in jobs))
        await b.close()
        return jobs, out

    jobs, out = run(go())
    assert fwd.sizes == [30]  # three requests of 10 prompts: one forward
    assert out == [[score("Tools", p) for p in j] for j in jobs]  # each request gets its own scores, in order
    assert obs.forwards == [("Tools", 30, 30 * 5)] and len(obs.waits) == 3 and obs.depths[-1] == 0


def test_a_large_request_is_split_into_forwards_of_max_prompts():
    fwd = FakeForward()

    async def go():
        b = Batcher(fwd, max_prompts=30, wait_ms=0)
        out = await b.submit("Tools", prompts(1, 100))
        await b.close()
        return out

    assert run(go()) == [score("Tools", p) for p in prompts(1, 100)]
    assert fwd.sizes == [30, 30, 30, 10]


def test_the_token_budget_caps_padded_tokens_per_forward():
    fwd = FakeForward()

    async def go():
        b = Batcher(fwd, max_prompts=30, max_tokens=100, wait_ms=50)
        await asyncio.gather(b.submit("Tools", prompts(1, 6, length=10)), b.submit("Tools", prompts(2, 6, length=20)))
        await b.close()

    run(go())
    # 6 x 10 tokens fit; a 20-token prompt would pad all 7 to 20 (140 > 100); then 5 x 20 = 100 is the most
    for _, batch in fwd.calls:
        assert len(batch) * max(map(len, batch)) <= 100
    assert fwd.sizes == [6, 5, 1]


def test_requests_for_different_domains_never_share_a_forward():
    fwd = FakeForward()

    async def go():
        b = Batcher(fwd, max_prompts=30, wait_ms=50)
        out = await asyncio.gather(b.submit("Tools", prompts(1, 5)), b.submit("Sports", prompts(2, 5)),
                                   b.submit("Tools", prompts(3, 5)))
        await b.close()
        return out

    out = run(go())
    assert sorted((d, len(p)) for d, p in fwd.calls) == [("Sports", 5), ("Tools", 10)]
    assert out[1] == [score("Sports", p) for p in prompts(2, 5)]
    assert out[2] == [score("Tools", p) for p in prompts(3, 5)]


def test_a_full_queue_refuses_with_retry_after_and_recovers():
    fwd = FakeForward(hold=True)

    async def go():
        b = Batcher(fwd, max_prompts=10, wait_ms=0, queue_prompts=20)
        first = asyncio.create_task(b.submit("Tools", prompts(1, 10)))
        await asyncio.sleep(0.05)  # taken by the (held) forward: no longer queued
        queued = [asyncio.create_task(b.submit("Tools", prompts(t, 10))) for t in (2, 3)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as info:
            await b.submit("Tools", prompts(4, 1))
        assert info.value.retry_after_s >= 1 and "XCROSS_QUEUE_PROMPTS" in str(info.value)
        fwd.release.set()
        await asyncio.gather(first, *queued)
        assert await b.submit("Tools", prompts(5, 1)) == [score("Tools", prompts(5, 1)[0])]
        await b.close()

    run(go())


def test_a_request_past_its_deadline_times_out_and_its_prompts_are_dropped():
    fwd = FakeForward(hold=True)

    async def go():
        b = Batcher(fwd, max_prompts=10, wait_ms=0, timeout_s=0.2)
        first = asyncio.create_task(b.submit("Tools", prompts(1, 10)))
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExceeded, match="XCROSS_REQUEST_TIMEOUT_S"):
            await b.submit("Tools", prompts(2, 10))
        assert b.queued_prompts == 0
        fwd.release.set()
        with pytest.raises(DeadlineExceeded):
            await first
        assert await b.submit("Tools", prompts(3, 2)) == [score("Tools", p) for p in prompts(3, 2)]
        await b.close()

    run(go())
    assert [p[0][0] for _, p in fwd.calls] == [1, 3]  # the timed-out request's prompts never ran


def test_close_finishes_queued_work_then_refuses():
    fwd = FakeForward(delay=0.02)

    async def go():
        b = Batcher(fwd, max_prompts=10, wait_ms=0)
        tasks = [asyncio.create_task(b.submit("Tools", prompts(t, 10))) for t in range(4)]
        await asyncio.sleep(0)
        await b.close()
        assert fwd.sizes == [10, 10, 10, 10]  # all queued work ran before close returned
        await asyncio.wait_for(asyncio.gather(*tasks), 1)
        with pytest.raises(BatcherClosed):
            await b.submit("Tools", prompts(9, 1))

    run(go())


def test_a_failing_forward_fails_its_requests_only():
    calls = []

    def forward(domain, ps):
        calls.append(len(ps))
        if any(p[0] == 666 for p in ps):
            raise RuntimeError("boom")
        return [score(domain, p) for p in ps]

    async def go():
        b = Batcher(forward, max_prompts=10, wait_ms=0)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit("Tools", prompts(666, 3))
        assert await b.submit("Tools", prompts(1, 3)) == [score("Tools", p) for p in prompts(1, 3)]
        await b.close()

    run(go())


def test_merged_forwards_give_the_scores_of_unmerged_ones(engine):
    """The real tiny model: prompts batched with other requests (different padding) score as when alone."""
    obs = Observer()
    reqs = [RecommendRequest.model_validate({"domain": "Tools", "history": [{"id": h} for h in range(k, k + 3 * k)],
                                             "candidates": [{"id": 100 + 13 * k + i} for i in range(7 + k)]})
            for k in range(1, 5)]
    prepared = [engine.preprocess(r) for r in reqs]
    alone = [engine.score("Tools", p.prompts) for p in prepared]

    async def go():
        b = Batcher(engine.forward, max_prompts=30, wait_ms=100, observer=obs)
        out = await asyncio.gather(*(b.submit("Tools", p.prompts) for p in prepared))
        await b.close()
        return out

    merged = run(go())
    assert max(n for _, n, _ in obs.forwards) > max(len(p.prompts) for p in prepared)  # requests were merged
    for a, m in zip(alone, merged, strict=True):
        assert max(abs(x - y) for x, y in zip(a, m, strict=True)) < 1e-5
