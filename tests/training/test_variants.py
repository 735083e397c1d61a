"""The variants on the smoke preset with a tiny backbone: hybrid LoRAs -> WeaveRec merges (uniform, learned lambda),
the naive merge, GCA, the served-cost measurement, the report section and the evaluate CLI's orthogonality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model.checkpoint import load_lora, load_weaverec, read_manifest
from model.lora import LoraWeights
from training.pipeline import Context, Paths, train_lora, train_xcross
from training.presets import get_preset
from training.variants import (
    DomainUser,
    MixedSource,
    markdown_section,
    measure_costs,
    merge_sources,
    mixed_users,
    train_gca,
    train_hybrid,
    train_weaverec,
)

SOURCES = ["Sports", "Electronics"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    ctx = Context(get_preset("smoke"), Paths(artifacts=root / "artifacts", results=root / "results",
                                             runs=root / "runs"), backbone_name="tiny:bert", progress=False)
    for d in ("Tools", *SOURCES):
        train_lora(ctx, d)
    train_xcross(ctx, "Tools", SOURCES)
    return ctx


@pytest.fixture(scope="module")
def weaverec(ctx):
    return train_weaverec(ctx, "Tools", SOURCES, learn_lambda=True)


def test_hybrid_mix_is_target_plus_as_many_source_users_shuffled(ctx):
    cfg = ctx.preset.lora
    users, recipe = mixed_users(ctx, "Tools", ["Sports"], cfg, cap=10)
    assert recipe["users"] == {"Tools": 10, "Sports": 10} and recipe["cap"] == 10 and recipe["seed"] == 0
    assert all(isinstance(u, DomainUser) for u in users) and {u.domain for u in users} == {"Tools", "Sports"}
    assert [u.domain for u in users] != sorted(u.domain for u in users)  # shuffled, not blocked
    sports_val = {u.user for u in ctx.split("Sports", cfg)[1]}
    assert not {u.user.removeprefix("Sports:") for u in users if u.domain == "Sports"} & sports_val
    # each user's titles come from its own catalog
    source = MixedSource({d: ctx.source(d, ctx.backbone().tokenizer, cfg.max_len) for d in ("Tools", "Sports")},
                         "Tools")
    u = next(u for u in users if u.domain == "Sports")
    ids, _ = source.batch(u, [u.target])
    sports = ctx.source("Sports", ctx.backbone().tokenizer, cfg.max_len)
    assert torch.equal(ids, sports.batch(u, [u.target])[0])


def test_weaverec_trains_hybrids_and_merges_them_with_the_target_lora(ctx, weaverec):
    assert weaverec["finished"] and weaverec["uniform"]["weights"] == pytest.approx([1 / 3] * 3)
    out = Path(weaverec["uniform"]["out"])
    assert out == ctx.paths.artifacts / "weaverec" / "Tools"
    m = read_manifest(out)
    assert m["kind"] == "weaverec" and [c["name"] for c in m["components"]] == [
        "lora:Tools", "hybrid:Sports", "hybrid:Electronics"]
    bb = ctx.backbone()
    parts = [load_lora(ctx.paths.lora("Tools"), bb)[0]] + [
        load_lora(ctx.paths.runs / f"variants-hybrid-{s}-Tools-smoke" / "model", bb)[0] for s in SOURCES]
    merged, _, _ = load_weaverec(out, bb)
    mod = parts[0].modules[0]
    assert torch.allclose(merged.delta(mod), LoraWeights.merge(parts).delta(mod), atol=1e-6)
    hybrid = json.loads((ctx.paths.results / "variants-hybrid-Sports-Tools-smoke.json").read_text())
    assert hybrid["mix"]["users"] == {"Tools": 16, "Sports": 16} and hybrid["mix"]["seed"] == 0
    res = json.loads((ctx.paths.results / "variants-weaverec-Tools-smoke.json").read_text())
    assert res["metrics"]["n_users"] == 6 and len(res["per_user"]) == 6 and res["trainable_params"] > 0


def test_train_hybrid_reuses_a_finished_hybrid_instead_of_training_it_again(ctx, weaverec):
    done = ctx.paths.runs / "variants-hybrid-Sports-Tools-smoke" / "model"
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    out = train_hybrid(ctx, "Tools", "Sports")
    assert out == {"finished": True, "out": str(done), "reused": True}
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before


def test_learned_lambda_moves_off_uniform_and_sums_to_one(ctx, weaverec):
    learned = weaverec["learned"]["weights"]
    assert sum(learned) == pytest.approx(1.0) and learned != pytest.approx([1 / 3] * 3, abs=1e-4)
    res = json.loads((ctx.paths.results / "variants-weaverec-learned-Tools-smoke.json").read_text())
    assert res["learned"] and len(res["lambda_curve"]) == 3 and res["lambda_curve"][-1]["lambda"] == pytest.approx(
        learned, abs=1e-4)


def test_naive_merge_and_gca_and_cost_and_report(ctx, weaverec):
    naive = merge_sources(ctx, "Tools", SOURCES)
    assert naive["dev"]["n_users"] == 6
    assert [c["name"] for c in read_manifest(naive["out"])["components"]] == [
        "lora:Tools", "lora:Sports", "lora:Electronics"]
    gca = train_gca(ctx, "Tools", act="tanh", layer_norm=False, layers=(-2, -1), sources=SOURCES)
    res = json.loads((ctx.paths.results / "variants-gca-tanh-noln-l-2_-1-Tools-smoke.json").read_text())
    assert set(res["orthogonality"]) == {"0", "1"} and read_manifest(gca["out"])["kind"] == "gca"
    assert set(res["curve"][-1]["orthogonality"]) == {"0", "1"}  # also logged at every validation
    served = train_gca(ctx, "Tools", sources=SOURCES)  # sigmoid + LayerNorm on the top layer: the served one
    assert Path(served["out"]) == ctx.paths.artifacts / "gca" / "Tools"
    shutil.rmtree(gca["out"])  # as when the checkpoint stayed on a GPU machine: timed with a stand-in
    cost = measure_costs(ctx, "Tools", n_users=2, repeats=1)
    assert set(cost["ratio"]) >= {"LoRA", "X-Cross", "WeaveRec", "GCA", "merge-sources", "gca-tanh-noln-l-2_-1"}
    assert cost["ratio"]["LoRA"] == 1.0 and cost["stand_ins"] == ["gca-tanh-noln-l-2_-1"]
    text = markdown_section(ctx.paths.results, "smoke", ("Tools",))
    assert "x (stand-in weights) |" in text
    assert "| WeaveRec, uniform lambda |" in text and "| X-Cross |" in text and "not run" in text  # no joint
    assert "L1: " in text and "tiny:bert" in text


def test_evaluate_cli_prints_orthogonality_for_gca(ctx, weaverec):
    from training.__main__ import app

    path = ctx.paths.artifacts / "gca" / "Tools"
    if not path.exists():
        train_gca(ctx, "Tools", sources=SOURCES)
    users = Path(__file__).resolve().parents[3] / "shared/data/amazon-xcross/Tools/dev.jsonl"
    out = CliRunner().invoke(app, ["evaluate", "--model", str(path), "--users", str(users), "--limit", "3",
                                   "--json", "--quiet", "--preset", "smoke"])
    assert out.exit_code == 0, out.output
    last = json.loads(out.output.strip().splitlines()[-1])
    assert last["n_users"] == 3 and set(last["orthogonality"]) == {"1"}


def test_gca_params_are_counted_from_the_recorded_config_when_the_checkpoint_is_elsewhere():
    from training.variants import _gca_params

    cfg = {"integrator": "gca", "n_streams": 2, "top_k": 0, "layers": [-1], "gca_act": "tanh", "gca_layer_norm": False}
    d = 384  # MiniLM: per layer 6d^2 + 5d (+ 2d with LayerNorm), head d^2 + 2d + 1, w n
    assert _gca_params(cfg, "minilm") == 6 * d * d + 5 * d + (d * d + 2 * d + 1) + 2
    assert _gca_params({**cfg, "gca_layer_norm": True, "layers": [-2, -1]}, "minilm") == (
        2 * (6 * d * d + 7 * d) + d * d + 2 * d + 1 + 2)
    assert _gca_params({**cfg, "integrator": "xcross"}, "minilm") is None
