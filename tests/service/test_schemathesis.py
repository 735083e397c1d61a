"""Property-based run of schemathesis against the OpenAPI document, in-process (ASGI, tiny engine), with every
check schemathesis has (`run --checks all`): no 5xx, responses as documented, and the schema and the validation
agree both ways - every schema-valid request is accepted (2xx), every schema-breaking one rejected (4xx).

Bounded: `EXAMPLES` cases per operation and generation mode (valid bodies, and bodies that break the schema),
derandomized (the same cases every run), so it takes seconds. It drives Hypothesis' `given` with schemathesis'
strategies directly: the pytest plugin's lazy fixture loader fails on this pytest version."""

from __future__ import annotations

import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.generation.modes import GenerationMode

from service.app import create_app

from .conftest import app_settings, wait_ready

EXAMPLES = 50
CASES = [("POST /recommend", GenerationMode.POSITIVE), ("POST /recommend", GenerationMode.NEGATIVE),
         ("POST /recall", GenerationMode.POSITIVE), ("POST /recall", GenerationMode.NEGATIVE),
         ("GET /readyz", GenerationMode.POSITIVE), ("GET /healthz", GenerationMode.POSITIVE),
         ("GET /metrics", GenerationMode.POSITIVE)]
load_all_checks()
ALL_CHECKS = [c for c in CHECKS.get_all() if callable(c) and not isinstance(c, type)]


@pytest.fixture(scope="module")
def api_schema(engine):
    from schemathesis.python import asgi

    app = create_app(app_settings(warmup=False), engine=engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    client = asgi.get_client(app)
    for _ in range(500):
        if client.get("/readyz").status_code == 200:
            break
        time.sleep(0.01)
    yield schema
    asgi.shutdown_lifespans()


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_no_server_errors(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is missing from the OpenAPI document"
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    def check(case):
        response = case.call()
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.status_code, response.text)
        if mode is GenerationMode.POSITIVE:  # the schema promised this request is valid
            assert response.status_code == 200, (case.body, response.status_code, response.text)
        case.validate_response(response, checks=ALL_CHECKS)

    check()
    assert seen
    if mode is GenerationMode.NEGATIVE:  # bodies that break the schema are always the client's error
        assert all(400 <= s < 500 for s in seen), seen


def test_every_check_is_run():
    assert {"positive_data_acceptance", "negative_data_rejection", "response_schema_conformance",
            "status_code_conformance", "not_a_server_error"} <= {c.__name__ for c in ALL_CHECKS}, ALL_CHECKS


def test_the_schema_publishes_the_served_choices(api_schema, engine):
    doc = api_schema.raw_schema["components"]["schemas"]
    variants = [doc[ref["$ref"].rsplit("/", 1)[1]] for ref in doc["RecommendRequest"]["oneOf"]]
    assert [v["properties"]["domain"]["enum"] for v in variants] == [[d] for d in engine.domains]
    for v in variants:
        domain = v["properties"]["domain"]["enum"][0]
        kinds = v["properties"]["model"]["anyOf"][0]["enum"]
        assert kinds == sorted(engine.kinds(domain)), (domain, kinds)
        item = doc[v["properties"]["history"]["items"]["$ref"].rsplit("/", 1)[1]]
        assert item["properties"]["id"]["maximum"] == len(engine.catalogs[domain].titles) - 1
    recall = [doc[ref["$ref"].rsplit("/", 1)[1]] for ref in doc["RecallRequest"]["oneOf"]]
    assert sorted(v["properties"]["dataset"]["enum"][0] for v in recall) == ["beauty-electronics", "food-kitchen"]


def test_integral_floats_are_the_integers_json_schema_says_they_are(engine):
    with TestClient(create_app(app_settings(warmup=False), engine=engine)) as client:
        wait_ready(client)
        integral_floats(client)


def integral_floats(client):
    body = {"domain": "Tools", "history": [{"id": 17.0}], "candidates": [{"id": 3}, {"id": 99.0}], "top_k": 2.0}
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    assert sorted(it["id"] for it in r.json()["items"]) == [3, 99]
    for bad in ({"id": 99.5}, {"id": "99"}, {"id": True}):
        r = client.post("/recommend", json={**body, "candidates": [bad]})
        assert r.status_code == 422 and "candidates[0].id" in r.json()["message"], r.text
    r = client.post("/recall", json={"dataset": "food-kitchen", "history": [{"id": 6190.0}], "domain": "kitchen",
                                     "top_k": 3.0})
    assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text
