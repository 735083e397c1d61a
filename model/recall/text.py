"""Text recall (issue 20): candidate generation over a whole catalog from title embeddings, with no training.

An item is the L2-normalised mean-pooled last hidden state of the plain backbone over its title (the
sentence-transformers pooling all-MiniLM-L6-v2 was trained with; `training.evaluate.embedding_floor` scores the
zero-shot floor the same way). A history is the normalised mean of its items' embeddings; the recall is the top N
catalog items by cosine with it, the history's items excluded.

Search: `ExactIndex` (one matrix product over the catalog: 12k x 384 floats is ~4.6 M multiply-adds per query, well
under a millisecond) and `HnswIndex` (usearch's HNSW graph, for catalogs where a full product per request is too
slow; optional dependency `usearch`). Both return the same (ids, cosine) form with ids sorted by descending score
(ties by ascending id in the exact index). `agreement` measures an approximate index's recall against exact search.

Pure computation plus one small cache helper (`cached_embeddings`: .npy keyed by the titles' hash and the
backbone); model/ imports neither training/ nor service/.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

EMBED_MAX_TOKENS = 64  # as embedding_floor: titles are at most 8 words


def _bf16_weights(model: torch.nn.Module) -> bool:
    """True when the encoder's linear weights were cast to bf16 (the service's serve_bf16_ casts shared tensors)."""
    return any(p.dtype == torch.bfloat16 for p in model.parameters())


@torch.inference_mode()
def embed_titles(model: torch.nn.Module, tokenizer, titles: Sequence[str], batch_size: int = 256,
                 max_length: int = EMBED_MAX_TOKENS) -> np.ndarray:
    """(len(titles), d) float32, each row the L2-normalised mean pooling of the encoder over one title.

    Titles are sorted by length before batching (less padding; the result is in the input order). Runs under bf16
    autocast only when the weights are already bf16 (then fp32 inputs could not meet them otherwise)."""
    if not titles:
        d = int(getattr(getattr(model, "config", None), "hidden_size", 0))
        return np.zeros((0, d), dtype=np.float32)
    device = next(model.parameters()).device
    order = sorted(range(len(titles)), key=lambda i: len(titles[i]))
    out = [None] * len(titles)
    bf16 = _bf16_weights(model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([titles[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h.float() * m).sum(1) / m.sum(1), dim=-1).cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = e[row]
    return np.stack(out).astype(np.float32)


def history_query(item_embeddings: np.ndarray) -> np.ndarray:
    """The normalised mean of a history's (normalised) item embeddings: (h, d) -> (d,)."""
    if len(item_embeddings) == 0:
        raise ValueError("an empty history has no query embedding")
    q = np.asarray(item_embeddings, dtype=np.float32).mean(0)
    norm = float(np.linalg.norm(q))
    return q / norm if norm > 0 else q


def catalog_key(titles: Iterable[str], backbone: str, max_length: int = EMBED_MAX_TOKENS) -> str:
    """sha256 over the backbone id, the token cap and every title (in id order): the embedding cache key."""
    h = hashlib.sha256(f"{backbone}\0{max_length}\0".encode())
    for t in titles:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def cached_embeddings(cache_dir: Path | None, name: str, key: str,
                      compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """(embeddings, from_cache): `<cache_dir>/<name>-<key[:16]>.npy` when present and readable, else computed and
    written there (atomically: a temp file renamed). `cache_dir` None: always computed."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"{name}-{key[:16]}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False).astype(np.float32, copy=False), True
        except (OSError, ValueError) as exc:
            log.warning("embedding cache %s unreadable (%s); recomputing", path, exc)
    emb = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")  # replicas may race
        np.save(tmp, emb, allow_pickle=False)
        tmp.replace(path)
    except OSError as exc:  # a read-only cache directory costs load time, never the service
        log.warning("embedding cache %s not written: %s", path, exc)
    return emb, False


def _exclusion(n: int, exclude: Iterable[int]) -> np.ndarray:
    ex = np.fromiter((int(i) for i in exclude), dtype=np.int64)
    return ex[(ex >= 0) & (ex < n)]


def top_k(scores: np.ndarray, k: int, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the best k entries of a full score vector not in `exclude`, by descending score, ties by
    ascending id. `scores` is not modified."""
    s = np.array(scores, dtype=np.float32)
    s[_exclusion(len(s), exclude)] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    kth = s[top].min()
    tied = np.flatnonzero(s >= kth)  # every item tied with the k-th, so ties resolve by id, not by partition
    order = np.lexsort((tied, -s[tied]))[:k]
    ids = tied[order]
    return ids.astype(np.int64), s[ids].astype(np.float32)


class ExactIndex:
    """Exact cosine search by one matrix product (rows of `embeddings` are normalised)."""

    kind = "exact"

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.embeddings)

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Cosine of every catalog item with the (normalised) query: (n,)."""
        return self.embeddings @ np.asarray(query, dtype=np.float32)

    def search(self, query: np.ndarray, k: int, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the best k items not in `exclude`, by descending score, ties by ascending id."""
        return top_k(self.scores(query), k, exclude)


class HnswIndex:
    """Approximate cosine search in a usearch HNSW graph (M = `connectivity`, efConstruction = `expansion_add`,
    ef = `expansion_search`). Asks for k + |exclude| neighbours (doubling while too few survive the exclusion)
    and reports exact cosines of the ids it returns, so its scores compare with `ExactIndex`'s."""

    kind = "hnsw"

    def __init__(self, embeddings: np.ndarray, connectivity: int = 16, expansion_add: int = 128,
                 expansion_search: int = 256, threads: int = 1, seed: int = 0):
        from usearch.index import Index  # optional dependency: pip install usearch

        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.threads = threads
        self.index = Index(ndim=self.embeddings.shape[1], metric="cos", dtype="f32", connectivity=connectivity,
                           expansion_add=expansion_add, expansion_search=expansion_search)
        if len(self.embeddings):
            self.index.add(np.arange(len(self.embeddings), dtype=np.uint64), self.embeddings, threads=threads)

    def __len__(self) -> int:
        return len(self.embeddings)

    def search(self, query: np.ndarray, k: int, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        excluded = set(_exclusion(len(self), exclude).tolist())
        k = min(k, len(self) - len(excluded))
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        want = k + len(excluded)
        q = np.asarray(query, dtype=np.float32)
        while True:
            found = self.index.search(q, min(want, len(self)), threads=self.threads)
            ids = np.asarray(found.keys, dtype=np.int64).reshape(-1)
            ids = np.array([i for i in ids if i not in excluded], dtype=np.int64)
            if len(ids) >= k or want >= len(self):
                break
            want *= 2
        scores = self.embeddings[ids] @ q
        order = np.lexsort((ids, -scores))[:k]
        return ids[order], scores[order].astype(np.float32)


INDEXES = {"exact": ExactIndex, "hnsw": HnswIndex}


def build_index(embeddings: np.ndarray, kind: str = "exact", **options) -> ExactIndex | HnswIndex:
    if kind not in INDEXES:
        raise ValueError(f"index {kind!r}: use one of {', '.join(INDEXES)}")
    return INDEXES[kind](embeddings, **options)


def agreement(approx: Sequence[int], exact: Sequence[int]) -> float:
    """Recall of an approximate top-k against the exact top-k: |approx ∩ exact| / |exact|."""
    return len(set(map(int, approx)) & set(map(int, exact))) / max(1, len(exact))


class TextRecall:
    """One catalog's text recall: item embeddings and a search index over them."""

    def __init__(self, embeddings: np.ndarray, index: str = "exact", **options):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.index = build_index(self.embeddings, index, **options)

    @property
    def kind(self) -> str:
        return self.index.kind

    def __len__(self) -> int:
        return len(self.embeddings)

    def query(self, history_ids: Sequence[int], extra: np.ndarray | None = None) -> np.ndarray:
        """The history's query: catalog items by id, plus `extra` embeddings (raw titles), (d,)."""
        parts = [self.embeddings[np.asarray(history_ids, dtype=np.int64)]] if len(history_ids) else []
        if extra is not None and len(extra):
            parts.append(np.asarray(extra, dtype=np.float32))
        if not parts:
            raise ValueError("an empty history has no query embedding")
        return history_query(np.concatenate(parts))

    def recall(self, history_ids: Sequence[int], n: int, extra: np.ndarray | None = None,
               exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosines) of the top n items, the history's ids (and `exclude`) left out."""
        q = self.query(history_ids, extra)
        return self.index.search(q, n, exclude=[*history_ids, *exclude])
