"""`python -m training report`: docs/results.md from the result files, with the paper's numbers beside ours.

Every number comes from a file in results/ (which records preset, command inputs and commit); a row whose file is
missing says so instead of inventing a number. Significance: two-sided paired t-test on per-user Hit@1 against
X-Cross on the same users; `*` marks p <= 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.data import DOMAINS
from training.evaluate import paired_ttest

# Paper Table 2 / Table 4 (DeBERTa-v3-base), Hit@1 / Hit@3 / Hit@10 / MRR@10, per target domain.
PAPER = {
    "Tools-LoRA": {"Tools": (18.74, 39.26, 74.87, 33.69), "Sports": (13.30, 28.11, 58.35, 24.64),
                   "Toys": (13.91, 26.40, 53.99, 23.79), "Electronics": (8.85, 20.11, 45.55, 17.75)},
    "Sports-LoRA": {"Tools": (12.40, 25.58, 55.95, 22.74), "Sports": (27.98, 51.49, 82.62, 43.49),
                    "Toys": (14.10, 25.49, 49.50, 22.92), "Electronics": (8.49, 17.63, 44.03, 16.48)},
    "Toys-LoRA": {"Tools": (11.26, 22.16, 48.34, 20.06), "Sports": (14.52, 27.54, 55.55, 24.71),
                  "Toys": (27.99, 52.02, 84.77, 44.05), "Electronics": (8.98, 18.96, 45.21, 17.47)},
    "Electronics-LoRA": {"Tools": (12.40, 26.32, 50.39, 21.59), "Sports": (15.82, 30.32, 59.08, 26.74),
                         "Toys": (14.34, 25.84, 52.85, 23.74), "Electronics": (25.56, 51.77, 84.08, 42.40)},
    "Pooler+Scorer": {"Tools": (14.09, 31.19, 61.70, 26.48), "Sports": (22.97, 42.56, 74.69, 36.74),
                      "Toys": (20.73, 39.73, 73.23, 34.45), "Electronics": (15.69, 33.91, 68.18, 29.07)},
    "X-Cross": {"Tools": (20.11, 40.36, 76.06, 34.87), "Sports": (28.40, 50.09, 82.05, 43.36),
                "Toys": (28.23, 52.66, 85.66, 44.65), "Electronics": (26.25, 50.72, 84.71, 42.84)},
    "-Layers": {"Tools": (16.60, 35.11, 68.99, 30.20), "Sports": (24.24, 44.58, 76.57, 38.53),
                "Toys": (22.96, 45.26, 81.73, 38.73), "Electronics": (15.67, 33.33, 69.47, 29.15)},
    "-Interactions": {"Tools": (17.46, 38.49, 75.01, 32.62), "Sports": (26.73, 49.55, 81.84, 42.10),
                      "Toys": (26.10, 50.97, 83.35, 42.51), "Electronics": (23.02, 46.12, 80.72, 38.95)},
    "-Experts": {"Tools": (19.33, 39.67, 73.78, 33.68), "Sports": (27.57, 49.75, 81.55, 42.62),
                 "Toys": (25.81, 49.03, 83.98, 41.80), "Electronics": (26.06, 50.06, 82.88, 42.13)},
}
METRICS = ("hit@1", "hit@3", "hit@10", "mrr@10")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _cell(res: dict | None, ref: dict | None, metric: str = "hit@1") -> str:
    if res is None:
        return "not run"
    value = f"{res['metrics'][metric]:.2f}"
    if ref is not None and res is not ref:
        t = paired_ttest(ref, res, metric)
        value += "*" if t["p_value"] <= 0.05 else ""
    return value


def _rows(results: Path, preset: str) -> list[tuple[str, str, callable]]:
    """(label, paper key, domain -> result file)."""
    rows = [("zero-shot embedding similarity", "", lambda d: results / f"floor-{d}.json")]
    for src in DOMAINS:
        rows.append((f"{src}-LoRA (zero-shot on others)", f"{src}-LoRA",
                     lambda d, s=src: results / f"lora-{d}-{preset}.json" if s == d
                     else results / "zero_shot" / f"{s}-on-{d}.json"))
    rows += [
        ("Pooler+Scorer (best source's head)", "Pooler+Scorer", lambda d: results / f"pooler-scorer-{d}-{preset}.json"),
        ("mean of source LoRAs", "", lambda d: results / f"mean-{d}-{preset}.json"),
        ("X-Cross", "X-Cross", lambda d: results / f"xcross-{d}-{preset}.json"),
        ("-Layers (beta = gamma = 0)", "-Layers", lambda d: results / f"minus-layers-{d}-{preset}.json"),
        ("-Interactions (gamma=0)", "-Interactions", lambda d: results / f"minus-interactions-{d}-{preset}.json"),
        ("-Experts (beta = 0)", "-Experts", lambda d: results / f"minus-experts-{d}-{preset}.json"),
    ]
    return rows


def users_note(results: Path, preset: str) -> str:
    """How many dev users each target's numbers are on, read from the result files of the table."""
    per = {}
    for _, _, path_of in _rows(results, preset):
        for d in DOMAINS:
            r = _load(path_of(d))
            if r is not None:
                per.setdefault(d, set()).add(r["metrics"]["n_users"])
    if not per:
        return "the dev users of each target"
    counts = ", ".join(f"{d} {' / '.join(f'{n:,}' for n in sorted(per[d]))}" for d in DOMAINS if d in per)
    return f"the dev users of each target ({counts})"


def results_table(results: Path, preset: str) -> str:
    lines = ["| model | " + " | ".join(f"{d} ours | {d} paper" for d in DOMAINS) + " |",
             "|---|" + "---|---|" * len(DOMAINS)]
    xcross = {d: _load(results / f"xcross-{d}-{preset}.json") for d in DOMAINS}
    for label, paper_key, path_of in _rows(results, preset):
        cells = []
        for d in DOMAINS:
            cells.append(_cell(_load(path_of(d)), xcross[d]))
            cells.append(f"{PAPER[paper_key][d][0]:.2f}" if paper_key in PAPER else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zero_shot_table(zs: dict) -> str:
    """The 4x4 transfer matrix: rows = whose LoRA, columns = evaluated on (dev Hit@1); the column's best in bold."""
    doms = [d for d in DOMAINS if d in zs["dev"]]
    lines = ["| LoRA of \\ on | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    best = {t: max(doms, key=lambda s: zs["dev"][s][t]["hit@1"]) for t in doms}
    for s in doms:
        cells = [f"**{zs['dev'][s][t]['hit@1']:.2f}**" if best[t] == s else f"{zs['dev'][s][t]['hit@1']:.2f}"
                 for t in doms]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_source(zs: dict, target: str) -> str:
    """The best zero-shot source on the target's validation users (the reference X-Cross must beat)."""
    return max((s for s in zs["val"] if s != target), key=lambda s: (zs["val"][s][target]["hit@1"],
                                                                        zs["val"][s][target]["mrr@10"]))


def own_lora_targets(results: Path, preset: str, share: float = 0.7) -> list[str]:
    """Issue 16's first target: each own-domain LoRA at `share` of the paper's own-domain LoRA Hit@1 or more."""
    out = []
    for d in DOMAINS:
        goal = share * PAPER[f"{d}-LoRA"][d][0]
        own = _load(results / f"lora-{d}-{preset}.json")
        if own is None:
            out.append(f"- {d} LoRA: not run (target Hit@1 {goal:.1f}).")
            continue
        hit, n = own["metrics"]["hit@1"], own["metrics"]["n_users"]
        out.append(f"- {d} LoRA: Hit@1 {hit:.2f} on {n} dev users, target {goal:.1f} ({100 * share:.0f}% of the "
                   f"paper's {PAPER[f'{d}-LoRA'][d][0]:.2f}): {'met' if hit >= goal else 'not met'}.")
    return out


def findings(results: Path, preset: str) -> list[str]:
    """The issue's checks, computed from the files (each says 'not run' while its inputs are missing)."""
    out = own_lora_targets(results, preset)
    zs = _load(results / "zero_shot.json")
    if zs:
        doms = [d for d in DOMAINS if d in zs["dev"]]
        diag = [t for t in doms if all(zs["dev"][t][t]["hit@1"] > zs["dev"][s][t]["hit@1"] for s in doms if s != t)]
        out.append(f"- Zero-shot matrix diagonal-dominant (own LoRA best on its domain) on {len(diag)} of "
                   f"{len(doms)} domains" + (f" ({', '.join(diag)})" if diag else "") + ".")
    else:
        out.append("- Zero-shot matrix: not run.")
    wins = {"pooler-scorer": 0, "mean": 0}
    for t in DOMAINS:
        xc = _load(results / f"xcross-{t}-{preset}.json")
        if xc is None:
            out.append(f"- {t}: X-Cross not run.")
            continue
        parts, verdict = [], {}
        if zs:
            src = _best_source(zs, t)
            ref = _load(results / "zero_shot" / f"{src}-on-{t}.json")
            if ref:
                r, m = paired_ttest(xc, ref), paired_ttest(xc, ref, "mrr@10")
                parts.append(f"vs best zero-shot source ({src}) Hit@1 {r['a']:.2f} vs {r['b']:.2f}, "
                             f"p = {r['p_value']:.3g}, MRR@10 {m['diff']:+.2f}, p = {m['p_value']:.3g} "
                             f"(n = {r['n_users']})")
                verdict.update({k: x["diff"] > 0 and x["p_value"] <= 0.05 for k, x in (("Hit@1", r), ("MRR@10", m))})
        for name, label in (("pooler-scorer", "Pooler+Scorer"), ("mean", "mean of LoRAs"),
                            ("minus-layers", "-Layers"), ("minus-interactions", "-Interactions"),
                            ("minus-experts", "-Experts")):
            other = _load(results / f"{name}-{t}-{preset}.json")
            if other is None:
                continue
            r = paired_ttest(xc, other)
            if name in wins and r["diff"] > 0:
                wins[name] += 1
            parts.append(f"vs {label} {r['diff']:+.2f}, p = {r['p_value']:.3g}")
        own = _load(results / f"lora-{t}-{preset}.json")
        if own is not None:
            r, m = paired_ttest(xc, own), paired_ttest(xc, own, "mrr@10")
            parts.append(f"vs the target's own LoRA {r['diff']:+.2f}, p = {r['p_value']:.3g}, MRR@10 "
                         f"{m['diff']:+.2f}, p = {m['p_value']:.3g}")
            if verdict:  # issue 16: at or above the own LoRA, above the best source with p <= 0.05
                met = [k for k, x in (("Hit@1", r), ("MRR@10", m)) if verdict[k] and x["diff"] >= 0]
                parts.append("target (>= own LoRA, > best source at p <= 0.05) "
                             + (f"met at {' and '.join(met)}" if met else "not met"))
        out.append(f"- {t}: X-Cross " + ("; ".join(parts) if parts else "(no comparison run yet)") + ".")
    out.append(f"- X-Cross above Pooler+Scorer on {wins['pooler-scorer']} targets and above the mean of LoRAs on "
               f"{wins['mean']} (Hit@1; of the targets where both ran).")
    return out


def low_data_table(result: dict) -> str:
    """Mean (min-max over seeds) dev Hit@1 per train size, and the smallest size beating the zero-shot reference."""
    import numpy as np

    ref = result["reference_hit@1"]
    sizes = sorted({r["size"] for r in result["rows"]})
    lines = ["| train users | X-Cross | target LoRA |", "|---|---|---|"]
    first = {}
    for size in sizes:
        cells = []
        for kind in ("xcross", "lora"):
            v = [r["hit@1"] for r in result["rows"] if r["model"] == kind and r["size"] == size]
            if not v:
                cells.append("not run")
                continue
            cells.append(f"{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}")
            if np.mean(v) > ref and kind not in first:
                first[kind] = size
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += ["", f"Reference: {result['reference']} LoRA zero-shot, Hit@1 {ref:.2f}. Smallest size above it: "
              f"X-Cross {first.get('xcross', 'none')}, target LoRA {first.get('lora', 'none')}."]
    return "\n".join(lines)


def detail_table(results: Path, preset: str, target: str) -> str:
    """All four metrics of every model run on one target, with the paired t-test p-value of Hit@1 vs X-Cross."""
    xc = _load(results / f"xcross-{target}-{preset}.json")
    lines = ["| model | Hit@1 | Hit@3 | Hit@10 | MRR@10 | users | p (Hit@1 vs X-Cross) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for label, _, path_of in _rows(results, preset):
        r = _load(path_of(target))
        if r is None:
            continue
        m = r["metrics"]
        own = path_of(target) == results / f"xcross-{target}-{preset}.json"
        p = "" if xc is None or own else f"{paired_ttest(xc, r)['p_value']:.3g}"
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.2f}" for k in METRICS) + f" | {m['n_users']} | {p} | "
                     f"{r.get('wall_s', '')} |")
    return "\n".join(lines)


def _extra_sections(results: Path, preset: str) -> list[str]:
    """Sections rendered by the variant and retrieval modules from their own result files, when they have any."""
    parts = []
    if list(results.glob("variants-*.json")):
        from training.variants import markdown_section

        parts += [markdown_section(results, preset), ""]
    if (results / "recall").is_dir() and list((results / "recall").glob("*.json")):
        try:
            from training.recall import markdown_section as recall_section
        except ImportError:  # the retrieval package is optional for this report
            recall_section = None
        if recall_section is not None:
            parts += [recall_section(), ""]
    if list(results.glob("full_catalog-*.json")):  # issue 20: whole-catalog recall + rerank
        from training.full_catalog import markdown_section as full_catalog_section

        parts += [full_catalog_section(results), ""]
    return parts


def provenance(results: Path) -> str:
    lines = ["| file | preset | commit | users | wall s |", "|---|---|---|---|---|"]
    for path in sorted(results.rglob("*.json")):
        r = _load(path)
        if not isinstance(r, dict) or "preset" not in r:
            continue
        users = r.get("metrics", {}).get("n_users", r.get("users", ""))
        lines.append(f"| {path.relative_to(results)} | {r['preset']} | {r.get('commit', '?')} | {users} | "
                     f"{r.get('wall_s', '')} |")
    return "\n".join(lines)


def write_report(results: Path, docs: Path, preset: str = "cpu") -> Path:
    zs = _load(results / "zero_shot.json")
    try:
        where = str(results.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        where = str(results)
    command = f"python -m training report --preset {preset}" + ("" if where == "results" else f" --results {where}")
    parts = [
        "# Results",
        "",
        f"Generated by `{command}` from the files in `{where}/`; every number is Hit@1 (x100) on "
        f"{users_note(results, preset)}, MiniLM-L6 backbone. `*`: two-sided paired t-test against X-Cross on the "
        "common users, p <= 0.05. "
        "`not run`: no result file yet. Paper columns: DeBERTa-v3-base, all test users (Tables 2 and 4).",
        "",
        results_table(results, preset),
        "",
    ]
    parts += ["## Findings", "", *findings(results, preset), ""]
    if zs:
        users = f"the first {zs['users']}" if zs.get("users") else "all"
        parts += ["## Zero-shot transfer matrix", "", f"Dev Hit@1 on {users} dev users; "
                  "bold: the best LoRA on each domain.", "", zero_shot_table(zs), ""]
        parts += ["## Source choice", "", "Best two zero-shot sources on the target's validation users (not dev):", ""]
        parts += [f"- {t}: {' + '.join(s)}" for t, s in zs["sources"].items()] + [""]
    for d in DOMAINS:
        if _load(results / f"xcross-{d}-{preset}.json") or _load(results / f"lora-{d}-{preset}.json"):
            parts += [f"## {d}: all metrics", "", detail_table(results, preset, d), ""]
    for d in DOMAINS:
        ld = _load(results / f"low_data-{d}.json")
        if ld:
            parts += [f"## Low data: {d}", "", low_data_table(ld), ""]
            png = results / f"low_data-{d}.png"
            if png.exists():
                parts += [f"![low data {d}](../results/{png.name})", ""]
    if (docs / "training_curves.png").exists():
        parts += ["## Training curves", "",
                  "Validation MRR@10 (the metric that keeps a checkpoint) against train users seen, per target: the "
                  "own LoRA, X-Cross, Pooler+Scorer and the ablations, beside the two chosen sources' zero-shot "
                  "points on the same validation users; dashed: runs without a dev result when the report was written "
                  "(still training, or trained and waiting for their dev evaluation).",
                  "", "![validation MRR@10 during training](training_curves.png)", ""]
    parts += _extra_sections(results, preset)
    parts += ["## Provenance", "", provenance(results), ""]
    out = docs / "results.md"
    out.write_text("\n".join(parts))
    return out


# the training runs whose validation curves share a target's panel, in legend order
CURVE_KINDS = {"lora": "own LoRA", "xcross": "X-Cross", "pooler-scorer": "Pooler+Scorer",
               "minus-layers": "-Layers", "minus-interactions": "-Interactions", "minus-experts": "-Experts"}


def curve_series(results: Path, preset: str, runs: Path | None = None) -> dict[str, dict]:
    """Per target: each run's validation curve (finished runs from their result files; with `runs`, runs still
    training from their resumable state.json) and its chosen sources' zero-shot validation points.

    {target: {"runs": [{"kind", "label", "running", "trained", "step", "curve"}], "sources": {source: metrics}}}
    `running`: no dev result yet; `trained`: its state says training finished (the dev evaluation is what is left)."""
    out: dict[str, dict] = {}
    zs = _load(results / "zero_shot.json") or {}
    for target in DOMAINS:
        series = []
        for kind, label in CURVE_KINDS.items():
            name = f"{kind}-{target}-{preset}"
            res = _load(results / f"{name}.json")
            state = _load(runs / name / "state.json") if runs is not None and res is None else None
            run = res if res is not None else state
            if run and run.get("curve"):
                series.append({"kind": kind, "label": label, "running": res is None, "curve": run["curve"],
                               "trained": res is None and bool(run.get("finished")),
                               "step": run.get("step", run["curve"][-1]["step"]) if res is None else None})
        sources = {s: zs["val"][s][target] for s in zs.get("sources", {}).get(target, [])}
        if series:
            out[target] = {"runs": series, "sources": sources}
    return out


def plot_curves(results: Path, out: Path, preset: str = "cpu", runs: Path | None = None,
                metric: str = "mrr@10") -> Path | None:
    """One panel per target: validation `metric` (the one that keeps a checkpoint) vs train users seen for the
    target's own LoRA, X-Cross, Pooler+Scorer and the ablations; dotted lines: the two chosen sources' zero-shot
    points on the same validation users; dashed curves: runs without a dev result (still training, or trained and
    waiting for their dev evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_series(results, preset, runs)
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    palette = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")
    colors = dict(zip(CURVE_KINDS, palette, strict=True))
    for ax, (target, panel) in zip(axes.flat, panels.items(), strict=False):  # spare axes: off
        for r in panel["runs"]:
            label = r["label"] + ("" if not r["running"] else " (trained, dev pending)" if r["trained"]
                                  else f" (training, step {r['step']:,})")
            ax.plot([c["users_seen"] / 1000 for c in r["curve"]], [c[metric] for c in r["curve"]], marker="o",
                    ms=3, color=colors[r["kind"]], ls="--" if r["running"] else "-", label=label)
        for (src, m), ls in zip(panel["sources"].items(), (":", "-."), strict=False):
            ax.axhline(m[metric], ls=ls, lw=1, color="gray", label=f"{src} LoRA zero-shot")
        users = next(iter(panel["sources"].values()), {}).get("n_users")
        ax.set_title(f"{target}" + (f" ({users:,} validation users)" if users else ""), fontsize=10)
        ax.set_xlabel("train users seen (thousands)")
        ax.set_ylabel(f"validation {metric.replace('mrr', 'MRR').replace('hit', 'Hit')}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
