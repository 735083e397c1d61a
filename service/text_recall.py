"""The recall stage of `POST /recommend` without `candidates` (issue 20): text recall per served domain.

At load (`build_text_recall`, called by `service.loading.load_engine` before the models are cast to bf16), every
served catalog's titles are embedded with the plain backbone (mean pooling, `model.recall.text`) or read from
`XCROSS_RECALL_CACHE/<Domain>-<key>.npy` (key: sha256 of the backbone id + revision and every title), and put in
an index (`XCROSS_RECALL_INDEX`: exact = one matrix product; hnsw = usearch's HNSW graph). A request's history
(ids and asins from the catalog, raw titles embedded on the fly) gives one query; the top `XCROSS_RECALL_N` items
by cosine, history items excluded, become the candidates that the domain's model ranks.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.backbone import Backbone
from model.recall.text import TextRecall, cached_embeddings, catalog_key, embed_titles
from service.catalog import Catalogs, Resolved

log = logging.getLogger("service")


@dataclass
class DomainRecall:
    """Text recall over one served catalog."""

    domain: str
    backbone: Backbone
    recall: TextRecall
    titles: list[str]
    asins: list[str]
    tokenizer: Any = None  # a copy of the backbone's: a fast tokenizer must not run in two threads at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        """What the response's `recall` field says: text:<backbone>/<index>."""
        return f"text:{self.backbone.name}/{self.recall.kind}"

    def candidates(self, history: Sequence[Resolved], n: int) -> list[Resolved]:
        """The top `n` catalog items for a history (raw titles embedded now), the history's items left out."""
        ids = [h.id for h in history if h.id is not None]
        raw = [h.title for h in history if h.id is None]
        extra = self.embed(raw) if raw else None
        top, _ = self.recall.recall(ids, n, extra=extra)
        return [Resolved(self.titles[i], int(i), self.asins[i]) for i in top.tolist()]

    def embed(self, titles: Sequence[str]) -> np.ndarray:
        """Embeddings of raw titles (the catalog's are precomputed), under the recall tokenizer's lock."""
        with self.lock:
            return embed_titles(self.backbone.model, self.tokenizer or self.backbone.tokenizer, titles)


def build_text_recall(backbone: Backbone, catalogs: Catalogs, domains: Iterable[str], index: str = "exact",
                      cache_dir: Path | None = None) -> dict[str, DomainRecall]:
    """One `DomainRecall` per domain; embeddings from the cache when it holds them (logged either way)."""
    out = {}
    tokenizer, lock = copy.deepcopy(backbone.tokenizer), threading.Lock()  # shared by the domains, not the cache
    for domain in sorted(set(domains)):
        catalog = catalogs[domain]
        key = catalog_key(catalog.titles, f"{backbone.name}@{backbone.revision}")
        t0 = time.perf_counter()
        emb, hit = cached_embeddings(cache_dir, domain, key,
                                     lambda c=catalog: embed_titles(backbone.model, backbone.tokenizer, c.titles))
        out[domain] = DomainRecall(domain, backbone, TextRecall(emb, index), catalog.titles, catalog.asins,
                                   tokenizer, lock)
        log.info("text recall %s: %d items, %s embeddings in %.1f s, %s index", domain, len(emb),
                 "cached" if hit else "computed", time.perf_counter() - t0, index)
    return out

