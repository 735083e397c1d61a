from fastapi.testclient import TestClient

from service.app import create_app


def test_healthz():
    with TestClient(create_app()) as client:
        r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
