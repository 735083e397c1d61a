"""Load test of a running service, loopback only and bounded: N concurrent clients send M requests in total.

    python -m bench.loadtest --url http://127.0.0.1:8000 --clients 8 --requests 200
    python -m bench.loadtest --url http://127.0.0.1:8000 --clients 8 --requests 200 --check   # + correctness

Payloads are real dev users of the served domains (history ids + their 30 fixed candidate ids, all ranked).
Prints throughput, latency p50/p95/p99 and the status counts. With `--check`, every response's ranking is
compared with the direct model call (`Engine.recommend`, loaded in this process from the same XCROSS_* settings
as the server; computed before the timed run so it does not compete for the CPU), and the ratio of the service's
throughput to the direct call's (HTTP, tokenization cache and batching overhead vs batching gains) is printed.

Rankings compare with a tolerance: the server merges prompts of concurrent requests into one padded forward, and
float rounding differs slightly with the batch's shape, so two candidates whose direct scores are within `tol`
may swap places. Everything else (the items, the order, the scores within `tol`) must be equal.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

MAX_REQUESTS = 100_000
MAX_CLIENTS = 256


@dataclass
class LoadReport:
    clients: int
    requests: int
    seconds: float
    latencies: list[float] = field(repr=False)
    statuses: Counter[int]
    checked: int = 0
    wrong: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds."""
        xs = sorted(self.latencies)
        return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else float("nan")

    def format(self) -> str:
        ok = self.statuses.get(200, 0)
        lines = [
            f"{self.requests} requests, {self.clients} clients, {self.seconds:.2f} s: {self.throughput:.1f} req/s",
            f"latency p50 {1000 * self.percentile(50):.1f} ms, p95 {1000 * self.percentile(95):.1f} ms, "
            f"p99 {1000 * self.percentile(99):.1f} ms",
            f"status {dict(sorted(self.statuses.items()))} ({ok}/{self.requests} ok)",
        ]
        if self.checked:
            lines.append(f"correct {self.checked - len(self.wrong)}/{self.checked} (ranking = direct model call)")
            lines += [f"  WRONG: {w}" for w in self.wrong[:5]]
        return "\n".join(lines)


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--url {url}: the load test only targets loopback addresses (127.0.0.1, ::1, localhost)")


def same_ranking(got: Sequence[dict[str, Any]], want: Sequence[dict[str, Any]], tol: float = 1e-4) -> str | None:
    """None when the rankings agree (see the module doc), else what differs."""
    if len(got) != len(want):
        return f"{len(got)} items, expected {len(want)}"
    want_score = {w["position"]: w["score"] for w in want}
    for rank, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        if abs(g["score"] - w["score"]) > tol:
            return f"rank {rank}: score {g['score']:.6f}, expected {w['score']:.6f}"
        if g["position"] != w["position"]:
            direct = want_score.get(g["position"], want[-1]["score"])
            if abs(direct - w["score"]) > tol:
                return f"rank {rank}: candidate {g['position']}, expected {w['position']}"
    return None


def served_domains(ready: dict[str, Any]) -> list[str]:
    """The domains of a /readyz body: its `models` keys are `<Domain>` (the domain's default model) and
    `<Domain>:<kind>` (the other kinds served for it)."""
    return sorted({key.split(":", 1)[0] for key in ready["models"]})


def dev_payloads(domains: Sequence[str], n: int, data_root: str | Path | None = None, seed: int = 0,
                 candidates: int = 30, history: int = 50) -> list[dict[str, Any]]:
    """`n` requests from dev users of `domains` (round robin): the (last `history`) history ids and (the first
    `candidates` of) the user's fixed candidates, all of them ranked."""
    from training.data import default_data_root

    root = Path(data_root) if data_root else default_data_root()
    rng = random.Random(seed)
    per_domain = {}
    for domain in domains:
        with open(root / domain / "dev.jsonl", encoding="utf-8") as f:
            users = [json.loads(line) for line in f if line.strip()]
        per_domain[domain] = rng.sample(users, min(len(users), n))
    out = []
    for i in range(n):
        domain = domains[i % len(domains)]
        user = per_domain[domain][(i // len(domains)) % len(per_domain[domain])]
        cands = user["candidates"][:candidates]
        out.append({"domain": domain, "history": [{"id": x} for x in user["items"][:-1][-history:]],
                    "candidates": [{"id": x} for x in cands], "top_k": len(cands)})
    return out


async def run_load(url: str, payloads: Sequence[dict[str, Any]], *, clients: int, requests: int,
                   expected: Sequence[list[dict[str, Any]]] | None = None, tol: float = 1e-4,
                   timeout_s: float = 120.0) -> LoadReport:
    """`clients` concurrent connections send `requests` requests (payloads round robin) to `url`/recommend."""
    require_loopback(url)
    if not (1 <= clients <= MAX_CLIENTS and 1 <= requests <= MAX_REQUESTS and payloads):
        raise ValueError(f"need 1..{MAX_CLIENTS} clients, 1..{MAX_REQUESTS} requests and at least one payload")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    next_index = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            body = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            r = await http.post("/recommend", json=body)
            latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] += 1
            if expected is not None:
                problem = (same_ranking(r.json()["items"], expected[i % len(payloads)], tol)
                           if r.status_code == 200 else f"status {r.status_code}: {r.text[:200]}")
                if problem:
                    wrong.append(f"request {i} ({body['domain']}): {problem}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    return LoadReport(clients, requests, seconds, latencies, statuses, requests if expected is not None else 0,
                      wrong)


def direct_rankings(payloads: Sequence[dict[str, Any]], recommend: Callable[[Any], Any]) -> list[list[dict]]:
    """The direct model call for each payload (`recommend` = Engine.recommend)."""
    from service.schemas import RecommendRequest

    return [[it.model_dump() for it in recommend(RecommendRequest.model_validate(p)).items] for p in payloads]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--payloads", type=int, default=50, help="distinct dev users (requests cycle over them)")
    parser.add_argument("--candidates", type=int, default=30, help="candidates per request (<= 30)")
    parser.add_argument("--history", type=int, default=50, help="most recent history items per request")
    parser.add_argument("--check", action="store_true", help="compare every ranking with the direct model call")
    parser.add_argument("--tol", type=float, default=None,
                        help="score tolerance for --check (default: 1e-4 when the server runs fp32, else 0.05)")
    args = parser.parse_args(argv)
    require_loopback(args.url)
    ready = httpx.get(args.url + "/readyz", timeout=10).json()
    if not ready.get("ready"):
        print(f"server not ready: {ready}", file=sys.stderr)
        return 1
    tol = args.tol if args.tol is not None else (1e-4 if ready.get("precision") == "fp32" else 0.05)
    payloads = dev_payloads(served_domains(ready), args.payloads, candidates=args.candidates,
                            history=args.history)
    expected = None
    if args.check:
        from service.loading import load_engine
        from service.settings import load_settings

        engine = load_engine(load_settings(redis_url=None, precision=ready["precision"]))
        t0 = time.perf_counter()
        expected = direct_rankings(payloads, engine.recommend)
        direct_rps = len(payloads) / (time.perf_counter() - t0)
    report = asyncio.run(run_load(args.url, payloads, clients=args.clients, requests=args.requests,
                                  expected=expected, tol=tol))
    print(f"server: {ready['device']} {ready['precision']}, models {', '.join(ready['models'].values())}")
    print(report.format())
    if expected is not None:
        print(f"direct model call (this process, one request at a time): {direct_rps:.1f} req/s; "
              f"service / direct = {report.throughput / direct_rps:.2f}")
    return 0 if report.statuses.get(200, 0) == args.requests and not report.wrong else 1


if __name__ == "__main__":
    sys.exit(main())
