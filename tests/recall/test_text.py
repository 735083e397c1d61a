"""Text recall (model/recall/text.py): exact top-N order and exclusion, HNSW agreement with exact search, the
history query, title embeddings (mean pooling) and the embedding cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.recall.text import (
    ExactIndex,
    HnswIndex,
    TextRecall,
    agreement,
    cached_embeddings,
    catalog_key,
    embed_titles,
    history_query,
)
from tests.tiny import tiny_backbone


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top_n_order_and_exclusion():
    emb = unit_rows(300, 16)
    q = history_query(emb[[3, 7]])
    ids, scores = ExactIndex(emb).search(q, 20, exclude=[3, 7])
    assert len(ids) == 20 and 3 not in ids and 7 not in ids
    assert np.all(np.diff(scores) <= 0)  # best first
    brute = emb @ q
    brute[[3, 7]] = -np.inf
    assert ids.tolist() == np.argsort(-brute, kind="stable")[:20].tolist()
    np.testing.assert_allclose(scores, brute[ids], rtol=1e-6)


def test_exact_ties_by_id_and_small_catalogs():
    emb = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [-1, 0]], dtype=np.float32)
    idx = ExactIndex(emb)
    ids, _ = idx.search(np.array([1, 0], dtype=np.float32), 2)
    assert ids.tolist() == [0, 2]  # three tied at 1.0: the lowest ids, in order
    ids, _ = idx.search(np.array([1, 0], dtype=np.float32), 10, exclude=[0, 2])
    assert ids.tolist() == [3, 1, 4]  # k larger than what is left: everything not excluded
    assert len(idx.search(np.array([1, 0], dtype=np.float32), 3, exclude=range(5))[0]) == 0


def test_hnsw_agrees_with_exact_on_a_small_catalog():
    pytest.importorskip("usearch")
    emb = unit_rows(2000, 32, seed=1)
    exact, approx = ExactIndex(emb), HnswIndex(emb)
    rates = []
    for u in range(40):
        history = [u, u + 100, u + 200]
        q = history_query(emb[history])
        a_ids, a_scores = approx.search(q, 50, exclude=history)
        e_ids, _ = exact.search(q, 50, exclude=history)
        assert len(a_ids) == 50 and not set(history) & set(a_ids.tolist())
        assert np.all(np.diff(a_scores) <= 0)
        np.testing.assert_allclose(a_scores, emb[a_ids] @ q, rtol=1e-5)  # exact cosines of what it found
        rates.append(agreement(a_ids, e_ids))
    assert np.mean(rates) >= 0.95, np.mean(rates)


def test_hnsw_exclusion_larger_than_k():
    pytest.importorskip("usearch")
    emb = unit_rows(200, 8, seed=2)
    q = emb[0]
    nearest = ExactIndex(emb).search(q, 30)[0].tolist()
    ids, _ = HnswIndex(emb).search(q, 5, exclude=nearest)  # the 30 nearest excluded: must look further
    assert len(ids) == 5 and not set(ids.tolist()) & set(nearest)


def test_text_recall_query_and_exclusion():
    emb = unit_rows(100, 8, seed=3)
    tr = TextRecall(emb)
    extra = unit_rows(1, 8, seed=4)
    q = tr.query([1, 2], extra)
    want = (emb[1] + emb[2] + extra[0]) / 3
    np.testing.assert_allclose(q, want / np.linalg.norm(want), rtol=1e-5)
    ids, _ = tr.recall([1, 2], 98)
    assert sorted(ids.tolist()) == [i for i in range(100) if i not in (1, 2)]
    with pytest.raises(ValueError, match="empty history"):
        tr.query([])


def test_embed_titles_mean_pooling_matches_one_by_one():
    bb = tiny_backbone("bert")
    titles = ["Stanley 16-Ounce Claw Hammer", "drill", "a much longer title with many words in it"]
    batched = embed_titles(bb.model, bb.tokenizer, titles, batch_size=2)
    assert batched.shape == (3, bb.hidden_size) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    for i, t in enumerate(titles):  # padding and length-sorting change nothing
        enc = bb.tokenizer([t], return_tensors="pt")
        with torch.inference_mode():
            h = bb.model(**enc).last_hidden_state.mean(1)
        np.testing.assert_allclose(batched[i], torch.nn.functional.normalize(h, dim=-1)[0].numpy(), atol=1e-5)


def test_embedding_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return unit_rows(10, 4)

    key = catalog_key(["a", "b"], "minilm@1")
    assert key != catalog_key(["a", "c"], "minilm@1") and key != catalog_key(["a", "b"], "minilm@2")
    first, hit1 = cached_embeddings(tmp_path, "Tools", key, compute)
    again, hit2 = cached_embeddings(tmp_path, "Tools", key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(first, again)
    (tmp_path / f"Tools-{key[:16]}.npy").write_bytes(b"garbage")
    _, hit3 = cached_embeddings(tmp_path, "Tools", key, compute)  # unreadable: recomputed, not fatal
    assert not hit3 and len(calls) == 2
