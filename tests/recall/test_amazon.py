"""Item-id recall per Amazon domain (issue 20): the single-domain loader and its validation split, the smoke preset
through the CLI, id recall and the blend (history excluded), and the two-stage `/recommend` with an id checkpoint
(the `recall` field names the stage used; raw-title histories fall back to text)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from model.recall.blend import RRF_K, IdRecall, rrf
from model.recall.data import held_out_users, load_amazon, load_splits, make_batch
from model.recall.train import load_checkpoint
from service.app import create_app
from service.catalog import Resolved
from service.settings import SettingsError, load_settings
from service.text_recall import IdStage, build_recall_stages, build_text_recall
from tests.service.conftest import app_settings, make_engine, wait_ready
from training.data import load_domain, split_train_val
from training.recall import app as recall_cli

HISTORY = [17, 250, 3001]
N = 40


@pytest.fixture(scope="module")
def tools():
    return load_amazon("Tools")


def test_amazon_split_holds_out_train_users_and_never_touches_dev(tools) -> None:
    dom = load_domain("Tools")
    train_ids = {u.user for u in tools.train}
    valid_ids = {u.user for u in tools.valid}
    assert len(tools.valid) == 877 and len(tools.train) + len(tools.valid) == len(dom.train)
    assert not train_ids & valid_ids
    _, val = split_train_val(dom.train, dom.popularity)  # the X-Cross validation users: the same ones
    assert valid_ids == {u.user for u in val}
    dev_ids = {u.user for u in dom.dev}
    assert [s.user for s in tools.test] == [u.user for u in dom.dev]
    assert not dev_ids & (train_ids | valid_ids)
    # ids shifted by one (0 = padding), one domain, every item its own day
    assert tools.catalog.n_items == len(dom.catalog) == 5820 and tools.catalog.domains == ["Tools"]
    first = tools.test[0]
    assert first.items.tolist() == [i + 1 for i in dom.dev[0].items]
    assert first.doms.tolist() == [0] * len(first.items) and first.ts.tolist() == list(range(len(first.items)))
    assert (tools.train_cut, tools.valid_cut, tools.test_cut) == (0, 0, 0)
    assert held_out_users(len(dom.train)).tolist() == sorted(int(u.user) for u in val)  # users are their index


def test_training_targets_are_every_transition_of_train_users_only(tools) -> None:
    seqs = tools.train[:5]
    b = make_batch(seqs, 50, cut=tools.train_cut)
    for row, s in enumerate(seqs):
        n = len(s.items)
        assert b.items[row, :n - 1].tolist() == s.items[:-1].tolist()
        assert b.targets[row, :n - 1].tolist() == s.items[1:].tolist()  # the last item is a training target
    v = make_batch(tools.valid[:3], 50, cut=tools.valid_cut, only_last=True)
    for row, s in enumerate(tools.valid[:3]):
        assert v.targets[row].max().item() == s.items[-1] and int(v.targets[row].gt(0).sum()) == 1


def test_smoke_limit_applies_to_every_file() -> None:
    sp = load_splits("amazon-Tools", limit=200)
    assert len(sp.train) + len(sp.valid) == 200 and len(sp.valid) == 20 and len(sp.test) == 200


@pytest.fixture(scope="module")
def amazon_smoke(tmp_path_factory) -> Path:
    """amazon-Tools hstu trained with the smoke preset through the CLI, shipped to <root>/artifacts/recall."""
    root = tmp_path_factory.mktemp("amazon-recall")
    res = CliRunner().invoke(recall_cli, ["train", "--dataset", "amazon-Tools", "--variant", "hstu", "--preset",
                                          "smoke", "--quiet", "--ship", "--results", str(root / "results"),
                                          "--runs", str(root / "runs"), "--artifacts",
                                          str(root / "artifacts" / "recall")])
    assert res.exit_code == 0, res.output
    return root


def test_smoke_cli_writes_result_and_fp16_artifact(amazon_smoke) -> None:
    res = json.loads((amazon_smoke / "results" / "amazon-Tools-hstu-smoke.json").read_text())
    assert res["n_users"] == 200 and res["n_valid_users"] == 20 and res["n_train_users"] == 180
    assert res["domains"] == ["Tools"] and 1 <= res["best_epoch"] <= 2
    ranks = np.asarray(res["per_user"]["rank_full"])
    assert ranks.min() >= 1 and ranks.max() <= 5820
    art = amazon_smoke / "artifacts" / "recall" / "amazon-Tools" / "hstu"
    assert {p.name for p in art.iterdir()} == {"model.safetensors", "manifest.json"}  # safetensors, no pickle
    _, manifest = load_checkpoint(art)
    assert manifest["dataset"] == "amazon-Tools" and manifest["valid"]["all"]["n_users"] == 20


@pytest.fixture(scope="module")
def id_recall(amazon_smoke) -> IdRecall:
    model, _ = load_checkpoint(amazon_smoke / "artifacts" / "recall" / "amazon-Tools" / "hstu")
    return IdRecall(model, "hstu")


def test_id_recall_excludes_history_and_follows_the_scores(id_recall) -> None:
    scores = id_recall.scores(HISTORY)
    assert scores.shape == (5820,)
    ids, s = id_recall.search(HISTORY, N)
    assert len(ids) == N and not set(ids.tolist()) & set(HISTORY)
    rest = np.delete(scores, HISTORY)
    assert s[0] == pytest.approx(rest.max()) and np.all(np.diff(s) <= 0)
    assert np.sort(rest)[::-1][N - 1] == pytest.approx(s[-1])
    # the query reads catalog id i as model id i + 1: the same as the model on the shifted batch
    from model.recall.train import batch_for_history

    b = batch_for_history([i + 1 for i in HISTORY], [0, 0, 0], None, 0, 50)
    with torch.no_grad():
        q = id_recall.model.queries(b)[0, 2]
        direct = id_recall.model.scores(q, torch.tensor([1, 18]))
    np.testing.assert_allclose(direct.numpy(), scores[[0, 17]], rtol=1e-5)


def test_rrf_fuses_by_reciprocal_rank_with_ties_by_id() -> None:
    ids, s = rrf([[5, 3, 9], [3, 7]], n=10)
    assert ids.tolist() == [3, 5, 7, 9]  # 3: both lists; 5 and 7 first in one (tie by id); 9 third in one
    assert s[0] == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert rrf([[1, 2], [2, 1]], n=1)[0].tolist() == [1]
    assert rrf([[], []], n=3)[0].tolist() == []


@pytest.fixture(scope="module")
def text_stage(tiny_bb, catalogs, tmp_path_factory):
    return build_text_recall(tiny_bb, catalogs, ["Tools"], "exact", tmp_path_factory.mktemp("recall-cache"))


def test_stages_by_mode(text_stage, amazon_smoke, catalogs, tmp_path) -> None:
    root = amazon_smoke / "artifacts" / "recall"
    assert build_recall_stages(text_stage, root, "text")["Tools"] is text_stage["Tools"]
    assert build_recall_stages(text_stage, tmp_path, "blend")["Tools"] is text_stage["Tools"]  # no checkpoint
    assert build_recall_stages(text_stage, root, "auto")["Tools"].name == "blend:text+hstu"
    id_only = build_recall_stages(text_stage, root, "id")["Tools"]
    history = [Resolved(catalogs["Tools"].titles[i], i) for i in HISTORY]
    got, name = id_only.pick(history, N)
    assert name == "id:hstu" and [c.id for c in got] == id_only.ids.search(HISTORY, N)[0].tolist()
    assert got[0].title == catalogs["Tools"].titles[got[0].id] and got[0].asin == catalogs["Tools"].asins[got[0].id]
    with pytest.raises(ValueError, match="recall mode"):
        build_recall_stages(text_stage, root, "both")


def test_blend_is_the_fusion_of_both_top_lists(text_stage, id_recall, catalogs) -> None:
    stage = IdStage(text_stage["Tools"], id_recall, "blend")
    history = [Resolved(catalogs["Tools"].titles[i], i) for i in HISTORY]
    got, name = stage.pick(history, N)
    text = [c.id for c in text_stage["Tools"].candidates(history, N)]
    ids = id_recall.search(HISTORY, N)[0].tolist()
    assert name == "blend:text+hstu" and [c.id for c in got] == rrf([text, ids], N)[0].tolist()
    assert len(got) == N and not {c.id for c in got} & set(HISTORY)


def test_raw_titles_feed_text_only(text_stage, id_recall, catalogs) -> None:
    stage = IdStage(text_stage["Tools"], id_recall, "id")
    raw = [Resolved("Stanley 16-Ounce Claw Hammer")]
    got, name = stage.pick(raw, N)
    assert name == text_stage["Tools"].name and [c.id for c in got] == [c.id for c in
                                                                          text_stage["Tools"].candidates(raw, N)]
    mixed = [raw[0], Resolved(catalogs["Tools"].titles[17], 17)]  # the id model reads the id'd item alone
    got, name = stage.pick(mixed, N)
    assert name == "id:hstu" and [c.id for c in got] == id_recall.search([17], N)[0].tolist()


def test_mismatched_checkpoint_is_skipped(text_stage, amazon_smoke, tmp_path) -> None:
    src = amazon_smoke / "artifacts" / "recall" / "amazon-Tools" / "hstu"
    dst = tmp_path / "amazon-Tools" / "hstu"
    dst.mkdir(parents=True)
    man = json.loads((src / "manifest.json").read_text())
    man["config"]["n_items"] = 100  # trained on another catalog: the tensors no longer fit either
    (dst / "manifest.json").write_text(json.dumps(man))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    assert build_recall_stages(text_stage, tmp_path, "blend")["Tools"] is text_stage["Tools"]


def test_recall_mode_setting() -> None:
    assert load_settings().recall_mode == "auto"
    assert load_settings(recall_mode="id").recall_mode == "id"
    with pytest.raises(SettingsError, match="XCROSS_RECALL_MODE"):
        load_settings(recall_mode="both")


@pytest.fixture(scope="module")
def client_id(tiny_bb, tiny_artifacts, catalogs, text_stage, amazon_smoke) -> Iterator[TestClient]:
    stages = build_recall_stages(text_stage, amazon_smoke / "artifacts" / "recall", "blend")
    engine = make_engine(tiny_bb, tiny_artifacts, catalogs, recall=stages, recall_n=N)
    with TestClient(create_app(app_settings(), engine=engine)) as c:
        wait_ready(c)
        yield c


def test_two_stage_recommend_with_an_id_checkpoint(client_id, text_stage, id_recall, catalogs) -> None:
    body = {"domain": "Tools", "history": [{"id": i} for i in HISTORY], "top_k": 5}
    resp = client_id.post("/recommend", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["recall"] == "blend:text+hstu" and len(out["items"]) == 5
    assert not {it["id"] for it in out["items"]} & set(HISTORY)
    history = [Resolved(catalogs["Tools"].titles[i], i) for i in HISTORY]
    fused = rrf([[c.id for c in text_stage["Tools"].candidates(history, N)],
                 id_recall.search(HISTORY, N)[0].tolist()], N)[0].tolist()
    assert [fused[it["position"]] for it in out["items"]] == [it["id"] for it in out["items"]]
    raw = client_id.post("/recommend", json={"domain": "Tools", "history": [{"title": "Claw Hammer"}], "top_k": 3})
    assert raw.status_code == 200 and raw.json()["recall"] == text_stage["Tools"].name
    assert client_id.get("/readyz").json()["recall"]["Tools"] == "blend:text+hstu"
