from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import User, load_domain
from training.evaluate import (
    PromptSource,
    embedding_floor,
    evaluate_users,
    metrics_from_ranks,
    paired_ttest,
    rank_of_target,
    to_device,
)


def test_ties_count_against_the_target():
    assert rank_of_target(np.zeros(30), 5) == 30
    assert rank_of_target(np.array([1.0, 3.0, 3.0, 0.0]), 1) == 2
    assert rank_of_target(np.array([1.0, 3.0, 2.0]), 1) == 1


def test_metrics_from_ranks():
    m = metrics_from_ranks([1, 2, 4, 11])
    assert m == {"hit@1": 25.0, "hit@3": 50.0, "hit@10": 75.0, "mrr@10": pytest.approx((1 + 0.5 + 0.25) / 4 * 100),
                 "n_users": 4}


@pytest.fixture(scope="module")
def tools_source(minilm_tokenizer):
    return PromptSource(minilm_tokenizer, load_domain("Tools").catalog, max_len=128)


def test_constant_scorer_looks_collapsed(tools_source):
    users = load_domain("Tools").dev[:5]
    res = evaluate_users(lambda ids, mask: torch.zeros(ids.shape[0]), tools_source, users, progress=False)
    assert res["metrics"]["hit@1"] == 0 and res["metrics"]["hit@10"] == 0
    assert all(p["rank"] == 30 for p in res["per_user"])


def test_oracle_scorer_is_perfect(tools_source):
    """A scorer that reads the candidate from the prompt and knows the target gets every user right."""
    users = load_domain("Tools").dev[:5]
    results = []
    for u in users:
        ids_target = tools_source.batch(u, [u.target])[0][0].tolist()

        def oracle(ids, mask, t=ids_target):
            return torch.tensor([float(row[: len(t)].tolist() == t) for row in ids])

        results.append(evaluate_users(oracle, tools_source, [u], progress=False)["per_user"][0]["rank"])
    assert results == [1] * 5


def test_user_without_candidates_is_an_error(tools_source):
    with pytest.raises(ValueError, match="no candidates"):
        evaluate_users(lambda i, m: torch.zeros(len(i)), tools_source, [User("u", (1, 2))], progress=False)


def test_paired_ttest_matches_scipy():
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(0)
    ra, rb = rng.integers(1, 31, 200), rng.integers(1, 31, 200)
    a = {"per_user": [{"user": str(i), "rank": int(r)} for i, r in enumerate(ra)]}
    b = {"per_user": [{"user": str(i), "rank": int(r)} for i, r in enumerate(rb)]}
    out = paired_ttest(a, b, "hit@10")
    assert out["p_value"] == pytest.approx(ttest_rel((ra <= 10).astype(float), (rb <= 10).astype(float)).pvalue)
    assert out["n_users"] == 200 and out["diff"] == pytest.approx(((ra <= 10).mean() - (rb <= 10).mean()) * 100)
    assert paired_ttest(a, a)["p_value"] == 1.0


@pytest.mark.slow
def test_embedding_floor_beats_chance(minilm, tools_source):
    res = embedding_floor(minilm, tools_source, load_domain("Tools").dev[:60], progress=False)
    assert res["metrics"]["n_users"] == 60 and res["metrics"]["hit@10"] > 100 * 10 / 30


def test_to_device_inside_inference_mode_leaves_trainable_tensors():
    """An evaluation (inference mode) that moves a model must not turn its parameters into inference tensors: the
    learned-lambda step after the uniform merge's evaluation trains the same model (a CUDA-only failure before)."""
    runner = type("Runner", (), {})()
    runner.model = torch.nn.LayerNorm(3)  # the frozen backbone, held outside the module tree
    model = torch.nn.Linear(3, 1)
    model.runner = runner
    with torch.inference_mode():
        to_device(model, torch.device("meta"))
    tensors = [*model.parameters(), *runner.model.parameters()]
    assert all(t.device.type == "meta" and not t.is_inference() for t in tensors)


def test_a_killed_evaluation_resumes_after_the_users_it_saved(tools_source, tmp_path, monkeypatch):
    import training.evaluate as ev

    monkeypatch.setattr(ev, "PROGRESS_EVERY", 2)
    users = load_domain("Tools").dev[:7]
    calls = []

    def scorer(ids, mask):  # deterministic and candidate-dependent, so ranks differ between users
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # the session ending mid-evaluation
        return (ids * torch.arange(ids.shape[1])).sum(1).float() % 97

    kill_at = 0
    whole = evaluate_users(scorer, tools_source, users, progress=False)
    assert len({p["rank"] for p in whole["per_user"]}) > 1
    progress = tmp_path / "dev-progress.json"
    calls.clear()
    kill_at = 6  # dies on the 6th user: users 1-4 were saved (every 2), the 5th was not
    with pytest.raises(KeyboardInterrupt):
        evaluate_users(scorer, tools_source, users, progress=False, resume=(progress, "weights-a"))
    assert progress.exists()
    calls.clear()
    kill_at = 0
    resumed = evaluate_users(scorer, tools_source, users, progress=False, resume=(progress, "weights-a"))
    assert len(calls) == 3  # users 5-7 only
    assert resumed == whole and not progress.exists()  # the same ranks; the progress file goes when it completes

    calls.clear()
    kill_at = 4
    with pytest.raises(KeyboardInterrupt):
        evaluate_users(scorer, tools_source, users, progress=False, resume=(progress, "weights-a"))
    calls.clear()
    kill_at = 0
    # other weights (or other users, candidates, precision) never reuse the saved ranks
    assert evaluate_users(scorer, tools_source, users, progress=False, resume=(progress, "weights-b")) == whole
    assert len(calls) == 7
    kill_at = 4
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate_users(scorer, tools_source, users, progress=False, resume=(progress, "weights-a"))
    calls.clear()
    kill_at = 0
    assert evaluate_users(scorer, tools_source, users[1:], progress=False, resume=(progress, "weights-a")) == \
        evaluate_users(scorer, tools_source, users[1:], progress=False)
    assert len(calls) == 12  # 6 + 6: nothing reused for a different user list
