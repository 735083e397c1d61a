"""Real processes (`python -m service`, the real MiniLM, freshly initialised checkpoints): two replicas sharing one
Redis, the load test against a server, SIGTERM in the middle of a load, corrupt or mismatched checkpoints at start."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import redis

from bench.loadtest import dev_payloads, direct_rankings, run_load, same_ranking
from service.__main__ import main

from .conftest import REPO, Server, server_env, start_server, wait_server
from .test_metrics import value


@pytest.fixture(scope="module")
def replicas(minilm_artifacts, redis_url, tmp_path_factory):
    """Two servers on two ports sharing the test Redis (started together: they load in parallel). No warm-up, to
    save time (the in-process tests cover it). The last test of this module stops the second one (SIGTERM)."""
    logs = tmp_path_factory.mktemp("replicas")
    servers = [start_server(server_env(minilm_artifacts, REDIS_URL=redis_url, XCROSS_WARMUP="0",
                                       XCROSS_LOG_LEVEL="info", XCROSS_DRAIN_S="0"), logs / f"api{i}.log")
               for i in range(2)]  # no drain: SIGTERM stops accepting at once (the drain: test_balancer.py)
    try:
        for s in servers:
            wait_server(s)
        yield servers
    finally:
        for s in servers:
            s.stop()


def metrics(server: Server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def test_a_title_tokenized_by_one_replica_is_a_redis_hit_for_the_other(replicas, redis_url, minilm):
    a, b = replicas
    title = f"Replica probe {uuid.uuid4().hex} cordless drill"
    body = {"domain": "Tools", "candidates": [{"title": title}]}
    event = "xcross_token_cache_events_total"
    a0, b0 = metrics(a), metrics(b)
    ra = httpx.post(a.url + "/recommend", json=body, timeout=30)
    assert ra.status_code == 200, ra.text
    key = f"tok:{minilm.tokenizer_fingerprint}:{hashlib.sha1(title.encode()).hexdigest()}"
    with redis.Redis.from_url(redis_url) as r:
        assert r.exists(key) and r.ttl(key) > 0  # written by replica A, with an expiry
    rb = httpx.post(b.url + "/recommend", json=body, timeout=30)
    assert rb.status_code == 200 and rb.json()["items"] == ra.json()["items"]
    a1, b1 = metrics(a), metrics(b)
    assert value(a1, event, tier="redis", event="miss") - value(a0, event, tier="redis", event="miss") == 1
    assert value(a1, event, tier="tokenizer", event="call") - value(a0, event, tier="tokenizer", event="call") == 1
    assert value(b1, event, tier="redis", event="hit") - value(b0, event, tier="redis", event="hit") == 1
    assert value(b1, event, tier="tokenizer", event="call") == value(b0, event, tier="tokenizer", event="call")
    with redis.Redis.from_url(redis_url) as r:
        r.delete(key)


def test_load_test_every_ranking_equals_the_direct_model_call(replicas, minilm_engine):
    server = replicas[0]
    payloads = dev_payloads(["Tools", "Sports", "Electronics"], 9, candidates=4, history=3)
    expected = direct_rankings(payloads, minilm_engine.recommend)
    report = asyncio.run(run_load(server.url, payloads, clients=4, requests=24, expected=expected, tol=1e-4))
    print(report.format())
    assert report.statuses == {200: 24} and report.checked == 24 and not report.wrong, report.format()
    assert 0 < report.percentile(50) <= report.percentile(95) <= report.percentile(99)
    assert report.throughput > 0
    text = metrics(server)
    merged = value(text, "xcross_forward_prompts_sum", domain="Tools") / value(
        text, "xcross_forward_prompts_count", domain="Tools")
    assert merged > 1  # forwards were not one prompt each


def test_the_load_test_refuses_non_loopback_targets():
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_load("http://example.com", [{}], clients=1, requests=1))


def test_the_load_test_cli_runs(replicas):
    out = subprocess.run([sys.executable, "-m", "bench.loadtest", "--url", replicas[1].url, "--clients", "2",
                          "--requests", "4", "--payloads", "2", "--candidates", "5", "--history", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 requests, 2 clients" in out.stdout and "p99" in out.stdout and "{200: 4}" in out.stdout


def test_a_corrupt_checkpoint_stops_the_process_with_exit_2_and_one_line(minilm_artifacts, tmp_path):
    broken = tmp_path / "artifacts"
    shutil.copytree(minilm_artifacts, broken)
    manifest = broken / "lora" / "Sports" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # cut short: invalid JSON
    server = start_server(server_env(broken), tmp_path / "corrupt.log")
    assert server.proc.wait(120) == 2
    log = server.log.read_text()
    assert log.splitlines()[-1].startswith(f"xcross-serve: cannot start: {manifest}: invalid JSON"), log
    assert "Traceback" not in log and "re-export the checkpoint" in log, log


@pytest.mark.parametrize("case", ["truncated tensors", "other backbone", "other tokenizer"])
def test_corrupt_or_mismatched_checkpoints_exit_2_with_one_clear_line(case, minilm_artifacts, tiny_artifacts,
                                                                     minilm, monkeypatch, capsys, tmp_path):
    """The same start-up path in-process (main()), with the already loaded MiniLM to save 3 s per case."""
    import service.loading

    artifacts = tiny_artifacts
    if case != "other backbone":
        artifacts = tmp_path / "artifacts"
        shutil.copytree(minilm_artifacts, artifacts)
    tensors = artifacts / "xcross" / "Tools" / "tensors.safetensors"
    manifest = artifacts / "lora" / "Electronics" / "manifest.json"
    if case == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:-64])
    if case == "other tokenizer":
        manifest.write_text(manifest.read_text().replace(minilm.tokenizer_fingerprint, "0123456789abcdef"))
    monkeypatch.setattr(service.loading, "load_backbone", lambda name: minilm)
    monkeypatch.setenv("XCROSS_ARTIFACTS", str(artifacts))
    monkeypatch.setenv("XCROSS_THREADS", "1")  # load_engine sets torch's thread count for this process
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xcross-serve: cannot start: "), err
    expected = {
        "truncated tensors": f"{tensors}: sha256",
        "other backbone": "trained on backbone 'random:bert' but XCROSS_BACKBONE is 'minilm'",
        "other tokenizer": f"{manifest.parent}: tokenizer fingerprint 0123456789abcdef (checkpoint) != "
                           f"{minilm.tokenizer_fingerprint} (running backbone)",
    }[case]
    assert expected in err, err


def test_sigterm_during_a_load_lets_in_flight_requests_finish(replicas, minilm_engine):
    """Runs last in this module: it stops replica B."""
    server = replicas[1]
    payloads = dev_payloads(["Tools", "Sports"], 4, seed=1, candidates=15, history=3)
    results: list = [None] * len(payloads)

    def send(i: int) -> None:
        results[i] = httpx.post(server.url + "/recommend", json=payloads[i], timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for _ in range(500):  # until every request is in the server (+1: this scrape)
        if value(metrics(server), "xcross_inflight_requests") >= len(payloads) + 1:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the requests were never in flight together")
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connections while the old ones finish
        httpx.get(server.url + "/healthz", timeout=2)
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0  # a clean shutdown exits 0 (a second SIGTERM would end it as killed: -15)
    expected = direct_rankings(payloads, minilm_engine.recommend)
    for r, want in zip(results, expected, strict=True):
        assert r is not None and r.status_code == 200, r
        assert same_ranking(r.json()["items"], want, tol=1e-4) is None
    log = server.log.read_text()
    assert log.index("Shutting down") < log.rindex('"POST /recommend HTTP/1.1" 200'), log[-2000:]
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]
