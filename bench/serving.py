"""The service-side comparisons: the running service (a `python -m service` subprocess on loopback) against the
raw engine forward at the same batch (30 prompts) and backend, and the tokenization cache warm vs cold.

Each round, in turn: the raw forward of one or two requests (this process, same backend, same thread count), as
many requests sent one at a time (latency), and a burst from several concurrent clients (throughput at
saturation: every forward holds one whole 30-candidate request, as the raw one does).
This process stays idle while the server works, except for the load-test client itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.loadtest import run_load
from bench.models import Request
from bench.timing import interleave, median
from service.cache import TokenCache
from service.engine import Engine, locked_encoder
from service.loading import load_engine
from service.schemas import RecommendRequest
from service.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service` on a free loopback port, with the given XCROSS_* settings; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log: Path):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        full = {**os.environ, "XCROSS_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1", **env}
        full.pop("REDIS_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1",
                                      "--port", self.url.rsplit(":", 1)[1]], cwd=REPO, env=full,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def server_env(artifacts: Path, backend: str, threads: int) -> dict[str, str]:
    return {"XCROSS_ARTIFACTS": str(artifacts), "XCROSS_BACKEND": backend, "XCROSS_PRECISION": "auto",
            "XCROSS_THREADS": str(threads), "XCROSS_BATCH_PROMPTS": "30"}


def bench_engine(artifacts: Path, backend: str, threads: int) -> Engine:
    """The engine the server runs, loaded in this process by the same code (the raw forward's reference)."""
    return load_engine(load_settings(artifacts=artifacts, backend=backend, precision="auto", threads=threads,
                                     redis_url=None))


def service_suite(engine: Engine, server: Server, requests: list[Request], reps: int, clients: int,
                  burst: int, per_round: int = 2) -> tuple[dict[str, float], dict[str, Any]]:
    """service_over_raw (throughput at saturation x raw forward time) and the p50 latency ratio; each round
    times `per_round` raw forwards, `per_round` sequential requests and a burst of `burst` requests."""
    payloads = [r.payload for r in requests]
    prepared = [engine.preprocess(RecommendRequest.model_validate(p)) for p in payloads]
    raw: list[float] = []
    latency: list[float] = []
    rps: list[float] = []
    counts: dict[int, int] = {}

    def raw_round(i: int) -> None:
        for k in range(per_round):
            p = prepared[(per_round * i + k) % len(prepared)]
            t0 = time.perf_counter()
            engine.forward(p.key, p.prompts)
            raw.append(time.perf_counter() - t0)

    def sequential(i: int) -> None:
        rep = asyncio.run(run_load(server.url, payloads[per_round * i % len(payloads):] + payloads, clients=1,
                                   requests=per_round))
        latency.extend(rep.latencies)
        for k, v in rep.statuses.items():
            counts[k] = counts.get(k, 0) + v

    def saturated(i: int) -> None:
        done, statuses = asyncio.run(_burst(server.url, payloads[i % len(payloads):] + payloads, clients, burst))
        rps.append((len(done) - 1) / (done[-1] - done[0]))  # steady state: between the first and last answers
        for k, v in statuses.items():
            counts[k] = counts.get(k, 0) + v

    interleave({"raw": raw_round, "sequential": sequential, "saturated": saturated}, reps=reps)
    raw_s = median(raw)
    keys = {"service_over_raw": median(rps) * raw_s, "service_p50_over_raw": median(latency) / raw_s,
            "service_rps": median(rps), "raw_forward_s": raw_s, "service_p50_s": median(latency)}
    return keys, {"statuses": counts, "clients": clients, "burst": burst}


async def _burst(url: str, payloads: list[dict], clients: int, requests: int) -> tuple[list[float], dict[int, int]]:
    """`clients` connections send `requests` requests back to back; the completion times (sorted) and statuses.
    Throughput is taken between the first and the last completion, so the ramp-up (the first request's
    preprocessing before any forward) and the drain do not count as service overhead."""
    todo = iter(range(requests))
    done: list[float] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:

        async def client() -> None:
            for i in todo:
                r = await http.post("/recommend", json=payloads[i % len(payloads)])
                done.append(time.perf_counter())
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(done), statuses


def concurrency_sweep(server: Server, requests: list[Request], levels: list[int], per_client: int) -> list[dict]:
    """Throughput and latency of the service at each number of concurrent clients."""
    payloads = [r.payload for r in requests]
    rows = []
    for c in levels:
        rep = asyncio.run(run_load(server.url, payloads, clients=c, requests=max(4, c * per_client)))
        rows.append({"clients": c, "rps": rep.throughput, "p50_s": rep.percentile(50),
                     "p95_s": rep.percentile(95), "ok": rep.statuses.get(200, 0), "requests": rep.requests})
    return rows


def cache_suite(engine: Engine, requests: list[Request], reps: int) -> dict[str, float]:
    """Preprocessing of a 30-candidate request (catalog, tokens, prompts) with a warm LRU vs a cold one."""
    reqs = [RecommendRequest.model_validate(r.payload) for r in requests]
    tok = engine.backbone.tokenizer
    warm = engine.cache
    for r in reqs:
        engine.preprocess(r)

    def cold(i: int) -> None:
        engine.cache = TokenCache(locked_encoder(tok), engine.backbone.tokenizer_fingerprint, None)
        try:
            engine.preprocess(reqs[i % len(reqs)])
        finally:
            engine.cache = warm

    def hot(i: int) -> None:
        engine.preprocess(reqs[i % len(reqs)])

    times = interleave({"cold": cold, "warm": hot}, reps=max(reps, 20), warmup=2)
    return {"cache_speedup": median(times["cold"]) / median(times["warm"]),
            "preprocess_cold_ms": 1000 * median(times["cold"]), "preprocess_warm_ms": 1000 * median(times["warm"])}
