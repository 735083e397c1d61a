"""Inference rewrites (model/inference.py) give the scores of the modules they replace."""

from __future__ import annotations

import pytest
import torch

from model.inference import (
    FastIntegrator,
    StreamwiseXCross,
    cast_frozen_,
    optimize_for_inference,
    runs_pure_bf16,
    serve_bf16_,
)
from model.lora import GroupedLoRALinear, LoraWeights
from model.xcross import Integrator, XCross, XCrossConfig
from tests.model.test_xcross import batch, random_lora, randomize_trainables
from tests.tiny import tiny_backbone


@pytest.mark.parametrize("n", [2, 3])
def test_fast_integrator_equals_eq5(n):
    integ = Integrator(n, 8, beta=0.5, gamma=0.4, init_std=0.3)
    h = torch.randn(n, 3, 5, 8)
    torch.testing.assert_close(FastIntegrator(integ)(h), integ(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
@pytest.mark.parametrize(("n", "top_k"), [(1, 0), (2, 2), (3, 1)])
def test_optimized_model_gives_the_same_scores(family, n, top_k):
    bb = tiny_backbone(family)
    loras = [random_lora(bb, seed=s) for s in range(n)]
    model = XCross(bb, loras, XCrossConfig(n_streams=n, top_k=top_k)).eval()
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        want = model(ids, mask)
        fast = optimize_for_inference(model)
        assert not any(isinstance(m, (GroupedLoRALinear, Integrator)) for m in fast.modules())
        torch.testing.assert_close(fast(ids, mask), want, atol=1e-5, rtol=0)
    assert all(p.dtype == torch.float32 for p in bb.model.parameters())  # a merge never touches the backbone


def test_bf16_weights_under_autocast_stay_close_and_the_head_stays_fp32():
    bb = tiny_backbone("bert")
    model = optimize_for_inference(XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=2)))
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        want = model(ids, mask)
        cast_frozen_(model, torch.bfloat16)
        assert model.head.pooler.weight.dtype == torch.float32
        assert bb.layers[0].attention.self.query.weight.dtype == torch.bfloat16  # shared with the backbone
        with torch.autocast("cpu", torch.bfloat16):
            got = model(ids, mask)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.02 * want.abs().max() + 1e-3


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_served_bf16_form_runs_bf16_end_to_end_where_packed(family):
    """serve_bf16_: the packed streamwise form keeps bf16 activations (no autocast needed: a bf16 weight on an
    fp32 activation would raise); other forms keep fp32 activations for autocast. Scores stay fp32 and close."""
    bb = tiny_backbone(family)
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=2)).eval()
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        want = model(ids, mask)
        served = serve_bf16_(optimize_for_inference(model, streamwise=True))
        assert runs_pure_bf16(served) == (family == "bert")  # DeBERTa is not packed
        assert served.head.pooler.weight.dtype == torch.float32
        if runs_pure_bf16(served):
            got = served(ids, mask)  # no autocast
        else:
            with torch.autocast("cpu", torch.bfloat16):
                got = served(ids, mask)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.02 * want.abs().max() + 1e-3
    assert not runs_pure_bf16(model)


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
@pytest.mark.parametrize(("n", "top_k", "lora_layers"), [(1, 0, None), (2, 2, None), (3, 1, None), (2, 1, {1})])
def test_streamwise_form_gives_the_same_scores(family, n, top_k, lora_layers):
    bb = tiny_backbone(family)
    loras = []
    for s in range(n):
        full = random_lora(bb, seed=s)
        keep = [k for k in full.A if lora_layers is None or full.layer_index(k) in lora_layers]
        loras.append(LoraWeights({k: full.A[k] for k in keep}, {k: full.B[k] for k in keep}, full.scale))
    model = XCross(bb, loras, XCrossConfig(n_streams=n, top_k=top_k)).eval()
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        want = model(ids, mask)
        fast = optimize_for_inference(model, streamwise=True)
        assert isinstance(fast, StreamwiseXCross) and fast.fold_at == (1 if lora_layers else 0)
        assert len(fast.packed) == (n if family == "bert" else 0)  # BERT runs packed: no work on padding
        torch.testing.assert_close(fast(ids, mask), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids, mask), want)  # the original is untouched


def test_packed_scores_do_not_depend_on_padding():
    bb = tiny_backbone("bert")
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=2)).eval()
    randomize_trainables(model)
    fast = optimize_for_inference(model, streamwise=True)
    ids, mask = batch(bb)
    wide_ids = torch.cat([ids, torch.zeros(3, 7, dtype=ids.dtype)], 1)  # 7 more padding columns
    wide_mask = torch.cat([mask, torch.zeros(3, 7, dtype=mask.dtype)], 1)
    with torch.no_grad():
        torch.testing.assert_close(fast(wide_ids, wide_mask), fast(ids, mask), atol=1e-5, rtol=0)
