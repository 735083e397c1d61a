"""ONNX export of the whole X-Cross forward: parity with torch at several shapes (dynamic axes), int8 runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.inference import optimize_for_inference
from model.onnx_export import export_onnx, parity, quantize_int8, run, session
from model.xcross import XCross, XCrossConfig
from tests.model.test_xcross import batch, random_lora, randomize_trainables
from tests.tiny import tiny_backbone


def other_shapes(bb):
    """Batches of another size and length than the export's example, with padding."""
    tok = bb.tokenizer
    long = ["History: " + " ".join(f"{k}: item number {k} with a longer title" for k in range(6)) + " Candidate: x",
            "History: 1: a Candidate: b"]
    enc = tok(long * 3, padding=True, return_tensors="pt")
    return [batch(bb), (enc["input_ids"], enc["attention_mask"])]


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
@pytest.mark.parametrize(("n", "top_k", "optimized"), [(2, 2, False), (2, 1, True), (1, 0, True), (2, 2, "streamwise")])
def test_export_matches_torch(tmp_path, family, n, top_k, optimized):
    bb = tiny_backbone(family)
    model = XCross(bb, [random_lora(bb, s) for s in range(n)], XCrossConfig(n_streams=n, top_k=top_k)).eval()
    randomize_trainables(model)
    if optimized:
        model = optimize_for_inference(model, streamwise=optimized == "streamwise")
    path = export_onnx(model, tmp_path / "m.onnx")
    batches = other_shapes(bb)
    assert batches[1][0].shape[1] > 16  # longer than the traced example
    assert parity(model, path, batches) < 1e-4


def test_int8_runs_and_stays_close(tmp_path):
    bb = tiny_backbone("bert")
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=2)).eval()
    randomize_trainables(model)
    q = quantize_int8(export_onnx(model, tmp_path / "m.onnx"), tmp_path / "m.int8.onnx")
    ids, mask = batch(bb)
    got = run(session(q, threads=1), ids, mask)
    with torch.no_grad():
        want = model(ids, mask).numpy()
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + 0.05
