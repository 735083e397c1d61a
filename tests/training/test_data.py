from __future__ import annotations

import json

import numpy as np
import pytest

from training.data import (
    PLACEHOLDER_TITLE,
    PopularitySampler,
    User,
    check_domain,
    load_domain,
    read_catalog,
    read_users,
    split_train_val,
)


@pytest.fixture(scope="module")
def sports():
    return load_domain("Sports")


def test_load_real_domain_counts(sports):
    assert len(sports.catalog) == 10036 and len(sports.train) == 15395 and len(sports.dev) == 1925
    assert sports.catalog.null_titles == 3 and sports.catalog.titles.count(PLACEHOLDER_TITLE) >= 3
    assert all(len(u.candidates) == 30 and u.target in u.candidates for u in sports.dev)
    assert sports.popularity.sum() == sum(len(u.items) for u in sports.train)


def test_titles_are_unescaped():
    tools = load_domain("Tools")
    assert not any("&amp;" in t or "&quot;" in t for t in tools.catalog.titles)
    assert any("&" in t for t in tools.catalog.titles)


def test_unknown_item_id_names_file_line_and_id(tmp_path):
    p = tmp_path / "dev.jsonl"
    p.write_text(json.dumps({"user": "a", "items": [0, 1]}) + "\n" + json.dumps({"user": "b", "items": [0, 7]}) + "\n")
    with pytest.raises(ValueError, match=r"dev\.jsonl:2: unknown item id 7"):
        read_users(p, n_items=5)


def test_null_title_gets_placeholder(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_text(
        "\n".join(json.dumps({"id": i, "asin": f"A{i}", "title": t}) for i, t in enumerate(["x &amp; y", None]))
    )
    cat = read_catalog(p)
    assert cat.titles == ["x & y", PLACEHOLDER_TITLE] and cat.null_titles == 1 and cat.asin_to_id["A1"] == 1


def test_unknown_domain_lists_known():
    with pytest.raises(ValueError, match="known: Electronics, Sports, Tools, Toys"):
        check_domain("Tool")


def test_popularity_sampler_excludes_and_is_seeded():
    pop = np.array([100, 50, 0, 0, 10, 5, 1, 1, 1, 1])
    a = PopularitySampler(pop, seed=3).sample({0, 4}, 5)
    assert a == PopularitySampler(pop, seed=3).sample({0, 4}, 5)
    assert len(set(a)) == 5 and not {0, 4} & set(a)
    with pytest.raises(ValueError, match="cannot draw"):
        PopularitySampler(pop).sample(set(range(8)), 3)


def test_popularity_sampler_follows_counts_plus_one():
    pop = np.array([99, 9, 0])  # weights 100 : 10 : 1
    s = PopularitySampler(pop, seed=0)
    first = np.bincount([s.sample(set(), 1)[0] for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(first, np.array([100, 10, 1]) / 111, atol=0.01)


def test_split_is_seeded_disjoint_and_val_has_candidates(sports):
    tr, va = split_train_val(sports.train, sports.popularity, val_fraction=0.1, seed=0)
    tr2, va2 = split_train_val(sports.train, sports.popularity, val_fraction=0.1, seed=0)
    assert [u.user for u in va] == [u.user for u in va2] and va[0].candidates == va2[0].candidates
    assert len(tr) + len(va) == len(sports.train) and not {u.user for u in tr} & {u.user for u in va}
    for u in va[:200]:
        assert len(set(u.candidates)) == 30 and u.target in u.candidates
        assert not (set(u.candidates) - {u.target}) & set(u.items)


def test_user_history_and_target():
    u = User("x", (3, 4, 5))
    assert u.history == (3, 4) and u.target == 5
