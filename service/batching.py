"""Micro-batching of concurrent requests (DESIGN 7): one public `submit()`, per-domain queues, one forward at a time.

A request's prompts join the queue of its domain. A single scheduler task forms each forward from ONE domain
(different targets are different models: they never share a forward), oldest request first:
- prompts are taken in arrival order, across requests, until the forward holds `max_prompts` prompts or one more
  would make the padded size (prompts x longest prompt) exceed `max_tokens`; a request with 100 candidates
  alone is 4 forwards (30, 30, 30, 10), and two concurrent 10-candidate requests share one forward of 20;
- when the scheduler is idle and the oldest request's domain has less than a full forward, it waits until that
  request is `wait_ms` old for more prompts to arrive, then runs what it has;
- forwards run one at a time in a dedicated thread (the event loop stays free for I/O); the model masks padding,
  so a prompt's score does not depend on which requests it was batched with.
Back-pressure: at most `queue_prompts` prompts may wait (not yet in a forward). A request that does not fit is
refused at once with `QueueFull(retry_after_s)` (an estimate from the measured forward speed). A request not
answered within `timeout_s` raises `DeadlineExceeded`, and its prompts that have not started are dropped.
`close()` stops taking requests, finishes the queued ones, and stops the thread.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

Forward = Callable[[str, list[Sequence[int]]], list[float]]


class QueueFull(RuntimeError):
    """Too many prompts are waiting; retry after `retry_after_s` seconds."""

    def __init__(self, queued: int, capacity: int, retry_after_s: int):
        super().__init__(f"the queue holds {queued} of {capacity} prompts (XCROSS_QUEUE_PROMPTS); "
                         f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The request was not answered within the batcher's timeout."""


class BatcherClosed(RuntimeError):
    """The service is shutting down and takes no new work."""


class BatchObserver(Protocol):
    """Receives the batcher's measurements (service.metrics.Metrics implements it)."""

    def queue_wait(self, domain: str, seconds: float) -> None: ...

    def queue_depth(self, prompts: int) -> None: ...

    def forward(self, domain: str, prompts: int, tokens: int, seconds: float) -> None: ...


@dataclass(eq=False)
class _Job:
    domain: str
    prompts: list[Sequence[int]]
    future: asyncio.Future[list[float]]
    enqueued: float
    scores: list[float] = field(default_factory=list)
    next: int = 0  # prompts handed to forwards so far
    done: int = 0  # prompts scored so far
    dropped: bool = False  # timed out or cancelled: skip the rest


class Batcher:
    """Runs `forward(domain, prompts) -> scores` for concurrent requests, micro-batched per domain."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_prompts: int = 30,  # prompts per forward (XCROSS_BATCH_PROMPTS)
        max_tokens: int = 30 * 256,  # padded tokens per forward: prompts x longest (XCROSS_MAX_BATCH_TOKENS)
        wait_ms: float = 2.0,  # idle wait for more prompts before a forward that is not full (XCROSS_BATCH_WAIT_MS)
        queue_prompts: int = 3000,  # prompts allowed to wait for a forward (XCROSS_QUEUE_PROMPTS)
        timeout_s: float = 30.0,  # per-request deadline (XCROSS_REQUEST_TIMEOUT_S)
        observer: BatchObserver | None = None,
    ):
        if max_prompts < 1 or max_tokens < 1 or wait_ms < 0 or queue_prompts < 1 or timeout_s <= 0:
            raise ValueError(f"bad Batcher settings max_prompts={max_prompts}, max_tokens={max_tokens}, "
                             f"wait_ms={wait_ms}, queue_prompts={queue_prompts}, timeout_s={timeout_s}")
        self._forward, self._observer = forward, observer
        self._max_prompts, self._max_tokens, self._wait_s = max_prompts, max_tokens, wait_ms / 1000
        self._capacity, self._timeout_s = queue_prompts, timeout_s
        self._queues: dict[str, deque[_Job]] = {}
        self._queued = 0  # prompts waiting, not yet in a forward
        self._sec_per_prompt = 0.01  # moving average of forward time per prompt (for Retry-After)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xcross-forward")
        self._closing = False

    async def submit(self, domain: str, prompts: Sequence[Sequence[int]]) -> list[float]:
        """One score per prompt, in order. Raises QueueFull, DeadlineExceeded, BatcherClosed."""
        if self._closing:
            raise BatcherClosed("the service is shutting down; send the request to another replica")
        if not prompts:
            return []
        n = len(prompts)
        if self._queued + n > self._capacity:
            raise QueueFull(self._queued, self._capacity, self._retry_after(n))
        self._start()
        loop = asyncio.get_running_loop()
        job = _Job(domain, list(prompts), loop.create_future(), time.monotonic(), [0.0] * n)
        self._queues.setdefault(domain, deque()).append(job)
        self._add_queued(n)
        try:
            return await asyncio.wait_for(job.future, self._timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {self._timeout_s:g} s (XCROSS_REQUEST_TIMEOUT_S); the server "
                                   "is overloaded: retry later or send fewer candidates") from None
        finally:
            if not job.future.done() or job.future.cancelled():
                self._drop(job)

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the forward thread."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self._executor.shutdown(wait=True)

    # --- scheduling -----------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xcross-batcher")
        self._wake.set()

    async def _run(self) -> None:
        while True:
            domain = self._oldest_domain()
            if domain is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather(domain)
            batch = self._take(domain)
            if batch:
                await self._run_forward(domain, batch)

    def _oldest_domain(self) -> str | None:
        """The domain whose first waiting request is the oldest."""
        best, best_t = None, math.inf
        for domain, queue in self._queues.items():
            while queue and queue[0].dropped:
                queue.popleft()
            if queue and queue[0].enqueued < best_t:
                best, best_t = domain, queue[0].enqueued
        return best

    async def _gather(self, domain: str) -> None:
        """Wait until the domain has a full forward or its oldest request is `wait_ms` old."""
        queue = self._queues[domain]
        until = queue[0].enqueued + self._wait_s
        while not self._closing and self._pending(queue) < self._max_prompts:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    @staticmethod
    def _pending(queue: deque[_Job]) -> int:
        return sum(len(j.prompts) - j.next for j in queue if not j.dropped)

    def _take(self, domain: str) -> list[tuple[_Job, int, int]]:
        """(job, start, end) slices of one forward, in arrival order, within the prompt and token budgets."""
        queue, now = self._queues[domain], time.monotonic()
        slices: list[tuple[_Job, int, int]] = []
        count, width, full = 0, 0, False
        while queue and not full:
            job = queue[0]
            if job.dropped:
                queue.popleft()
                continue
            start = job.next
            while job.next < len(job.prompts):
                w = max(width, len(job.prompts[job.next]))
                if count == self._max_prompts or (count and (count + 1) * w > self._max_tokens):
                    full = True
                    break
                count, width, job.next = count + 1, w, job.next + 1
            if job.next > start:
                slices.append((job, start, job.next))
                if start == 0 and self._observer is not None:
                    self._observer.queue_wait(domain, now - job.enqueued)
            if job.next == len(job.prompts):
                queue.popleft()
        self._add_queued(-count)
        return slices

    async def _run_forward(self, domain: str, slices: list[tuple[_Job, int, int]]) -> None:
        prompts = [p for job, s, e in slices for p in job.prompts[s:e]]
        t0 = time.perf_counter()
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, domain, prompts)
            if len(scores) != len(prompts):
                raise RuntimeError(f"forward returned {len(scores)} scores for {len(prompts)} prompts")
        except Exception as exc:  # noqa: BLE001 - the requests in this forward get the error, the loop goes on
            for job, _, _ in slices:
                if not job.future.done():
                    job.future.set_exception(exc)
                self._drop(job)
            return
        seconds = time.perf_counter() - t0
        self._sec_per_prompt = 0.8 * self._sec_per_prompt + 0.2 * seconds / len(prompts)
        if self._observer is not None:
            self._observer.forward(domain, len(prompts), len(prompts) * max(map(len, prompts)), seconds)
        i = 0
        for job, s, e in slices:
            if not job.future.done():
                job.scores[s:e] = scores[i : i + e - s]
                job.done += e - s
                if job.done == len(job.prompts):
                    job.future.set_result(job.scores)
            i += e - s

    # --- bookkeeping ----------------------------------------------------------------------------------

    def _drop(self, job: _Job) -> None:
        """Forget a job's prompts that have not started (timed out, cancelled, or failed)."""
        if not job.dropped:
            job.dropped = True
            self._add_queued(-(len(job.prompts) - job.next))
            job.next = len(job.prompts)

    def _add_queued(self, n: int) -> None:
        self._queued += n
        if self._observer is not None:
            self._observer.queue_depth(self._queued)

    def _retry_after(self, n: int) -> int:
        return max(1, math.ceil((self._queued + n) * self._sec_per_prompt))

    @property
    def queued_prompts(self) -> int:
        return self._queued
