"""The inference engine, in three steps (as infinity's encode_pre / encode_core / encode_post):

  preprocess(request)        catalog lookup, cached title tokenization, prompt assembly -> `Prepared` (CPU, I/O:
                             the token cache may ask Redis; runs in a worker thread)
  forward(key, prompts)      ONE padded batch through one served model under `torch.inference_mode`, bf16
                             autocast when the precision says so -> one fp32 score per prompt (the batcher calls it
                             from its single forward thread)
  postprocess(prepared, s)   rank by score, ties by input position, top-k -> `RecommendResponse`

Models are keyed `<Domain>` (the domain's default) or `<Domain>:<kind>` (the others: service.loading); a request's
optional `model` field (a kind) picks one, and forwards, batches and runtimes go by that key.
`recommend(request)` chains the three without a batcher (forwards of `batch_prompts`): the direct model call that
tests and the load test compare the service against. No FastAPI here; loading from settings is `service.loading`.

Extension point for other runtimes: a `Runtime` scores one padded batch for a domain; `TorchRuntime` is the one
here, `service.runtimes.OnnxRuntime` (ONNX Runtime, fp32 or int8) implements the same call and `describe()`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.backbone import Backbone
from model.inference import serving_autocast
from model.prompts import PromptBuilder, encode_pieces
from service.cache import TokenCache
from service.catalog import Catalogs, Resolved
from service.schemas import InputError, Item, RankedItem, RecommendRequest, RecommendResponse, field_error
from service.text_recall import DomainRecall, IdStage


@dataclass(frozen=True)
class ServedModel:
    """A loaded checkpoint serving one target domain."""

    domain: str
    kind: str  # manifest kind: "xcross", "weaverec", "gca" or "lora"
    sha: str  # manifest content_hash
    model: torch.nn.Module  # an XCross, in its inference form (model.inference.optimize_for_inference)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.domain}@{self.sha[:12]}"


@dataclass
class Prepared:
    """A preprocessed request: its candidates (for the response) and one prompt (token ids) per candidate."""

    domain: str
    candidates: list[Resolved]
    prompts: list[list[int]]
    top_k: int
    key: str = ""  # the served model's key (batcher and runtime route by it); default: the domain's default model
    recall: str | None = None  # the recall stage that chose the candidates (a request without candidates)

    def __post_init__(self) -> None:
        self.key = self.key or self.domain


class Runtime(Protocol):
    """Scores one padded batch of prompts with a domain's model: (B, T) ids and mask -> (B,) fp32 on the CPU."""

    def __call__(self, domain: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, str]: ...


class TorchRuntime:
    """The PyTorch models on one device; with `precision == "bf16"` the models `serve_bf16_` prepared (packed
    streamwise forms: bf16 activations, no autocast; others: bf16 autocast). Head and scores stay fp32."""

    def __init__(self, models: Mapping[str, torch.nn.Module], device: str = "cpu", precision: str = "fp32",
                 backend: str | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: use fp32 or bf16")
        self.models, self.device, self.precision = dict(models), torch.device(device), precision
        self.backend = backend or ("torch-bf16" if precision == "bf16" else "torch")

    def __call__(self, domain: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.models[domain]
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.inference_mode(), serving_autocast(model, self.device.type, self.precision == "bf16"):
            return model(ids, mask).float().cpu()  # (B,)

    def describe(self) -> dict[str, str]:
        return {"runtime": "torch", "backend": self.backend, "device": str(self.device), "precision": self.precision}


def locked_encoder(tokenizer: Any) -> Callable[[Sequence[str]], list[list[int]]]:
    """`encode_pieces` behind a lock: a fast tokenizer's Rust state must not be used by two threads at once."""
    lock = threading.Lock()

    def encode(titles: Sequence[str]) -> list[list[int]]:
        with lock:
            return encode_pieces(tokenizer, titles)

    return encode


class Engine:
    """Preprocess -> forward -> postprocess for the served domains."""

    def __init__(
        self,
        backbone: Backbone,
        models: Mapping[str, ServedModel],
        catalogs: Catalogs,
        cache: TokenCache,
        *,
        runtime: Runtime | None = None,  # default: TorchRuntime on the CPU in fp32
        max_len: int = 256,  # prompt tokens; the oldest history items are dropped beyond it
        max_history: int = 50,  # history items kept (the most recent)
        batch_prompts: int = 30,  # prompts per forward on the direct path (`score`, `recommend`)
        recall: Mapping[str, DomainRecall | IdStage] | None = None,  # per domain: candidates for requests without
        recall_n: int = 200,  # how many candidates the recall stage picks
    ):
        missing = sorted({m.domain for m in models.values()} - set(catalogs.domains))
        if missing:
            raise ValueError(f"no catalog for served domains {missing}")
        self.backbone, self.models, self.catalogs, self.cache = backbone, dict(models), catalogs, cache
        self.runtime = runtime or TorchRuntime({d: m.model for d, m in models.items()})
        self.builder = PromptBuilder(backbone.tokenizer, max_len=max_len, max_history=max_history)
        self.batch_prompts = batch_prompts
        self.recall, self.recall_n = dict(recall or {}), recall_n

    @property
    def domains(self) -> list[str]:
        return sorted({m.domain for m in self.models.values()})

    def kinds(self, domain: str) -> dict[str, str]:
        """The kinds served for a domain -> their model keys."""
        return {m.kind: key for key, m in sorted(self.models.items()) if m.domain == domain}

    def describe(self) -> dict[str, Any]:
        """What /readyz and the model-info metric show."""
        return {"backbone": self.backbone.name, **self.runtime.describe(),
                "models": {d: m.name for d, m in sorted(self.models.items())},
                "recall": {d: r.name for d, r in sorted(self.recall.items()) if self.recall_n > 0}}

    # --- the three steps ------------------------------------------------------------------------------

    def preprocess(self, req: RecommendRequest) -> Prepared:
        """Resolve items, tokenize titles through the cache (one call per request), build one prompt per candidate."""
        domain = self._served(req.domain)
        key = self._model(domain, req.model)
        errors: list[dict[str, Any]] = []
        history = self.catalogs.resolve(domain, req.history, "history", errors)
        given = req.candidates is not None
        candidates = self.catalogs.resolve(domain, req.candidates, "candidates", errors) if given else []
        if errors:
            raise InputError(errors)
        history = history[-self.builder.max_history :]
        recall = None
        if not given:
            candidates, recall = self.recall_candidates(domain, history)
        ids = self.cache.get_many([it.title for it in history + candidates])
        prompts = self.builder.build_many(ids[: len(history)], ids[len(history) :])
        return Prepared(domain, candidates, prompts, min(req.top_k, len(candidates)), key, recall)

    def recall_candidates(self, domain: str, history: list[Resolved]) -> tuple[list[Resolved], str]:
        """The recall stage: `recall_n` catalog items for the history (its items excluded), and its name."""
        stage = self.recall.get(domain) if self.recall_n > 0 else None
        if stage is None:
            msg = (f"is required: no recall stage serves {domain} (XCROSS_RECALL_N=0 or no catalog embeddings); "
                   "give the items to rank")
            raise InputError([field_error(["body", "candidates"], msg, "missing")])
        if not history:
            msg = ("is empty and no candidates were given: the recall stage picks candidates from the history; "
                   "give at least one history item, or the candidates to rank")
            raise InputError([field_error(["body", "history"], msg, "too_short")])
        found, name = stage.pick(history, self.recall_n)  # name: the stage used (an id stage may fall back to text)
        if not found:
            msg = f"recalled nothing: the history covers the whole {domain} catalog; give the candidates to rank"
            raise InputError([field_error(["body", "history"], msg, "too_long")])
        return found, name

    def forward(self, key: str, prompts: Sequence[Sequence[int]]) -> list[float]:
        """Scores of one forward batch through the model `key` (a domain: its default), padded to its longest."""
        input_ids, attention_mask = self.builder.collate(prompts)  # (B, T) each
        return self.runtime(key, input_ids, attention_mask).tolist()

    def postprocess(self, prepared: Prepared, scores: Sequence[float]) -> RecommendResponse:
        """Rank by score (descending; ties keep input order) and keep the top k."""
        if len(scores) != len(prepared.candidates):
            raise ValueError(f"{len(scores)} scores for {len(prepared.candidates)} candidates")
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: prepared.top_k]
        items = [
            RankedItem(position=i, id=prepared.candidates[i].id, asin=prepared.candidates[i].asin,
                       title=prepared.candidates[i].title, score=float(scores[i]), rank=rank)
            for rank, i in enumerate(order, start=1)
        ]
        return RecommendResponse(domain=prepared.domain, model=self.models[prepared.key].name, items=items,
                                 recall=prepared.recall)

    # --- direct path ----------------------------------------------------------------------------------

    def score(self, key: str, prompts: Sequence[Sequence[int]]) -> list[float]:
        """All prompts, in forwards of `batch_prompts`."""
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_prompts):
            out += self.forward(key, prompts[start : start + self.batch_prompts])
        return out

    def recommend(self, req: RecommendRequest) -> RecommendResponse:
        """The direct model call: preprocess, score, postprocess (no batcher)."""
        prepared = self.preprocess(req)
        return self.postprocess(prepared, self.score(prepared.key, prepared.prompts))

    def warmup_requests(self, candidates: int | None = None, history: int = 10) -> list[RecommendRequest]:
        """One request per served model from its domain's catalog: `history` items and `candidates` (default: a
        full forward)."""
        candidates = candidates or self.batch_prompts
        reqs = []
        for key, served in sorted(self.models.items()):
            n = len(self.catalogs[served.domain])
            ids = [i % n for i in range(history + candidates)]
            reqs.append(RecommendRequest(domain=served.domain, history=[Item(id=i) for i in ids[:history]],
                                         candidates=[Item(id=i) for i in ids[history:]], top_k=candidates,
                                         model=None if key == served.domain else served.kind))
        return reqs

    def close(self) -> None:
        self.cache.close()

    def _model(self, domain: str, kind: str | None) -> str:
        """The key of the model serving `domain` with `kind` (None: the domain's default)."""
        if kind is None:
            return domain if domain in self.models else next(iter(self.kinds(domain).values()))
        kinds = self.kinds(domain)
        if kind in kinds:
            return kinds[kind]
        default = self.models[domain].kind if domain in self.models else "none"
        msg = (f"model {kind[:32]!r} is not served for {domain}; valid choices: {', '.join(sorted(kinds))} "
               f"(default: {default}; omit the field to use it)")
        raise InputError([field_error(["body", "model"], msg, "unknown_model")])

    def _served(self, domain: str) -> str:
        if domain in self.domains:
            return domain
        served = ", ".join(self.domains) or "none (no checkpoints loaded)"
        msg = f"domain {domain[:64]!r} is not served; served domains: {served}"
        raise InputError([field_error(["body", "domain"], msg, "unknown_domain")])
