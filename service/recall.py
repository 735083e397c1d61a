"""`POST /recall`: the top-k items of one domain for a mixed-domain history, from a trained recall model (issue 9).

```json
{"dataset": "food-kitchen", "history": [{"id": 821}, {"id": 12016}], "domain": "kitchen", "top_k": 10}
-> {"dataset": "food-kitchen", "domain": "kitchen", "model": "recall:food-kitchen/ddsr@<sha12>",
    "items": [{"id": 19359, "asin": "...", "title": "...", "score": 3.1, "rank": 1}, ...]}
```

Models: `artifacts/recall/<dataset>/<variant>/` (`model.safetensors` + `manifest.json`, written by
`python -m training recall train --ship`); one per dataset is served (with several, the best validation NDCG@10
in the manifests). Catalogs (domains, ASINs, titles) come from `<data>/amazon-<dataset>/items.jsonl`, where `<data>` is
the parent of XCROSS_DATA_DIR when set, else `../shared/data`. History items carry no dates: each is its own day
(TAPE/DDSR see every item as its own step); the oldest beyond the model's 50 positions are dropped; the history's
own items are never recommended. Errors: 422 naming the field (unknown dataset, domain or item id, limits), as
`/recommend`. A dataset without a model is an unknown dataset (the message lists those served).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Histogram, Info
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from model.recall.data import DATASETS, DEFAULT_DATA, Catalog, dataset_dir, load_catalog
from model.recall.model import RecallModel
from model.recall.train import batch_for_history, load_checkpoint, selection_score
from service.schemas import ErrorResponse, InputError, JsonInt, field_error

log = logging.getLogger("service")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RecallItem(BaseModel):
    """A history item by catalog id."""

    model_config = ConfigDict(extra="forbid")
    id: JsonInt = Field(ge=1, description="item id of the dataset's catalog (either domain)")


EXAMPLE = {"dataset": "food-kitchen", "history": [{"id": 821}, {"id": 12016}], "domain": "kitchen", "top_k": 10}


class RecallRequest(BaseModel):
    """A mixed-domain history (oldest first) and the domain to retrieve from."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]})
    dataset: StrictStr = Field(description="food-kitchen | beauty-electronics (those with a served model)")
    history: list[RecallItem] = Field(min_length=1, description="items of either domain, oldest first")
    domain: StrictStr = Field(description="the domain to retrieve from, e.g. kitchen")
    top_k: JsonInt = Field(10, ge=1, le=1000, description="how many items to return")


class RecalledItem(BaseModel):
    id: int
    asin: str | None
    title: str | None = Field(description="null where the catalog has no title")
    score: float = Field(description="cosine / temperature")
    rank: int = Field(description="1 = best")


class RecallResponse(BaseModel):
    dataset: str
    domain: str
    model: str = Field(description="recall:<dataset>/<variant>@<sha256[:12]>")
    items: list[RecalledItem]


@dataclass
class ServedRecall:
    dataset: str
    variant: str
    model: RecallModel
    catalog: Catalog
    asins: list[str | None]
    sha: str

    @property
    def name(self) -> str:
        return f"recall:{self.dataset}/{self.variant}@{self.sha[:12]}"

    def recall(self, items: list[int], domain: int, top_k: int) -> list[tuple[int, float]]:
        """(item id, score) of the best `top_k` items of `domain`, the history's items left out."""
        b = batch_for_history(items, [int(self.catalog.item_domain[i]) for i in items], None, domain,
                              self.model.cfg.max_len)
        ids = torch.from_numpy(self.catalog.domain_items(domain))
        with torch.inference_mode():
            q = self.model.queries(b)[0, int(b.valid.sum()) - 1]
            scores = self.model.scores(q, ids).masked_fill(torch.isin(ids, torch.tensor(items)), float("-inf"))
        k = min(top_k, int(torch.isfinite(scores).sum()))
        top = scores.topk(k)
        return [(int(ids[i]), float(s)) for s, i in zip(top.values, top.indices, strict=True)]


@dataclass
class RecallModels:
    """The served recall models by dataset (empty when none were trained)."""

    models: dict[str, ServedRecall] = field(default_factory=dict)

    @classmethod
    def load_cached(cls, root: Path, data_root: Path | None = None) -> RecallModels:
        """`load`, shared by apps of one process while the manifests are unchanged (the models are read-only)."""
        key = (root, data_root, tuple((p, p.stat().st_mtime_ns) for p in sorted(root.glob("*/*/manifest.json"))))
        if key not in _LOADED:
            _LOADED[key] = cls.load(root, data_root)
        return _LOADED[key]

    @classmethod
    def load(cls, root: Path, data_root: Path | None = None) -> RecallModels:
        """The mixed-domain datasets' checkpoints (`best_checkpoints`; the amazon-<Domain> ones serve the
        two-stage `/recommend`, service/text_recall.py). A missing catalog is logged and skipped."""
        out = {}
        for dataset, (variant, model, manifest) in best_checkpoints(root, DATASETS).items():
            try:
                path = dataset_dir(dataset, data_root)
            except (ValueError, FileNotFoundError) as exc:
                log.error("recall model %s/%s skipped: %s", dataset, variant, exc)
                continue
            catalog = load_catalog(path)
            if catalog.n_items != model.cfg.n_items or catalog.domains != manifest["domains"]:
                log.error("recall model %s/%s skipped: trained on %d items %s, the catalog at %s has %d %s",
                          dataset, variant, model.cfg.n_items, manifest["domains"], path, catalog.n_items,
                          catalog.domains)
                continue
            asins = _asins(path, catalog.n_items)
            out[dataset] = ServedRecall(dataset, variant, model, catalog, asins, manifest["sha256"])
            log.info("serving %s", out[dataset].name)
        return cls(out)


_LOADED: dict[tuple, RecallModels] = {}


def best_checkpoints(root: Path, datasets: Iterable[str]) -> dict[str, tuple[str, RecallModel, dict[str, Any]]]:
    """{dataset: (variant, model, manifest)} of the `<root>/<dataset>/<variant>/` checkpoints of `datasets`: the
    best per dataset by the validation metric its preset chose epochs by (NDCG@10, or Recall@200 for `amazon`;
    test metrics for manifests without validation metrics).

    A corrupt checkpoint is logged and skipped (the rest of the service still starts)."""
    found: dict[str, list[tuple[float, str, RecallModel, dict[str, Any]]]] = {}
    for dataset in sorted(set(datasets)):
        for man in sorted((root / dataset).glob("*/manifest.json")):
            try:
                model, manifest = load_checkpoint(man.parent)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("recall checkpoint %s skipped: %s", man.parent, exc)
                continue
            score = selection_score(manifest)
            found.setdefault(dataset, []).append((score, man.parent.name, model, manifest))
    out = {}
    for dataset, options in found.items():
        _, variant, model, manifest = max(options, key=lambda o: o[0])
        out[dataset] = (variant, model, manifest)
    return out


def _asins(path: Path, n: int) -> list[str | None]:
    import json

    asins: list[str | None] = [None] * (n + 1)
    for line in (path / "items.jsonl").open():
        r = json.loads(line)
        asins[r["id"]] = r.get("orig_id")
    return asins


def recall_data_root(data_dir: Path | None) -> Path:
    """Parent of XCROSS_DATA_DIR (the amazon-xcross folder) when set, else ../shared/data."""
    return data_dir.parent if data_dir is not None else DEFAULT_DATA


class RecallMetrics:
    """xcross_recall_duration_seconds{dataset,domain} (model time per request); xcross_recall_model_info."""

    def __init__(self, registry: CollectorRegistry):
        self.duration = Histogram("xcross_recall_duration_seconds", "Recall model time per request",
                                  ["dataset", "domain"], buckets=LATENCY_BUCKETS, registry=registry)
        self.info = Info("xcross_recall_model", "Served recall checkpoints", ["dataset"], registry=registry)

    def publish(self, served: RecallModels) -> None:
        for dataset, s in served.models.items():
            self.info.labels(dataset=dataset).info({"variant": s.variant, "sha": s.sha[:12]})


# --- request checks and the handler -----------------------------------------------------------------------------


def resolve(req: RecallRequest, served: RecallModels, max_history: int) -> tuple[ServedRecall, int]:
    """The served model and domain id; raises InputError naming every bad field."""
    s = served.models.get(req.dataset)
    if s is None:
        have = ", ".join(sorted(served.models)) or "none (train one: python -m training recall train --ship)"
        known = ", ".join(DATASETS)
        raise InputError([field_error(["body", "dataset"], f"no recall model for {req.dataset!r}; served: {have} "
                                                           f"(datasets: {known})", "unknown_dataset")])
    errors = []
    if req.domain not in s.catalog.domains:
        errors.append(field_error(["body", "domain"], f"unknown domain {req.domain!r} in {req.dataset}; known: "
                                                      f"{', '.join(s.catalog.domains)}", "unknown_domain"))
    if len(req.history) > max_history:
        errors.append(field_error(["body", "history"], f"has {len(req.history)} items, at most {max_history} are "
                                                       "allowed (XCROSS_MAX_HISTORY); send the most recent ones",
                                  "too_long"))
    for i, item in enumerate(req.history):
        if item.id > s.catalog.n_items:
            errors.append(field_error(["body", "history", i, "id"], f"unknown item id {item.id} in {req.dataset}; "
                                                                    f"valid ids are 1..{s.catalog.n_items}",
                                      "unknown_item"))
    if errors:
        raise InputError(errors)
    return s, s.catalog.domains.index(req.domain)


async def get_recall(request: Request) -> RecallModels:
    return request.app.state.recall


RecallDep = Annotated[RecallModels, Depends(get_recall)]
router = APIRouter()


@router.post("/recall", response_model=RecallResponse,
             responses={422: {"model": ErrorResponse, "description": "bad field, unknown dataset, domain or item"}})
async def recall(req: RecallRequest, served: RecallDep, request: Request) -> RecallResponse:
    """Retrieve the top-k items of one domain for a mixed-domain history."""
    s, domain = resolve(req, served, request.app.state.service.settings.max_history)
    t0 = time.perf_counter()
    top = await run_in_threadpool(s.recall, [it.id for it in req.history], domain, req.top_k)
    request.app.state.recall_metrics.duration.labels(req.dataset, req.domain).observe(time.perf_counter() - t0)
    items = [RecalledItem(id=i, asin=s.asins[i], title=s.catalog.titles[i], score=score, rank=r + 1)
             for r, (i, score) in enumerate(top)]
    return RecallResponse(dataset=req.dataset, domain=req.domain, model=s.name, items=items)
