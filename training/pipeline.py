"""The offline pipeline as plain functions (the CLI in `training/__main__.py` is a thin layer over these).

Where things go (all paths configurable through `Paths`):
  artifacts/lora/<D>/          source LoRA checkpoints (shipped, served)
  artifacts/xcross/<D>/        X-Cross checkpoints (shipped, served)
  results/*.json               metrics + per-user ranks of every evaluated model (small, committed)
  runs/<name>/                 resumable training state and non-shipped models (baselines, ablations; not committed)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.backbone import Backbone, load_backbone
from model.checkpoint import load_lora, load_model, lora_pooling, read_manifest, save_lora, save_xcross
from model.fast_lora import FastLoraModel, xcross_training_form
from model.inference import optimize_for_inference
from model.lora import LoraConfig, LoraWeights
from model.source import SourceLoraModel
from model.xcross import Head, XCross, XCrossConfig
from training.data import DOMAINS, Domain, load_domain, read_users, split_train_val
from training.evaluate import (
    PromptSource,
    device_info,
    embedding_floor,
    evaluate_users,
    load_result,
    save_result,
    train_device,
)
from training.loop import dist_world, load_best, train
from training.presets import DEVIATIONS, Preset, TrainConfig

log = logging.getLogger("training")
REPO = Path(__file__).resolve().parents[1]
DEV_PROGRESS = "dev-progress.json"  # a finished run's dev evaluation so far, kept across a kill (commit_states.sh)


def _root(env: str, default: str) -> Path:
    """A root directory: `$<env>` when set (`python -m training all --artifacts/--results/--runs` sets it for its
    jobs, e.g. to retrain into a staging root while the service keeps serving artifacts/), else <repo>/<default>."""
    return Path(os.environ[env]).resolve() if os.environ.get(env) else REPO / default


@dataclass
class Paths:
    artifacts: Path = field(default_factory=lambda: _root("XCROSS_ARTIFACTS", "artifacts"))
    results: Path = field(default_factory=lambda: _root("XCROSS_RESULTS", "results"))
    runs: Path = field(default_factory=lambda: _root("XCROSS_RUNS", "runs"))
    data: Path | None = None

    def lora(self, domain: str) -> Path:
        return self.artifacts / "lora" / domain

    def xcross(self, domain: str) -> Path:
        return self.artifacts / "xcross" / domain


@dataclass
class Context:
    preset: Preset
    paths: Paths = field(default_factory=Paths)
    backbone_name: str = "minilm"
    seed: int = 0
    progress: bool = True
    _backbone: Backbone | None = None
    _domains: dict[str, Domain] = field(default_factory=dict)
    _sources: dict[tuple, PromptSource] = field(default_factory=dict)

    def backbone(self, fresh: bool = False) -> Backbone:
        """The frozen backbone; `fresh` for a trainer that wraps it with peft in place."""
        if fresh:
            return load_backbone(self.backbone_name)
        if self._backbone is None:
            self._backbone = load_backbone(self.backbone_name)
        return self._backbone

    def domain(self, name: str) -> Domain:
        if name not in self._domains:
            self._domains[name] = load_domain(name, self.paths.data)
        return self._domains[name]

    def split(self, name: str, cfg: TrainConfig) -> tuple[list, list]:
        """(train subset, validation users) of a domain; seeded."""
        dom = self.domain(name)
        train_users, val = split_train_val(dom.train, dom.popularity, seed=self.seed)
        if cfg.train_users is not None and cfg.train_users < len(train_users):
            idx = np.random.default_rng([self.seed, 7]).choice(len(train_users), cfg.train_users, replace=False)
            train_users = [train_users[i] for i in sorted(idx)]
        return train_users, val[: cfg.eval_users]

    def source(self, name: str, tokenizer, max_len: int) -> PromptSource:
        """Title ids of a domain's catalog, tokenized once per (domain, max_len)."""
        key = (name, max_len, id(tokenizer))
        if key not in self._sources:
            self._sources[key] = PromptSource(tokenizer, self.domain(name).catalog, max_len)
        return self._sources[key]

    def dev(self, name: str, limit: int | None) -> list:
        return self.domain(name).dev[:limit]

    def meta(self, **extra: Any) -> dict[str, Any]:
        p = self.preset
        return {"preset": p.name, "base_preset": p.base or p.name, "overrides": list(p.overrides),
                "backbone": self.backbone_name, "commit": git_commit(), "seed": self.seed,
                "deviations": DEVIATIONS.get(p.base or p.name, []), **device_info(), **extra}


def git_commit() -> str:
    """The short commit (+ "-dirty"); `$XCROSS_COMMIT` where the tree travels without .git (a lent GPU)."""
    if os.environ.get("XCROSS_COMMIT"):
        return os.environ["XCROSS_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _manifest_extra(meta: dict[str, Any]) -> dict[str, Any]:
    """Run metadata for a manifest, minus what the checkpoint writer sets itself (or is too long)."""
    skip = ("curve", "domain", "target", "sources", "backbone")
    return {("variant" if k == "kind" else k): v for k, v in meta.items() if k not in skip}


def _lora_cfg_dict(cfg: LoraConfig, pooling: str = "cls") -> dict[str, Any]:
    return {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": cfg.targets, "pooling": pooling}


# ----------------------------------------------------------------------------- source LoRAs


def _train_then_evaluate(ctx: Context, model, source: PromptSource, users: list, val: list, domain: str,
                         cfg: TrainConfig, run_dir: Path, resume: bool, max_steps: int | None):
    """Train, then (finished, rank 0 only) reload the best weights and evaluate on dev; dev is None otherwise."""
    state = train(model, source, users, ctx.domain(domain).popularity, cfg, run_dir, val, seed=ctx.seed,
                  resume=resume, progress=ctx.progress, log=log.info, max_steps=max_steps)
    if not state.finished or dist_world()[0] != 0:
        return state, None
    load_best(model, run_dir)
    model.eval()
    dev = ctx.dev(domain, cfg.dev_users)
    weights = hashlib.sha256((run_dir / "best.safetensors").read_bytes()).hexdigest()
    return state, _saved_dev(ctx, run_dir, state, dev) or evaluate_users(
        model, source, dev, cfg.bf16, ctx.progress, "dev", resume=(run_dir / DEV_PROGRESS, weights))


def _saved_dev(ctx: Context, run_dir: Path, state, dev: list) -> dict | None:
    """The dev evaluation a finished run already saved, when it is of the same kept weights (same best step, same
    wall time) on the same users: a restart that lost only the checkpoint (an ignored artifacts/ folder) re-exports
    it from best.safetensors instead of scoring every dev user again."""
    path = ctx.paths.results / f"{run_dir.name}.json"
    if not path.exists():
        return None
    res = load_result(path)
    same = (res.get("best_step") == state.best_step and res.get("wall_s") == round(state.wall_s, 1)
            and [p["user"] for p in res.get("per_user", [])] == [u.user for u in dev])
    if not same:
        return None
    log.info(f"{run_dir.name}: finished earlier; reusing its dev evaluation from {path} (same best step "
             f"{state.best_step})")
    return {"metrics": res["metrics"], "per_user": res["per_user"]}


def source_model(bb: Backbone, cfg: TrainConfig) -> tuple[torch.nn.Module, LoraConfig]:
    """The source LoRA trainer of a config: the fast path (model/fast_lora.py, no dropout, LoRA on the top
    `lora_layers`; frozen weights in bf16 under `bf16`: give it a backbone of its own) or the first wave's peft
    model (dropout 0.1 on the base and the LoRA input)."""
    if cfg.fast_path:
        lora_cfg = LoraConfig(dropout=0.0, targets=bb.lora_targets_top(cfg.lora_layers))
        model = FastLoraModel(bb, lora_cfg, top_k=cfg.lora_layers, pooling=cfg.pooling)
        return (model.frozen_bf16_() if cfg.bf16 else model), lora_cfg
    if cfg.pooling != "cls":
        raise ValueError(f"pooling={cfg.pooling!r} needs the fast path (fast_path=true)")
    lora_cfg = LoraConfig(targets=bb.lora_targets_top(cfg.lora_layers))
    return SourceLoraModel(bb, lora_cfg), lora_cfg


def train_lora(ctx: Context, domain: str, resume: bool = False, out: Path | None = None,
               train_users: list | None = None, run_name: str | None = None, max_steps: int | None = None) -> dict:
    """Fine-tune one LoRA + head on a domain; save the checkpoint and its dev metrics."""
    cfg = ctx.preset.lora
    bb = ctx.backbone(fresh=True)
    users, val = ctx.split(domain, cfg)
    users = train_users if train_users is not None else users
    source = ctx.source(domain, bb.tokenizer, cfg.max_len)
    torch.manual_seed(ctx.seed)
    model, lora_cfg = source_model(bb, cfg)
    run_dir = ctx.paths.runs / (run_name or f"lora-{domain}-{ctx.preset.name}")
    state, dev = _train_then_evaluate(ctx, model, source, users, val, domain, cfg, run_dir, resume, max_steps)
    if dev is None:
        return {"finished": state.finished, "step": state.step, "wall_s": state.wall_s, "out": None}
    meta = ctx.meta(kind="lora", domain=domain, train_users=len(users), hyperparameters=cfg.to_dict(),
                    wall_s=round(state.wall_s, 1), best_step=state.best_step, curve=state.curve)
    out = out or ctx.paths.lora(domain)
    save_lora(out, model.lora_weights(), model.head, bb, domain=domain,
              lora_config=_lora_cfg_dict(lora_cfg, cfg.pooling),
              metrics={"dev": dev["metrics"]}, **_manifest_extra(meta))
    save_result(ctx.paths.results / f"{run_dir.name}.json", dev, **meta, model=str(out))
    return {"finished": True, "dev": dev["metrics"], "wall_s": state.wall_s, "out": str(out)}


# ----------------------------------------------------------------------------- zero-shot


def evaluation_form(path: Path, bb: Backbone, search: list[Path] = ()) -> torch.nn.Module:
    """A checkpoint as training evaluates it, so a saved model scores what its training run reported: a LoRA (or a
    merged WeaveRec adapter) as the packed `FastLoraModel`, X-Cross models in the packed streamwise form; as built on
    a GPU, for other integrators (GCA) and for other backbone families. Both packed forms can use the frozen-prefix
    cache (training/prefix.py)."""
    cpu_bert = train_device().type == "cpu" and bb.family == "bert"
    kind = read_manifest(path).get("kind")
    if cpu_bert and kind in ("lora", "weaverec"):
        lora, head, manifest = load_lora(path, bb, kinds=(kind,))
        lowest = min(lora.layer_index(m) for m in lora.modules)
        targets = "|".join(re.escape(m) for m in lora.modules)
        cfg = LoraConfig(r=lora.rank, dropout=0.0, targets=targets)
        fast = FastLoraModel(bb, cfg, top_k=bb.num_layers - lowest, head=head, pooling=lora_pooling(manifest))
        if fast.packed:
            return fast.load_lora(lora).eval()
    model, manifest = load_model(path, bb, search=search)
    if not cpu_bert or kind in ("lora", "weaverec"):
        return model
    if not manifest.get("hyperparameters", {}).get("fast_path", False):  # trained and validated as built (wave 1)
        return model
    return optimize_for_inference(model, streamwise=True) if model.config.integrator == "xcross" else model


def score_checkpoint(ctx: Context, path: Path, users: list, domain: str, bf16: bool, desc: str = "eval") -> dict:
    bb = ctx.backbone()
    model = evaluation_form(path, bb, search=[ctx.paths.artifacts / "lora"])
    source = ctx.source(domain, bb.tokenizer, ctx.preset.lora.max_len)
    return evaluate_users(model, source, users, bf16, ctx.progress, desc)


def zero_shot(ctx: Context, domains: tuple[str, ...] = DOMAINS, rows: tuple[str, ...] | None = None) -> dict:
    """Every domain's LoRA on every domain's dev and validation users; sources = best two on validation.

    Each (source, target) cell is saved to results/zero_shot/<S>-on-<T>.json as soon as it is evaluated and reused
    by later calls (same preset and LoRA checkpoint), so the matrix resumes after a kill and `rows` lets several
    workers split it; the matrix and the choice of sources are written once every row is there. A diagonal cell (a
    LoRA on its own domain) is taken from the LoRA's run when its files describe the checkpoint there (dev: the same
    evaluation; validation: the kept checkpoint's point of the curve) instead of being scored again.
    """
    n = ctx.preset.floor_users
    cfg = ctx.preset.lora
    dev, val = {}, {}
    for src in rows or domains:
        sha = read_manifest(ctx.paths.lora(src))["content_hash"]
        for tgt in domains:
            path = _cell_path(ctx, src, tgt)
            cached = _saved_cell(ctx, src, tgt)
            if cached is not None:
                dev.setdefault(src, {})[tgt], val.setdefault(src, {})[tgt] = cached["metrics"], cached["val"]
                continue
            own = _own_domain_cell(ctx, src) if src == tgt else None
            if own is not None:
                r_dev = {k: own[0][k] for k in ("metrics", "per_user")}
                r_val, how = {"metrics": own[1]}, {"from_run": True}
            else:
                r_dev = score_checkpoint(ctx, ctx.paths.lora(src), ctx.dev(tgt, n), tgt, cfg.bf16,
                                         f"{src}->{tgt} dev")
                r_val = score_checkpoint(ctx, ctx.paths.lora(src), ctx.split(tgt, cfg)[1][:n], tgt, cfg.bf16,
                                         f"{src}->{tgt} val")
                how = {}
            dev.setdefault(src, {})[tgt], val.setdefault(src, {})[tgt] = r_dev["metrics"], r_val["metrics"]
            save_result(path, r_dev, **ctx.meta(kind="lora-zero-shot", source=src, target=tgt, lora_hash=sha),
                        val=r_val["metrics"], **how)
    if rows is not None and set(rows) != set(domains):
        return {"dev": dev, "val": val, "sources": {}}
    sources = {tgt: _pick_sources({s: val[s][tgt] for s in domains if s != tgt}) for tgt in domains}
    out = {**ctx.meta(kind="zero-shot-matrix", users=n), "dev": dev, "val": val, "sources": sources}
    (ctx.paths.results / "zero_shot.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _own_domain_cell(ctx: Context, domain: str) -> tuple[dict, dict] | None:
    """The diagonal cell of the matrix from the LoRA's own run, so it is not scored again: its dev evaluation (the
    exported checkpoint, on the same dev users) and its best validation point (the checkpoint kept, on the same
    validation users). None when the run's files do not describe the checkpoint there now."""
    name = f"lora-{domain}-{ctx.preset.name}"
    res_path, state_path = ctx.paths.results / f"{name}.json", ctx.paths.runs / name / "state.json"
    if not (res_path.exists() and state_path.exists()):
        return None
    res, state = load_result(res_path), json.loads(state_path.read_text())
    exported = read_manifest(ctx.paths.lora(domain)).get("metrics", {}).get("dev")
    if (res.get("model") != str(ctx.paths.lora(domain)) or exported != res["metrics"] or "per_user" not in res
            or res["metrics"]["n_users"] != len(ctx.dev(domain, ctx.preset.floor_users))):
        return None
    best = next((p for p in state.get("curve", []) if p["step"] == state.get("best_step")), None)
    if best is None:
        return None
    val = {k: best[k] for k in ("hit@1", "hit@3", "hit@10", "mrr@10")}
    return res, {**val, "n_users": len(ctx.split(domain, ctx.preset.lora)[1])}


def _cell_path(ctx: Context, src: str, tgt: str) -> Path:
    return ctx.paths.results / "zero_shot" / f"{src}-on-{tgt}.json"


def _saved_cell(ctx: Context, src: str, tgt: str) -> dict | None:
    """A saved zero-shot cell when it scored the current checkpoint of `src` (same preset) on today's dev users."""
    path = _cell_path(ctx, src, tgt)
    if not path.exists() or not (ctx.paths.lora(src) / "manifest.json").exists():
        return None
    cached = load_result(path)
    sha = read_manifest(ctx.paths.lora(src))["content_hash"]
    if (cached.get("preset") == ctx.preset.name and cached.get("lora_hash") == sha and "val" in cached
            and cached["metrics"].get("n_users") == len(ctx.dev(tgt, ctx.preset.floor_users))):
        return cached
    return None


def _pick_sources(val: dict[str, dict]) -> list[str]:
    """The two sources of a target: the best zero-shot LoRAs on its validation users (Hit@1, then MRR@10)."""
    return sorted(val, key=lambda s: (val[s]["hit@1"], val[s]["mrr@10"]), reverse=True)[:2]


def chosen_sources(ctx: Context, target: str, domains: tuple[str, ...] = DOMAINS) -> list[str]:
    """The sources zero_shot.json chose for `target`; before the whole matrix exists, the same choice from the
    saved cells of every other domain's LoRA on `target` (so X-Cross on a target starts without waiting for its
    own domain's LoRA, which no choice of its sources reads)."""
    path = ctx.paths.results / "zero_shot.json"
    if path.exists():
        return json.loads(path.read_text())["sources"][target]
    cells = {s: _saved_cell(ctx, s, target) for s in domains if s != target}
    missing = [s for s, c in cells.items() if c is None]
    if missing:
        raise FileNotFoundError(f"{path} missing and no current zero-shot cell of {', '.join(missing)} on {target}: "
                                f"run `python -m training zero-shot` (or `--rows {','.join(missing)}`) first, "
                                "or pass --sources")
    return _pick_sources({s: c["val"] for s, c in cells.items()})


# ----------------------------------------------------------------------------- X-Cross and baselines


def train_xcross(ctx: Context, target: str, sources: list[str] | None = None, top_k: int | None = None,
                 gamma: float | None = None, head_only: bool = False, name: str = "xcross", resume: bool = False,
                 out: Path | None = None, train_users: list | None = None, max_steps: int | None = None,
                 beta: float | None = None, integrator: dict[str, Any] | None = None) -> dict:
    """X-Cross on the chosen sources (or an ablation / the Pooler+Scorer baseline with `head_only`).

    `integrator`: further `XCrossConfig` fields, e.g. the GCA option (training/variants.py)."""
    cfg = ctx.preset.xcross
    bb = ctx.backbone()
    sources = sources or chosen_sources(ctx, target)
    loaded = [load_lora(ctx.paths.lora(s), bb) for s in sources]
    loras = [x[0] for x in loaded]
    n = len(sources)
    k = 0 if n == 1 else (ctx.preset.top_k if top_k is None else top_k)
    poolings = {lora_pooling(x[2]) for x in loaded}
    if len(poolings) > 1:
        raise ValueError(f"sources {sources} were trained with different pooling ({sorted(poolings)}); retrain one")
    xcfg = XCrossConfig(n_streams=n, top_k=k, beta=0.5 if beta is None else beta,
                        gamma=0.4 if gamma is None else gamma, pooling=poolings.pop(), **(integrator or {}))
    torch.manual_seed(ctx.seed)
    head = copy.deepcopy(loaded[0][1])  # init from the best zero-shot source's head (DESIGN 5.2)
    model = XCross(bb, loras, xcfg, head=head)
    if head_only:
        model.freeze_all_but_head()
    users, val = ctx.split(target, cfg)
    users = train_users if train_users is not None else users
    source = ctx.source(target, bb.tokenizer, cfg.max_len)
    run_dir = ctx.paths.runs / f"{name}-{target}-{ctx.preset.name}"
    trainer = xcross_training_form(model) if cfg.fast_path else model  # same trainable tensors
    state, dev = _train_then_evaluate(ctx, trainer, source, users, val, target, cfg, run_dir, resume, max_steps)
    if dev is None:
        return {"finished": state.finished, "step": state.step, "wall_s": state.wall_s, "out": None}
    meta = ctx.meta(kind=name, target=target, sources=sources, config=xcfg.to_dict(), head_only=head_only,
                    train_users=len(users), hyperparameters=cfg.to_dict(), wall_s=round(state.wall_s, 1),
                    best_step=state.best_step)
    out = out or (ctx.paths.xcross(target) if name == "xcross" else run_dir / "model")
    save_xcross(out, model, bb, target=target, sources=[(s, ctx.paths.lora(s)) for s in sources],
                metrics={"dev": dev["metrics"]}, **_manifest_extra(meta))
    save_result(ctx.paths.results / f"{run_dir.name}.json", dev, **meta, curve=state.curve, model=str(out))
    return {"finished": True, "dev": dev["metrics"], "wall_s": state.wall_s, "out": str(out)}


def low_data(ctx: Context, target: str, models: tuple[str, ...] = ("xcross", "lora"),
             sizes: tuple[int, ...] | None = None, available: bool = False) -> dict:
    """Paper Table 3 / Figure 3: X-Cross and a target LoRA trained on small random user subsets, dev Hit@1.

    `sizes` (a subset of the preset's) trains only those runs and writes no table (workers splitting the curve).
    `available` trains nothing: the table and plot from the finished runs, the others listed as `missing`."""
    unknown = set(sizes or ()) - set(ctx.preset.low_data_sizes)
    if unknown:
        raise ValueError(f"sizes {sorted(unknown)} are not in the preset's {ctx.preset.low_data_sizes}")
    rows, missing, devices = [], [], set()
    for size in sizes or ctx.preset.low_data_sizes:
        for seed in ctx.preset.low_data_seeds:
            pool, _ = ctx.split(target, replace(ctx.preset.lora, train_users=None))
            idx = np.random.default_rng([seed, size, 11]).choice(len(pool), min(size, len(pool)), replace=False)
            subset = [pool[i] for i in sorted(idx)]
            for kind in models:
                name = f"lowdata-{kind}-{size}-s{seed}"
                run = f"{name}-{target}-{ctx.preset.name}"
                done = ctx.paths.results / f"{run}.json"  # finished runs are not trained again; others resume
                if not done.exists() and available:
                    missing.append(run)
                    continue
                if not done.exists() and kind == "xcross":
                    train_xcross(ctx, target, name=name, train_users=subset, resume=True)
                elif not done.exists():
                    train_lora(ctx, target, train_users=subset, run_name=run, resume=True,
                               out=ctx.paths.runs / run / "model")
                res = load_result(done)  # written by the training call under the run's name
                devices.add(res.get("device", "cpu"))
                rows.append({"model": kind, "size": size, "seed": seed, **res["metrics"]})
    if sizes:
        return {"rows": rows}
    zs = json.loads((ctx.paths.results / "zero_shot.json").read_text())
    reference = max((s for s in zs["dev"] if s != target), key=lambda s: zs["val"][s][target]["hit@1"])
    result = {**ctx.meta(kind="low-data", target=target), "rows": rows, "missing": missing, "reference": reference,
              "reference_hit@1": zs["dev"][reference][target]["hit@1"], "devices": sorted(devices)}
    path = ctx.paths.results / f"low_data-{target}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot_low_data(result, ctx.paths.results / f"low_data-{target}.png")
    return result


def plot_low_data(result: dict, path: Path) -> Path:
    """Hit@1 vs train size (mean and per-seed points), the best zero-shot source as a dashed line (paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, color in (("xcross", "tab:blue"), ("lora", "tab:orange")):
        rows = [r for r in result["rows"] if r["model"] == kind]
        sizes = sorted({r["size"] for r in rows})
        means = [np.mean([r["hit@1"] for r in rows if r["size"] == s]) for s in sizes]
        ax.scatter([r["size"] for r in rows], [r["hit@1"] for r in rows], color=color, alpha=0.35, s=12)
        ax.plot(sizes, means, "o-", color=color, label="X-Cross" if kind == "xcross" else "target LoRA")
    ax.axhline(result["reference_hit@1"], color="red", ls="--", label=f"{result['reference']} LoRA zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("train users")
    ax.set_ylabel("dev Hit@1")
    ax.set_title(f"{result['target']} ({result['preset']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mean_lora(ctx: Context, target: str, sources: list[str] | None = None) -> dict:
    """Baseline: the explicit average of the source LoRAs' delta W (and of their heads), zero-shot on the target."""
    bb = ctx.backbone()
    sources = sources or chosen_sources(ctx, target)
    loaded = [load_lora(ctx.paths.lora(s), bb) for s in sources]
    mean = LoraWeights.mean([x[0] for x in loaded])
    head = Head(bb.hidden_size)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.stack([dict(x[1].named_parameters())[name] for x in loaded]).mean(0))
    out = ctx.paths.runs / f"mean-{target}-{ctx.preset.name}" / "model"
    save_lora(out, mean, head, bb, domain=target, lora_config={"r": mean.rank, "alpha": mean.rank, "mean_of": sources})
    dev = score_checkpoint(ctx, out, ctx.dev(target, ctx.preset.xcross.dev_users), target, ctx.preset.lora.bf16)
    save_result(ctx.paths.results / f"mean-{target}-{ctx.preset.name}.json", dev,
                **ctx.meta(kind="mean-lora", target=target, sources=sources, model=str(out)))
    return {"dev": dev["metrics"], "out": str(out)}


def floor(ctx: Context, domain: str) -> dict:
    """Zero-shot sentence-embedding similarity on the first `floor_users` dev users."""
    bb = ctx.backbone()
    source = ctx.source(domain, bb.tokenizer, ctx.preset.lora.max_len)
    res = embedding_floor(bb, source, ctx.dev(domain, ctx.preset.floor_users), ctx.progress)
    save_result(ctx.paths.results / f"floor-{domain}.json", res, **ctx.meta(kind="embedding-floor", domain=domain))
    return res["metrics"]


def evaluate_file(ctx: Context, model_path: Path, users_file: Path, limit: int | None, domain: str | None,
                  bf16: bool | None = None) -> dict:
    """Any checkpoint on any dev.jsonl-format file; the domain defaults to the checkpoint's."""
    manifest = read_manifest(model_path)
    ctx.backbone_name = manifest["backbone"]["name"]  # evaluate a checkpoint on the backbone it was trained on
    domain = domain or manifest.get("target") or manifest.get("domain")
    if domain not in DOMAINS:
        raise ValueError(f"cannot tell the domain of {model_path}; pass --domain (one of {', '.join(DOMAINS)})")
    users = read_users(users_file, len(ctx.domain(domain).catalog))[:limit]
    bf16 = ctx.preset.lora.bf16 if bf16 is None else bf16
    res = score_checkpoint(ctx, model_path, users, domain, bf16)
    res.update(ctx.meta(kind="evaluate", model=str(model_path), users_file=str(users_file), domain=domain,
                        bf16=bf16))
    return res


def compare(a: Path, b: Path) -> dict:
    from training.evaluate import paired_ttest

    ra, rb = load_result(a), load_result(b)
    return {m: paired_ttest(ra, rb, m) for m in ("hit@1", "hit@3", "hit@10", "mrr@10")}
