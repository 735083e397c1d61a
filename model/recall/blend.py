"""Item-id recall over one Amazon catalog, and its blend with text recall by reciprocal rank fusion (issue 20).

`IdRecall` wraps a recall checkpoint trained on one amazon-xcross domain (`python -m training recall train
--dataset amazon-<Domain>`): the catalog's 0-based ids are the model's ids minus 1 (0 is the model's padding). A
history (catalog ids, oldest first, each its own day, the last `max_len` kept) gives one query; every catalog item
is scored by cosine / tau, and `search` returns the top k with the history's items left out, ties by ascending id
(`model.recall.text.top_k`, as the exact text index).

`rrf` fuses ranked lists (Cormack, Clarke and Buettcher, SIGIR 2009): an item's score is the sum over the lists
that hold it of 1 / (k + rank), rank 1-based, k = 60 (the paper's constant; not tuned here); the top n by fused
score, ties by ascending id. The blend fuses each stage's top n, so an item only one stage found gets that
stage's term alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from model.recall.model import RecallModel
from model.recall.text import top_k
from model.recall.train import batch_for_history

RRF_K = 60


class IdRecall:
    """A single-domain item-id recall model over a 0-based catalog of `n_items` items."""

    def __init__(self, model: RecallModel, variant: str):
        self.model, self.variant = model.eval(), variant
        self._ids = torch.arange(1, model.cfg.n_items + 1)  # model ids of catalog items 0..n-1

    @property
    def n_items(self) -> int:
        return self.model.cfg.n_items

    @torch.inference_mode()
    def scores(self, history: Sequence[int]) -> np.ndarray:
        """(n_items,) float32: the score of every catalog item for a history of catalog ids (oldest first)."""
        if not len(history):
            raise ValueError("an empty history has no id-recall query")
        items = [int(i) + 1 for i in history][-self.model.cfg.max_len:]
        b = batch_for_history(items, [0] * len(items), None, 0, self.model.cfg.max_len)
        q = self.model.queries(b)[0, int(b.valid.sum()) - 1]  # (d,)
        return self.model.scores(q, self._ids).float().numpy()

    def search(self, history: Sequence[int], k: int, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the best k catalog items, the history's items (and `exclude`) left out."""
        return top_k(self.scores(history), k, [*history, *exclude])


def rrf(lists: Sequence[Sequence[int]], n: int, k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """(ids, fused scores) of the top n items of ranked id lists by reciprocal rank fusion, ties by ascending id."""
    fused: dict[int, float] = {}
    for ranked in lists:
        for rank, item in enumerate(ranked, start=1):
            fused[int(item)] = fused.get(int(item), 0.0) + 1.0 / (k + rank)
    if not fused:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    ids = np.fromiter(fused, dtype=np.int64)
    scores = np.fromiter(fused.values(), dtype=np.float64)
    order = np.lexsort((ids, -scores))[:n]
    return ids[order], scores[order]
