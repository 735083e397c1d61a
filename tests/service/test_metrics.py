"""Prometheus metrics: the series the issue lists, their values after known traffic, and `promtool check metrics`."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app

from .conftest import app_settings, make_engine, wait_ready


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; it comes with the Debian package `prometheus`: "
                    "run `apt-get install -y prometheus` (.ci/run does this when promtool is missing)")
    return path


def test_metrics_after_known_traffic_and_promtool_accepts_them(engine):
    with TestClient(create_app(app_settings(), engine=engine)) as c:
        wait_ready(c)
        before = c.get("/metrics").text
        title = f"metrics probe {uuid.uuid4().hex}"
        hundred = {"domain": "Sports", "history": [{"id": 1}], "candidates": [{"id": i} for i in range(99)] +
                   [{"title": title}]}
        assert c.post("/recommend", json=hundred).status_code == 200
        mid = c.get("/metrics").text
        assert c.post("/recommend", json={"domain": "Tools", "candidates": [{"title": title}]}).status_code == 200
        assert c.post("/recommend", json={"domain": "Tools", "candidates": []}).status_code == 422
        assert c.post("/recommend", content=b"x" * (2 << 20),
                      headers={"content-type": "application/json"}).status_code == 413
        assert c.get("/nope").status_code == 404
        text = c.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return value(text, name, **labels) - value(before, name, **labels)

    assert delta("xcross_requests_total", route="/recommend", status="200") == 2
    assert delta("xcross_requests_total", route="/recommend", status="422") == 1
    assert delta("xcross_requests_total", route="/recommend", status="413") == 1
    assert delta("xcross_requests_total", route="unmatched", status="404") == 1
    assert delta("xcross_request_duration_seconds_count", route="/recommend", status="200") == 2
    # 100 candidates = 4 forwards of 30, 30, 30, 10 prompts; then one forward of 1
    assert delta("xcross_forward_prompts_count", domain="Sports") == 4
    assert delta("xcross_forward_prompts_sum", domain="Sports") == 100
    assert delta("xcross_forward_prompts_count", domain="Tools") == 1
    assert delta("xcross_forward_duration_seconds_count", domain="Sports") == 4
    assert delta("xcross_forward_tokens_sum", domain="Sports") >= 100 * 5
    assert delta("xcross_queue_wait_seconds_count", domain="Sports") == 1
    # the new title: tokenized in the first request, an LRU hit in the second
    assert value(mid, "xcross_token_cache_events_total", tier="tokenizer", event="call") > value(
        before, "xcross_token_cache_events_total", tier="tokenizer", event="call")
    for event, n in (("hit", 1), ("miss", 0)):
        assert value(text, "xcross_token_cache_events_total", tier="lru", event=event) - value(
            mid, "xcross_token_cache_events_total", tier="lru", event=event) == n
    assert value(text, "xcross_token_cache_events_total", tier="tokenizer", event="call") == value(
        mid, "xcross_token_cache_events_total", tier="tokenizer", event="call")
    assert value(text, "xcross_redis_errors_total") == 0
    assert value(text, "xcross_inflight_requests") == 1  # the /metrics request itself
    assert value(text, "xcross_queue_prompts") == 0
    info = {labels for (name, labels), v in samples(text).items() if name == "xcross_model_info" and v == 1}
    sha = engine.models["Tools"].sha[:12]
    assert (("backbone", "random:bert"), ("backend", "torch"), ("domain", "Tools"), ("kind", "xcross"),
            ("precision", "fp32"), ("sha", sha)) in info and len(info) == 3

    check = subprocess.run([promtool(), "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check


def test_cache_metrics_count_redis_hits_across_two_apps(tiny_bb, tiny_artifacts, catalogs, redis_url):
    """Two apps (two LRUs) on one Redis: the second finds the first's tokenization there."""
    title = f"shared redis probe {uuid.uuid4().hex}"
    body = {"domain": "Tools", "candidates": [{"title": title}]}
    texts = []
    for _ in range(2):
        engine = make_engine(tiny_bb, tiny_artifacts, catalogs, redis_url=redis_url)
        with TestClient(create_app(app_settings(redis_url=redis_url, warmup=False), engine=engine)) as c:
            wait_ready(c)
            assert c.get("/readyz").json()["redis"] == "ok"
            assert c.post("/recommend", json=body).status_code == 200
            texts.append(c.get("/metrics").text)
        engine.close()
    first, second = texts
    assert value(first, "xcross_token_cache_events_total", tier="redis", event="miss") == 1
    assert value(first, "xcross_token_cache_events_total", tier="tokenizer", event="call") == 1
    assert value(second, "xcross_token_cache_events_total", tier="redis", event="hit") == 1
    assert value(second, "xcross_token_cache_events_total", tier="tokenizer", event="call") == 0
