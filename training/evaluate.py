"""Ranking evaluation on 30 candidates: Hit@1/3/10, MRR@10 (x100), per-user ranks, paired t-tests.

Ranks count ties against the target: rank = number of candidates scoring >= the target (so a constant scorer
gets rank 30 and Hit@1 = 0: a collapsed model looks collapsed).
"""

from __future__ import annotations

import hashlib
import json
import os
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

DEVICE_ENV = "XCROSS_TRAIN_DEVICE"  # cpu (default) | cuda | cuda:N | auto
STEP_BATCH_ENV = "XCROSS_TRAIN_STEP_BATCH"  # 1: all users of an optimizer step in one forward (default on CUDA)


def train_device() -> torch.device:
    """Where training and evaluation run: `$XCROSS_TRAIN_DEVICE` (cpu, cuda, cuda:N, auto = cuda if present)."""
    name = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={name} but torch sees no CUDA device; unset it to train on the CPU")
    return torch.device(name)


def step_batched() -> bool:
    """One forward per optimizer step (every user's prompts padded together) instead of one per user: the same
    loss (the mean over users of eq. 1), far fewer kernel launches on a GPU; the CPU default stays per user."""
    flag = os.environ.get(STEP_BATCH_ENV)
    return train_device().type == "cuda" if flag is None else flag.strip() in ("1", "true", "yes")


BF16_ENV = "XCROSS_TRAIN_BF16"  # auto (default) | on | off


def bf16_allowed() -> tuple[bool, str]:
    """Whether a preset's bf16 autocast runs here, and why: `$XCROSS_TRAIN_BF16` on/off, else `auto`, which keeps
    it on a GPU and on a CPU with native bf16 matmuls (AMX, AVX512-BF16) and turns it off where the CPU only
    emulates bf16 (AVX2: a MiniLM forward ~6x slower than fp32, docs/performance-epyc.md), as the service's
    `auto` backend does."""
    flag = os.environ.get(BF16_ENV, "auto").strip().lower() or "auto"
    if flag not in ("auto", "on", "off"):
        raise ValueError(f"{BF16_ENV}={flag!r}: use auto, on or off")
    if flag != "auto":
        return flag == "on", f"{BF16_ENV}={flag}"
    if train_device().type == "cuda":
        return True, "GPU"
    from service.machine import cpu_bf16_flags

    native = cpu_bf16_flags()
    return (True, f"native bf16 ({', '.join(native)})") if native else (False, "this CPU emulates bf16 (no AMX or "
                                                                       "AVX512-BF16): fp32 is ~6x faster")


def device_info() -> dict:
    """Recorded in every result file: where it ran (and, where the preset's bf16 was turned off here, why)."""
    dev = train_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    note = {"run_note": os.environ["XCROSS_RUN_NOTE"]} if os.environ.get("XCROSS_RUN_NOTE") else {}
    allowed, why = bf16_allowed()
    if not allowed:
        note["precision_note"] = f"fp32 where the preset asks for bf16 autocast: {why}"
    return {"device": f"{dev.type}:{name}" if dev.type == "cuda" else "cpu", "step_batched": step_batched(), **note}


def to_device(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """Move a model and the frozen backbone it runs through (held by a `LayerRunner`, not a submodule).

    Outside inference mode even when called from an evaluation: parameters moved inside it would become inference
    tensors, and a later training step on the same model (the learned WeaveRec lambda after the uniform merge's
    evaluation, on CUDA) fails with "Inference tensors cannot be saved for backward"."""
    device = device or train_device()
    with torch.inference_mode(False):
        model.to(device)
        for m in model.modules():
            runner = getattr(m, "runner", None)
            if isinstance(getattr(runner, "model", None), torch.nn.Module):
                runner.model.to(device)
    return model


class PromptBatches:
    """Padded batches on the training device from a `prompts(user, candidates)` and a `builder` (to collate)."""

    builder: PromptBuilder

    def prompts(self, user: User, candidates: Sequence[int]) -> list:
        raise NotImplementedError

    def batch(self, user: User, candidates: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One user's prompts, padded to the longest, on the training device."""
        return self._collate(self.prompts(user, candidates))

    def batch_many(self, pairs: Sequence[tuple[User, Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Several users' prompts in one batch (user-major, each user's candidates in order)."""
        return self._collate([p for user, cands in pairs for p in self.prompts(user, cands)])

    def _collate(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.builder.collate(prompts)
        device = train_device()
        return (ids, mask) if device.type == "cpu" else (ids.to(device), mask.to(device))


class PromptSource(PromptBatches):
    """Title ids of one catalog (tokenized once) and the prompt builder."""

    def __init__(self, tokenizer, catalog: Catalog, max_len: int):
        self.catalog = catalog
        self.title_ids = encode_pieces(tokenizer, catalog.titles)
        self.builder = PromptBuilder(tokenizer, max_len=max_len)

    def prompts(self, user: User, candidates: Sequence[int]) -> list:
        history = [self.title_ids[i] for i in user.history]
        return self.builder.build_many(history, [self.title_ids[c] for c in candidates])


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


def autocast(enabled: bool, device: str | None = None):
    return torch.autocast(device or train_device().type, dtype=torch.bfloat16) if enabled else nullcontext()


PROGRESS_EVERY = 100  # users between saves of a resumable evaluation (a multiple of the prefix cache's shard)


def _progress_key(model_key: str, users: Sequence[User], bf16: bool) -> str:
    h = hashlib.sha256(f"{model_key}|bf16={bf16}|".encode())
    for u in users:
        h.update(f"{u.user}\0{u.target}\0{','.join(map(str, u.candidates))}\n".encode())
    return h.hexdigest()


def _load_progress(path: Path, key: str) -> list[dict]:
    """The per-user ranks an interrupted evaluation of the same model on the same users saved (else none)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short by a kill mid-write of an older format: start over
        return []
    return saved["per_user"] if saved.get("key") == key else []


def _save_progress(path: Path, key: str, per_user: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "per_user": per_user}))
    os.replace(tmp, path)


@torch.inference_mode()
def evaluate_users(scorer: Scorer, source: PromptSource, users: Sequence[User], bf16: bool = False,
                   progress: bool = True, desc: str = "eval", resume: tuple[Path, str] | None = None) -> dict:
    """Score each user's 30 candidates in one forward; return metrics and per-user ranks, and for models with
    gated cross-attention the orthogonality diagnostic per layer (mean_t |cos(X_t, A_t)|, model/gca.py).

    `resume` = (progress file, a key naming the weights): every PROGRESS_EVERY users the ranks so far are saved
    there, and an evaluation of the same weights on the same users (same candidates, same precision) that was
    killed picks up after them (ranks are deterministic); the file is removed when the evaluation completes.
    Not for GCA models, whose diagnostic needs every user in one process."""
    gca = isinstance(scorer, torch.nn.Module) and bool(gca_modules(scorer))
    if isinstance(scorer, torch.nn.Module):
        to_device(scorer)
    if gca:
        track(scorer)
    missing = [u.user for u in users if u.candidates is None]
    if missing:
        raise ValueError(f"user {missing[0]} has no candidates; evaluation needs dev.jsonl-style users")
    path, key = (resume[0], _progress_key(resume[1], users, bf16)) if resume and not gca else (None, "")
    per_user = _load_progress(path, key) if path else []
    cache = prefix_cache(scorer, source, users, bf16) if not gca else None
    try:
        for i in tqdm(range(len(per_user), len(users)), desc=desc, disable=not progress, leave=False,
                      initial=len(per_user), total=len(users)):
            u = users[i]
            ids, mask = cache.batches[i] if cache else source.batch(u, u.candidates)
            with autocast(bf16):
                scores = (cache.scores(i) if cache else scorer(ids, mask)).float().cpu().numpy()
            per_user.append({"user": u.user, "rank": rank_of_target(scores, u.candidates.index(u.target))})
            if path and (i + 1) % PROGRESS_EVERY == 0 and i + 1 < len(users):
                _save_progress(path, key, per_user)
        if cache:
            cache.close()
        out = {"metrics": metrics_from_ranks([p["rank"] for p in per_user]), "per_user": per_user}
        if gca:
            out["orthogonality"] = {layer: round(v, 5) for layer, v in orthogonality(scorer).items()}
        if path:
            path.unlink(missing_ok=True)
        return out
    finally:
        if gca:
            track(scorer, on=False)


def prefix_cache(scorer: Scorer, source: PromptBatches, users: Sequence[User], bf16: bool):
    """The frozen-prefix cache for this evaluation (training/prefix.py), or None where it does not apply."""
    from training.prefix import MAX_ROWS, PrefixCache, cache_dir, supports

    directory = cache_dir()
    if directory is None or not supports(scorer):
        return None
    batches = [source.batch(u, u.candidates) for u in users]
    if any(ids.shape[0] > MAX_ROWS or ids.device.type != "cpu" for ids, _ in batches):
        return None
    return PrefixCache(directory, scorer, batches, bf16)


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
