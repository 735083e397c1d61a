"""The drain's in-process half (service/drain.py, docs/reliability.md): once draining, /readyz answers 503
`draining` while every endpoint still answers, with `Connection: close`; the settings keep the drain inside the
graceful timeout. The signals, the exit status and the real connections are tested with processes in
test_balancer.py."""

from __future__ import annotations

import pytest

from service.settings import SettingsError, load_settings

BODY = {"domain": "Tools", "history": [{"id": 17}], "candidates": [{"id": 3}, {"id": 99}]}


def test_draining_turns_readiness_503_and_keeps_answering_with_connection_close(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.headers.get("connection") != "close"
    before = client.post("/recommend", json=BODY)
    assert before.status_code == 200 and before.headers.get("connection") != "close"

    client.app.state.service.drain()  # what the first SIGTERM does

    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "draining" and not ready.json()["ready"]
    assert ready.json()["models"]  # still describes what it serves
    during = client.post("/recommend", json=BODY)
    assert during.status_code == 200 and during.json()["items"] == before.json()["items"]
    for r in (ready, during, client.get("/healthz"), client.get("/metrics"),
              client.post("/recommend", json={"domain": "Nope", "candidates": [{"id": 1}]})):
        assert r.headers["connection"] == "close", (r.request.url, r.headers)
    assert client.post("/recommend", json={"domain": "Nope", "candidates": [{"id": 1}]}).status_code == 422


def test_the_drain_must_fit_in_the_graceful_timeout():
    with pytest.raises(SettingsError, match="XCROSS_DRAIN_S=30 is not below XCROSS_GRACEFUL_TIMEOUT_S=30"):
        load_settings(drain_s=30, graceful_timeout_s=30)
    assert load_settings(drain_s=0).drain_s == 0  # 0: stop accepting at once (readiness still turns 503)
    assert load_settings().drain_s == 5.0
