"""Cross-domain retrieval (issue 9): train, evaluate, benchmark and report the HSTU / TAPE / DDSR / GCA variants.

    python -m training recall train --dataset food-kitchen --variant tape --preset cpu      # + results/recall/*.json
    python -m training recall train --dataset food-kitchen --variant ddsr --preset cpu --ship   # also artifacts/recall
    python -m training recall evaluate --checkpoint artifacts/recall/food-kitchen/ddsr --dataset food-kitchen
    python -m training recall bench-attention                    # full vs intra-domain attention at 50, 200, 1000
    python -m training recall report                             # markdown section + docs/recall_*.png
    python -m training recall train --dataset amazon-Tools --variant hstu --preset cpu --ship  # one Amazon domain

Datasets: food-kitchen and beauty-electronics (mixed-domain, leave-one-out), amazon-<Domain> for Tools, Toys, Sports,
Electronics (one domain: train users minus a seeded 10% (at most 1,000) held out for the epoch choice; dev users
only for the reported test). Variants: hstu (full attention), sasrec (softmax attention), intra (intra-domain
mask only), tape, ddsr (tape + domain state), gca (intra + gated cross-attention). Presets: smoke (seconds, for
tests), cpu (d=64, 2 layers, a few minutes on one thread). Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "recall"
ARTIFACTS = REPO / "artifacts" / "recall"
RUNS = REPO / "runs" / "recall"
DOCS = REPO / "docs"
LENGTHS = (50, 200, 1000)
PAIRS = (("hstu", "popularity"), ("sasrec", "hstu"), ("intra", "hstu"), ("tape", "intra"), ("ddsr", "tape"),
         ("ddsr", "hstu"), ("gca", "intra"), ("gca", "hstu"))

DatasetOpt = Annotated[str, typer.Option(help="food-kitchen | beauty-electronics | amazon-Tools | amazon-Toys | "
                                               "amazon-Sports | amazon-Electronics")]
DataRootOpt = Annotated[Path | None, typer.Option(help="folder holding amazon-<dataset>/ and amazon-xcross/ "
                                                       "(default ../shared/data)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def _check(value: str, known: tuple[str, ...] | list[str], option: str) -> str:
    if value not in known:
        raise typer.BadParameter(f"--{option} {value!r} is unknown; use one of {', '.join(known)}")
    return value


def provenance(command: str) -> dict[str, Any]:
    """Commit, CPU model, threads and the command, for a result file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("XCROSS_GIT_COMMIT", "unknown")  # a run from a copy of the tree
    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import torch

    return {"command": command, "git_commit": commit, "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@app.command("train")
def train_cmd(dataset: DatasetOpt = "food-kitchen",
              variant: Annotated[str, typer.Option(help="hstu | sasrec | intra | tape | ddsr | gca")] = "tape",
              preset: Annotated[str, typer.Option(help="smoke | cpu | amazon (one Amazon domain)")] = "cpu",
              seed: Annotated[int, typer.Option(help="seed of init, order and negatives")] = 0,
              max_minutes: Annotated[float | None, typer.Option(help="wall-clock cap (default: the preset's)")]
              = None,
              gca_layers: Annotated[str, typer.Option(help="gca: comma-separated blocks followed by GCA")] = "0",
              gca_act: Annotated[str, typer.Option(help="gca gate: sigmoid | tanh")] = "sigmoid",
              gca_ln: Annotated[bool, typer.Option(help="gca: LayerNorm on query and key/value")] = True,
              tag: Annotated[str | None, typer.Option(help="suffix of the result/run name")] = None,
              ship: Annotated[bool, typer.Option("--ship", help="also save fp16 weights to artifacts/recall/")]
              = False,
              data_root: DataRootOpt = None, results: Annotated[Path, typer.Option()] = RESULTS,
              runs: Annotated[Path, typer.Option(help="checkpoint root of every run")] = RUNS,
              artifacts: Annotated[Path, typer.Option(help="served checkpoint root (--ship)")] = ARTIFACTS,
              quiet: QuietOpt = False) -> None:
    """Train one variant (model selection on validation), evaluate on test, save checkpoint and result."""
    from model.recall.data import load_splits
    from model.recall.model import VARIANTS
    from model.recall.train import evaluate, get_preset, metrics, save_checkpoint, train

    _check(variant, VARIANTS, "variant")
    t0 = time.perf_counter()
    try:
        chosen = get_preset(preset)
        splits = load_splits(dataset, data_root, chosen.user_limit)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    catalog = splits.catalog
    overrides = {}
    if variant == "gca":
        overrides = {"gca_layers": tuple(int(x) for x in gca_layers.split(",") if x), "gca_act": gca_act,
                     "gca_ln": gca_ln}
    model, info = train(catalog, splits, variant, chosen, seed=seed, progress=not quiet, max_minutes=max_minutes,
                        log=typer.echo, **overrides)
    valid = evaluate(model, splits.valid, catalog, splits.valid_cut, seed=seed)
    test = evaluate(model, splits.test, catalog, splits.test_cut, seed=seed)
    name = f"{dataset}-{variant}-{chosen.name}" + (f"-{tag}" if tag else "")
    result = {"dataset": dataset, "variant": variant, "preset": chosen.name, "seed": seed, "tag": tag,
              "config": {**chosen.__dict__, **{k: list(v) if isinstance(v, tuple) else v
                                              for k, v in overrides.items()}},
              "n_params": sum(p.numel() for p in model.parameters()), "n_users": len(splits.test),
              "n_train_users": len(splits.train), "n_valid_users": len(splits.valid),
              "domains": catalog.domains, "best_epoch": info["best_epoch"], "history": info["history"],
              "valid": metrics(valid, catalog.domains), "test": metrics(test, catalog.domains),
              "per_user": {k: v.tolist() for k, v in test.items()},
              "wall_s": time.perf_counter() - t0, "train_wall_s": info["train_wall_s"],
              **provenance("python -m training recall " + " ".join(sys.argv[sys.argv.index("train"):])
                           if "train" in sys.argv else "")}
    extra = {"preset": chosen.name, "valid": result["valid"], "test": result["test"], "best_epoch": info["best_epoch"],
             "git_commit": result["git_commit"]}
    save_checkpoint(model, runs / dataset / name, dataset, catalog.domains, extra)
    if ship:
        save_checkpoint(model, artifacts / dataset / variant, dataset, catalog.domains, extra, half=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result))
    m = result["test"]["all"]
    typer.echo(f"{name} test: Recall@10 {m['recall@10_full']:.2f}  NDCG@10 {m['ndcg@10_full']:.2f} (full catalog); "
               f"Recall@10 {m['recall@10_sampled']:.2f}  NDCG@10 {m['ndcg@10_sampled']:.2f} (100 sampled); "
               f"{result['wall_s']:.0f} s -> {results / (name + '.json')}")


@app.command("popularity")
def popularity_cmd(dataset: DatasetOpt = "food-kitchen", data_root: DataRootOpt = None,
                   results: Annotated[Path, typer.Option()] = RESULTS) -> None:
    """Floor: training-prefix popularity within the target's domain, evaluated exactly like the models."""
    from model.recall.data import load_splits
    from model.recall.train import Popularity, evaluate, metrics

    t0 = time.perf_counter()
    try:
        splits = load_splits(dataset, data_root)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    catalog, seqs = splits.catalog, splits.test
    test = evaluate(Popularity(splits.train, catalog.n_items, cut=splits.train_cut), seqs, catalog, splits.test_cut)
    result = {"dataset": dataset, "variant": "popularity", "preset": "cpu", "seed": 0, "tag": None, "n_params": 0,
              "n_users": len(seqs), "domains": catalog.domains, "best_epoch": 0, "history": [],
              "test": metrics(test, catalog.domains), "per_user": {k: v.tolist() for k, v in test.items()},
              "wall_s": time.perf_counter() - t0, "train_wall_s": 0.0,
              **provenance("python -m training recall " + " ".join(sys.argv[sys.argv.index("popularity"):])
                           if "popularity" in sys.argv else "")}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{dataset}-popularity-cpu.json").write_text(json.dumps(result))
    m = result["test"]["all"]
    typer.echo(f"{dataset} popularity test: Recall@10 {m['recall@10_full']:.2f}  NDCG@10 {m['ndcg@10_full']:.2f} "
               f"(full); Recall@10 {m['recall@10_sampled']:.2f}  NDCG@10 {m['ndcg@10_sampled']:.2f} (100 sampled)")


@app.command("evaluate")
def evaluate_cmd(checkpoint: Annotated[Path, typer.Option(help="a recall checkpoint directory")],
                 split: Annotated[str, typer.Option(help="valid | test")] = "test",
                 limit: Annotated[int | None, typer.Option(help="first N users only")] = None,
                 data_root: DataRootOpt = None) -> None:
    """Recall@10 / NDCG@10 of a checkpoint on its dataset (full domain catalog and 100 sampled negatives)."""
    from model.recall.data import load_splits
    from model.recall.train import evaluate, load_checkpoint, metrics

    _check(split, ("valid", "test"), "split")
    try:
        model, manifest = load_checkpoint(checkpoint)
        splits = load_splits(manifest["dataset"], data_root, limit)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    catalog = splits.catalog
    seqs, cut = (splits.valid, splits.valid_cut) if split == "valid" else (splits.test, splits.test_cut)
    for group, m in metrics(evaluate(model, seqs, catalog, cut), catalog.domains).items():
        typer.echo(f"{group:>12}: Recall@10 {m['recall@10_full']:6.2f}  NDCG@10 {m['ndcg@10_full']:6.2f} (full)  "
                   f"Recall@10 {m['recall@10_sampled']:6.2f}  NDCG@10 {m['ndcg@10_sampled']:6.2f} (100 sampled)  "
                   f"n={m['n_users']}")


def _silu_attention(q: Any, k: Any, v: Any, n: int) -> Any:
    """One HSTU attention with a causal mask: (SiLU(q k^T) / n * causal) v; q, k, v (1, h, m, dh)."""
    import torch
    import torch.nn.functional as F

    m = q.shape[2]
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    return (F.silu(q @ k.transpose(-1, -2)) / n * causal) @ v


def _intra_attention(q: Any, k: Any, v: Any, doms: Any) -> Any:
    """Intra-domain attention done the cheap way: each domain's items gathered into their own causal sequence."""
    import torch

    out = torch.empty_like(v)
    for dom in (0, 1):
        idx = (doms == dom).nonzero().squeeze(1)
        out[:, :, idx] = _silu_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], len(doms))
    return out


def _median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def bench_attention(lengths: tuple[int, ...] = LENGTHS, d: int = 64, n_heads: int = 2, repeats: int = 20,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Median time per sequence of one HSTU attention (q k^T, SiLU, A v): full causal mask vs intra-domain.

    Intra-domain attention is run the way it saves work: each domain's items gathered into their own causal
    sequence (cost sum_d n_d^2 instead of n^2). Domains are drawn i.i.d. with the datasets' mix (52% / 48%).
    FLOPs count the two matmuls only: 2 * 2 * h * n_q * n_k * d_h (multiply-add = 2), the full square for both
    (a dense kernel computes the masked half too).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        q, k, v = (torch.randn(1, n_heads, n, d // n_heads, generator=gen) for _ in range(3))
        doms = (torch.rand(n, generator=gen) < 0.48).long()
        sizes = [int((doms == 0).sum()), int((doms == 1).sum())]
        dh = d // n_heads
        rows.append({"length": n, "d": d, "n_heads": n_heads, "n_per_domain": sizes,
                     "full_ms": _median_ms(lambda q=q, k=k, v=v, n=n: _silu_attention(q, k, v, n), repeats),
                     "intra_ms": _median_ms(lambda q=q, k=k, v=v, doms=doms: _intra_attention(q, k, v, doms),
                                            repeats),
                     "full_mflops": 4 * n_heads * n * n * dh / 1e6,
                     "intra_mflops": sum(4 * n_heads * m * m * dh for m in sizes) / 1e6})
    return rows


@app.command("bench-attention")
def bench_attention_cmd(repeats: Annotated[int, typer.Option(help="timed repeats per length")] = 20,
                        results: Annotated[Path, typer.Option()] = RESULTS) -> None:
    """Full vs intra-domain attention cost at lengths 50, 200, 1000 (synthetic sequences)."""
    import torch

    rows = bench_attention(repeats=repeats)
    out = {"rows": rows, "repeats": repeats, **provenance("python -m training recall " + " ".join(sys.argv[1:])),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    results.mkdir(parents=True, exist_ok=True)
    (results / "attention-bench.json").write_text(json.dumps(out, indent=1))
    for r in rows:
        typer.echo(f"n={r['length']:>5}: full {r['full_ms']:.3f} ms ({r['full_mflops']:.2f} MFLOP)  intra "
                   f"{r['intra_ms']:.3f} ms ({r['intra_mflops']:.2f} MFLOP)  ratio {r['intra_ms'] / r['full_ms']:.2f}")


# --- report ----------------------------------------------------------------------------------------------------


def load_results(root: Path = RESULTS, preset: str = "cpu") -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {variant: result}} of untagged runs of one preset."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(root.glob(f"*-{preset}.json")):
        r = json.loads(path.read_text())
        if r.get("tag") is None and "variant" in r:
            out.setdefault(r["dataset"], {})[r["variant"]] = r
    return out


def load_gca_options(root: Path = RESULTS, preset: str = "cpu") -> dict[str, list[dict[str, Any]]]:
    """{dataset: [gca results, the untagged run first, then tagged option runs]}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.glob(f"*-gca-{preset}*.json")):
        r = json.loads(path.read_text())
        if r.get("variant") == "gca" and r.get("preset") == preset and r.get("seed", 0) == 0:
            out.setdefault(r["dataset"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r.get("tag") is not None)
    return out


def load_seed_runs(root: Path = RESULTS, preset: str = "cpu") -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """{dataset: {variant: {seed: result}}} of the default configuration (untagged, or tagged `seed<k>`)."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted(root.glob(f"*-{preset}*.json")):
        r = json.loads(path.read_text())
        if "variant" in r and r.get("preset") == preset and (r.get("tag") or "seed").startswith("seed"):
            out.setdefault(r["dataset"], {}).setdefault(r["variant"], {})[r["seed"]] = r
    return out


def _seed_table(by_variant: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    seeds = sorted({s for runs in by_variant.values() for s in runs})
    if len(seeds) < 2:
        return []
    lines = ["", "Seed check (same preset, other seeds for init, order and negatives): test NDCG@10 / Recall@10, full "
                 "catalog:", "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (len(seeds) + 1) + "|"]
    from model.recall.model import VARIANTS

    for v in VARIANTS:
        runs = by_variant.get(v, {})
        cells = [f"{runs[s]['test']['all']['ndcg@10_full']:.2f} / {runs[s]['test']['all']['recall@10_full']:.2f}"
                 if s in runs else "not run" for s in seeds]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def _gca_table(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[str]:
    lines = ["", "GCA options (insertion after blocks, gate, LayerNorm); mean |cos(X_t, A_t)| at the chosen epoch; "
                 "p: paired t-test on per-user NDCG@10 against intra:", "",
             "| blocks | gate | LN | all R@10 | all N@10 | mean abs cos (per module) | p vs intra |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c, t = r["config"], r["test"]["all"]
        cos = r["history"][r["best_epoch"] - 1].get("gca_cos", {})
        p = f"{paired(r, ref)['p_value']:.3g}" if ref else "n/a"
        lines.append(f"| {','.join(map(str, c.get('gca_layers', [])))} + readout | {c.get('gca_act')} | "
                     f"{c.get('gca_ln')} | {t['recall@10_full']:.2f} | {t['ndcg@10_full']:.2f} | "
                     + ", ".join(f"{k} {v:.3f}" for k, v in cos.items()) + f" | {p} |")
    return lines


def paired(a: dict[str, Any], b: dict[str, Any], kind: str = "full") -> dict[str, float]:
    """Two-sided paired t-test on per-user NDCG@10 (same users, same targets)."""
    import numpy as np
    from scipy import stats

    from model.recall.train import per_user_ndcg

    x = per_user_ndcg(np.asarray(a["per_user"][f"rank_{kind}"]))
    y = per_user_ndcg(np.asarray(b["per_user"][f"rank_{kind}"]))
    if len(x) != len(y):
        raise ValueError(f"different user counts {len(x)} vs {len(y)}: rerun both on the same users")
    t = stats.ttest_rel(x, y)
    return {"diff": float(100 * (x - y).mean()), "t": float(t.statistic), "p_value": float(t.pvalue), "n": len(x)}


def _plot(res: dict[str, dict[str, dict[str, Any]]], bench: dict[str, Any] | None, docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.recall.model import VARIANTS

    names = []
    if res:
        fig, axes = plt.subplots(1, len(res), figsize=(5.5 * len(res), 3.6), squeeze=False)
        for ax, (dataset, by_variant) in zip(axes[0], sorted(res.items()), strict=True):
            variants = [v for v in ("popularity", *VARIANTS) if v in by_variant]
            domains = by_variant[variants[0]]["domains"]
            width = 0.8 / len(domains)
            for j, dom in enumerate(domains):
                vals = [by_variant[v]["test"][dom]["ndcg@10_full"] for v in variants]
                ax.bar([i + j * width for i in range(len(variants))], vals, width, label=f"target {dom}")
            ax.set_xticks([i + width * (len(domains) - 1) / 2 for i in range(len(variants))],
                          [v.replace("popularity", "pop.") for v in variants])
            ax.set_title(f"{dataset}: test NDCG@10 (full catalog)")
            ax.set_ylabel("NDCG@10 x100")
            ax.legend(fontsize=8, loc="best", framealpha=0.9)
        fig.tight_layout()
        fig.savefig(docs / "recall_ndcg.png", dpi=110)
        plt.close(fig)
        names.append("recall_ndcg.png")
    if bench:
        rows = bench["rows"]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot([r["length"] for r in rows], [r["full_ms"] for r in rows], "o-", label="full attention")
        ax.plot([r["length"] for r in rows], [r["intra_ms"] for r in rows], "s-", label="intra-domain")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms per sequence (one layer)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / "recall_attention_cost.png", dpi=110)
        plt.close(fig)
        names.append("recall_attention_cost.png")
    return names


def markdown_section(root: Path = RESULTS, docs: Path = DOCS, preset: str = "cpu") -> str:
    """The recall results as a markdown section (tables from results/recall/*.json; plots written under docs/)."""
    from model.recall.model import VARIANTS

    res = load_results(root, preset)
    gca_options = load_gca_options(root, preset)
    seed_runs = load_seed_runs(root, preset)
    bench_path = root / "attention-bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    docs.mkdir(parents=True, exist_ok=True)
    plots = _plot(res, bench, docs)
    lines = ["## Cross-domain retrieval (HSTU, TAPE, DDSR, GCA)", "",
             f"Preset `{preset}`; design and every reconstructed formula: [recall.md](recall.md). Leave-one-out "
             "test target of every user, after choosing the epoch on the validation target. Recall@10 / NDCG@10 "
             "(x100) over the **full catalog of the target's domain** and over **100 sampled negatives** of that "
             "domain. Each row is one run (seed 0).", ""]
    for dataset, by_variant in sorted(res.items()):
        any_r = next(iter(by_variant.values()))
        doms = any_r["domains"]
        lines += [f"### {dataset} ({any_r['n_users']} test users)", "",
                  "| variant | all R@10 | all N@10 | " + " | ".join(f"{d} R@10 | {d} N@10" for d in doms)
                  + " | all R@10 (100 neg.) | all N@10 (100 neg.) | params | best epoch | train s |",
                  "|---" * (8 + 2 * len(doms)) + "|"]
        for v in ("popularity", *VARIANTS):
            if v == "popularity" and v not in by_variant:
                continue
            if v not in by_variant:
                lines.append(f"| {v} | not run |" + " |" * (6 + 2 * len(doms)))
                continue
            r, t = by_variant[v], by_variant[v]["test"]
            cells = [f"{t['all']['recall@10_full']:.2f}", f"{t['all']['ndcg@10_full']:.2f}"]
            cells += [f"{t[d][k]:.2f}" for d in doms for k in ("recall@10_full", "ndcg@10_full")]
            cells += [f"{t['all']['recall@10_sampled']:.2f}", f"{t['all']['ndcg@10_sampled']:.2f}",
                      f"{r['n_params'] / 1e6:.2f} M", str(r["best_epoch"]), f"{r['train_wall_s']:.0f}"]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        tests = [(a, b) for a, b in PAIRS if a in by_variant and b in by_variant]
        if tests:
            lines += ["", "Paired two-sided t-tests on per-user NDCG@10 (full catalog), A - B:", "",
                      "| A vs B | diff (x100) | t | p |", "|---|---|---|---|"]
            for a, b in tests:
                p = paired(by_variant[a], by_variant[b])
                lines.append(f"| {a} vs {b} | {p['diff']:+.2f} | {p['t']:.2f} | {p['p_value']:.3g} |")
        lines += _seed_table(seed_runs.get(dataset, {}))
        gca_rows = gca_options.get(dataset, [])
        if gca_rows:
            lines += _gca_table(gca_rows, by_variant.get("intra"))
        lines += ["", f"Runs: {any_r['cpu']}, {any_r['torch_threads']} torch thread(s), commit "
                      f"`{any_r['git_commit'][:12]}` (+ the uncommitted recall code); the machine's 2 cores were "
                      "shared with other jobs, so `train s` measures load as much as the variant. Commands in each "
                      f"`results/recall/{dataset}-*.json`.", ""]
    if not res:
        lines += ["No recall result files yet: run `python -m training recall train ...`.", ""]
    if bench:
        lines += ["### Attention cost: full vs intra-domain (one HSTU attention, synthetic sequences)", "",
                  "| length | full ms | intra ms | intra / full | full MFLOP | intra MFLOP |",
                  "|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            lines.append(f"| {r['length']} | {r['full_ms']:.3f} | {r['intra_ms']:.3f} | "
                         f"{r['intra_ms'] / r['full_ms']:.2f} | {r['full_mflops']:.2f} | {r['intra_mflops']:.2f} |")
        lines += ["", f"d={bench['rows'][0]['d']}, {bench['rows'][0]['n_heads']} heads, domains i.i.d. 52/48, "
                      f"{bench['repeats']} repeats, {bench['cpu']}, {bench['torch_threads']} thread(s).", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


@app.command("report")
def report_cmd(preset: Annotated[str, typer.Option(help="which runs")] = "cpu",
               results: Annotated[Path, typer.Option()] = RESULTS,
               docs: Annotated[Path, typer.Option(help="where the plots go")] = DOCS,
               out: Annotated[Path | None, typer.Option(help="write the section here (default: print)")] = None,
               ) -> None:
    """The recall section for docs/results.md (markdown on stdout or --out; plots under docs/)."""
    text = markdown_section(results, docs, preset)
    if out:
        out.write_text(text)
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text)
