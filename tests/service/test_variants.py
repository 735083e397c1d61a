"""WeaveRec and GCA checkpoints served beside X-Cross through the same POST /recommend: the optional `model` field,
the XCROSS_MODEL default, 422 for an unknown model, and a WeaveRec model that is one plain stream."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.backbone import Backbone, load_backbone
from model.checkpoint import load_lora, save_weaverec, save_xcross
from model.inference import StreamwiseXCross
from model.lora import LoraWeights
from model.reference import random_lora
from model.weaverec import merge_heads
from model.xcross import Head, XCross, XCrossConfig
from service.app import create_app
from service.engine import Engine
from service.loading import StartupError, build_runtime, load_engine, load_models
from service.schemas import RecommendRequest
from tests.model.test_xcross import randomize_trainables

from .conftest import SOURCES, app_settings, make_engine, randomize_head, save_artifacts, wait_ready

REQ = {"domain": "Tools", "history": [{"id": 17}, {"id": 4}], "candidates": [{"id": i} for i in range(3, 15)],
       "top_k": 5}


def save_variant_artifacts(root: Path, bb: Backbone) -> Path:
    """The shared layout (lora/Sports, lora/Electronics, xcross/Tools) + weaverec/Tools and gca/Tools."""
    save_artifacts(root, bb, top_k=1)
    parts = [load_lora(root / "lora" / s, bb) for s in SOURCES] + [(random_lora(bb, seed=9), Head(bb.hidden_size))]
    randomize_head(parts[-1][1], 9)
    lam = [0.5, 0.2, 0.3]
    save_weaverec(root / "weaverec" / "Tools", LoraWeights.merge([p[0] for p in parts], lam),
                  merge_heads([p[1] for p in parts], lam), bb, target="Tools",
                  components=[(f"lora:{s}", root / "lora" / s) for s in SOURCES], weights=lam)
    gca = XCross(bb, [p[0] for p in parts[:2]], XCrossConfig(top_k=0, layers=(-1,), integrator="gca")).eval()
    randomize_trainables(gca, 3)
    randomize_head(gca.head, 3)
    save_xcross(root / "gca" / "Tools", gca, bb, target="Tools",
                sources=[(s, root / "lora" / s) for s in SOURCES])
    return root


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return load_backbone("tiny:bert")  # named, so that load_engine can load it from settings


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, bb) -> Path:
    return save_variant_artifacts(tmp_path_factory.mktemp("variant-artifacts"), bb)


@pytest.fixture(scope="module")
def variant_engine(bb, artifacts, catalogs) -> Engine:
    return make_engine(bb, artifacts, catalogs)


@pytest.fixture(scope="module")
def client(variant_engine):
    with TestClient(create_app(app_settings(), engine=variant_engine)) as c:
        wait_ready(c)
        yield c


def test_every_checkpoint_is_served_under_its_key(variant_engine, client):
    assert set(variant_engine.models) == {"Tools", "Tools:weaverec", "Tools:gca", "Sports", "Electronics"}
    assert variant_engine.domains == ["Electronics", "Sports", "Tools"]
    assert variant_engine.models["Tools"].kind == "xcross"  # auto: xcross first
    assert set(client.get("/readyz").json()["models"]) == set(variant_engine.models)


@pytest.mark.parametrize("model", [None, "xcross", "weaverec", "gca"])
def test_the_model_field_selects_the_checkpoint(client, variant_engine, model):
    body = {**REQ, **({"model": model} if model else {})}
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    key = "Tools" if model in (None, "xcross") else f"Tools:{model}"
    assert r.json()["model"] == variant_engine.models[key].name
    assert r.json()["model"].startswith(f"{model or 'xcross'}:Tools@")
    direct = variant_engine.recommend(RecommendRequest.model_validate(body))
    assert [it["position"] for it in r.json()["items"]] == [it.position for it in direct.items]
    assert max(abs(g["score"] - w.score) for g, w in zip(r.json()["items"], direct.items, strict=True)) < 1e-5


def test_models_give_different_rankings(variant_engine):
    scores = {m: [it.score for it in variant_engine.recommend(RecommendRequest.model_validate(
        {**REQ, "model": m})).items] for m in ("xcross", "weaverec", "gca")}
    assert scores["xcross"] != scores["weaverec"] != scores["gca"]


@pytest.mark.parametrize(("domain", "model", "choices"), [("Tools", "bogus", "gca, weaverec, xcross"),
                                                          ("Sports", "weaverec", "lora")])
def test_an_unknown_model_is_422_naming_the_field_and_the_choices(client, domain, model, choices):
    r = client.post("/recommend", json={**REQ, "domain": domain, "model": model})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"][0]["loc"] == ["body", "model"] and f"valid choices: {choices}" in body["message"]


def test_a_non_string_model_is_422(client):
    r = client.post("/recommend", json={**REQ, "model": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]


def test_the_setting_picks_the_default_model(artifacts):
    settings = app_settings(artifacts=artifacts, backbone="tiny:bert", model="weaverec", backend="torch", threads=1)
    engine = load_engine(settings)
    try:
        assert engine.models["Tools"].kind == "weaverec" and engine.models["Tools:xcross"].kind == "xcross"
        assert engine.models["Sports"].kind == "lora"  # a domain without the preferred kind keeps its own
        out = engine.recommend(RecommendRequest.model_validate(REQ))
        assert out.model.startswith("weaverec:Tools@")
        assert engine.recommend(RecommendRequest.model_validate({**REQ, "model": "xcross"})).model.startswith(
            "xcross:Tools@")
    finally:
        engine.close()


def test_weaverec_is_served_as_one_merged_stream_like_a_lora(variant_engine):
    weaverec, lora = variant_engine.models["Tools:weaverec"].model, variant_engine.models["Sports"].model
    assert isinstance(weaverec, StreamwiseXCross) and weaverec.config.n_streams == 1
    shapes = [(type(m).__name__, tuple(p.shape)) for m in weaverec.modules() for p in m.parameters(False)]
    assert shapes == [(type(m).__name__, tuple(p.shape)) for m in lora.modules() for p in m.parameters(False)]


def test_onnx_backends_refuse_gca_with_a_clear_message(bb, artifacts, tmp_path):
    models = load_models(artifacts, bb, streamwise=False)
    settings = app_settings(artifacts=artifacts, onnx_cache=tmp_path, backend="onnx", precision="auto")
    with pytest.raises(StartupError, match="GCA checkpoints .*Tools:gca.* torch backends only"):
        build_runtime("onnx", models, settings, bb, "cpu")


def test_a_gca_model_not_retrained_keeps_serving_its_scores_after_a_ship_with_keep_sources(bb, artifacts, tmp_path):
    """A retrain ships new LoRAs and X-Cross while gca/ is not retrained yet: with --keep-sources the served GCA
    model resolves its old sources from <served>/sources/ and ranks exactly as before; the new X-Cross is served."""
    import shutil

    import torch

    from training.ship import ship

    served = tmp_path / "artifacts"
    shutil.copytree(artifacts, served)
    old = load_models(served, bb)
    staged = save_artifacts(tmp_path / "stage", bb, top_k=1, seed=40)
    out = ship(staged, served, tmp_path / "runs", keep_sources=True)
    assert out["kinds"] == ["lora", "xcross"] and len(out["sources_kept"]) == 2
    new = load_models(served, bb)
    assert new["Tools:gca"].sha == old["Tools:gca"].sha
    assert new["Tools"].sha != old["Tools"].sha  # the retrained X-Cross
    ids = bb.tokenizer(["a b c", "d e f g"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = (m["Tools:gca"].model(ids["input_ids"], ids["attention_mask"]) for m in (old, new))
    assert torch.allclose(a, b)
