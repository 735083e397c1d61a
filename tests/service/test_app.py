"""The HTTP surface in-process (tiny engine): endpoints, the direct-call equality, bad input, readiness, overload."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from fastapi.testclient import TestClient

from service.app import create_app, get_engine
from service.engine import Engine
from service.schemas import RecommendRequest

from .conftest import app_settings, serve_async, wait_ready

GOOD = {"domain": "Tools", "history": [{"id": 17}, {"title": "Stanley 16-Ounce Claw Hammer"}],
        "candidates": [{"id": 3}, {"id": 99}, {"title": "DEWALT 20V MAX Cordless Drill"}, {"asin": "B0002YUX8I"}],
        "top_k": 3}


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["precision"] == "fp32" and ready["device"] == "cpu"
    assert ready["redis"] == "disabled" and set(ready["models"]) == {"Tools", "Sports", "Electronics"}


def test_recommend_equals_the_direct_model_call(client, engine: Engine):
    r = client.post("/recommend", json=GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    direct = engine.recommend(RecommendRequest.model_validate(GOOD)).model_dump()
    assert body["model"] == direct["model"] == engine.models["Tools"].name
    assert [it["position"] for it in body["items"]] == [it["position"] for it in direct["items"]]
    assert [it["rank"] for it in body["items"]] == [1, 2, 3]
    for got, want in zip(body["items"], direct["items"], strict=True):
        assert abs(got["score"] - want["score"]) < 1e-5 and got["title"] == want["title"] and got["id"] == want["id"]
    by_position = {it["position"]: it for it in body["items"]}
    if 3 in by_position:
        assert by_position[3]["asin"] == "B0002YUX8I" and by_position[3]["id"] == 1


def test_every_domain_answers(client, engine: Engine):
    for domain in engine.domains:
        r = client.post("/recommend", json={"domain": domain, "history": [{"id": 5}],
                                            "candidates": [{"id": i} for i in range(12)], "top_k": 5})
        assert r.status_code == 200 and r.json()["model"].split(":")[1].startswith(domain)


def test_openapi_documents_the_configured_limits_and_domains(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    variants = [schemas[v["$ref"].rsplit("/", 1)[1]] for v in schemas["RecommendRequest"]["oneOf"]]
    assert [v["properties"]["domain"]["enum"] for v in variants] == [["Electronics"], ["Sports"], ["Tools"]]
    for req in (v["properties"] for v in variants):
        assert req["history"]["maxItems"] == 50 and req["candidates"]["maxItems"] == 1000
        assert req["top_k"]["maximum"] == 1000
    tools = variants[2]["properties"]
    assert tools["model"]["anyOf"][0]["enum"] == ["xcross"]  # the kinds the tiny engine serves for Tools
    item = schemas[tools["candidates"]["items"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert item["id"] == {**item["id"], "type": "integer", "minimum": 0, "maximum": N_TOOLS - 1}
    assert item["title"]["maxLength"] == 512 and "B0002YUX8I" in item["asin"]["enum"]
    assert {"/recommend", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    assert client.get("/docs").status_code == 200


TITLE_10K = "x" * 10_240
N_TOOLS = 5820
BAD = [
    # (case, body bytes or JSON, status, field path in the message, words in the message)
    ("empty body", b"", 422, "body", "Field required"),
    ("malformed JSON", b'{"domain": "Tools", "candidates": [', 422, "body", "invalid JSON"),
    ("not an object", b"[1, 2]", 422, "body", "valid dictionary"),
    ("domain not a string", {"domain": 5, "candidates": [{"id": 1}]}, 422, "domain", "valid string"),
    ("id as a string", {"domain": "Tools", "candidates": [{"id": "3"}]}, 422, "candidates[0].id", "integer"),
    ("id as a fraction", {"domain": "Tools", "candidates": [{"id": 3.5}]}, 422, "candidates[0].id", "integer"),
    ("id as a bool", {"domain": "Tools", "candidates": [{"id": True}]}, 422, "candidates[0].id", "integer"),
    ("negative id", {"domain": "Tools", "candidates": [{"id": -1}]}, 422, "candidates[0].id", "greater than"),
    ("top_k not an int", {"domain": "Tools", "candidates": [{"id": 1}], "top_k": "5"}, 422, "top_k", "integer"),
    ("top_k zero", {"domain": "Tools", "candidates": [{"id": 1}], "top_k": 0}, 422, "top_k", "greater than"),
    ("candidates not a list", {"domain": "Tools", "candidates": {"id": 1}}, 422, "candidates", "valid list"),
    ("missing candidates", {"domain": "Tools"}, 422, "candidates", "required"),
    ("empty candidates", {"domain": "Tools", "candidates": []}, 422, "candidates", "at least 1"),
    ("too many candidates", {"domain": "Tools", "candidates": [{"id": 1}] * 1001}, 422, "candidates",
     "XCROSS_MAX_CANDIDATES"),
    ("too much history", {"domain": "Tools", "history": [{"id": 1}] * 51, "candidates": [{"id": 1}]}, 422,
     "history", "XCROSS_MAX_HISTORY"),
    ("unknown domain", {"domain": "Tool", "candidates": [{"id": 1}]}, 422, "domain",
     "served domains: Electronics, Sports, Tools"),
    ("unknown item id", {"domain": "Tools", "candidates": [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 99999}]}, 422,
     "candidates[3].id", f"valid ids are 0..{N_TOOLS - 1}"),
    ("unknown asin", {"domain": "Tools", "history": [{"asin": "B000NOPE"}], "candidates": [{"id": 1}]}, 422,
     "history[0].asin", "unknown asin"),
    ("empty title", {"domain": "Tools", "candidates": [{"title": ""}]}, 422, "candidates[0].title", "at least 1"),
    ("blank title", {"domain": "Tools", "candidates": [{"title": " \t\n\u3000 "}]}, 422, "candidates[0].title",
     "only whitespace"),
    ("10 KB title", {"domain": "Tools", "candidates": [{"title": TITLE_10K}]}, 422, "candidates[0].title",
     "XCROSS_MAX_TITLE_CHARS"),
    ("unpaired surrogate", b'{"domain": "Tools", "candidates": [{"title": "a\\ud800b"}]}', 422,
     "candidates[0].title", "valid string"),
    ("two keys in an item", {"domain": "Tools", "candidates": [{"id": 1, "title": "x"}]}, 422, "candidates[0]",
     "exactly one of id, asin or title (got id and title)"),
    ("empty item", {"domain": "Tools", "candidates": [{}]}, 422, "candidates[0]", "got none of them"),
    ("unknown field", {"domain": "Tools", "candidates": [{"id": 1}], "user": "u1"}, 422, "user", "not permitted"),
    ("null item", {"domain": "Tools", "candidates": [None]}, 422, "candidates[0]", "valid dictionary"),
    ("non-UTF-8 bytes", b'{"domain": "Tools", "candidates": [{"title": "caf\xe9"}]}', 422, "body", "UTF-8"),
    ("2 MB body", {"domain": "Tools", "candidates": [{"title": "y" * 500}] * 4000}, 413, "body",
     "XCROSS_MAX_BODY_BYTES"),
]


def test_an_escaped_blank_title_is_scored_as_unknown_item_like_the_catalogs_empty_titles(client):
    """The schema's rule for a title (one character that is not whitespace) is the validation's rule; a title that
    only HTML-unescaping empties is `unknown item`, as the catalogs' empty titles are."""
    body = {"domain": "Tools", "candidates": [{"title": "&nbsp; &#32;"}, {"id": 3.0}], "top_k": 2}
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    titles = {it["position"]: it["title"] for it in r.json()["items"]}
    assert titles[0] == "unknown item" and r.json()["items"][0]["id"] in (None, 3)


@pytest.fixture(scope="module")
def shared_client(engine):
    """One app for the table of bad inputs (they change no state)."""
    with TestClient(create_app(app_settings(), engine=engine)) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(("case", "body", "status", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(shared_client, case, body, status, field, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = shared_client.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    message = r.json()["message"]
    assert message.startswith(f"{field}: ") or f"; {field}: " in message, message
    assert words in message, message


def test_a_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(40):
            yield b" " * 65536

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "XCROSS_MAX_BODY_BYTES" in r.json()["message"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_that_is_not_declared_json_is_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/recommend", content=json.dumps(GOOD).encode(), headers=headers)
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["message"]
    ok = client.post("/recommend", content=json.dumps(GOOD).encode(),
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_configured_limits_apply(engine):
    with TestClient(create_app(app_settings(max_candidates=5, queue_prompts=5, max_history=2, max_title_chars=10),
                               engine=engine)) as c:
        wait_ready(c)
        r = c.post("/recommend", json={"domain": "Tools", "history": [{"id": 1}] * 3,
                                       "candidates": [{"title": "a very long title indeed"}] * 6})
        assert r.status_code == 422
        paths = {tuple(e["loc"]) for e in r.json()["detail"]}
        assert {("body", "history"), ("body", "candidates"), ("body", "candidates", 0, "title")} <= paths


class GatedEngine(Engine):
    """The tiny engine whose forwards wait for `gate` (and can be slowed down)."""

    def __init__(self, base: Engine, delay: float = 0.0):
        super().__init__(base.backbone, base.models, base.catalogs, base.cache)
        self.gate, self.delay = threading.Event(), delay

    def forward(self, domain, prompts):
        self.gate.wait(10)
        threading.Event().wait(self.delay)
        return super().forward(domain, prompts)


def test_not_ready_until_warm_up_is_done(engine):
    slow = GatedEngine(engine)
    with TestClient(create_app(app_settings(), engine=slow)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "warming up"
        r = c.post("/recommend", json=GOOD)
        assert r.status_code == 503 and "warming up" in r.json()["message"] and r.headers["retry-after"] == "1"
        slow.gate.set()
        wait_ready(c)
        assert c.post("/recommend", json=GOOD).status_code == 200


def test_engine_dependency_can_be_overridden(engine):
    app = create_app(app_settings(warmup=False), engine=engine)
    sentinel = GatedEngine(engine)
    sentinel.gate.set()
    app.dependency_overrides[get_engine] = lambda: sentinel
    calls = []
    sentinel.preprocess = lambda req: calls.append(req.domain) or Engine.preprocess(sentinel, req)
    with TestClient(app) as c:
        wait_ready(c)
        assert c.post("/recommend", json=GOOD).status_code == 200
    assert calls == ["Tools"]


def test_queue_full_is_429_with_retry_after(engine):
    slow = GatedEngine(engine, delay=0.3)
    slow.gate.set()
    settings = app_settings(max_candidates=10, queue_prompts=10, batch_prompts=10, warmup=False)
    body = {"domain": "Tools", "candidates": [{"id": i} for i in range(10)]}

    async def go():
        async with serve_async(create_app(settings, engine=slow)) as c:
            first = asyncio.create_task(c.post("/recommend", json=body))
            await asyncio.sleep(0.1)  # in the forward: the queue is empty again
            second = asyncio.create_task(c.post("/recommend", json=body))
            await asyncio.sleep(0.1)  # queued: the queue is full
            third = await c.post("/recommend", json=body)
            return (await first), (await second), third

    first, second, third = asyncio.run(go())
    assert first.status_code == 200 and second.status_code == 200
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert "XCROSS_QUEUE_PROMPTS" in third.json()["message"]


def test_deadline_is_504(engine):
    slow = GatedEngine(engine, delay=0.5)
    slow.gate.set()
    with TestClient(create_app(app_settings(request_timeout_s=0.2, warmup=False), engine=slow)) as c:
        wait_ready(c)
        r = c.post("/recommend", json=GOOD)
        assert r.status_code == 504 and "XCROSS_REQUEST_TIMEOUT_S" in r.json()["message"]
        assert 'xcross_requests_total{route="/recommend",status="504"} 1.0' in c.get("/metrics").text


def test_no_models_is_not_ready_with_a_reason(engine):
    empty = Engine(engine.backbone, {}, engine.catalogs, engine.cache)
    with TestClient(create_app(app_settings(allow_empty=True), engine=empty)) as c:
        for _ in range(100):
            if c.get("/readyz").json()["status"] != "loading":
                break
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"].startswith("no models: no checkpoints under")
        assert c.post("/recommend", json=GOOD).status_code == 503
