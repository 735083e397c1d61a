"""POST /recommend without candidates (issue 20): text recall over the domain's catalog, then the model ranks the
recalled items. Tiny random backbone and checkpoints (conftest), the real Tools catalog."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.recall.text import ExactIndex, history_query
from service.app import create_app
from service.catalog import Resolved
from service.engine import Engine
from service.text_recall import build_text_recall

from .conftest import app_settings, make_engine, wait_ready

RECALL_N = 40
HISTORY = [17, 250, 3001]


@pytest.fixture(scope="module")
def recalls(tiny_bb, catalogs, tmp_path_factory):
    return build_text_recall(tiny_bb, catalogs, ["Tools"], "exact", tmp_path_factory.mktemp("recall-cache"))


@pytest.fixture(scope="module")
def two_stage(tiny_bb, tiny_artifacts, catalogs, recalls) -> Engine:
    return make_engine(tiny_bb, tiny_artifacts, catalogs, recall=recalls, recall_n=RECALL_N)


@pytest.fixture
def client2(two_stage) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(), engine=two_stage)) as c:
        wait_ready(c)
        yield c


def test_recall_excludes_history_and_follows_cosine(recalls, tiny_bb, catalogs):
    r = recalls["Tools"]
    history = [Resolved(catalogs["Tools"].titles[i], i) for i in HISTORY]
    got = [c.id for c in r.candidates(history, RECALL_N)]
    assert len(got) == RECALL_N and not set(got) & set(HISTORY)
    q = history_query(r.recall.embeddings[HISTORY])
    assert got == ExactIndex(r.recall.embeddings).search(q, RECALL_N, exclude=HISTORY)[0].tolist()


def test_recommend_without_candidates_ranks_the_recalled_items(client2, two_stage):
    body = {"domain": "Tools", "history": [{"id": i} for i in HISTORY], "top_k": 5}
    resp = client2.post("/recommend", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["recall"] == f"text:{two_stage.backbone.name}/exact"
    assert out["model"].startswith("xcross:Tools@")
    assert [it["rank"] for it in out["items"]] == [1, 2, 3, 4, 5]
    ids = [it["id"] for it in out["items"]]
    assert not set(ids) & set(HISTORY)
    # the same as giving the recalled items as candidates: the model's ranking of exactly those
    history = [Resolved(two_stage.catalogs["Tools"].titles[i], i) for i in HISTORY]
    recalled = [c.id for c in two_stage.recall["Tools"].candidates(history, RECALL_N)]
    given = client2.post("/recommend", json={**body, "candidates": [{"id": i} for i in recalled]}).json()
    assert given["recall"] is None
    assert [(it["id"], it["position"]) for it in given["items"]] == [(it["id"], it["position"])
                                                                     for it in out["items"]]
    np.testing.assert_allclose([it["score"] for it in given["items"]], [it["score"] for it in out["items"]],
                               rtol=1e-5)
    scores = [it["score"] for it in out["items"]]
    assert scores == sorted(scores, reverse=True)


def test_raw_title_history_and_model_choice(client2):
    body = {"domain": "Tools", "history": [{"title": "Stanley 16-Ounce Claw Hammer"}, {"id": 17}], "top_k": 3,
            "model": "xcross"}
    resp = client2.post("/recommend", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["items"]) == 3 and 17 not in [it["id"] for it in resp.json()["items"]]


def test_without_candidates_needs_a_history(client2):
    resp = client2.post("/recommend", json={"domain": "Tools", "history": []})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "history"]


def test_candidates_required_without_a_recall_stage(client):
    """The conftest engine has no recall stage: a request without candidates is told to give them."""
    resp = client.post("/recommend", json={"domain": "Tools", "history": [{"id": 1}]})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "candidates"]
    ok = client.post("/recommend", json={"domain": "Tools", "history": [{"id": 1}], "candidates": [{"id": 2}]})
    assert ok.status_code == 200 and ok.json()["recall"] is None


def test_readyz_names_the_recall_stage(client2, two_stage):
    assert client2.get("/readyz").json()["recall"] == {"Tools": f"text:{two_stage.backbone.name}/exact"}


def test_hnsw_index_serves_the_same_path(tiny_bb, tiny_artifacts, catalogs, recalls, tmp_path):
    pytest.importorskip("usearch")
    hnsw = build_text_recall(tiny_bb, catalogs, ["Tools"], "hnsw", tmp_path)  # a fresh cache: recomputed
    np.testing.assert_array_equal(hnsw["Tools"].recall.embeddings, recalls["Tools"].recall.embeddings)
    engine = make_engine(tiny_bb, tiny_artifacts, catalogs, recall=hnsw, recall_n=RECALL_N)
    with TestClient(create_app(app_settings(), engine=engine)) as c:
        wait_ready(c)
        out = c.post("/recommend", json={"domain": "Tools", "history": [{"id": i} for i in HISTORY]}).json()
    assert out["recall"].endswith("/hnsw") and len(out["items"]) == 10
    assert not {it["id"] for it in out["items"]} & set(HISTORY)


def test_load_engine_builds_the_recall_stage_before_bf16(tmp_path):
    """The service's own loading: every served catalog gets text recall, embedded in fp32 before the backbone's
    shared weights go bf16 (and cached); a raw history title is then embedded under bf16 autocast."""
    from model.backbone import load_backbone
    from model.recall.text import embed_titles
    from service.loading import load_engine
    from service.schemas import RecommendRequest

    from .conftest import save_artifacts

    artifacts = save_artifacts(tmp_path / "artifacts", load_backbone("tiny:bert"), top_k=1)
    settings = app_settings(artifacts=artifacts, backbone="tiny:bert", backend="torch-bf16", precision="bf16",
                            threads=1, recall_cache=tmp_path / "cache", recall_n=25)
    engine = load_engine(settings)
    try:
        assert sorted(engine.recall) == ["Electronics", "Sports", "Tools"]
        assert len(list((tmp_path / "cache").glob("Tools-*.npy"))) == 1
        assert any(p.dtype == torch.bfloat16 for p in engine.backbone.model.parameters())  # served in bf16 ...
        fresh = load_backbone("tiny:bert")
        titles = engine.catalogs["Tools"].titles[:8]
        np.testing.assert_allclose(engine.recall["Tools"].recall.embeddings[:8],  # ... recall embedded in fp32
                                   embed_titles(fresh.model, fresh.tokenizer, titles), atol=1e-5)
        out = engine.recommend(RecommendRequest.model_validate(
            {"domain": "Tools", "history": [{"title": "Stanley claw hammer"}, {"id": 3}], "top_k": 5}))
        assert out.recall == "text:tiny:bert/exact" and len(out.items) == 5 and 3 not in [it.id for it in out.items]
    finally:
        engine.close()
