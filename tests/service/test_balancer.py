"""Zero lost requests across SIGTERM and rolling restarts (issue 18; docs/reliability.md), with real processes:
two `python -m service` replicas (the real MiniLM, freshly initialised checkpoints, no warm-up) on loopback ports
sharing the test Redis, a real HAProxy in front (docker/haproxy.cfg, the compose balancer's file), and keep-alive
clients (one `http.client` connection per client, reused until the server answers `Connection: close`).

The module's tests share the replicas and run in order: the rolling restart (both replicas restarted in turn), a
`kill -9` of replica B under the same load, keep-alive clients straight to replica A across its SIGTERM (A stops
for good), and a second SIGTERM to B (started again) stopping it at once. Each load test prints its figures
(`pytest -s`); docs/reliability.md quotes them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.loadtest import dev_payloads, direct_rankings, same_ranking

from .conftest import REPO, Server, free_port, server_env, wait_server
from .test_metrics import value

DRAIN_S = 3.0  # XCROSS_DRAIN_S of the replicas: > HAProxy's fall x inter (2 x 0.25 s) + timeout check (2 s)
GRACEFUL_S = 15.0  # XCROSS_GRACEFUL_TIMEOUT_S
SIGNAL_SKEW_S = 0.25  # how long after the test sends SIGTERM the replica may start its drain clock
CLIENTS = 3  # keep-alive clients of the bounded load
PAUSE_S = 0.02  # each client's pause between requests (bounds the load on a shared 2-core machine)
KILL9_BOUND = CLIENTS  # failures allowed for a kill -9: at most the requests in flight on the killed replica
HAPROXY_CFG = REPO / "docker" / "haproxy.cfg"
HAPROXY_LOG: dict[str, Path] = {}
RETRIES = re.compile(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+ \"POST /recommend")  # httplog: .../retries (+ = redispatched)


def haproxy_retries() -> int:
    """Retries HAProxy made so far for POST /recommend (from its request log)."""
    return sum(int(m.group(1)) for m in RETRIES.finditer(HAPROXY_LOG["path"].read_text()))


def haproxy_binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        pytest.fail("haproxy is not installed: `make test` installs it (Debian package `haproxy`); "
                    "or run `apt-get install -y haproxy`")
    return path


def launch(env: dict[str, str], log: Path, port: int) -> Server:
    """`python -m service` on a given loopback port (a restart keeps the replica's port)."""
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(proc, f"http://127.0.0.1:{port}", log)


def served(server: Server) -> float:
    """/recommend requests the replica answered 200 (from its /metrics)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return value(text, "xcross_requests_total", route="/recommend", status="200")


# --- keep-alive load -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    client: int
    payload: int
    t0: float  # time.monotonic() when the request was sent (for a refused connection: when connect was tried)
    t1: float
    status: int | None = None  # None: no response
    error: str | None = None  # exception type and message; refused = "ConnectionRefusedError..."
    closed: bool = False  # the response said `Connection: close`
    wrong: str | None = None  # ranking differs from the direct model call
    new_connection: bool = False

    @property
    def refused(self) -> bool:
        return self.error is not None and self.error.startswith("ConnectionRefusedError")


@dataclass
class Load:
    """`clients` threads, each with one keep-alive connection to `url`, sending POST /recommend back to back
    (payloads round robin, `pause_s` apart) until `stop()`; every response is checked against `expected`."""

    url: str
    payloads: list[dict[str, Any]]
    expected: list[list[dict[str, Any]]]
    clients: int = CLIENTS
    pause_s: float = PAUSE_S
    stop_when_refused: bool = False  # a client stops at its first refused connection (the server is gone)
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(self.clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.outcomes

    def wait_for(self, n: int, since: float, timeout: float = 120) -> None:
        """Until `n` requests sent after `since` have finished."""
        end = time.monotonic() + timeout
        while sum(o.t0 >= since for o in self.outcomes) < n:
            assert time.monotonic() < end, f"fewer than {n} requests in {timeout} s"
            time.sleep(0.05)

    def _client(self, c: int) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        conn: http.client.HTTPConnection | None = None
        i = c
        while not self._stop.is_set():
            p = i % len(self.payloads)
            body = json.dumps(self.payloads[p]).encode()
            fresh = conn is None
            t0 = time.monotonic()
            out = Outcome(c, p, t0, t0, new_connection=fresh)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=60)
                    conn.connect()
                    out.t0 = time.monotonic()
                conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                out.status, out.closed = r.status, r.will_close
                if r.status == 200:
                    out.wrong = same_ranking(json.loads(data)["items"], self.expected[p], tol=1e-4)
                else:
                    out.wrong = f"status {r.status}: {data[:200]!r}"
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                out.error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            out.t1 = time.monotonic()
            with self._lock:
                self.outcomes.append(out)
            if out.refused and self.stop_when_refused:
                return
            i += self.clients
            self._stop.wait(self.pause_s)
        if conn is not None:
            conn.close()


def p99_ms(outcomes: list[Outcome]) -> float:
    xs = sorted(o.t1 - o.t0 for o in outcomes if o.status == 200)
    return 1000 * xs[max(0, math.ceil(0.99 * len(xs)) - 1)] if xs else float("nan")


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200 or o.wrong is not None]


def describe(o: Outcome, t_ref: float) -> str:
    return (f"client {o.client} at {o.t0 - t_ref:+.3f} s: status {o.status} error {o.error} wrong {o.wrong} "
            f"(new connection: {o.new_connection})")


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def payloads() -> list[dict[str, Any]]:
    return dev_payloads(["Tools", "Sports", "Electronics"], 12, seed=3, candidates=6, history=4)


@pytest.fixture(scope="module")
def expected(payloads, minilm_engine) -> list[list[dict[str, Any]]]:
    return direct_rankings(payloads, minilm_engine.recommend)


@pytest.fixture(scope="module")
def replica_env(minilm_artifacts, redis_url) -> dict[str, str]:
    return server_env(minilm_artifacts, REDIS_URL=redis_url, XCROSS_WARMUP="0", XCROSS_LOG_LEVEL="info",
                      XCROSS_DRAIN_S=str(DRAIN_S), XCROSS_GRACEFUL_TIMEOUT_S=str(GRACEFUL_S),
                      XCROSS_RECALL_N="0")  # no recall stage: start-up without embedding the catalogs


@pytest.fixture(scope="module")
def replicas(replica_env, tmp_path_factory) -> list[Server]:
    """Replicas A and B (started together: they load in parallel); tests replace entries when they restart one."""
    logs = tmp_path_factory.mktemp("balanced")
    servers = [launch(replica_env, logs / f"api{i}.log", free_port()) for i in range(2)]
    try:
        for s in servers:
            wait_server(s)
        yield servers
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


@pytest.fixture(scope="module")
def balancer(replicas, tmp_path_factory) -> str:
    """HAProxy on a free loopback port in front of both replicas, health-checking /readyz every 250 ms; its log
    (one line per request, option httplog) is HAPROXY_LOG["path"]."""
    binary = haproxy_binary()
    port = free_port()
    env = {**os.environ, "XCROSS_LB_BIND": f"127.0.0.1:{port}", "XCROSS_LB_CHECK_INTER": "250ms",
           "XCROSS_LB_API1": replicas[0].url.removeprefix("http://"),
           "XCROSS_LB_API2": replicas[1].url.removeprefix("http://")}
    check = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = HAPROXY_LOG["path"] = tmp_path_factory.mktemp("haproxy") / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/lb-healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"haproxy did not answer: {log.read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def wait_in_rotation(server: Server, timeout: float = 30) -> None:
    """Until the balancer sends the replica requests (health checks passed: it is UP again)."""
    start, end = served(server), time.monotonic() + timeout
    while time.monotonic() < end:
        if served(server) > start:
            return
        time.sleep(0.1)
    raise AssertionError(f"{server.url} got no request through the balancer within {timeout} s")


# --- tests -----------------------------------------------------------------------------------------------------


def test_rolling_restart_behind_haproxy_loses_no_request(replicas, balancer, replica_env, payloads, expected):
    retries0 = haproxy_retries()
    with Load(balancer, payloads, expected) as load:
        for s in replicas:
            wait_in_rotation(s)  # both replicas serve before the restarts
        t_start = time.monotonic()
        exits = []
        for i, old in enumerate(list(replicas)):
            t_sig = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            rc = old.proc.wait(GRACEFUL_S + 5)
            exits.append((rc, time.monotonic() - t_sig))
            new = launch(replica_env, old.log, int(old.url.rsplit(":", 1)[1]))
            replicas[i] = new
            wait_server(new)
            wait_in_rotation(new)
        t_end = time.monotonic()
        time.sleep(0.5)
    outcomes = load.outcomes
    during = [o for o in outcomes if t_start <= o.t0 <= t_end]
    bad = failed(outcomes)
    print(f"\nrolling restart through haproxy: {len(outcomes)} requests ({len(during)} during the restarts, "
          f"{t_end - t_start:.1f} s), {len(bad)} failed; p99 {p99_ms(during):.0f} ms during the restarts, "
          f"{p99_ms([o for o in outcomes if o.t0 < t_start]):.0f} ms before; {haproxy_retries() - retries0} retried "
          f"by haproxy; exits "
          f"{[(rc, round(s, 2)) for rc, s in exits]}")
    assert not bad, "\n".join(describe(o, t_start) for o in bad[:20])
    assert len(during) >= 10, "the load did not run through the restarts"
    assert all(rc == 0 and s < GRACEFUL_S for rc, s in exits), exits
    for s in replicas:
        log = s.log.read_text()
        assert "SIGTERM: draining" in log and "Traceback" not in log, log[-3000:]


def test_kill_9_of_one_replica_under_load_is_absorbed_by_the_balancer(replicas, balancer, replica_env, payloads,
                                                                      expected):
    a, b = replicas
    retries0 = haproxy_retries()
    with Load(balancer, payloads, expected) as load:
        for s in replicas:
            wait_in_rotation(s)  # both replicas serve before the kill
        time.sleep(0.5)
        t_kill = time.monotonic()
        b.proc.kill()  # SIGKILL: no drain, the balancer finds out by failed requests and health checks
        b.proc.wait()
        load.wait_for(10, since=t_kill)  # then 10 more requests through the balancer (A alone)
    outcomes = load.outcomes
    bad = failed(outcomes)
    after = [o for o in outcomes if o.t0 >= t_kill]
    print(f"\nkill -9 of one replica through haproxy: {len(outcomes)} requests ({len(after)} after the kill), "
          f"{len(bad)} failed (bound {KILL9_BOUND}), {haproxy_retries() - retries0} retried by haproxy; "
          f"p99 {p99_ms(after):.0f} ms after the kill")
    for o in bad:
        print("  " + describe(o, t_kill))
    assert len(bad) <= KILL9_BOUND, "\n".join(describe(o, t_kill) for o in bad)
    assert len(after) >= 10 and served(a) > 0


def test_keep_alive_clients_get_every_answer_across_sigterm(replicas, payloads, expected):
    """Straight to replica A, no balancer: every request sent before the drain ends is answered in full."""
    server = replicas[0]
    ready = {}
    with Load(server.url, payloads, expected, pause_s=0.0, stop_when_refused=True) as load:
        load.wait_for(12, since=0)
        t_sig = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with httpx.Client(timeout=5) as c:  # readiness turns 503 `draining` at once
            r = c.get(server.url + "/readyz")
            ready = {"status": r.status_code, "body": r.json(), "connection": r.headers.get("connection")}
        rc = server.proc.wait(GRACEFUL_S + 5)
        t_exit = time.monotonic()
        time.sleep(0.2)
    outcomes = load.outcomes
    drain_end = t_sig + DRAIN_S
    before = [o for o in outcomes if o.t0 < t_sig]
    in_drain = [o for o in outcomes if t_sig <= o.t0 < drain_end]
    # the server's drain clock starts when its loop handles the signal, a little after t_sig (tens of ms on a
    # loaded 2-core machine): a request sent in that margin past drain_end may be answered or refused, never cut
    edge = [o for o in outcomes if drain_end <= o.t0 < drain_end + SIGNAL_SKEW_S]
    late = [o for o in outcomes if o.t0 >= drain_end + SIGNAL_SKEW_S]
    print(f"\nkeep-alive clients across SIGTERM (drain {DRAIN_S:g} s): {len(before)} requests before on "
          f"{sum(o.new_connection for o in before)} connections, {len(in_drain)} during the drain (all answered "
          f"{all(o.status == 200 for o in in_drain)}), {len(late)} after it ({sum(o.refused for o in late)} "
          f"refused), exit {rc} after {t_exit - t_sig:.2f} s; p99 {p99_ms(in_drain):.0f} ms during the drain")
    assert ready["status"] == 503 and ready["body"]["status"] == "draining", ready
    assert ready["connection"] == "close", ready
    assert rc == 0 and DRAIN_S <= t_exit - t_sig < GRACEFUL_S
    # every request sent before the drain ended got a complete, correct response; none was reset or cut
    sent = before + in_drain
    bad = failed(sent)
    assert not bad, "\n".join(describe(o, t_sig) for o in bad[:20])
    # ... and connections were reused (keep-alive) before the signal, closed by the server during the drain
    assert len(before) >= 3 * sum(o.new_connection for o in before), "the clients did not reuse connections"
    assert in_drain and all(o.closed for o in in_drain if o.t0 > t_sig + 0.1)
    assert max(o.t0 for o in in_drain) > t_sig + 0.8 * DRAIN_S, "the server stopped answering before the drain end"
    # after the drain: only refused connections (the port is closed), never a connection cut mid-request
    assert all(o.refused for o in late), "\n".join(describe(o, t_sig) for o in late if not o.refused)
    cut = [o for o in failed(edge) if not o.refused]
    assert not cut, "\n".join(describe(o, t_sig) for o in cut)
    log = server.log.read_text()
    assert "Traceback" not in log and "Finished server process" in log, log[-3000:]


def test_a_second_sigterm_stops_at_once(replicas, replica_env):
    b = replicas[1]  # killed by the kill -9 test: started again on its port
    server = replicas[1] = launch(replica_env, b.log, int(b.url.rsplit(":", 1)[1]))
    wait_server(server)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(server.url + "/readyz", timeout=5).json()["status"] == "draining"
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(5)
    assert rc == -signal.SIGTERM and time.monotonic() - t0 < 1.0  # well before the drain's 2 s
    assert "second SIGTERM while draining: stopping at once" in server.log.read_text()
