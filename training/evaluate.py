"""Ranking evaluation on 30 candidates: Hit@1/3/10, MRR@10 (x100), per-user ranks, paired t-tests.

Ranks count ties against the target: rank = number of candidates scoring >= the target (so a constant scorer
gets rank 30 and Hit@1 = 0: a collapsed model looks collapsed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.gca import gca_modules, orthogonality, track
from model.prompts import PromptBuilder, encode_pieces
from training.data import Catalog, User

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PromptSource:
    """Title ids of one catalog (tokenized once) and the prompt builder."""

    def __init__(self, tokenizer, catalog: Catalog, max_len: int):
        self.catalog = catalog
        self.title_ids = encode_pieces(tokenizer, catalog.titles)
        self.builder = PromptBuilder(tokenizer, max_len=max_len)

    def batch(self, user: User, candidates: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        history = [self.title_ids[i] for i in user.history]
        prompts = self.builder.build_many(history, [self.title_ids[c] for c in candidates])
        return self.builder.collate(prompts)


def rank_of_target(scores: np.ndarray, target_pos: int) -> int:
    """1-based rank; ties count against the target."""
    return int((scores >= scores[target_pos]).sum())


def metrics_from_ranks(ranks: Sequence[int]) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    if len(r) == 0:
        raise ValueError("no users to evaluate")
    return {
        "hit@1": float((r <= 1).mean() * 100),
        "hit@3": float((r <= 3).mean() * 100),
        "hit@10": float((r <= 10).mean() * 100),
        "mrr@10": float(np.where(r <= 10, 1.0 / r, 0.0).mean() * 100),
        "n_users": int(len(r)),
    }


def autocast(enabled: bool, device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else nullcontext()


@torch.inference_mode()
def evaluate_users(scorer: Scorer, source: PromptSource, users: Sequence[User], bf16: bool = False,
                   progress: bool = True, desc: str = "eval") -> dict:
    """Score each user's 30 candidates in one forward; return metrics and per-user ranks, and for models with
    gated cross-attention the orthogonality diagnostic per layer (mean_t |cos(X_t, A_t)|, model/gca.py)."""
    gca = isinstance(scorer, torch.nn.Module) and bool(gca_modules(scorer))
    if gca:
        track(scorer)
    per_user = []
    try:
        for u in tqdm(users, desc=desc, disable=not progress, leave=False):
            if u.candidates is None:
                raise ValueError(f"user {u.user} has no candidates; evaluation needs dev.jsonl-style users")
            ids, mask = source.batch(u, u.candidates)
            with autocast(bf16):
                scores = scorer(ids, mask).float().numpy()
            per_user.append({"user": u.user, "rank": rank_of_target(scores, u.candidates.index(u.target))})
        out = {"metrics": metrics_from_ranks([p["rank"] for p in per_user]), "per_user": per_user}
        if gca:
            out["orthogonality"] = {layer: round(v, 5) for layer, v in orthogonality(scorer).items()}
        return out
    finally:
        if gca:
            track(scorer, on=False)


def per_user_vectors(result: dict) -> dict[str, dict[str, float]]:
    out = {}
    for p in result["per_user"]:
        r = p["rank"]
        out[p["user"]] = {"hit@1": float(r <= 1), "hit@3": float(r <= 3), "hit@10": float(r <= 10),
                          "mrr@10": 1.0 / r if r <= 10 else 0.0}
    return out


def paired_ttest(a: dict, b: dict, metric: str = "hit@1") -> dict[str, float]:
    """Two-sided paired t-test of a vs b on their common users."""
    from scipy.stats import ttest_rel

    va, vb = per_user_vectors(a), per_user_vectors(b)
    common = sorted(set(va) & set(vb))
    if len(common) < 2:
        raise ValueError(f"only {len(common)} users in common; compare results on the same users")
    xa = np.array([va[u][metric] for u in common])
    xb = np.array([vb[u][metric] for u in common])
    diff = xa - xb
    p = 1.0 if np.allclose(diff, 0) else float(ttest_rel(xa, xb).pvalue)
    return {"metric": metric, "n_users": len(common), "a": float(xa.mean() * 100), "b": float(xb.mean() * 100),
            "diff": float(diff.mean() * 100), "p_value": p}


def save_result(path: str | Path, result: dict, **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, **result}, indent=1) + "\n")
    return path


def load_result(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@torch.inference_mode()
def embedding_floor(backbone, source: PromptSource, users: Sequence[User], progress: bool = True) -> dict:
    """Zero-shot floor: cos(mean history embedding, candidate embedding), sentence-transformers mean pooling."""
    tok = backbone.tokenizer
    cache: dict[int, torch.Tensor] = {}

    def embed(item_ids: Sequence[int]) -> torch.Tensor:
        todo = [i for i in dict.fromkeys(item_ids) if i not in cache]
        if todo:
            enc = tok([source.catalog.titles[i] for i in todo], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
            h = backbone.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
            cache.update(zip(todo, e, strict=True))
        return torch.stack([cache[i] for i in item_ids])

    per_user = []
    for u in tqdm(users, desc="floor", disable=not progress, leave=False):
        hist = torch.nn.functional.normalize(embed(u.history).mean(0), dim=-1)
        scores = (embed(u.candidates) @ hist).numpy()
        per_user.append({"user": u.user, "rank": rank_of_target(scores, u.candidates.index(u.target))})
    return {"metrics": metrics_from_ranks([p["rank"] for p in per_user]), "per_user": per_user}
