"""The recall stage of `POST /recommend` without `candidates` (issue 20): text recall per served domain, and the
item-id recall / blend where the domain has an id checkpoint.

At load (`build_text_recall`, called by `service.loading.load_engine` before the models are cast to bf16), every
served catalog's titles are embedded with the plain backbone (mean pooling, `model.recall.text`) or read from
`XCROSS_RECALL_CACHE/<Domain>-<key>.npy` (key: sha256 of the backbone id + revision and every title), and put in
an index (`XCROSS_RECALL_INDEX`: exact = one matrix product; hnsw = usearch's HNSW graph). A request's history
(ids and asins from the catalog, raw titles embedded on the fly) gives one query; the top `XCROSS_RECALL_N` items
by cosine, history items excluded, become the candidates that the domain's model ranks.

Item-id recall (`build_recall_stages`, `XCROSS_RECALL_MODE`): where `<XCROSS_ARTIFACTS>/recall/amazon-<Domain>/`
holds a checkpoint for the served catalog (the best validation NDCG@10 of its variants), `IdStage` replaces the
text stage: `id` = the id model's top N; `blend` = reciprocal rank fusion of the text and id top N
(`model.recall.blend.rrf`). The id model reads only the history's catalog items (by id or asin), in order; a
history of raw titles only falls back to text recall, and the response's `recall` field names the stage used.
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
from model.recall.blend import IdRecall, rrf
from model.recall.data import AMAZON
from model.recall.text import TextRecall, cached_embeddings, catalog_key, embed_titles
from service.catalog import Catalogs, Resolved
from service.recall import best_checkpoints

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

    def pick(self, history: Sequence[Resolved], n: int) -> tuple[list[Resolved], str]:
        """The candidates and the name of the stage that chose them (the engine's call)."""
        return self.candidates(history, n), self.name

    def embed(self, titles: Sequence[str]) -> np.ndarray:
        """Embeddings of raw titles (the catalog's are precomputed), under the recall tokenizer's lock."""
        with self.lock:
            return embed_titles(self.backbone.model, self.tokenizer or self.backbone.tokenizer, titles)


MODES = ("auto", "text", "id", "blend")


@dataclass
class IdStage:
    """Item-id recall over one served catalog (`mode` id), or its blend with the domain's text recall (`blend`)."""

    text: DomainRecall
    ids: IdRecall
    mode: str  # id | blend

    @property
    def name(self) -> str:
        """id:<variant> or blend:text+<variant>."""
        return f"id:{self.ids.variant}" if self.mode == "id" else f"blend:text+{self.ids.variant}"

    def candidates(self, history: Sequence[Resolved], n: int) -> list[Resolved]:
        return self.pick(history, n)[0]

    def pick(self, history: Sequence[Resolved], n: int) -> tuple[list[Resolved], str]:
        """The top `n` items and the stage's name; text recall (and its name) for a history without catalog items."""
        known = [h.id for h in history if h.id is not None]
        if not known:
            return self.text.pick(history, n)
        top, _ = self.ids.search(known, n)
        if self.mode == "blend":
            text = [c.id for c in self.text.candidates(history, n)]
            top, _ = rrf([text, top.tolist()], n)
        return [Resolved(self.text.titles[i], int(i), self.text.asins[i]) for i in top.tolist()], self.name


def build_recall_stages(text: dict[str, DomainRecall], root: Path, mode: str = "auto"
                        ) -> dict[str, DomainRecall | IdStage]:
    """Per domain: the text stage, or an `IdStage` over `<root>/amazon-<Domain>/<variant>/` (`mode` id or blend;
    auto = blend) where that checkpoint exists and matches the catalog's size. `mode` text loads no id model."""
    if mode not in MODES:
        raise ValueError(f"recall mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "text":
        return dict(text)
    found = best_checkpoints(root, [f"amazon-{d}" for d in text if f"amazon-{d}" in AMAZON])
    out: dict[str, DomainRecall | IdStage] = dict(text)
    for domain, stage in text.items():
        if f"amazon-{domain}" not in found:
            log.log(logging.INFO if mode == "auto" else logging.WARNING, "recall mode %s: no id checkpoint under "
                    "%s/amazon-%s; %s serves text recall", mode, root, domain, domain)
            continue
        variant, model, _ = found[f"amazon-{domain}"]
        if model.cfg.n_items != len(stage.titles):
            log.error("id recall %s/%s skipped: trained on %d items, the served catalog has %d; text recall serves",
                      domain, variant, model.cfg.n_items, len(stage.titles))
            continue
        out[domain] = IdStage(stage, IdRecall(model, variant), "blend" if mode == "auto" else mode)
        log.info("recall %s: %s", domain, out[domain].name)
    return out


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

