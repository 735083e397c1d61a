"""POST /recall over a smoke checkpoint, in the real app (TestClient)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from model.recall.data import dataset_dir, load_catalog
from service.app import create_app
from tests.service.conftest import app_settings, wait_ready

HISTORY = [{"id": 821}, {"id": 1860}, {"id": 12016}, {"id": 772}]  # food, food, kitchen, food


@pytest.fixture(scope="module")
def client(engine, smoke_runs) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(artifacts=smoke_runs / "artifacts"), engine=engine)) as c:
        wait_ready(c)
        yield c


def test_recall_returns_top_k_of_the_domain(client) -> None:
    catalog = load_catalog(dataset_dir("food-kitchen"))
    r = client.post("/recall", json={"dataset": "food-kitchen", "history": HISTORY, "domain": "kitchen",
                                     "top_k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dataset"] == "food-kitchen" and body["domain"] == "kitchen"
    assert body["model"].startswith("recall:food-kitchen/ddsr@")
    items = body["items"]
    assert [it["rank"] for it in items] == list(range(1, 8))
    assert all(catalog.item_domain[it["id"]] == 1 for it in items)
    assert all(it["title"] == catalog.titles[it["id"]] for it in items)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    food = client.post("/recall", json={"dataset": "food-kitchen", "history": HISTORY, "domain": "food",
                                        "top_k": 50}).json()["items"]
    ids = {it["id"] for it in food}
    assert all(catalog.item_domain[i] == 0 for i in ids) and not ids & {821, 1860, 772}  # history left out


def test_recall_depends_on_the_history(client) -> None:
    a = client.post("/recall", json={"dataset": "food-kitchen", "history": HISTORY, "domain": "kitchen"}).json()
    b = client.post("/recall", json={"dataset": "food-kitchen", "history": [{"id": 25000}, {"id": 30}],
                                     "domain": "kitchen"}).json()
    assert [it["score"] for it in a["items"]] != [it["score"] for it in b["items"]]


@pytest.mark.parametrize(("body", "loc", "text"), [
    ({"dataset": "beauty-electronics", "history": HISTORY, "domain": "beauty"}, ["body", "dataset"], "served"),
    ({"dataset": "food-kitchen", "history": HISTORY, "domain": "Kitchen"}, ["body", "domain"], "food, kitchen"),
    ({"dataset": "food-kitchen", "history": [{"id": 821}, {"id": 99999}], "domain": "food"},
     ["body", "history", 1, "id"], "1..28095"),
    ({"dataset": "food-kitchen", "history": [], "domain": "food"}, ["body", "history"], "at least 1"),
    ({"dataset": "food-kitchen", "history": [{"id": "821"}], "domain": "food"}, ["body", "history", 0, "id"],
     "integer"),
    ({"dataset": "food-kitchen", "history": HISTORY, "domain": "food", "top_k": 0}, ["body", "top_k"], "1"),
    ({"dataset": "food-kitchen", "history": [{"id": 1}] * 51, "domain": "food"}, ["body", "history"],
     "XCROSS_MAX_HISTORY"),
])
def test_recall_errors_name_the_field(client, body, loc, text) -> None:
    r = client.post("/recall", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"] == loc and text in detail[0]["msg"], detail


def test_recall_metrics_and_readiness(client) -> None:
    client.post("/recall", json={"dataset": "food-kitchen", "history": HISTORY, "domain": "food"})
    text = client.get("/metrics").text
    assert 'xcross_recall_duration_seconds_count{dataset="food-kitchen",domain="food"}' in text
    assert 'xcross_recall_model_info{dataset="food-kitchen",sha=' in text
    assert 'xcross_requests_total{route="/recall",status="200"}' in text
    assert client.get("/readyz").status_code == 200


def test_no_recall_model_keeps_the_service_ready(engine, tmp_path) -> None:
    with TestClient(create_app(app_settings(artifacts=tmp_path), engine=engine)) as c:
        wait_ready(c)
        assert c.get("/readyz").status_code == 200
        r = c.post("/recall", json={"dataset": "food-kitchen", "history": HISTORY, "domain": "food"})
        assert r.status_code == 422 and "no recall model" in r.json()["message"]
