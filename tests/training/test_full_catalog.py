"""training/full_catalog.py: whole-catalog ranks (ties against the target, history excluded), reranked ranks with
misses, the metrics, paired tests and the report section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.full_catalog import (
    full_catalog,
    full_rank,
    markdown_section,
    ndcg10,
    paired,
    rank_in,
    served_variant,
    summarize,
)
from training.pipeline import Context, Paths
from training.presets import get_preset


def test_full_rank_excludes_history_and_counts_ties_against_the_target():
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.95])
    assert full_rank(scores, target=1, exclude=[]) == 4  # 0.95, 0.9 and the tied 0.5 count
    assert full_rank(scores, target=1, exclude=[4, 0]) == 2
    assert full_rank(scores, target=3, exclude=[0]) == 4


def test_rank_in_recalled_candidates():
    assert rank_in([5, 7, 9], [0.1, 0.3, 0.2], target=9) == 2
    assert rank_in([5, 7, 9], [0.1, 0.3, 0.2], target=4) is None  # not recalled: a miss
    assert rank_in([5, 7], [1.0, 1.0], target=7) == 2


def test_summarize_and_paired():
    ranks = [1, 3, 60, 150, None]
    m = summarize(ranks)
    assert m["recall@50"] == pytest.approx(40) and m["recall@100"] == pytest.approx(60)
    assert m["recall@200"] == pytest.approx(80) and m["hit@10"] == pytest.approx(40)
    assert m["ndcg@10"] == pytest.approx(100 * (1 + 1 / math.log2(4)) / 5)
    assert ndcg10(None) == 0.0 and ndcg10(11) == 0.0
    t = paired([1, 2, None, 5], [None, 2, None, 20])
    assert t["hit@10"]["diff"] == pytest.approx(50) and 0 < t["hit@10"]["p_value"] <= 1
    assert paired([1, 2], [1, 2])["ndcg@10"]["p_value"] == 1.0


def test_markdown_section(tmp_path):
    row = {"recall@50": 10.0, "recall@100": 20.0, "recall@200": 30.0, "hit@10": 5.0, "ndcg@10": 2.5, "n_users": 4}
    test = {m: {"diff": 1.0, "p_value": 0.5} for m in ("hit@10", "ndcg@10")}
    result = {"domain": "Tools", "users": 4, "catalog_items": 5820, "preset": "cpu", "commit": "abc",
              "command": "python -m training full-catalog --domain Tools", "torch_threads": 1,
              "metrics": {"text": row, "text+xcross": row}, "paired_ttests": {"text+xcross vs text": test},
              "ann": {"library": "usearch", "index": "HNSW", "agreement_with_exact": {"top50": 99.0, "top100": 98.5,
                                                                                     "top200": 98.0},
                      "query_ms": 0.5, "exact_query_ms": 0.7, "build_s": 1.0},
              "rerankers": {"xcross": {"sha": "0123456789ab", "rerank_s": 10.0}}}
    (tmp_path / "full_catalog-Tools.json").write_text(json.dumps(result))
    md = markdown_section(tmp_path)
    assert "### Tools (4 dev users, 5820 items)" in md
    assert "| text top-200 + X-Cross rerank | 10.00 | 20.00 | 30.00 | 5.00 | 2.50 |" in md
    assert "| text+xcross vs text | +1.00 | 0.5 | +1.00 | 0.5 | n/a | n/a |" in md
    assert "99.00 / 98.50 / 98.00%" in md


def test_markdown_renders_id_and_blend_rows_and_the_rerank_file(tmp_path):
    row = {"recall@50": 10.0, "recall@100": 20.0, "recall@200": 30.0, "hit@10": 5.0, "ndcg@10": 2.5, "n_users": 4}
    test = {m: {"diff": 1.0, "p_value": 0.5} for m in ("hit@10", "ndcg@10", "recall@200")}
    ann = {"library": "usearch", "index": "HNSW", "agreement_with_exact": {"top50": 99.0, "top100": 98.5,
                                                                          "top200": 98.0},
           "query_ms": 0.5, "exact_query_ms": 0.7, "build_s": 1.0}
    base = {"domain": "Tools", "catalog_items": 5820, "preset": "cpu", "commit": "abc", "torch_threads": 1, "ann": ann}
    stages = {**base, "users": 1097, "command": "python -m training full-catalog --domain Tools --users 0",
              "metrics": {"text": row, "popularity": row, "id:hstu": row, "blend:text+hstu": row},
              "paired_ttests": {"id:hstu vs text": test}, "rerankers": {},
              "id_models": {"hstu": {"sha": "0123456789ab", "preset": "amazon", "best_epoch": 6,
                                     "valid_ndcg@10": 0.7}}}
    rerank = {**base, "users": 150, "command": "python -m training full-catalog --domain Tools --users 150",
              "metrics": {"text": row, "text+xcross": row}, "paired_ttests": {}, "rerank_n": 200,
              "rerankers": {"xcross": {"sha": "0123456789ab", "rerank_s": 10.0}}}
    (tmp_path / "full_catalog-Tools.json").write_text(json.dumps(stages))
    (tmp_path / "full_catalog_rerank-Tools.json").write_text(json.dumps(rerank))
    md = markdown_section(tmp_path)
    assert "### Tools (1097 dev users, 5820 items)" in md
    assert "### Tools, text top 200 reranked (150 dev users, 5820 items)" in md
    assert md.index("### Tools (1097") < md.index("### Tools, text top 200 reranked")
    lines = md.splitlines()
    labels = [ln.split(" | ")[0] for ln in lines[lines.index("### Tools (1097 dev users, 5820 items)"):]
              if ln.startswith("| ") and "R@50" not in ln][:4]
    assert labels == ["| popularity (recall alone)", "| text recall, exact (alone)",
                      "| item-id recall, hstu (alone)", "| blend: text + hstu (RRF of the two top 200)"]
    assert "| id:hstu vs text | +1.00 | 0.5 | +1.00 | 0.5 | +1.00 | 0.5 |" in md
    assert "Item-id models: hstu 0123456789ab (amazon, epoch 6" in md


def test_blend_rerank_file_renders_its_stage(tmp_path):
    row = {"recall@50": 10.0, "recall@100": 20.0, "recall@200": 30.0, "hit@10": 5.0, "ndcg@10": 2.5, "n_users": 4}
    ann = {"library": "usearch", "index": "HNSW", "agreement_with_exact": {"top50": 99.0, "top100": 98.5,
                                                                          "top200": 98.0},
           "query_ms": 0.5, "exact_query_ms": 0.7, "build_s": 1.0}
    r = {"domain": "Toys", "catalog_items": 10457, "preset": "cpu", "commit": "abc", "torch_threads": 1, "ann": ann,
         "users": 100, "command": "python -m training full-catalog --domain Toys --rerank-recall blend",
         "rerank_n": 100, "rerank_recall": "blend:text+sasrec", "paired_ttests": {},
         "metrics": {"text": row, "blend:text+sasrec": row, "blend:text+sasrec+lora": row,
                     "blend:text+sasrec+xcross": row},
         "rerankers": {"xcross": {"sha": "0123456789ab", "rerank_s": 10.0}}}
    (tmp_path / "full_catalog_rerank_blend-Toys.json").write_text(json.dumps(r))
    md = markdown_section(tmp_path)
    assert "### Toys, blend:text+sasrec top 100 reranked (100 dev users, 10457 items)" in md
    labels = [ln.split(" | ")[0] for ln in md.splitlines() if ln.startswith("| ") and "R@50" not in ln][:4]
    assert labels == ["| text recall, exact (alone)", "| blend: text + sasrec (RRF of the two top 200)",
                      "| blend: text + sasrec (RRF of the two top 200): its top 100 + own-domain LoRA rerank",
                      "| blend: text + sasrec (RRF of the two top 200): its top 100 + X-Cross rerank"]


def test_served_variant_follows_the_validation_metric_of_its_preset():
    ids = {"hstu": (None, {"preset": "amazon", "valid": {"all": {"recall@200_full": 12.0, "ndcg@10_full": 0.9}}}),
           "sasrec": (None, {"preset": "amazon", "valid": {"all": {"recall@200_full": 13.0, "ndcg@10_full": 0.5}}})}
    assert served_variant(ids) == "sasrec"  # amazon selects on Recall@200, not NDCG@10
    assert served_variant({}) is None


def test_blend_rerank_needs_an_id_checkpoint(tmp_path):
    ctx = Context(get_preset("smoke"), Paths(artifacts=tmp_path / "artifacts", results=tmp_path / "results",
                                             runs=tmp_path / "runs"), progress=False)
    with pytest.raises(ValueError, match="needs an item-id checkpoint under .*recall/amazon-Tools"):
        full_catalog(ctx, "Tools", 2, rerankers=("xcross",), rerank_recall="blend")
    with pytest.raises(ValueError, match="use 'text' or 'blend'"):
        full_catalog(ctx, "Tools", 2, rerank_recall="id")
