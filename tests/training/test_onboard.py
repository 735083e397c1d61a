"""Onboarding a new domain (issue 19): validation errors naming file, line and field; the smoke preset end to end
from CSV and from JSON Lines on a tiny random backbone (plumbing, not what MiniLM learns)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.backbone import load_backbone
from model.checkpoint import load_lora, read_manifest, save_lora
from model.xcross import Head
from tests.model.test_xcross import random_lora
from training.data import read_catalog
from training.onboard import MAX_HISTORY, OnboardError, onboard, split_users, validate

BACKBONE = "tiny:bert"
WORDS = ["hose", "rake", "shovel", "seed", "pot", "trowel", "glove", "lamp", "fence", "soil", "mower", "hoe"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_sources(artifacts: Path, domains=("Sports", "Electronics")) -> dict[str, Path]:
    """Random source LoRAs on the tiny backbone (what artifacts/lora/<D>/ holds)."""
    bb = load_backbone(BACKBONE)
    out = {}
    for s, domain in enumerate(domains):
        head = Head(bb.hidden_size)
        g = torch.Generator().manual_seed(100 + s)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out[domain] = save_lora(artifacts / "lora" / domain, random_lora(bb, s), head, bb, domain=domain,
                                lora_config={"r": 16, "alpha": 32, "dropout": 0.0, "pooling": "cls"})
    return out


def garden(n_items: int = 60, n_users: int = 40, seed: int = 0) -> tuple[list[dict], dict[str, list[tuple]]]:
    """Items {asin, title} with string keys, and per user a list of (key, unix seconds) on distinct days."""
    rng = np.random.default_rng(seed)
    items = [{"asin": f"G-{i:04d}", "title": f"Garden &amp; {WORDS[i % 12]}  model {i} deluxe"} for i in range(n_items)]
    users = {}
    for u in range(n_users):
        n = int(rng.integers(3, 9))
        keys = rng.choice(n_items, n, replace=False)
        users[f"user{u}"] = [(items[k]["asin"], 1_700_000_000 + day * 86_400) for day, k in enumerate(keys)]
    users["lonely"] = [("G-0001", 1_700_000_000)]  # one interaction: skipped and counted
    return items, users


def write_csv(tmp: Path, items, users, same_day: bool = True) -> tuple[Path, Path]:
    ip, ep = tmp / "items.csv", tmp / "events.csv"
    with open(ip, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["asin", "title"])
        w.writerows([[it["asin"], it["title"]] for it in items])
    rows = [(u, k, ts) for u, evs in users.items() for k, ts in evs]
    if same_day:  # a second interaction on user0's first day: dropped (one per user and day)
        rows.append(("user0", "G-0059", users["user0"][0][1] + 60))
    rows.reverse()  # not sorted: the tool sorts
    with open(ep, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp"])
        w.writerows(rows)
    return ip, ep


def write_jsonl(tmp: Path, items, users) -> tuple[Path, Path]:
    ip, ep = tmp / "items.jsonl", tmp / "events.jsonl"
    ip.write_text("".join(json.dumps(it) + "\n" for it in items))
    ep.write_text("".join(json.dumps({"user": u, "items": [k for k, _ in evs]}) + "\n" for u, evs in users.items()))
    return ip, ep


# ----------------------------------------------------------------------------- validation


def test_validate_csv_sorts_dedups_days_and_counts_skipped(tmp_path):
    items, users = garden()
    users["long"] = [(f"G-{i:04d}", 1_700_000_000 + i * 86_400) for i in range(20)]
    ip, ep = write_csv(tmp_path, items, users)
    data = validate("Garden", ip, ep, tmp_path / "artifacts")
    assert data.skipped_users == 1 and data.dropped_same_day == 1 and data.cut_histories == 1
    assert data.catalog.titles[3] == "Garden & seed model 3 deluxe"  # unescaped, whitespace collapsed
    by_user = {u.user: u for u in data.users}
    assert by_user["user0"].items == tuple(data.catalog.asin_to_id[k] for k, _ in users["user0"])
    assert by_user["long"].items == tuple(range(20 - MAX_HISTORY, 20))  # the most recent 15
    assert "lonely" not in by_user


def test_validate_jsonl_same_users_as_csv(tmp_path):
    items, users = garden()
    a = validate("Garden", *write_csv(tmp_path, items, users, same_day=False), tmp_path / "artifacts")
    b = validate("Garden", *write_jsonl(tmp_path, items, users), tmp_path / "artifacts")
    assert sorted(a.users, key=lambda u: u.user) == sorted(b.users, key=lambda u: u.user)
    assert a.digest == b.digest


@pytest.mark.parametrize("case, expect", [
    ("unknown_item_csv", r"events.csv:\d+: field 'item': unknown item key 'NOPE'"),
    ("unknown_item_jsonl", r"events.jsonl:3: field 'items\[1\]': unknown item key 'NOPE'"),
    ("empty_title", r"items.csv:4: field 'title' is empty"),
    ("escaped_empty_title", r"items.jsonl:3: field 'title' is empty"),
    ("long_title", r"items.csv:4: field 'title' is 600 characters; at most 512"),
    ("duplicate_key", r"items.csv:6: field 'asin': duplicate key 'G-0001' \(first at line 3\)"),
    ("missing_column", r"items.csv:1: CSV header lacks column\(s\) title"),
    ("missing_field", r"events.jsonl:2: field 'items' missing"),
    ("bad_timestamp", r"events.csv:\d+: field 'timestamp' 'yesterday'"),
    ("duplicate_user", r"events.jsonl:\d+: field 'user': 'user0' appears again"),
    ("too_few_users", r"events.csv: 5 users with at least 2 interactions \(1 skipped"),
])
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, case, expect):
    items, users = garden()
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts, ("Sports",))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if case == "unknown_item_csv":
        users["user3"][1] = ("NOPE", users["user3"][1][1])
    if case == "unknown_item_jsonl":
        users["user2"][1] = ("NOPE", 0)
    if case in ("empty_title", "escaped_empty_title"):
        items[2]["title"] = "  " if case == "empty_title" else "&nbsp; "
    if case == "long_title":
        items[2]["title"] = "x" * 600
    if case == "duplicate_key":
        items[4]["asin"] = "G-0001"
    if case == "too_few_users":
        users = {u: users[u] for u in [f"user{i}" for i in range(5)] + ["lonely"]}
    jsonl = case in ("unknown_item_jsonl", "escaped_empty_title", "missing_field", "duplicate_user")
    ip, ep = (write_jsonl if jsonl else write_csv)(tmp_path, items, users)
    if case == "missing_column":
        ip.write_text("asin,name\nG-1,x\n")
    if case == "missing_field":
        lines = ep.read_text().splitlines()
        lines[1] = json.dumps({"user": "user1"})
        ep.write_text("\n".join(lines) + "\n")
    if case == "bad_timestamp":
        ep.write_text(ep.read_text() + "user1,G-0002,yesterday\n")
    if case == "duplicate_user":
        ep.write_text(ep.read_text() + json.dumps({"user": "user0", "items": ["G-0001", "G-0002"]}) + "\n")
    before = sorted(p.relative_to(tmp_path) for p in artifacts.rglob("*"))
    with pytest.raises(OnboardError, match=expect):
        onboard("Garden", ip, ep, preset="smoke", artifacts=artifacts, runs=tmp_path / "runs", backbone=BACKBONE,
                progress=False, echo=lambda *_: None)
    assert sorted(p.relative_to(tmp_path) for p in artifacts.rglob("*")) == before
    assert not (tmp_path / "runs").exists()


def test_domain_name_clashes(tmp_path):
    items, users = garden()
    ip, ep = write_csv(tmp_path, items, users)
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts, ("Sports",))
    with pytest.raises(OnboardError, match="'Tools' is a built-in served domain"):
        validate("Tools", ip, ep, artifacts)
    with pytest.raises(OnboardError, match="'Sports' is a built-in served domain"):
        validate("Sports", ip, ep, artifacts)
    (artifacts / "domains" / "Garden").mkdir(parents=True)
    with pytest.raises(OnboardError, match="already served from .*--replace"):
        validate("Garden", ip, ep, artifacts)
    assert validate("Garden", ip, ep, artifacts, replace=True).name == "Garden"
    with pytest.raises(OnboardError, match="use a letter then"):
        validate("../x", ip, ep, artifacts)


def test_cli_dry_run_validates_only(tmp_path):
    from training.__main__ import app

    items, users = garden()
    ip, ep = write_csv(tmp_path, items, users)
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts)
    r = CliRunner().invoke(app, ["onboard", "--domain", "Garden", "--items", str(ip), "--interactions", str(ep),
                                 "--artifacts", str(artifacts), "--dry-run", "--backbone", BACKBONE])
    assert r.exit_code == 0, r.output
    assert "40 users (1 skipped" in r.output and "dry run" in r.output
    assert not (artifacts / "domains").exists()
    bad = CliRunner().invoke(app, ["onboard", "--domain", "Tools", "--items", str(ip), "--interactions", str(ep),
                                   "--artifacts", str(artifacts), "--dry-run"])
    assert bad.exit_code == 2 and "built-in served domain" in bad.output
    assert "python -m training onboard --domain Garden" in CliRunner().invoke(app, ["onboard", "--help"]).output


# ----------------------------------------------------------------------------- end to end (smoke preset)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_onboard_smoke_end_to_end(tmp_path, fmt):
    items, users = garden()
    artifacts = tmp_path / "artifacts"
    srcs = save_sources(artifacts, ("Sports", "Electronics", "Toys"))
    ip, ep = (write_csv if fmt == "csv" else write_jsonl)(tmp_path, items, users)
    out: list[str] = []
    rep = onboard("Garden", ip, ep, preset="smoke", artifacts=artifacts, runs=tmp_path / "runs", backbone=BACKBONE,
                  progress=False, echo=out.append)
    dest = artifacts / "domains" / "Garden"
    assert sorted(p.name for p in dest.iterdir()) == ["catalog.jsonl", "onboard.json", "xcross"]
    assert not [p for p in (artifacts / "domains").iterdir() if p.name.startswith(".")]  # no temp dir left
    cat = read_catalog(dest / "catalog.jsonl", "Garden")
    assert cat.asins == [it["asin"] for it in items] and cat.titles[0] == "Garden & hose model 0 deluxe"
    pops = [json.loads(line)["popularity"] for line in (dest / "catalog.jsonl").read_text().splitlines()]
    train_users, test_users = split_users(validate("Garden", ip, ep, artifacts, replace=True).users, 0)
    assert sum(pops) == sum(len(u.items) for u in train_users) and len(test_users) == rep["split"]["test"]
    m = read_manifest(dest / "xcross")
    assert m["kind"] == "xcross" and m["target"] == "Garden" and m["config"]["n_streams"] == 2
    assert [s["domain"] for s in m["sources"]] == rep["sources"] and len(set(rep["sources"])) == 2
    assert set(rep["zero_shot_val"]) == {"Sports", "Electronics", "Toys"}
    best = max(rep["zero_shot_val"], key=lambda s: (rep["zero_shot_val"][s]["hit@1"],
                                                    rep["zero_shot_val"][s]["mrr@10"]))
    assert rep["sources"][0] == best
    assert all(ref["content_hash"] == read_manifest(srcs[ref["domain"]])["content_hash"] for ref in m["sources"])
    models = [r["model"] for r in rep["table"]]
    assert models[0].startswith("xcross (") and "embedding floor" in models and len(models) == 5
    assert all(r["n_users"] == rep["split"]["test"] for r in rep["table"])
    assert all("p_value" in r for r in rep["table"][1:])
    assert any("Hit@1" in line and "MRR@10" in line for line in out)
    assert json.loads((dest / "onboard.json").read_text())["sources"] == rep["sources"]
    assert rep["data"]["skipped_users"] == 1 and rep["split"]["test"] == 4
    assert not list(dest.rglob("*.bin")) and not list(dest.rglob("*.pt"))  # safetensors only

    with pytest.raises(OnboardError, match="already served"):
        onboard("Garden", ip, ep, preset="smoke", artifacts=artifacts, runs=tmp_path / "runs", backbone=BACKBONE,
                progress=False, echo=lambda *_: None)
    first_hash = m["content_hash"]
    rep2 = onboard("Garden", ip, ep, preset="smoke", artifacts=artifacts, runs=tmp_path / "runs", backbone=BACKBONE,
                   progress=False, echo=lambda *_: None, replace=True, sources=["Toys"])
    m2 = read_manifest(dest / "xcross")
    assert rep2["sources"] == ["Toys"] and m2["config"]["n_streams"] == 1 and m2["content_hash"] != first_hash


def test_interrupted_onboarding_leaves_the_previous_state(tmp_path, monkeypatch):
    """A Ctrl-C during training: the served directory is untouched and no temp directory is left behind."""
    items, users = garden()
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts)
    ip, ep = write_csv(tmp_path, items, users)
    kw = dict(preset="smoke", artifacts=artifacts, runs=tmp_path / "runs", backbone=BACKBONE, progress=False,
              echo=lambda *_: None)
    onboard("Garden", ip, ep, **kw)
    dest = artifacts / "domains" / "Garden"
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    # late: X-Cross is trained into the temp dir, then its evaluation is interrupted
    monkeypatch.setattr("training.evaluate.evaluate_users", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onboard("Garden", ip, ep, replace=True, sources=["Sports"], **kw)
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert [p.name for p in (artifacts / "domains").iterdir()] == ["Garden"]


def test_with_lora_trains_the_domains_own_lora(tmp_path):
    items, users = garden()
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts)
    ip, ep = write_jsonl(tmp_path, items, users)
    rep = onboard("Garden", ip, ep, preset="smoke", artifacts=artifacts, runs=tmp_path / "runs", backbone=BACKBONE,
                  progress=False, echo=lambda *_: None, with_lora=True)
    dest = artifacts / "domains" / "Garden"
    m = read_manifest(dest / "lora")
    assert m["kind"] == "lora" and m["domain"] == "Garden"
    assert "Garden LoRA (own)" in [r["model"] for r in rep["table"]]
    load_lora(dest / "lora", load_backbone(BACKBONE))
    # now a source for the next onboarded domain
    from training.onboard import available_sources

    assert available_sources(artifacts, exclude="Other")["Garden"] == dest / "lora"


def test_catalog_file_gives_the_trained_titles_back(tmp_path):
    """catalog.jsonl is read by the service with read_catalog (which unescapes): titles come back exactly."""
    from training.data import Catalog
    from training.onboard import write_catalog

    titles = ["Tom & Jerry's saw", "literal &amp; kept", "<b>bold</b> 5\" nail"]
    cat = Catalog("Garden", list(titles), ["a", "b", "c"])
    write_catalog(tmp_path / "catalog.jsonl", cat, np.array([3, 0, 1]))
    back = read_catalog(tmp_path / "catalog.jsonl", "Garden")
    assert back.titles == titles and back.asins == ["a", "b", "c"]


def test_xcross_is_validated_every_epoch_on_a_small_domain():
    """With cpu's eval_every=500 a 900-user domain (~102 steps per epoch) would be validated only at the end."""
    from types import SimpleNamespace

    from training.onboard import _validate_every_epoch
    from training.presets import get_preset

    def ctx(n_train):
        return SimpleNamespace(preset=get_preset("cpu"), split=lambda name, cfg: ([None] * n_train, []))

    small = ctx(810)
    _validate_every_epoch(small, "Garden", [])
    assert small.preset.xcross.eval_every == 102  # ceil(810 / 8): once per epoch
    assert small.preset.lora.eval_every == 500 and "xcross.eval_every=102 (once per epoch)" in small.preset.overrides
    big = ctx(20_000)
    _validate_every_epoch(big, "Garden", [])
    preset_every = get_preset("cpu").xcross.eval_every
    assert 102 < preset_every < 2500
    assert big.preset.xcross.eval_every == preset_every  # 2,500 steps per epoch: already more often than that
    asked = ctx(810)
    _validate_every_epoch(asked, "Garden", ["xcross.eval_every=1000"])
    assert asked.preset.xcross.eval_every == preset_every  # an explicit --set wins (the preset as built by get_preset)
