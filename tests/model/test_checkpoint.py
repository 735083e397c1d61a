"""Checkpoints: round trip, hash and backbone verification, clear errors for missing or corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_lora, load_model, load_xcross, save_lora, save_xcross
from model.xcross import Head, XCross, XCrossConfig
from tests.model.test_xcross import batch, random_lora, randomize_trainables
from tests.tiny import tiny_backbone

LORA_CFG = {"r": 16, "alpha": 32, "dropout": 0.1}


@pytest.fixture()
def saved(tmp_path):
    bb = tiny_backbone("bert")
    dirs = []
    for s, dom in enumerate(["Sports", "Electronics"]):
        head = Head(bb.hidden_size)
        dirs.append(save_lora(tmp_path / "lora" / dom, random_lora(bb, s), head, bb, domain=dom, lora_config=LORA_CFG))
    loras = [load_lora(d, bb)[0] for d in dirs]
    model = XCross(bb, loras, XCrossConfig(top_k=2)).eval()
    randomize_trainables(model)
    xdir = save_xcross(tmp_path / "xcross" / "Tools", model, bb, target="Tools",
                       sources=[("Sports", dirs[0]), ("Electronics", dirs[1])], metrics={"hit@1": 1.0})
    return bb, model, xdir, dirs


def test_xcross_round_trip_gives_identical_scores(saved):
    bb, model, xdir, _ = saved
    loaded, manifest = load_xcross(xdir, bb)
    ids, mask = batch(bb)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))
    assert manifest["target"] == "Tools" and [s["domain"] for s in manifest["sources"]] == ["Sports", "Electronics"]
    assert manifest["metrics"] == {"hit@1": 1.0} and "torch" in manifest["versions"]


def test_lora_round_trip(saved, tmp_path):
    bb, _, _, dirs = saved
    model, manifest = load_model(dirs[0], bb)
    lora, head, _ = load_lora(dirs[0], bb)
    ref = random_lora(bb, 0)
    assert all(torch.equal(lora.A[m], ref.A[m]) and torch.equal(lora.B[m], ref.B[m]) for m in ref.modules)
    assert manifest["kind"] == "lora" and manifest["lora"]["scale"] == 2.0 and model.config.n_streams == 1


def test_sources_are_found_by_content_hash_after_moving(saved, tmp_path):
    bb, model, xdir, dirs = saved
    moved = tmp_path / "elsewhere"
    (tmp_path / "lora").rename(moved)
    with pytest.raises(CheckpointError, match="not found"):
        load_xcross(xdir, bb)
    loaded, _ = load_xcross(xdir, bb, search=[moved])
    ids, mask = batch(bb)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_retrained_source_is_detected(saved):
    bb, _, xdir, dirs = saved
    save_lora(dirs[0], random_lora(bb, 99), Head(bb.hidden_size), bb, domain="Sports", lora_config=LORA_CFG)
    with pytest.raises(CheckpointError, match="content hash"):
        load_xcross(xdir, bb)


def test_truncated_file_is_an_error(saved):
    bb, _, xdir, _ = saved
    f = xdir / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or modified"):
        load_xcross(xdir, bb)


def test_missing_files_are_errors(saved):
    bb, _, xdir, dirs = saved
    (dirs[1] / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_lora(dirs[1], bb)
    (xdir / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_xcross(xdir, bb)


def test_backbone_and_tokenizer_mismatch_name_both_values(saved):
    bb, _, xdir, _ = saved
    other = tiny_backbone("deberta-v2")
    with pytest.raises(CheckpointError, match="'random:bert'.*'random:deberta-v2'"):
        load_xcross(xdir, other)
    m = json.loads((xdir / "manifest.json").read_text())
    m["tokenizer_fingerprint"] = "0123456789abcdef"
    (xdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=f"0123456789abcdef.*{bb.tokenizer_fingerprint}"):
        load_xcross(xdir, bb)


def test_files_are_safetensors_not_pickle(saved):
    _, _, xdir, _ = saved
    assert sorted(p.name for p in xdir.iterdir()) == ["manifest.json", "tensors.safetensors"]
    assert not (xdir / "tensors.safetensors").read_bytes().startswith(b"\x80")  # pickle protocol marker
