"""Prometheus metrics (prometheus-client), one `CollectorRegistry` per app so tests can run several apps.

  xcross_requests_total{route,status}                 counter    HTTP requests (route = path template)
  xcross_request_duration_seconds{route,status}       histogram  HTTP latency
  xcross_inflight_requests                            gauge      HTTP requests being handled
  xcross_queue_wait_seconds{domain}                   histogram  submit -> the request's first forward starts
  xcross_queue_prompts                                gauge      prompts waiting for a forward
  xcross_forward_prompts{domain}                      histogram  prompts per forward
  xcross_forward_tokens{domain}                       histogram  padded tokens per forward (prompts x longest)
  xcross_forward_duration_seconds{domain}             histogram  forward latency
  xcross_token_cache_events_total{tier,event}         counter    token cache: lru hit/miss; redis hit/miss/corrupt/
                                                                 error/fallback; tokenizer call (in titles)
  xcross_redis_errors_total                           counter    failed Redis round trips
  xcross_model_info{domain,kind,backbone,sha,precision,backend}  gauge 1  the served checkpoints
The cache counters are read from `TokenCache.stats()` at scrape time (a custom collector), so they need no wiring
into the cache and are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from service.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROMPT_BUCKETS = (1, 2, 4, 8, 16, 30, 60, 120, 240, 480)
TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class CacheCollector(Collector):
    """Token cache counters from `stats()` of the engine's cache, when an engine is loaded."""

    def __init__(self, stats: Callable[[], dict[tuple[str, str], int]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        events = CounterMetricFamily("xcross_token_cache_events", "Token cache events by tier, in titles "
                                     "(redis error counts round trips)", labels=["tier", "event"])
        for (tier, event), n in sorted(stats.items()):
            events.add_metric([tier, event], n)
        yield events
        yield CounterMetricFamily("xcross_redis_errors", "Failed Redis round trips of the token cache",
                                  value=stats.get(("redis", "error"), 0))


class Metrics:
    """The service's metrics; implements `service.batching.BatchObserver`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._engine: Engine | None = None
        self.requests = Counter("xcross_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_duration = Histogram("xcross_request_duration_seconds", "HTTP request latency",
                                          ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("xcross_inflight_requests", "HTTP requests being handled", registry=r)
        self._queue_wait = Histogram("xcross_queue_wait_seconds", "Wait from submit to the request's first "
                                     "forward", ["domain"], buckets=WAIT_BUCKETS, registry=r)
        self._queue_depth = Gauge("xcross_queue_prompts", "Prompts waiting for a forward", registry=r)
        self._forward_prompts = Histogram("xcross_forward_prompts", "Prompts per forward", ["domain"],
                                          buckets=PROMPT_BUCKETS, registry=r)
        self._forward_tokens = Histogram("xcross_forward_tokens", "Padded tokens per forward (prompts x longest)",
                                         ["domain"], buckets=TOKEN_BUCKETS, registry=r)
        self._forward_duration = Histogram("xcross_forward_duration_seconds", "Forward latency", ["domain"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self._model_info = Info("xcross_model", "Served checkpoints", ["domain"], registry=r)
        r.register(CacheCollector(lambda: self._engine.cache.stats() if self._engine is not None else {}))

    def set_engine(self, engine: Engine) -> None:
        """Read cache counters from this engine and publish its models as xcross_model_info."""
        self._engine = engine
        info = engine.describe()
        for domain, served in engine.models.items():
            self._model_info.labels(domain=domain).info(
                {"kind": served.kind, "backbone": info["backbone"], "sha": served.sha[:12],
                 "precision": info["precision"], "backend": info.get("backend", info.get("runtime", ""))})

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route, str(status)).observe(seconds)

    # --- BatchObserver ----------------------------------------------------------------------------------

    def queue_wait(self, domain: str, seconds: float) -> None:
        self._queue_wait.labels(domain).observe(seconds)

    def queue_depth(self, prompts: int) -> None:
        self._queue_depth.set(prompts)

    def forward(self, domain: str, prompts: int, tokens: int, seconds: float) -> None:
        self._forward_prompts.labels(domain).observe(prompts)
        self._forward_tokens.labels(domain).observe(tokens)
        self._forward_duration.labels(domain).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
