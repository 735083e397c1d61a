"""The smoke preset of the whole pipeline: train-lora -> zero-shot -> train-xcross (+ baselines) -> evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import read_manifest
from training.pipeline import Context, Paths, mean_lora, train_lora, train_xcross, zero_shot
from training.presets import get_preset

REPO = Path(__file__).resolve().parents[2]
DOMS = ("Tools", "Sports", "Electronics")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    ctx = Context(  # a tiny random backbone: this checks the pipeline's plumbing, not what MiniLM learns
        get_preset("smoke"),
        Paths(artifacts=root / "artifacts", results=root / "results", runs=root / "runs"),
        backbone_name="tiny:bert",
        progress=False,
    )
    loras = {d: train_lora(ctx, d) for d in DOMS}
    zs = zero_shot(ctx, DOMS)
    xc = train_xcross(ctx, "Tools")
    return ctx, root, loras, zs, xc


def test_source_loras_saved_with_metrics(pipeline):
    ctx, root, loras, _, _ = pipeline
    for d in DOMS:
        m = read_manifest(root / "artifacts" / "lora" / d)
        assert m["kind"] == "lora" and m["domain"] == d and m["preset"] == "smoke"
        assert m["metrics"]["dev"]["n_users"] == 6 and loras[d]["finished"]
        res = json.loads((root / "results" / f"lora-{d}-smoke.json").read_text())
        assert len(res["per_user"]) == 6 and res["curve"] and res["commit"]


def test_zero_shot_matrix_and_source_choice(pipeline):
    _, root, _, zs, _ = pipeline
    assert set(zs["dev"]) == set(DOMS) and all(set(zs["dev"][s]) == set(DOMS) for s in DOMS)
    for tgt, srcs in zs["sources"].items():
        assert len(srcs) == 2 and tgt not in srcs
        best = max(
            (s for s in DOMS if s != tgt), key=lambda s: (zs["val"][s][tgt]["hit@1"], zs["val"][s][tgt]["mrr@10"])
        )
        assert srcs[0] == best
    assert json.loads((root / "results" / "zero_shot.json").read_text())["sources"] == zs["sources"]


def test_zero_shot_reuses_saved_cells_and_splits_by_row(pipeline, monkeypatch):
    import training.pipeline as tp

    ctx, root, _, zs, _ = pipeline
    cell = json.loads((root / "results" / "zero_shot" / "Tools-on-Sports.json").read_text())
    assert cell["val"] == zs["val"]["Tools"]["Sports"] and cell["lora_hash"]

    def no_eval(*_a, **_k):
        raise AssertionError("a saved cell was evaluated again")

    monkeypatch.setattr(tp, "score_checkpoint", no_eval)
    again = zero_shot(ctx, DOMS)
    assert again["dev"] == zs["dev"] and again["sources"] == zs["sources"]
    part = zero_shot(ctx, DOMS, rows=("Sports",))
    assert set(part["dev"]) == {"Sports"} and part["sources"] == {}


def test_zero_shot_diagonal_comes_from_the_loras_own_run(pipeline, monkeypatch, tmp_path):
    """A LoRA on its own domain is not scored again when its run evaluated that checkpoint on the same users (smoke
    scores the matrix on 4 dev users and the LoRAs on 6: here the matrix is asked for 6)."""
    import dataclasses
    import shutil

    import training.pipeline as tp

    ctx, root, *_ = pipeline
    assert "from_run" not in json.loads((root / "results" / "zero_shot" / "Tools-on-Tools.json").read_text())
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    six = dataclasses.replace(ctx, preset=dataclasses.replace(ctx.preset, floor_users=6),
                              paths=dataclasses.replace(ctx.paths, results=results))
    calls = []
    real = tp.score_checkpoint
    monkeypatch.setattr(tp, "score_checkpoint", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    zero_shot(six, DOMS, rows=("Tools",))
    assert calls == ["Sports", "Sports", "Electronics", "Electronics"]  # dev + validation, off the diagonal only
    own = json.loads((results / "lora-Tools-smoke.json").read_text())
    cell = json.loads((results / "zero_shot" / "Tools-on-Tools.json").read_text())
    assert cell["from_run"] and cell["metrics"] == own["metrics"] and cell["per_user"] == own["per_user"]
    state = json.loads((root / "runs" / "lora-Tools-smoke" / "state.json").read_text())
    best = next(p for p in state["curve"] if p["step"] == state["best_step"])
    assert cell["val"]["mrr@10"] == best["mrr@10"]

    (results / "zero_shot" / "Tools-on-Tools.json").unlink()
    stale = {**own, "metrics": {**own["metrics"], "hit@1": own["metrics"]["hit@1"] + 1}}
    (results / "lora-Tools-smoke.json").write_text(json.dumps(stale))  # no longer the exported checkpoint's
    calls.clear()
    zero_shot(six, DOMS, rows=("Tools",))
    assert calls == ["Tools", "Tools"]  # scored: the run's file does not describe the checkpoint
    assert "from_run" not in json.loads((results / "zero_shot" / "Tools-on-Tools.json").read_text())


def test_zero_shot_cells_on_other_users_are_evaluated_again(pipeline, monkeypatch):
    """A cell saved for another number of dev users (e.g. the first 1,000 before every dev user) is not reused."""
    import dataclasses

    import training.pipeline as tp

    ctx, *_ = pipeline
    fewer = dataclasses.replace(ctx, preset=dataclasses.replace(ctx.preset, floor_users=ctx.preset.floor_users - 1))
    calls = []
    real = tp.score_checkpoint

    def counting(*a, **k):
        calls.append(len(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(tp, "score_checkpoint", counting)
    zero_shot(fewer, DOMS, rows=("Tools",))
    n = ctx.preset.floor_users - 1
    assert calls and calls[0::2] == [n] * len(DOMS)  # the dev cells, on the new number of users
    zero_shot(ctx, DOMS, rows=("Tools",))  # back to the original users: evaluated again, then saved
    assert len(calls) == 4 * len(DOMS)


def test_sources_are_chosen_from_the_other_rows_before_the_matrix_exists(pipeline, tmp_path):
    """X-Cross on a target may start once every other domain's row is saved: its own LoRA is not read."""
    from training.pipeline import chosen_sources

    ctx, root, _, zs, _ = pipeline
    matrix = root / "results" / "zero_shot.json"
    aside = tmp_path / "zero_shot.json"
    matrix.rename(aside)
    own = root / "results" / "zero_shot" / "Electronics-on-Electronics.json"
    other = root / "results" / "zero_shot" / "Sports-on-Electronics.json"
    try:
        own.rename(tmp_path / own.name)  # the target's own row is not needed
        assert chosen_sources(ctx, "Electronics", DOMS) == zs["sources"]["Electronics"]
        other.rename(tmp_path / other.name)  # a source's cell is
        with pytest.raises(FileNotFoundError, match="Sports on Electronics.*--rows Sports"):
            chosen_sources(ctx, "Electronics", DOMS)
    finally:
        for f in (own, other):
            if (tmp_path / f.name).exists():
                (tmp_path / f.name).rename(f)
        aside.rename(matrix)
    assert chosen_sources(ctx, "Electronics", DOMS) == zs["sources"]["Electronics"]


def test_xcross_checkpoint_references_its_sources(pipeline):
    _, root, _, zs, xc = pipeline
    m = read_manifest(root / "artifacts" / "xcross" / "Tools")
    assert m["kind"] == "xcross" and m["target"] == "Tools" and m["config"]["n_streams"] == 2
    assert [s["domain"] for s in m["sources"]] == zs["sources"]["Tools"]
    for ref in m["sources"]:
        assert ref["content_hash"] == read_manifest(root / "artifacts" / "lora" / ref["domain"])["content_hash"]


def test_baselines_and_ablations_run(pipeline):
    ctx, root, _, _, _ = pipeline
    assert train_xcross(ctx, "Tools", top_k=0, name="minus-layers")["finished"]
    ps = train_xcross(ctx, "Tools", sources=ctx_sources(root)[:1], head_only=True, name="pooler-scorer")
    m = read_manifest(Path(ps["out"]))
    assert m["config"]["n_streams"] == 1 and m["head_only"] is True
    assert mean_lora(ctx, "Tools")["dev"]["n_users"] == 6


def ctx_sources(root: Path) -> list[str]:
    return json.loads((root / "results" / "zero_shot.json").read_text())["sources"]["Tools"]


def test_evaluate_cli_prints_json_last_line(pipeline, tmp_path):
    _, root, _, _, _ = pipeline
    users = tmp_path / "heldout.jsonl"  # any dev.jsonl-format file, not necessarily the dev file
    lines = (REPO.parent / "shared/data/amazon-xcross/Tools/dev.jsonl").read_text().splitlines()[-6:]
    users.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "evaluate",
            "--model",
            str(root / "artifacts/xcross/Tools"),
            "--users",
            str(users),
            "--json",
            "--quiet",
            "--save",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last) == {"hit@1", "hit@3", "hit@10", "mrr@10", "n_users"} and last["n_users"] == 6
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["per_user"]) == 6
    cmp = subprocess.run(
        [sys.executable, "-m", "training", "compare", str(tmp_path / "r.json"), str(tmp_path / "r.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "p=1 " in cmp.stdout  # identical runs: no difference


def test_cli_rejects_unknown_domain():
    out = subprocess.run(
        [sys.executable, "-m", "training", "train-lora", "--domain", "Tool", "--preset", "smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert out.returncode != 0 and "known: Electronics, Sports, Tools, Toys" in out.stderr


def test_low_data_runs_and_plots(pipeline):
    from training.pipeline import low_data

    ctx, root, _, _, _ = pipeline
    part = low_data(ctx, "Tools", sizes=(4,))  # a worker's share: trains size 4 only, writes no table
    assert {(r["model"], r["size"]) for r in part["rows"]} == {("xcross", 4), ("lora", 4)}
    assert not (root / "results" / "low_data-Tools.json").exists()
    avail = low_data(ctx, "Tools", available=True)  # trains nothing, lists what is missing
    assert {(r["model"], r["size"]) for r in avail["rows"]} == {("xcross", 4), ("lora", 4)}
    assert sorted(avail["missing"]) == ["lowdata-lora-8-s0-Tools-smoke", "lowdata-xcross-8-s0-Tools-smoke"]
    with pytest.raises(ValueError, match="not in the preset"):
        low_data(ctx, "Tools", sizes=(5,))
    out = low_data(ctx, "Tools")
    assert out["missing"] == []
    assert {(r["model"], r["size"]) for r in out["rows"]} == {("xcross", 4), ("xcross", 8), ("lora", 4), ("lora", 8)}
    assert out["reference"] in ("Sports", "Electronics")
    assert (root / "results" / "low_data-Tools.png").stat().st_size > 1000
    mtime = (root / "results" / "lowdata-xcross-4-s0-Tools-smoke.json").stat().st_mtime
    assert low_data(ctx, "Tools")["rows"] == out["rows"]  # finished runs are read back, not trained again
    assert (root / "results" / "lowdata-xcross-4-s0-Tools-smoke.json").stat().st_mtime == mtime


def test_report_writes_tables_with_paper_numbers(pipeline, tmp_path):
    from training.pipeline import low_data
    from training.report import plot_curves, write_report

    ctx, root, _, _, _ = pipeline
    low_data(ctx, "Tools")  # the low-data section's input (read back when test_low_data_runs_and_plots ran first)
    out = write_report(root / "results", tmp_path, preset="smoke")
    text = out.read_text()
    assert "| X-Cross |" in text and "20.11" in text  # the paper's Tools X-Cross Hit@1 beside ours
    # the header names the results root it read and the users its numbers are on, from the files
    assert f"report --preset smoke --results {root / 'results'}`" in text
    import re

    counts = re.search(r"on the dev users of each target \(([^)]*)\)", text).group(1)
    assert counts.startswith("Tools ") and "Sports " in counts and "Toys" not in counts  # Toys was not trained
    assert "6" in re.findall(r"Tools ([\d / ]+)", counts)[0].split(" / ")  # the 6 dev users of the smoke LoRA
    xc = json.loads((root / "results" / "xcross-Tools-smoke.json").read_text())["metrics"]["hit@1"]
    assert f"{xc:.2f}" in text and "not run" in text  # ours, and rows that have no file yet
    zs = json.loads((root / "results" / "zero_shot.json").read_text())
    assert "## Zero-shot transfer matrix" in text and f"{zs['dev']['Sports']['Tools']['hit@1']:.2f}" in text
    assert f"Dev Hit@1 on the first {zs['users']} dev users;" in text  # smoke: a prefix of dev (cpu: all of it)
    matrix = root / "results" / "zero_shot.json"
    kept = matrix.read_text()
    try:  # a matrix on all dev users (the cpu preset's) says so
        matrix.write_text(json.dumps({**zs, "users": None}))
        assert "Dev Hit@1 on all dev users;" in write_report(root / "results", tmp_path, preset="smoke").read_text()
    finally:
        matrix.write_text(kept)
    text = write_report(root / "results", tmp_path, preset="smoke").read_text()
    assert "diagonal-dominant" in text and "- Tools: X-Cross vs best zero-shot source" in text and "p = " in text
    assert "## Tools: all metrics" in text and "| -Layers (beta = gamma = 0) |" in text
    own = json.loads((root / "results" / "lora-Tools-smoke.json").read_text())["metrics"]
    verdict = "met" if own["hit@1"] >= 0.7 * 18.74 else "not met"
    assert f"- Tools LoRA: Hit@1 {own['hit@1']:.2f} on {own['n_users']} dev users, target 13.1" in text
    assert f"paper's 18.74): {verdict}." in text and "vs the target's own LoRA" in text
    # issue 16's X-Cross check, at Hit@1 and MRR@10, with both p-values
    assert re.search(r"- Tools: X-Cross vs best zero-shot source \(\w+\) Hit@1 .*, p = .*, MRR@10 [+-]\d+\.\d\d, "
                     r"p = .*target \(>= own LoRA, > best source at p <= 0\.05\) (met at|not met)", text)
    assert "## Low data: Tools" in text and "Smallest size above it" in text
    assert plot_curves(root / "results", tmp_path / "c.png", preset="smoke").stat().st_size > 1000


def test_roots_follow_the_environment_that_all_sets_for_its_jobs(monkeypatch, tmp_path):
    from training.pipeline import REPO, Paths

    for env in ("XCROSS_ARTIFACTS", "XCROSS_RESULTS", "XCROSS_RUNS"):
        monkeypatch.delenv(env, raising=False)
    assert Paths().artifacts == REPO / "artifacts" and Paths().runs == REPO / "runs"
    monkeypatch.setenv("XCROSS_ARTIFACTS", str(tmp_path / "stage"))
    monkeypatch.setenv("XCROSS_RESULTS", str(tmp_path / "res"))
    p = Paths()
    assert p.artifacts == (tmp_path / "stage").resolve() and p.results == (tmp_path / "res").resolve()
    assert p.lora("Tools") == (tmp_path / "stage" / "lora" / "Tools").resolve() and p.runs == REPO / "runs"


def test_a_finished_lora_whose_checkpoint_was_lost_is_exported_again_without_rescoring_dev(pipeline, monkeypatch,
                                                                                          tmp_path):
    """The run's state, best.safetensors and results file were committed but the (ignored) artifacts/ folder was
    not: the restart writes the same checkpoint from best.safetensors and reuses the saved dev evaluation."""
    import dataclasses
    import shutil

    from safetensors.torch import load_file

    import training.pipeline as tp

    ctx, root, *_ = pipeline
    paths = Paths(artifacts=tmp_path / "artifacts", results=tmp_path / "results", runs=tmp_path / "runs")
    shutil.copytree(root / "results", paths.results)
    shutil.copytree(root / "runs" / "lora-Tools-smoke", paths.runs / "lora-Tools-smoke")
    again = dataclasses.replace(ctx, paths=paths)
    calls = []
    real = tp.evaluate_users
    monkeypatch.setattr(tp, "evaluate_users", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    out = train_lora(again, "Tools", resume=True)
    assert calls == [] and out["finished"]
    before, after = (load_file(p / "lora" / "Tools" / "tensors.safetensors") for p in (root / "artifacts",
                                                                                       paths.artifacts))
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    assert read_manifest(paths.artifacts / "lora" / "Tools")["metrics"] == read_manifest(
        root / "artifacts" / "lora" / "Tools")["metrics"]

    res = json.loads((paths.results / "lora-Tools-smoke.json").read_text())
    (paths.results / "lora-Tools-smoke.json").write_text(json.dumps({**res, "best_step": res["best_step"] + 1}))
    shutil.rmtree(paths.artifacts)
    train_lora(again, "Tools", resume=True)  # the saved file is of other weights: dev is scored again
    assert calls == [6]


def test_a_dev_evaluation_killed_after_training_resumes_from_its_saved_progress(pipeline, monkeypatch, tmp_path):
    """The session ended while a finished run scored dev: the restart keeps the ranks saved for the same kept
    weights and scores only the users after them."""
    import dataclasses
    import shutil

    import training.evaluate as ev

    ctx, root, *_ = pipeline
    paths = Paths(artifacts=tmp_path / "artifacts", results=tmp_path / "results", runs=tmp_path / "runs")
    shutil.copytree(root / "runs" / "lora-Tools-smoke", paths.runs / "lora-Tools-smoke")
    again = dataclasses.replace(ctx, paths=paths)
    run = paths.runs / "lora-Tools-smoke"
    monkeypatch.setattr(ev, "PROGRESS_EVERY", 2)
    scored, real = [], ev.rank_of_target

    def killed(*a):  # the third dev user's ranking is never reached: the process dies there
        if len(scored) == 3:
            raise KeyboardInterrupt
        return scored.append(1) or real(*a)

    monkeypatch.setattr(ev, "rank_of_target", killed)
    with pytest.raises(KeyboardInterrupt):
        train_lora(again, "Tools", resume=True)  # no results file: the finished run scores dev, and is killed
    saved = json.loads((run / "dev-progress.json").read_text())["per_user"]
    assert len(saved) == 2
    marked = [{**p, "rank": 30 - i} for i, p in enumerate(saved)]  # recognisable: the restart must keep these
    (run / "dev-progress.json").write_text(json.dumps({**json.loads((run / "dev-progress.json").read_text()),
                                                       "per_user": marked}))
    scored.clear()
    monkeypatch.setattr(ev, "rank_of_target", lambda *a: scored.append(1) or real(*a))
    train_lora(again, "Tools", resume=True)
    res = json.loads((paths.results / "lora-Tools-smoke.json").read_text())
    assert len(scored) == 4 and res["per_user"][:2] == marked and len(res["per_user"]) == 6
    assert not (run / "dev-progress.json").exists()
