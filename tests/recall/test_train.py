"""The smoke preset end to end through the CLI: train, evaluate, checkpoint, report; the attention benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.recall.data import dataset_dir, load_catalog, load_sequences, make_batch
from model.recall.train import evaluate, load_checkpoint, metrics, per_user_ndcg
from training.recall import app as recall_cli
from training.recall import bench_attention, markdown_section


def test_smoke_train_writes_results_and_checkpoints(smoke_runs) -> None:
    res = json.loads((smoke_runs / "results" / "food-kitchen-ddsr-smoke.json").read_text())
    assert res["preset"] == "smoke" and res["n_users"] == 200 and res["git_commit"] and res["cpu"]
    ranks = np.asarray(res["per_user"]["rank_full"])
    doms = np.asarray(res["per_user"]["target_domain"])
    n_dom = [11837, 16258]
    assert ranks.min() >= 1 and all(ranks[doms == d].max() <= n_dom[d] for d in (0, 1))
    sampled = np.asarray(res["per_user"]["rank_sampled"])
    assert sampled.min() >= 1 and sampled.max() <= 101
    assert res["test"]["all"]["ndcg@10_full"] == pytest.approx(100 * per_user_ndcg(ranks).mean())
    assert [h["epoch"] for h in res["history"]] == [1, 2] and 1 <= res["best_epoch"] <= 2
    assert (smoke_runs / "runs" / "food-kitchen" / "food-kitchen-hstu-smoke" / "model.safetensors").is_file()
    assert (smoke_runs / "artifacts" / "recall" / "food-kitchen" / "ddsr" / "manifest.json").is_file()


def test_checkpoint_round_trip_reproduces_the_evaluation(smoke_runs) -> None:
    path = dataset_dir("food-kitchen")
    catalog = load_catalog(path)
    seqs = load_sequences(path, catalog, limit=200)
    model, manifest = load_checkpoint(smoke_runs / "runs" / "food-kitchen" / "food-kitchen-ddsr-smoke")
    again = metrics(evaluate(model, seqs, catalog, "test"), catalog.domains)
    saved = json.loads((smoke_runs / "results" / "food-kitchen-ddsr-smoke.json").read_text())["test"]
    assert again["all"] == pytest.approx(saved["all"])
    half, _ = load_checkpoint(smoke_runs / "artifacts" / "recall" / "food-kitchen" / "ddsr")  # fp16 copy
    b = make_batch(seqs[:8], 50, cut=0, only_last=True)
    with torch.no_grad():
        assert torch.allclose(model.queries(b), half.queries(b), atol=0.05)


def test_corrupt_checkpoint_is_refused(smoke_runs, tmp_path) -> None:
    src = smoke_runs / "runs" / "food-kitchen" / "food-kitchen-hstu-smoke"
    for name in ("manifest.json", "model.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    blob = bytearray((tmp_path / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(tmp_path)
    res = CliRunner().invoke(recall_cli, ["evaluate", "--checkpoint", str(tmp_path)])
    assert res.exit_code != 0 and "sha256" in res.output


def test_cli_rejects_unknown_names() -> None:
    res = CliRunner().invoke(recall_cli, ["train", "--variant", "hstuu", "--preset", "smoke"])
    assert res.exit_code != 0 and "hstu, sasrec" in res.output
    res = CliRunner().invoke(recall_cli, ["train", "--dataset", "food", "--preset", "smoke"])
    assert res.exit_code != 0 and "food-kitchen" in res.output


def test_markdown_section_from_results(smoke_runs, tmp_path) -> None:
    text = markdown_section(smoke_runs / "results", tmp_path, preset="smoke")
    res = json.loads((smoke_runs / "results" / "food-kitchen-hstu-smoke.json").read_text())
    assert "### food-kitchen (200 test users)" in text
    assert f"| hstu | {res['test']['all']['recall@10_full']:.2f} | {res['test']['all']['ndcg@10_full']:.2f} |" in text
    assert "| ddsr vs hstu |" in text and "| sasrec | not run |" in text
    gca = json.loads((smoke_runs / "results" / "food-kitchen-gca-smoke.json").read_text())
    cos = gca["history"][gca["best_epoch"] - 1]["gca_cos"]
    assert set(cos) == {"block0", "readout"}
    assert f"| 0 + readout | sigmoid | True | {gca['test']['all']['recall@10_full']:.2f} |" in text
    assert f"block0 {cos['block0']:.3f}, readout {cos['readout']:.3f} | n/a |" in text  # no intra run to test against
    assert (tmp_path / "recall_ndcg.png").stat().st_size > 1000


def test_bench_attention_counts_intra_as_cheaper() -> None:
    rows = bench_attention(lengths=(20, 80), repeats=1)
    assert [r["length"] for r in rows] == [20, 80]
    for r in rows:
        assert sum(r["n_per_domain"]) == r["length"]
        assert r["intra_mflops"] < r["full_mflops"] and r["full_ms"] > 0 and r["intra_ms"] > 0


def test_recall_is_a_training_subcommand() -> None:
    from training.__main__ import app as training_cli

    res = CliRunner().invoke(training_cli, ["recall", "--help"])
    assert res.exit_code == 0 and "bench-attention" in res.output and "report" in res.output


def test_popularity_floor_ranks_by_training_counts(toy_catalog) -> None:
    from model.recall.train import Popularity
    from tests.recall.conftest import toy_sequence

    # training prefixes (all but the last two items): counts 5: 2, 22: 2, 21, 6, 7, 24: 1
    seqs = [toy_sequence(toy_catalog, [5, 21, 6, 22, 5, 23], [1, 2, 3, 4, 5, 6]),
            toy_sequence(toy_catalog, [5, 22, 7, 24, 8, 6], [1, 2, 3, 4, 5, 6])]
    ranks = evaluate(Popularity(seqs, toy_catalog.n_items), seqs, toy_catalog, "test")
    assert ranks["target_domain"].tolist() == [1, 0]
    # user 0: target 23 (count 0) ties with the 17 other unseen-in-history b items (21, 22 are history): rank 18
    # user 1: target 6 (count 1); 5 (count 2) and 7 are history, so nothing else scores >= 1: rank 1
    assert ranks["rank_full"].tolist() == [18, 1]
    assert 1 <= ranks["rank_sampled"].min() and ranks["rank_sampled"].max() <= 20
