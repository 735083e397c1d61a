"""Offline training and evaluation CLI.

    python -m training floor --domain Tools                       # zero-shot sentence-embedding floor
    python -m training train-lora --domain Tools --preset cpu     # a source LoRA + head -> artifacts/lora/Tools
    python -m training zero-shot --preset cpu                     # 4x4 transfer matrix; picks each target's sources
    python -m training train-xcross --target Tools --preset cpu   # X-Cross -> artifacts/xcross/Tools
    python -m training train-xcross --target Tools --top-k 0 --name minus-layers       # ablation -Layers
    python -m training train-xcross --target Tools --gamma 0 --name minus-interactions # ablation -Interactions
    python -m training train-xcross --target Tools --beta 0 --name minus-experts        # ablation -Experts
    python -m training train-xcross --target Tools --n-sources 1 --head-only --name pooler-scorer
    python -m training mean-lora --target Tools                   # baseline: averaged source LoRAs
    python -m training low-data --target Tools                    # X-Cross vs LoRA on 50..1000 users (+ plot)
    python -m training evaluate --model artifacts/xcross/Tools \
        --users ../shared/data/amazon-xcross/Tools/dev.jsonl --json   # any dev.jsonl-format file
    python -m training compare results/a.json results/b.json     # paired two-sided t-test per metric
    python -m training full-catalog --domain Tools --users 300  # whole-catalog recall + rerank (issue 20)
    python -m training onboard --domain Garden --items items.csv --interactions events.csv  # a new domain (issue 19)
    python -m training report                                     # docs/results.md + docs/training_curves.png
    python -m training recall --help                              # cross-domain retrieval (docs/recall.md)
    python -m training variants --help                            # WeaveRec and GCA variants (docs/variants.md)
    python -m training all --preset cpu --jobs 2                  # everything above, resumable, 2 workers

Long commands show progress, checkpoint every few steps, and continue after a kill with `--resume`.
Every command takes `--preset smoke|cpu|cpu-wave1|paper` (default cpu) and `--quiet`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from training.data import DOMAINS, check_domain
from training.evaluate import bf16_allowed
from training.onboard import register as register_onboard
from training.pipeline import Context, Paths
from training.presets import get_preset
from training.recall import app as recall_app
from training.schedule import STAGES
from training.variants import app as variants_app

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)

PresetOpt = Annotated[str, typer.Option(help="smoke | cpu | cpu-wave1 | paper")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a preset field: lr=2e-3, lora.max_len=128")]
TagOpt = Annotated[str | None, typer.Option(help="name for an overridden preset (runs/results get <preset>-<tag>)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the run's last saved state")]
SeedOpt = Annotated[int, typer.Option(help="seed of the split, subset, order and negatives")]
ArtifactsOpt = Annotated[Path | None, typer.Option(help="checkpoint root (default: artifacts/)")]
ResultsOpt = Annotated[Path | None, typer.Option(help="results root (default: results/)")]
RunsOpt = Annotated[Path | None, typer.Option(help="training state root (default: runs/)")]
DataOpt = Annotated[Path | None, typer.Option(help="amazon-xcross data root (default: ../shared/data/amazon-xcross)")]


app.add_typer(variants_app, name="variants", help="WeaveRec merging and gated cross-attention beside X-Cross "
                                                   "(docs/variants.md)")
app.add_typer(recall_app, name="recall", help="cross-domain retrieval (HSTU/TAPE/DDSR/GCA): train, evaluate, "
                                               "bench-attention, report")

register_onboard(app)  # python -m training onboard (issue 19, training/onboard.py)

MaxStepsOpt = Annotated[int | None, typer.Option(help="stop after N optimizer steps (resume later with --resume)")]


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1): one process group, gloo on CPU, nccl on GPU."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _ctx(preset: str, quiet: bool, seed: int = 0, artifacts: Path | None = None, results: Path | None = None,
         runs: Path | None = None, data: Path | None = None, overrides: list[str] | None = None,
         tag: str | None = None) -> Context:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _init_distributed()
    paths = Paths()
    paths.artifacts, paths.results = artifacts or paths.artifacts, results or paths.results
    paths.runs, paths.data = runs or paths.runs, data
    try:
        chosen = get_preset(preset, overrides or [], tag)
        allowed, why = bf16_allowed()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not allowed and (chosen.lora.bf16 or chosen.xcross.bf16):
        # the same preset and run names (a run resumes across machines); the result records the precision note
        logging.getLogger("training").warning("bf16 autocast off: %s", why)
        chosen = replace(chosen, lora=replace(chosen.lora, bf16=False), xcross=replace(chosen.xcross, bf16=False))
    return Context(chosen, paths, seed=seed, progress=not quiet)


def _domain(value: str) -> str:
    try:
        return check_domain(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _report_training(title: str, out: dict) -> None:
    if not out["finished"]:
        typer.echo(f"{title}: stopped at step {out['step']} ({out['wall_s']:.0f} s); continue with --resume")
    elif out["out"]:
        _print_metrics(f"{title} dev", out["dev"])
        typer.echo(f"saved {out['out']} ({out['wall_s']:.0f} s)")


def _print_metrics(title: str, m: dict) -> None:
    typer.echo(f"{title}: Hit@1 {m['hit@1']:.2f}  Hit@3 {m['hit@3']:.2f}  Hit@10 {m['hit@10']:.2f}  "
               f"MRR@10 {m['mrr@10']:.2f}  (n_users {m['n_users']})")


@app.command("floor")
def floor_cmd(domain: Annotated[str, typer.Option(callback=_domain)], preset: PresetOpt = "cpu",
              quiet: QuietOpt = False, results: ResultsOpt = None, data: DataOpt = None) -> None:
    """Zero-shot floor: cos(mean history embedding, candidate embedding) with the plain backbone."""
    from training.pipeline import floor

    _print_metrics(f"floor {domain}", floor(_ctx(preset, quiet, results=results, data=data), domain))


@app.command("train-lora")
def train_lora_cmd(domain: Annotated[str, typer.Option(callback=_domain)], preset: PresetOpt = "cpu",
                   resume: ResumeOpt = False, seed: SeedOpt = 0, quiet: QuietOpt = False,
                   max_steps: MaxStepsOpt = None, overrides: SetOpt = None, tag: TagOpt = None,
                   artifacts: ArtifactsOpt = None, results: ResultsOpt = None, runs: RunsOpt = None,
                   data: DataOpt = None) -> None:
    """Fine-tune a source-domain LoRA + head (loss eq. 1) and save it under artifacts/lora/<domain>."""
    from training.pipeline import train_lora

    ctx = _ctx(preset, quiet, seed, artifacts, results, runs, data, overrides, tag)
    _report_training(f"LoRA {domain}", train_lora(ctx, domain, resume=resume, max_steps=max_steps))


@app.command("zero-shot")
def zero_shot_cmd(preset: PresetOpt = "cpu", quiet: QuietOpt = False,
                  domains: Annotated[str, typer.Option(help="comma-separated subset")] = ",".join(DOMAINS),
                  rows: Annotated[str | None, typer.Option(help="only these sources' rows (to split the work)")]
                  = None,
                  artifacts: ArtifactsOpt = None, results: ResultsOpt = None, data: DataOpt = None) -> None:
    """Every domain's LoRA on every domain (dev and validation users); choose each target's two sources.

    Cells already evaluated (results/zero_shot/<S>-on-<T>.json, same preset and LoRA) are reused."""
    from training.pipeline import zero_shot

    names = tuple(_domain(d) for d in domains.split(","))
    picked = tuple(_domain(d) for d in rows.split(",")) if rows else None
    out = zero_shot(_ctx(preset, quiet, artifacts=artifacts, results=results, data=data), names, picked)
    typer.echo("dev Hit@1 (rows: LoRA of, columns: evaluated on)")
    typer.echo(" " * 12 + "".join(f"{t:>12}" for t in names))
    for s in picked or names:
        typer.echo(f"{s:>12}" + "".join(f"{out['dev'][s][t]['hit@1']:12.2f}" for t in names))
    for t, srcs in out["sources"].items():
        typer.echo(f"sources for {t}: {' + '.join(srcs)}")


@app.command("train-xcross")
def train_xcross_cmd(target: Annotated[str, typer.Option(callback=_domain)], preset: PresetOpt = "cpu",
                     sources: Annotated[str | None, typer.Option(help="comma-separated; default: zero-shot choice")]
                     = None,
                     n_sources: Annotated[int, typer.Option(help="first N chosen sources (1: Pooler+Scorer)")]
                     = 2,
                     top_k: Annotated[int | None, typer.Option(help="integrated top layers (0 = -Layers)")] = None,
                     gamma: Annotated[float | None, typer.Option(help="interaction strength (0 = -Interactions)")]
                     = None,
                     beta: Annotated[float | None, typer.Option(help="direct-influence strength (0 = -Experts)")]
                     = None,
                     head_only: Annotated[bool, typer.Option("--head-only", help="Pooler+Scorer baseline")] = False,
                     lora_top: Annotated[int, typer.Option(
                         help="keep the source LoRAs on the top N layers only (0 = all): the shared-lower-layers "
                              "option, lower layers run once for all streams")] = 0,
                     name: Annotated[str, typer.Option(help="run name; 'xcross' saves to artifacts/xcross")]
                     = "xcross",
                     resume: ResumeOpt = False, seed: SeedOpt = 0, quiet: QuietOpt = False,
                     max_steps: MaxStepsOpt = None, overrides: SetOpt = None, tag: TagOpt = None,
                     artifacts: ArtifactsOpt = None, results: ResultsOpt = None, runs: RunsOpt = None,
                     data: DataOpt = None) -> None:
    """Train the X-Cross integrator for a target on frozen source LoRAs (or an ablation / baseline)."""
    from training.pipeline import chosen_sources, train_xcross

    ctx = _ctx(preset, quiet, seed, artifacts, results, runs, data, overrides, tag)
    srcs = [_domain(s) for s in sources.split(",")] if sources else chosen_sources(ctx, target)
    out = train_xcross(ctx, target, srcs[:n_sources], top_k, gamma, head_only, name, resume, max_steps=max_steps,
                       beta=beta, integrator={"lora_top": lora_top} if lora_top else None)
    _report_training(f"{name} {target}", out)


@app.command("low-data")
def low_data_cmd(target: Annotated[str, typer.Option(callback=_domain)], preset: PresetOpt = "cpu",
                 quiet: QuietOpt = False, artifacts: ArtifactsOpt = None, results: ResultsOpt = None,
                 runs: RunsOpt = None, data: DataOpt = None,
                 sizes: Annotated[str | None, typer.Option(
                     help="only these train sizes (comma-separated), e.g. to split the curve over workers; "
                          "the table and plot are written by a run without --sizes")] = None,
                 available: Annotated[bool, typer.Option(
                     "--available", help="train nothing: table and plot from the finished runs, the rest listed "
                                         "as missing")] = False) -> None:
    """X-Cross vs target LoRA on small train subsets (preset sizes x seeds); plot with the zero-shot reference."""
    from training.pipeline import low_data

    picked = tuple(int(x) for x in sizes.split(",")) if sizes else None
    out = low_data(_ctx(preset, quiet, 0, artifacts, results, runs, data), target, sizes=picked, available=available)
    if picked:
        typer.echo(f"trained sizes {picked}; run low-data --target {target} without --sizes for the table")
        return
    for r in out["rows"]:
        typer.echo(f"{r['model']:>7} size {r['size']:>5} seed {r['seed']}: Hit@1 {r['hit@1']:.2f}")
    typer.echo(f"reference ({out['reference']} zero-shot): Hit@1 {out['reference_hit@1']:.2f}")
    if out["missing"]:
        typer.echo(f"not run ({len(out['missing'])}): {', '.join(out['missing'])}")


@app.command("mean-lora")
def mean_lora_cmd(target: Annotated[str, typer.Option(callback=_domain)], preset: PresetOpt = "cpu",
                  quiet: QuietOpt = False, artifacts: ArtifactsOpt = None, results: ResultsOpt = None,
                  runs: RunsOpt = None, data: DataOpt = None) -> None:
    """Baseline: explicit average of the chosen source LoRAs (delta W and heads), zero-shot on the target."""
    from training.pipeline import mean_lora

    _print_metrics(f"mean-of-LoRAs {target} dev",
                   mean_lora(_ctx(preset, quiet, 0, artifacts, results, runs, data), target)["dev"])


@app.command("evaluate")
def evaluate_cmd(model: Annotated[Path, typer.Option(help="checkpoint directory")],
                 users: Annotated[Path, typer.Option(help="a file in the dev.jsonl format")],
                 limit: Annotated[int | None, typer.Option(help="first N users only")] = None,
                 domain: Annotated[str | None, typer.Option(help="catalog domain (default: the model's)")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")]
                 = False,
                 save: Annotated[Path | None, typer.Option(help="write metrics + per-user ranks here")] = None,
                 fp32: Annotated[bool, typer.Option("--fp32", help="no bf16 autocast")] = False,
                 preset: PresetOpt = "cpu", quiet: QuietOpt = False, data: DataOpt = None) -> None:
    """Evaluate any checkpoint on any dev.jsonl-format file: Hit@1/3/10, MRR@10 (x100)."""
    from training.evaluate import save_result
    from training.pipeline import evaluate_file

    if not users.is_file():
        raise typer.BadParameter(f"--users {users}: no such file")
    res = evaluate_file(_ctx(preset, quiet, data=data), model, users, limit, domain, bf16=False if fp32 else None)
    if save:
        save_result(save, res)
    _print_metrics(f"{model} on {users}", res["metrics"])
    if as_json:
        extra = {"orthogonality": res["orthogonality"]} if "orthogonality" in res else {}  # GCA models
        typer.echo(json.dumps({**res["metrics"], **extra}))


@app.command("report")
def report_cmd(preset: PresetOpt = "cpu", results: ResultsOpt = None,
               docs: Annotated[Path, typer.Option(help="where results.md goes")] = Path("docs"),
               runs: Annotated[Path | None, typer.Option(help="run states to plot the curves of runs still training "
                                                         "(e.g. runs/wave2); default: finished runs only")] = None,
               ) -> None:
    """Write docs/results.md (tables with the paper's numbers, significance, plots, provenance)."""
    from training.pipeline import Paths
    from training.report import plot_curves, write_report

    root = results or Paths().results
    docs.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(root, docs / "training_curves.png", preset, runs)
    typer.echo(f"wrote {write_report(root, docs, preset)}" + (f" and {curves}" if curves else ""))


@app.command("all")
def all_cmd(preset: PresetOpt = "cpu",
            jobs: Annotated[int, typer.Option(help="worker processes")] = 2,
            threads: Annotated[int | None, typer.Option(help="threads per worker (default: cores / jobs)")] = None,
            stages: Annotated[str, typer.Option(help="comma-separated subset of: " + ", ".join(STAGES))]
            = ",".join(STAGES),
            targets: Annotated[str, typer.Option(help="X-Cross / baseline targets")] = ",".join(DOMAINS),
            ablation_targets: Annotated[str, typer.Option(help="targets of the three ablations")]
            = ",".join(DOMAINS),
            low_data_targets: Annotated[str, typer.Option(help="targets of the low-data curves")] = "Tools,Toys",
            variant_targets: Annotated[str, typer.Option(help="targets of the WeaveRec / GCA variants")]
            = "Tools,Toys",
            dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and what is done")] = False,
            results: ResultsOpt = None, artifacts: ArtifactsOpt = None, runs: RunsOpt = None) -> None:
    """The whole pipeline as a resumable job graph on N worker processes (logs in logs/<job>.log).

    Run it again after a kill, or in the next session: finished jobs are skipped, unfinished ones resume.
    `--artifacts/--results/--runs` put every job's checkpoints, results and states under other roots (a retrain
    staged beside what the service serves)."""
    from training.pipeline import REPO, Paths
    from training.schedule import plan, run

    picked = tuple(s.strip() for s in stages.split(","))
    unknown = [s for s in picked if s not in STAGES]
    if unknown:
        raise typer.BadParameter(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")

    def doms(value: str) -> tuple[str, ...]:
        return tuple(_domain(d) for d in value.split(",") if d)

    for env, root in (("XCROSS_RESULTS", results), ("XCROSS_ARTIFACTS", artifacts), ("XCROSS_RUNS", runs)):
        if root is not None:  # every job (a subprocess) writes and reads there
            os.environ[env] = str(root.resolve())
    paths = Paths()
    graph = plan(preset, paths.results, doms(targets), picked, doms(ablation_targets),
                 doms(low_data_targets), variant_targets=doms(variant_targets), artifacts=paths.artifacts)
    if dry_run:
        for j in graph:
            mark = "done" if j.done and j.finished() else "todo"
            typer.echo(f"{mark:>4}  {j.name:<28} python -m training {' '.join(j.args)}")
        return
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    status = run(graph, jobs, threads, REPO / "logs", REPO, echo=typer.echo)
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "skipped", "failed", "blocked")}
    typer.echo("pipeline: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"] or counts["blocked"]:
        raise typer.Exit(1)


@app.command("full-catalog")
def full_catalog_cmd(domain: Annotated[str, typer.Option(callback=_domain)],
                     users: Annotated[int | None, typer.Option(help="first N users (default 300; 0 = all)")] = 300,
                     users_file: Annotated[Path | None, typer.Option(help="a dev.jsonl-format file (default: dev)")]
                     = None,
                     rerank_n: Annotated[int, typer.Option(help="text-recall items each reranker scores")] = 200,
                     rerankers: Annotated[str, typer.Option(help="checkpoint kinds, comma-separated; \"\": none")]
                     = "xcross,lora",
                     rerank_recall: Annotated[str, typer.Option(
                         help="recall whose top N the rerankers score: text | blend (text + the served item-id "
                              "model, the service's auto mode)")] = "text",
                     preset: PresetOpt = "cpu", quiet: QuietOpt = False, artifacts: ArtifactsOpt = None,
                     results: ResultsOpt = None, runs: RunsOpt = None, data: DataOpt = None) -> None:
    """Two-stage evaluation over the whole catalog: recall stages (Recall@50/100/200), recall vs recall + rerank."""
    from training.full_catalog import command_line, full_catalog

    ctx = _ctx(preset, quiet, 0, artifacts, results, runs, data)
    out = full_catalog(ctx, domain, users or None, users_file, rerank_n, tuple(r for r in rerankers.split(",") if r),
                       command=command_line(), rerank_recall=rerank_recall)
    for name, m in out["metrics"].items():
        typer.echo(f"{name:>14}: " + "  ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "n_users")
                   + f"  (n_users {m['n_users']})")


@app.command("ship")
def ship_cmd(source: Annotated[Path, typer.Option("--from", help="staging root of a retrain: runs/wave2/artifacts")],
             to: Annotated[Path | None, typer.Option(help="served root (default: artifacts/)")] = None,
             runs: RunsOpt = None,
             dry_run: Annotated[bool, typer.Option("--dry-run", help="only check; change nothing")] = False,
             keep_sources: Annotated[bool, typer.Option(
                 "--keep-sources", help="served kinds that are not staged (e.g. gca/ of an earlier wave) keep "
                 "serving on copies of their current source LoRAs under <to>/sources/")] = False) -> None:
    """Swap a retrained, verified, self-consistent checkpoint set into the served artifacts
    (then POST /admin/reload or SIGHUP the service).

    Example: python -m training ship --from runs/wave2/artifacts --keep-sources --dry-run
    """
    from training.pipeline import Paths
    from training.ship import ShipError, ship

    paths = Paths()
    try:
        out = ship(source, to or paths.artifacts, runs or paths.runs, dry_run=dry_run, keep_sources=keep_sources)
    except ShipError as exc:
        typer.echo(f"not shipped: {exc}", err=True)
        raise typer.Exit(1) from exc
    for kind in out["kinds"]:
        same = " (identical to what is served)" if kind in out["unchanged"] else ""
        typer.echo(f"{kind}: {', '.join(out['checkpoints'][kind])}{same}")
    for dst in out["sources_kept"]:
        typer.echo(f"kept a served model's current source LoRA: {dst}")
    for d in out["sources_retired"]:
        typer.echo(f"retired a kept source no served model names any more: {d}")
    typer.echo("default model per domain after the swap: "
               + ", ".join(f"{d}: {k}" for d, k in out["defaults"].items()))
    for line in out["stale_defaults"]:
        typer.echo(f"warning: {line}", err=True)
    typer.echo("checked; nothing changed (--dry-run)" if dry_run else
               f"shipped into {out['to']}; previous set in {out['backup']}; reload the service: POST /admin/reload "
               "(Authorization: Bearer $XCROSS_ADMIN_TOKEN) or kill -HUP <pid>")


@app.command("compare")
def compare_cmd(a: Path, b: Path) -> None:
    """Two-sided paired t-test between two saved results (same users)."""
    from training.pipeline import compare

    for metric, r in compare(a, b).items():
        typer.echo(f"{metric:>7}: A {r['a']:.2f}  B {r['b']:.2f}  diff {r['diff']:+.2f}  p={r['p_value']:.3g}  "
                   f"(n={r['n_users']})")


if __name__ == "__main__":
    app()
