"""Sampled-softmax training, leave-one-out evaluation and checkpoints of the recall models.

Training: every position of a user's training prefix predicts the next item (mixed-domain datasets: all but the
last two items; one Amazon domain: every item of the training users, `model.recall.data.load_amazon`). Loss:
softmax over the target and K negatives drawn uniformly, with replacement, from the *target's domain* (one draw of
K per domain per batch, shared by the batch's positions; a negative equal to the target is masked). The sampling is
uniform, so no logQ correction is needed. Model selection: NDCG@10 (full catalog) on the validation target after
each epoch (the second-to-last item of every user, or the last item of held-out train users for one Amazon domain);
the best epoch's weights are kept; early stop after `patience` epochs without improvement.

Evaluation (per user, one target): the target's domain catalog minus the user's history items is scored in full
(ranks count ties against the target; no target is in its own history in these data), and against 100 negatives
drawn uniformly from that domain without the target (seeded per user, fixed across models). Recall@10 (= HR@10
with one target) and NDCG@10.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model.recall.data import Batch, Catalog, Sequence, Splits, leave_one_out, make_batch, select
from model.recall.model import N_DOMAINS, RecallConfig, RecallModel, sampled_softmax_loss

TENSORS, MANIFEST = "model.safetensors", "manifest.json"
N_SAMPLED = 100


@dataclass(frozen=True)
class Preset:
    name: str
    d: int
    n_layers: int
    n_heads: int
    epochs: int
    batch_size: int
    negatives: int  # K per domain per batch
    lr: float
    dropout: float
    max_minutes: float  # wall-clock cap of one training run
    patience: int
    weight_decay: float = 0.01
    tau: float = 0.05
    user_limit: int | None = None  # first N users only (smoke)
    select: str = "ndcg@10"  # validation metric of the epoch choice: ndcg@10 | recall@200 (full catalog)

    def __post_init__(self) -> None:
        if self.select not in ("ndcg@10", "recall@200"):
            raise ValueError(f"preset {self.name}: select {self.select!r} is unknown; use ndcg@10 or recall@200")


PRESETS = {
    "smoke": Preset("smoke", d=16, n_layers=1, n_heads=1, epochs=2, batch_size=32, negatives=32, lr=3e-3,
                    dropout=0.1, max_minutes=1.0, patience=2, tau=0.2, user_limit=200),
    "cpu": Preset("cpu", d=64, n_layers=2, n_heads=2, epochs=40, batch_size=128, negatives=256, lr=1e-3,
                  dropout=0.5, max_minutes=4.0, patience=3, tau=0.2),
    # one Amazon domain as a recall stage handing 200 items to the reranker: the epoch is chosen on validation
    # Recall@200 (~70 of 877-1,000 held-out users are hits, where NDCG@10 rests on ~10); lr 3e-4 (docs/recall.md)
    "amazon": Preset("amazon", d=64, n_layers=2, n_heads=2, epochs=40, batch_size=128, negatives=256, lr=3e-4,
                     dropout=0.5, max_minutes=4.0, patience=3, tau=0.2, select="recall@200"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def negatives_for_batch(catalog: Catalog, k: int, gen: torch.Generator) -> torch.Tensor:
    """(N_DOMAINS, k) item ids drawn uniformly with replacement from each domain (padding ids for a domain the
    catalog does not have: a one-domain catalog has no target there, so its row is never read)."""
    rows = []
    for d in range(N_DOMAINS):
        ids = torch.from_numpy(catalog.domain_items(d))
        rows.append(ids[torch.randint(len(ids), (k,), generator=gen)] if len(ids) else torch.zeros(k, dtype=torch.long))
    return torch.stack(rows)


class Popularity(torch.nn.Module):
    """Floor: every user gets the items of the target domain by training-prefix popularity (same `evaluate`).

    `cut`: items left out at the end of each sequence (2: leave-one-out training prefixes; 0: training users)."""

    def __init__(self, seqs: list[Sequence], n_items: int, max_len: int = 50, cut: int = 2):
        super().__init__()
        counts = np.zeros(n_items + 1)
        for s in seqs:
            np.add.at(counts, s.items[:len(s.items) - cut], 1)  # training prefixes only
        self.counts = torch.from_numpy(counts).float()
        self.cfg = RecallConfig(n_items=n_items, variant="hstu", max_len=max_len)

    def queries(self, b: Batch) -> torch.Tensor:
        return torch.zeros(*b.items.shape, 1)

    def scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.counts[ids].expand(*q.shape[:-1], len(ids))


@torch.no_grad()
def evaluate(model: RecallModel | Popularity, seqs: list[Sequence], catalog: Catalog, split: str | int,
             batch_size: int = 256, seed: int = 0, sampled_too: bool = True) -> dict[str, Any]:
    """Per-user ranks of the validation ("valid": second-to-last item) or test ("test": last item) target, or of the
    last item after cutting `split` items (an int): full domain catalog and 100 sampled (sampled ranks are 0 when
    `sampled_too` is off)."""
    cut = split if isinstance(split, int) else {"valid": 1, "test": 0}[split]
    model.eval()
    full = np.zeros(len(seqs), dtype=np.int64)
    sampled = np.zeros(len(seqs), dtype=np.int64)
    tdoms = np.zeros(len(seqs), dtype=np.int64)
    domain_ids = [torch.from_numpy(catalog.domain_items(d)) for d in range(N_DOMAINS)]
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        b = make_batch(chunk, model.cfg.max_len, cut, only_last=True)
        last = b.valid.sum(1) - 1  # (B,)
        rows = torch.arange(len(chunk))
        q = model.queries(b)[rows, last]  # (B, d)
        target, tdom = b.targets[rows, last], b.target_doms[rows, last]
        for d in range(N_DOMAINS):
            sel = (tdom == d).nonzero().squeeze(1)
            if not len(sel):
                continue
            s = model.scores(q[sel], domain_ids[d])  # (n, n_d)
            pos = model.scores(q[sel], target[sel]).diagonal()[:, None]
            seen = torch.zeros(len(sel), catalog.n_items + 1, dtype=torch.bool).scatter_(1, b.items[sel], True)
            seen[torch.arange(len(sel)), target[sel]] = False
            seen = seen[:, domain_ids[d]]  # (n, n_d)
            s = s.masked_fill(seen, float("-inf"))  # the user's history items are not candidates
            full[start + sel.numpy()] = (s >= pos).sum(1).numpy()
            for j, i in enumerate(sel.tolist() if sampled_too else []):
                rng = np.random.default_rng([seed, start + i])
                pool = domain_ids[d].numpy()
                pool = pool[pool != int(target[i])]
                negs = rng.choice(pool, min(N_SAMPLED, len(pool)), replace=False)
                ns = model.scores(q[i:i + 1], torch.from_numpy(negs))[0]
                sampled[start + i] = int((ns >= pos[j, 0]).sum()) + 1
        tdoms[start:start + len(chunk)] = tdom.numpy()
    return {"rank_full": full, "rank_sampled": sampled, "target_domain": tdoms}


def metrics(ranks: dict[str, Any], domains: list[str]) -> dict[str, dict[str, float]]:
    """Recall@10 and NDCG@10 (x100) per target domain and over all users, full catalog and sampled."""
    out: dict[str, dict[str, float]] = {}
    groups = {"all": np.ones_like(ranks["target_domain"], dtype=bool)}
    groups |= {name: ranks["target_domain"] == d for d, name in enumerate(domains)}
    for g, sel in groups.items():
        row = {"n_users": int(sel.sum())}
        for kind in ("full", "sampled"):
            r = ranks[f"rank_{kind}"][sel]
            row[f"recall@10_{kind}"] = float(100 * (r <= 10).mean())
            row[f"ndcg@10_{kind}"] = float(100 * per_user_ndcg(r).mean())
        row["recall@200_full"] = float(100 * (ranks["rank_full"][sel] <= 200).mean())
        out[g] = row
    return out


def per_user_ndcg(ranks: np.ndarray) -> np.ndarray:
    """NDCG@10 of one target at rank r (1 = best): 1 / log2(r + 1) within the top 10, else 0."""
    ranks = np.asarray(ranks)
    return np.where((ranks <= 10) & (ranks >= 1), 1 / np.log2(np.maximum(ranks, 1) + 1), 0.0)


def train(catalog: Catalog, seqs: list[Sequence] | Splits, variant: str, preset: Preset, seed: int = 0,
          progress: bool = True, max_minutes: float | None = None,
          log: Callable[[str], None] = print, **overrides: Any) -> tuple[RecallModel, dict[str, Any]]:
    """Train one variant; returns the best-on-validation model and its history. `seqs`: sequences under the
    leave-one-out protocol, or `Splits` (training and validation users, with their cuts)."""
    splits = seqs if isinstance(seqs, Splits) else leave_one_out(catalog, seqs)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = RecallConfig(n_items=catalog.n_items, variant=variant, d=preset.d, n_layers=preset.n_layers,
                       n_heads=preset.n_heads, dropout=preset.dropout, tau=preset.tau, **overrides)
    model = RecallModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    data = make_batch(splits.train, cfg.max_len, cut=splits.train_cut)
    data_ok = data.targets.gt(0).any(1).nonzero().squeeze(1)  # users with at least one training target
    budget = 60 * (max_minutes if max_minutes is not None else preset.max_minutes)
    t0, best, best_state, history, bad = time.perf_counter(), -1.0, None, [], 0
    steps_per_epoch = math.ceil(len(data_ok) / preset.batch_size)
    for epoch in range(preset.epochs):
        model.train()
        order = data_ok[torch.randperm(len(data_ok), generator=gen)]
        losses, cos = [], []
        bar = tqdm(range(steps_per_epoch), desc=f"{variant} epoch {epoch + 1}", disable=not progress, leave=False)
        for step in bar:
            b = select(data, order[step * preset.batch_size:(step + 1) * preset.batch_size])
            q = model.queries(b)
            sel = b.targets > 0
            loss = sampled_softmax_loss(model, q[sel], b.targets[sel], b.target_doms[sel],
                                        negatives_for_batch(catalog, preset.negatives, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            cos.append(model.gca_cos())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        valid = metrics(evaluate(model, splits.valid, catalog, splits.valid_cut, seed=seed, sampled_too=False),
                        catalog.domains)["all"]
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "valid_ndcg@10": valid["ndcg@10_full"],
                 "valid_recall@10": valid["recall@10_full"], "valid_recall@200": valid["recall@200_full"],
                 "wall_s": time.perf_counter() - t0}
        if cos and cos[0]:
            entry["gca_cos"] = {k: float(np.mean([c[k] for c in cos if k in c])) for k in cos[0]}
        history.append(entry)
        log(f"{variant} epoch {epoch + 1}: loss {entry['loss']:.4f}  valid NDCG@10 {entry['valid_ndcg@10']:.2f}  "
            f"Recall@10 {entry['valid_recall@10']:.2f}  Recall@200 {entry['valid_recall@200']:.2f}  "
            f"({entry['wall_s']:.0f} s)")
        if entry[f"valid_{preset.select}"] > best:
            best, bad = entry[f"valid_{preset.select}"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if bad >= preset.patience or time.perf_counter() - t0 > budget:
            break
    model.load_state_dict(best_state)
    model.eval()
    best_epoch = max(history, key=lambda h: h[f"valid_{preset.select}"])["epoch"]
    return model, {"history": history, "best_epoch": best_epoch, "train_wall_s": time.perf_counter() - t0}


def save_checkpoint(model: RecallModel, out: Path, dataset: str, domains: list[str], extra: dict[str, Any],
                    half: bool = False) -> Path:
    """`model.safetensors` + `manifest.json` (config, dataset, domains, sha256 of the tensors, extra).

    `half` stores fp16 tensors (half the size; loaded back into fp32)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / TENSORS))
    sha = hashlib.sha256((out / TENSORS).read_bytes()).hexdigest()
    manifest = {"kind": "recall", "dataset": dataset, "domains": domains, "config": asdict(model.cfg),
                "sha256": sha, **extra}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def selection_score(manifest: dict[str, Any]) -> float:
    """A shipped checkpoint's validation value of the metric its preset chose epochs by (NDCG@10, or Recall@200 for
    `amazon`; the test metrics for manifests without validation metrics): how the served variant is picked."""
    preset = PRESETS.get(manifest.get("preset"), PRESETS["cpu"])
    return manifest.get("valid", manifest.get("test", {})).get("all", {}).get(f"{preset.select}_full", 0.0)


def load_checkpoint(path: Path) -> tuple[RecallModel, dict[str, Any]]:
    """The model (eval mode) and its manifest; raises ValueError naming the file when it is missing or corrupt."""
    man_path, ten_path = path / MANIFEST, path / TENSORS
    for p in (man_path, ten_path):
        if not p.is_file():
            raise ValueError(f"{p} is missing; train it with `python -m training recall train` or remove {path}")
    manifest = json.loads(man_path.read_text())
    sha = hashlib.sha256(ten_path.read_bytes()).hexdigest()
    if sha != manifest.get("sha256"):
        raise ValueError(f"{ten_path}: sha256 {sha[:12]} does not match the manifest's "
                         f"{str(manifest.get('sha256'))[:12]}; the file is corrupt or was replaced: retrain it")
    cfg = dict(manifest["config"])
    cfg["gca_layers"] = tuple(cfg.get("gca_layers", ()))
    model = RecallModel(RecallConfig(**cfg))
    try:
        model.load_state_dict({k: v.float() for k, v in load_file(str(ten_path)).items()})
    except RuntimeError as exc:
        raise ValueError(f"{ten_path} does not match its manifest's config: {exc}") from exc
    model.eval()
    return model, manifest


def batch_for_history(items: list[int], doms: list[int], ts: list[int] | None, target_dom: int,
                      max_len: int) -> Batch:
    """A one-row batch for serving: the history (oldest first) with a pseudo target of `target_dom` appended."""
    ts = ts if ts is not None else list(range(len(items)))  # no dates: every item its own day
    seq = Sequence("request", np.asarray(items + [0], dtype=np.int64), np.asarray(doms + [target_dom]),
                   np.asarray(ts + [ts[-1] + 1 if ts else 0], dtype=np.int64))
    return make_batch([seq], max_len, cut=0, only_last=True)
