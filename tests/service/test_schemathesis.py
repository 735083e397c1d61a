"""Property-based run of schemathesis against the OpenAPI document, in-process (ASGI, tiny engine): no 5xx.

Bounded: `EXAMPLES` cases per operation and generation mode (valid bodies, and bodies that break the schema),
derandomized (the same cases every run), so it takes seconds. It drives Hypothesis' `given` with schemathesis'
strategies directly: the pytest plugin's lazy fixture loader fails on this pytest version."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from service.app import create_app

from .conftest import app_settings

EXAMPLES = 50
CASES = [("POST /recommend", GenerationMode.POSITIVE), ("POST /recommend", GenerationMode.NEGATIVE),
         ("GET /readyz", GenerationMode.POSITIVE), ("GET /healthz", GenerationMode.POSITIVE),
         ("GET /metrics", GenerationMode.POSITIVE)]


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
        case.validate_response(response, checks=[not_a_server_error])

    check()
    assert seen
    if label == "POST /recommend" and mode is GenerationMode.POSITIVE:  # reached rankings and rejections
        assert 200 in seen and 422 in seen, seen
    if mode is GenerationMode.NEGATIVE:  # bodies that break the schema are always the client's error
        assert all(400 <= s < 500 for s in seen), seen
