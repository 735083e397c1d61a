"""Full-catalog evaluation of the two-stage recommender (issue 20): recall from the whole catalog, then rerank.

    python -m training full-catalog --domain Tools --users 0 --rerankers ''   # all dev users, recall stages only
    python -m training full-catalog --domain Tools --users 150                  # + reranks: full_catalog_rerank-*

On the first N dev users (or any dev.jsonl-format file, `--users-file`), the held-out target is looked for among
the domain's **whole catalog** (no sampled negatives), the user's history items excluded:
- recall stages: text recall (MiniLM title embeddings, cosine with the history's mean; exact search), the same
  through usearch's HNSW index (its top-N agreement with exact search is reported too), training-set
  popularity as the floor, and, for each item-id checkpoint under artifacts/recall/amazon-<D>/<variant>/, the id
  model alone (`id:<variant>`) and its blend with text recall (`blend:text+<variant>`: reciprocal rank fusion of
  the two top 200, as the service's XCROSS_RECALL_MODE=blend with XCROSS_RECALL_N=200). Recall@50/100/200 of
  each; rank = items scoring >= the target (ties count against it); a blend rank is the target's place in the
  fused top 200 (beyond it: a miss).
- recall alone vs recall + rerank: the text recall's top `--rerank-n` (200) are scored by the domain's served
  X-Cross checkpoint (artifacts/xcross/<D>) and by its own-domain LoRA (artifacts/lora/<D>), 30 prompts per
  forward, in the served form (streamwise, bf16 where the preset says so). A target outside the recalled set is a
  miss for every reranker. Hit@10 and NDCG@10 (x100) per row; two-sided paired t-tests (scipy) on the per-user
  vectors.
Reranked scores are appended per user to runs/full_catalog/<D>-<model sha12>.jsonl, so a killed run resumes.
A run without rerankers writes results/full_catalog-<D>.json, one with rerankers results/full_catalog_rerank-<D>.json
(so the cheap recall-stage runs on all users and the expensive reranks on fewer users live side by side).
`markdown_section()` renders the docs/results.md section (`python -m training report` splices it in).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_model, read_manifest
from model.inference import optimize_for_inference, serve_bf16_, serving_autocast
from model.recall.blend import RRF_K, IdRecall, rrf
from model.recall.text import (
    ExactIndex,
    HnswIndex,
    agreement,
    cached_embeddings,
    catalog_key,
    embed_titles,
    history_query,
)
from training.data import read_users
from training.evaluate import PromptSource, save_result
from training.pipeline import REPO, Context

log = logging.getLogger("training")
RECALL_CACHE = Path("~/.cache/xcross-serve/recall").expanduser()  # the service's XCROSS_RECALL_CACHE default
NS = (50, 100, 200)
MISS = None  # a target outside the recalled set (rank stored as null)
BLEND_N = 200  # each stage's top N fused by the blend (the service's XCROSS_RECALL_N default)


def ndcg10(rank: int | None) -> float:
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0


def summarize(ranks: Sequence[int | None]) -> dict[str, float]:
    """Recall@N (N = 50, 100, 200), Hit@10, NDCG@10 (x100) from 1-based ranks (None: not found)."""
    r = [x if x is not None else math.inf for x in ranks]
    out = {f"recall@{n}": 100 * float(np.mean([x <= n for x in r])) for n in NS}
    out["hit@10"] = 100 * float(np.mean([x <= 10 for x in r]))
    out["ndcg@10"] = 100 * float(np.mean([ndcg10(x if x != math.inf else None) for x in r]))
    out["n_users"] = len(r)
    return out


def paired(a: Sequence[int | None], b: Sequence[int | None]) -> dict[str, dict[str, float]]:
    """Two-sided paired t-tests of per-user Hit@10, NDCG@10 and Recall@200, a - b (x100)."""
    from scipy.stats import ttest_rel

    out = {}
    for metric, f in (("hit@10", lambda r: float(r is not None and r <= 10)), ("ndcg@10", ndcg10),
                      ("recall@200", lambda r: float(r is not None and r <= 200))):
        xa, xb = np.array([f(r) for r in a]), np.array([f(r) for r in b])
        diff = xa - xb
        p = 1.0 if np.allclose(diff, 0) else float(ttest_rel(xa, xb).pvalue)
        out[metric] = {"a": 100 * float(xa.mean()), "b": 100 * float(xb.mean()), "diff": 100 * float(diff.mean()),
                       "p_value": p, "n_users": len(xa)}
    return out


def full_rank(scores: np.ndarray, target: int, exclude: Sequence[int]) -> int:
    """1-based rank of the target among the catalog minus `exclude`; ties count against the target."""
    s = scores.astype(np.float64, copy=True)
    s[np.asarray(list(exclude), dtype=np.int64)] = -np.inf
    return int((s >= s[target]).sum())


def rank_in(candidates: Sequence[int], scores: Sequence[float], target: int) -> int | None:
    """1-based rank of the target among reranked candidates (ties against it); None when it was not recalled."""
    if target not in candidates:
        return MISS
    s = np.asarray(scores, dtype=np.float64)
    return int((s >= s[list(candidates).index(target)]).sum())


def id_recalls(artifacts: Path, domain: str) -> dict[str, tuple[IdRecall, dict]]:
    """{variant: (IdRecall, manifest)} of every checkpoint under <artifacts>/recall/amazon-<domain>/."""
    from model.recall.train import load_checkpoint

    out = {}
    for man in sorted((artifacts / "recall" / f"amazon-{domain}").glob("*/manifest.json")):
        model, manifest = load_checkpoint(man.parent)
        out[man.parent.name] = (IdRecall(model, man.parent.name), manifest)
    return out


def served_variant(ids: dict[str, tuple[IdRecall, dict]]) -> str | None:
    """The variant the service serves from these checkpoints (service.recall.best_checkpoints' rule: the best
    validation value of the metric its preset chose epochs by)."""
    from model.recall.train import selection_score

    return max(ids, key=lambda v: selection_score(ids[v][1])) if ids else None


def _served_form(path: Path, ctx: Context, bf16: bool) -> tuple[torch.nn.Module, dict]:
    """A checkpoint as the service runs it on the CPU: streamwise inference form, bf16 weights under bf16 (on a
    backbone of its own: serve_bf16_ casts the backbone's shared tensors)."""
    bb = ctx.backbone(fresh=True)
    model, manifest = load_model(path, bb, search=[ctx.paths.artifacts / "lora"])
    model = optimize_for_inference(model.eval(), streamwise=True)
    if bf16:
        serve_bf16_(model)
    return model, manifest


@torch.inference_mode()
def rerank(model: torch.nn.Module, source: PromptSource, users: Sequence, candidates: Sequence[Sequence[int]],
           bf16: bool, cache: Path, batch: int = 30, progress: bool = True, desc: str = "rerank") -> list[list[float]]:
    """Scores of each user's candidates (`batch` prompts per forward); resumes from the per-user jsonl `cache`."""
    done: dict[str, list[float]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            with_scores = json.loads(line)
            done[with_scores["user"]] = with_scores["scores"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with cache.open("a") as f:
        for u, cands in tqdm(list(zip(users, candidates, strict=True)), desc=desc, disable=not progress,
                             leave=False):
            if u.user in done and len(done[u.user]) == len(cands):
                out.append(done[u.user])
                continue
            prompts = source.prompts(u, cands)
            scores: list[float] = []
            for start in range(0, len(prompts), batch):
                ids, mask = source.builder.collate(prompts[start:start + batch])
                with serving_autocast(model, "cpu", bf16):
                    scores += model(ids, mask).float().tolist()
            f.write(json.dumps({"user": u.user, "scores": scores}) + "\n")
            f.flush()
            out.append(scores)
    return out


def full_catalog(ctx: Context, domain: str, n_users: int | None = 300, users_file: Path | None = None,
                 rerank_n: int = 200, rerankers: Sequence[str] = ("xcross", "lora"),
                 cache_dir: Path | None = RECALL_CACHE, command: str = "", rerank_recall: str = "text") -> dict:
    """The evaluation above; writes results/full_catalog-<domain>.json and returns its content.

    `rerank_recall`: the recall stage whose top `rerank_n` the rerankers score: "text", or "blend" (text + the
    served item-id variant, as XCROSS_RECALL_MODE=auto serves it; needs an id checkpoint)."""
    if rerank_recall not in ("text", "blend"):
        raise ValueError(f"rerank_recall {rerank_recall!r}: use 'text' or 'blend'")
    t_start = time.perf_counter()
    ids = id_recalls(ctx.paths.artifacts, domain)
    served_id = served_variant(ids)
    if rerank_recall == "blend" and served_id is None:
        raise ValueError(f"--rerank-recall blend needs an item-id checkpoint under "
                         f"{ctx.paths.artifacts}/recall/amazon-{domain}/ (python -m training recall train ... --ship)")
    stage = "text" if rerank_recall == "text" else f"blend:text+{served_id}"
    dom = ctx.domain(domain)
    users = read_users(users_file, len(dom.catalog)) if users_file else dom.dev
    users = users[:n_users]
    bb = ctx.backbone()
    key = catalog_key(dom.catalog.titles, f"{bb.name}@{bb.revision}")
    t0 = time.perf_counter()
    emb, hit = cached_embeddings(cache_dir, domain, key, lambda: embed_titles(bb.model, bb.tokenizer,
                                                                               dom.catalog.titles))
    embed_s = time.perf_counter() - t0
    exact = ExactIndex(emb)
    t0 = time.perf_counter()
    hnsw = HnswIndex(emb)
    hnsw_build_s = time.perf_counter() - t0
    pop = dom.popularity.astype(np.float64)

    ranks: dict[str, list[int | None]] = {"text": [], "text_hnsw": [], "popularity": []}
    ranks |= {f"{kind}{v}": [] for v in ids for kind in ("id:", "blend:text+")}
    agree = {n: [] for n in NS}
    recalled: list[list[int]] = []
    t_exact = t_hnsw = 0.0
    for u in users:
        q = history_query(emb[list(u.history)])
        ranks["text"].append(full_rank(exact.scores(q), u.target, u.history))
        ranks["popularity"].append(full_rank(pop, u.target, u.history))
        t0 = time.perf_counter()
        top, _ = exact.search(q, max(NS + (rerank_n,)), exclude=u.history)
        t_exact += time.perf_counter() - t0
        t0 = time.perf_counter()
        approx, _ = hnsw.search(q, max(NS), exclude=u.history)
        t_hnsw += time.perf_counter() - t0
        for n in NS:
            agree[n].append(agreement(approx[:n], top[:n]))
        hits = approx.tolist()
        ranks["text_hnsw"].append(hits.index(u.target) + 1 if u.target in hits else MISS)
        recalled.append(top[:rerank_n].tolist())
        for v, (idr, _) in ids.items():
            s = idr.scores(u.history)
            ranks[f"id:{v}"].append(full_rank(s, u.target, u.history))
            fused, _ = rrf([top[:BLEND_N].tolist(), idr.search(u.history, BLEND_N)[0].tolist()], BLEND_N)
            fused = fused.tolist()
            ranks[f"blend:text+{v}"].append(fused.index(u.target) + 1 if u.target in fused else MISS)
            if v == served_id and rerank_recall == "blend":
                recalled[-1] = fused[:rerank_n]

    source = PromptSource(bb.tokenizer, dom.catalog, ctx.preset.lora.max_len)
    bf16 = ctx.preset.lora.bf16
    models = {}
    for kind in rerankers:
        path = ctx.paths.artifacts / kind / domain
        if not (path / "manifest.json").is_file():
            log.warning("no %s checkpoint for %s at %s: that reranker is skipped", kind, domain, path)
            continue
        sha = read_manifest(path)["content_hash"]
        model, _ = _served_form(path, ctx, bf16)
        t0 = time.perf_counter()
        scores = rerank(model, source, users, recalled, bf16,
                        ctx.paths.runs / "full_catalog" / f"{domain}-{kind}-{sha[:12]}-{rerank_n}"
                        f"{'' if rerank_recall == 'text' else '-' + stage.replace(':', '_')}.jsonl",
                        progress=ctx.progress, desc=f"{kind} {domain}")
        ranks[f"{stage}+{kind}"] = [rank_in(c, s, u.target) for u, c, s in zip(users, recalled, scores, strict=True)]
        models[kind] = {"path": str(path), "sha": sha[:12], "rerank_s": round(time.perf_counter() - t0, 1)}
        del model

    metrics = {name: summarize(r) for name, r in ranks.items()}
    tests = {}
    pairs = [(f"{stage}+xcross", stage), (f"{stage}+lora", stage), (f"{stage}+xcross", f"{stage}+lora"),
             ("text", "popularity")]
    pairs += [(f"{kind}{v}", b) for v in ids for kind in ("id:", "blend:text+") for b in ("text", "popularity")]
    for a, b in pairs:
        if a in ranks and b in ranks:
            tests[f"{a} vs {b}"] = paired(ranks[a], ranks[b])
    result = {
        "metrics": metrics, "paired_ttests": tests,
        "ann": {"library": "usearch", "index": "HNSW M=16 efConstruction=128 ef=256, cosine, f32",
                "agreement_with_exact": {f"top{n}": 100 * float(np.mean(agree[n])) for n in NS},
                "build_s": round(hnsw_build_s, 3), "query_ms": round(1000 * t_hnsw / max(1, len(users)), 3),
                "exact_query_ms": round(1000 * t_exact / max(1, len(users)), 3)},
        "catalog_items": len(dom.catalog), "users": len(users), "rerank_n": rerank_n, "rerankers": models,
        "rerank_recall": stage,
        "id_models": {v: {"sha": m["sha256"][:12], "best_epoch": m.get("best_epoch"), "preset": m.get("preset"),
                          **{f"valid_{k}": m.get("valid", {}).get("all", {}).get(f"{k}_full")
                             for k in ("ndcg@10", "recall@200")}}
                      for v, (_, m) in ids.items()},
        "blend": {"method": "reciprocal rank fusion", "k": RRF_K, "depth": BLEND_N},
        "embeddings": {"cached": hit, "s": round(embed_s, 1), "key": key[:16]},
        "per_user": [{"user": u.user, "target": u.target, **{k: ranks[k][i] for k in ranks}}
                     for i, u in enumerate(users)],
    }
    meta = ctx.meta(kind="full-catalog", domain=domain, users_file=str(users_file or "dev.jsonl"),
                    command=command, torch_threads=torch.get_num_threads(),
                    wall_s=round(time.perf_counter() - t_start, 1))
    name = ("full_catalog_rerank" + ("" if rerank_recall == "text" else "_blend")) if rerankers else "full_catalog"
    save_result(ctx.paths.results / f"{name}-{domain}.json", result, **meta)
    return {**meta, **result}


def command_line() -> str:
    return "python -m training " + " ".join(sys.argv[1:])


ROWS = [("popularity", "popularity (recall alone)"), ("text", "text recall, exact (alone)"),
        ("text_hnsw", "text recall, HNSW (alone)"), ("text+lora", "text top-200 + own-domain LoRA rerank"),
        ("text+xcross", "text top-200 + X-Cross rerank")]


def _label(key: str, rerank_n: int = 200) -> str:
    for kind, name in (("+xcross", "X-Cross"), ("+lora", "own-domain LoRA")):
        if key.endswith(kind):
            base = key[: -len(kind)]
            return (f"text top-{rerank_n} + {name} rerank" if base == "text"
                    else f"{_label(base)}: its top {rerank_n} + {name} rerank")
    if key.startswith("id:"):
        return f"item-id recall, {key[3:]} (alone)"
    if key.startswith("blend:text+"):
        return f"blend: text + {key[11:]} (RRF of the two top {BLEND_N})"
    return dict(ROWS).get(key, key)


def _order(metrics: dict) -> list[str]:
    """Popularity, text, then the id rows, the blend rows, then the reranks."""
    fixed = [k for k, _ in ROWS[:3] if k in metrics]
    ids = sorted(k for k in metrics if k.startswith("id:"))
    reranked = [k for k in metrics if k.endswith(("+xcross", "+lora"))]
    blends = sorted(k for k in metrics if k.startswith("blend:") and k not in reranked)
    return fixed + ids + blends + sorted(reranked, key=lambda k: (k.split("+")[0], k.endswith("+xcross")))


def _domain_of(path: Path) -> str:
    return path.stem.split("-", 1)[1]


def _section(r: dict, title: str) -> list[str]:
    m = r["metrics"]
    parts = [title, "", "| stage | R@50 | R@100 | R@200 | Hit@10 | NDCG@10 |", "|---|---|---|---|---|---|"]
    for key in _order(m):
        x = m[key]
        label = _label(key, r.get("rerank_n", 200))
        parts.append(f"| {label} | {x['recall@50']:.2f} | {x['recall@100']:.2f} | {x['recall@200']:.2f} | "
                     f"{x['hit@10']:.2f} | {x['ndcg@10']:.2f} |")
    parts += ["", "| A vs B | Hit@10 diff | p | NDCG@10 diff | p | R@200 diff | p |", "|---|---|---|---|---|---|---|"]
    for name, t in r["paired_ttests"].items():
        cells = [f"{t[m]['diff']:+.2f} | {t[m]['p_value']:.3g}" if m in t else "n/a | n/a"
                 for m in ("hit@10", "ndcg@10", "recall@200")]
        parts.append(f"| {name} | " + " | ".join(cells) + " |")
    a = r["ann"]
    ag = a["agreement_with_exact"]
    rr = ", ".join(f"{k} {v['sha']} ({v['rerank_s']:.0f} s in this run)" for k, v in r["rerankers"].items()) or "none"
    idm = ", ".join(f"{k} {v['sha']} ({v['preset']}, epoch {v['best_epoch']}, validation NDCG@10 "
                    f"{v['valid_ndcg@10']:.2f}, Recall@200 {v.get('valid_recall@200') or 0:.2f})"
                    for k, v in r.get("id_models", {}).items()) or "none"
    parts += ["", f"HNSW ({a['library']}, {a['index']}) vs exact search: top-50 / 100 / 200 agreement "
                  f"{ag['top50']:.2f} / {ag['top100']:.2f} / {ag['top200']:.2f}%; query {a['query_ms']:.2f} ms "
                  f"vs exact {a['exact_query_ms']:.2f} ms, build {a['build_s']:.2f} s. Rerankers: {rr}. "
                  f"Item-id models: {idm}. Preset `{r['preset']}`, commit `{r['commit']}`, "
                  f"{r.get('torch_threads', '?')} thread(s), `{r['command']}`.", ""]
    return parts


def markdown_section(results: Path = REPO / "results") -> str:
    """The docs/results.md section from results/full_catalog-*.json (recall stages) and
    results/full_catalog_rerank-*.json (recall + rerank)."""
    from training.data import DOMAINS

    def files(prefix: str) -> list[Path]:
        return sorted(results.glob(f"{prefix}-*.json"), key=lambda f: (
            DOMAINS.index(_domain_of(f)) if _domain_of(f) in DOMAINS else 99, f.name))

    parts = ["## Full catalog: recall + rerank (issue 20)", "",
             "The held-out dev target among the domain's **whole catalog** (history items excluded, no sampled "
             "negatives): Recall@N of each recall stage (text, the item-id model, their blend, popularity), and "
             "Hit@10 / NDCG@10 (x100) of recall alone vs a recall stage's top N (each section says which: text, or "
             "the served blend with `--rerank-recall blend`) reranked by the served X-Cross and by the domain's own "
             "LoRA (a target the recall missed is a miss). Rank = items scoring >= the "
             "target. Produced by `python -m training full-catalog --domain <D> --users <N>` (module "
             "`training/full_catalog.py`; each section names its users and command; the recall-stage tables were "
             "run with `--rerankers ''`); p: two-sided paired t-test on per-user vectors.", ""]
    for path in files("full_catalog"):
        r = json.loads(path.read_text())
        parts += _section(r, f"### {r['domain']} ({r['users']} dev users, {r['catalog_items']} items)")
    for path in files("full_catalog_rerank") + files("full_catalog_rerank_blend"):
        r = json.loads(path.read_text())
        what = r.get("rerank_recall", "text")
        parts += _section(r, f"### {r['domain']}, {what} top {r['rerank_n']} reranked ({r['users']} dev users, "
                             f"{r['catalog_items']} items)")
    return "\n".join(parts)
