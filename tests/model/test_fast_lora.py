"""The fast training form of a source LoRA (model/fast_lora.py) computes what peft's LoRA computes in eval mode:
same scores, same gradients of the LoRA and head, for BERT (packed) and DeBERTa-v2 (padded)."""

from __future__ import annotations

import pytest
import torch

from model.fast_lora import FastLoraModel
from model.lora import LoraConfig
from model.source import SourceLoraModel
from model.xcross import XCross, XCrossConfig, pool_tokens
from tests.tiny import tiny_backbone


def _batch(B: int = 5, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    lengths = torch.tensor([T, T - 3, 5, T - 1, 7][:B])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids * mask, mask


def _pair(family: str, top_k: int, layers: int = 3):
    bb_ref, bb_fast = tiny_backbone(family, layers), tiny_backbone(family, layers)
    targets = bb_ref.lora_targets_top(top_k)
    torch.manual_seed(1)
    ref = SourceLoraModel(bb_ref, LoraConfig(dropout=0.0, targets=targets))
    with torch.no_grad():  # non-zero B so the deltas matter
        for n, p in ref.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    fast = FastLoraModel(bb_fast, LoraConfig(dropout=0.0), top_k=top_k, head=None)
    fast.load_lora(ref.lora_weights())
    fast.head.load_state_dict(ref.head.state_dict())
    return ref.eval(), fast


@pytest.mark.parametrize("family,top_k", [("bert", 0), ("bert", 2), ("deberta-v2", 0), ("deberta-v2", 1)])
def test_scores_and_gradients_equal_peft(family, top_k):
    ref, fast = _pair(family, top_k)
    assert fast.packed == (family == "bert")
    ids, mask = _batch()
    s_ref, s_fast = ref(ids, mask), fast.train()(ids, mask)
    assert torch.allclose(s_ref, s_fast, atol=1e-5), (s_ref - s_fast).abs().max()
    s_ref.square().sum().backward()
    s_fast.square().sum().backward()
    ref_lora, fast_grads = {}, {}
    for n, p in ref.peft.named_parameters():
        if p.requires_grad:
            path = n.removeprefix("base_model.model.").replace(".default", "")
            ref_lora[path] = p.grad
    for p in fast.paths:
        m = fast.loras[p.replace(".", "__")]
        fast_grads[f"{p}.lora_A.weight"], fast_grads[f"{p}.lora_B.weight"] = m.lora_A.grad, m.lora_B.grad
    assert set(ref_lora) == set(fast_grads)
    for k in ref_lora:
        assert torch.allclose(ref_lora[k], fast_grads[k], atol=1e-5, rtol=1e-4), k
    assert torch.allclose(ref.head.scorer.weight.grad, fast.head.scorer.weight.grad, atol=1e-5)


def test_lower_layers_have_no_lora_and_no_autograd():
    _, fast = _pair("bert", top_k=1)
    assert all(p.startswith("encoder.layer.2.") for p in fast.paths) and len(fast.paths) == 4
    trainable = [n for n, p in fast.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    ids, mask = _batch()
    fast.train()(ids, mask).sum().backward()
    assert all(p.grad is None for p in fast.layers.parameters())  # frozen base: no weight gradients


def test_trained_adapter_serves_through_xcross_with_the_same_scores():
    _, fast = _pair("bert", top_k=2)
    bb = tiny_backbone("bert", 3)
    served = XCross(bb, [fast.lora_weights()], XCrossConfig(n_streams=1, top_k=0), head=fast.head).eval()
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.allclose(served(ids, mask), fast.eval()(ids, mask), atol=1e-5)


def test_mean_pooling_is_the_masked_token_mean():
    bb = tiny_backbone("bert", 2)
    fast = FastLoraModel(bb, LoraConfig(dropout=0.0), pooling="mean")
    padded = FastLoraModel(tiny_backbone("bert", 2), LoraConfig(dropout=0.0), pooling="mean", packed=False)
    padded.load_lora(fast.lora_weights())
    ids, mask = _batch()
    with torch.no_grad():
        a, b = fast.pool(ids, mask), padded.pool(ids, mask)
        h = bb.runner().forward(ids, mask)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, pool_tokens(h, mask, "mean"), atol=1e-5)
    assert torch.allclose(a[2], h[2, :5].mean(0), atol=1e-5)  # row 2 has 5 real tokens


def test_rejects_what_it_cannot_do():
    bb = tiny_backbone("bert", 2)
    with pytest.raises(ValueError, match="dropout"):
        FastLoraModel(bb, LoraConfig(dropout=0.1))
    with pytest.raises(ValueError, match="top_k"):
        FastLoraModel(bb, LoraConfig(dropout=0.0), top_k=3)
    with pytest.raises(ValueError, match="pooling"):
        FastLoraModel(bb, LoraConfig(dropout=0.0), pooling="max")


def test_bucketed_forward_gives_the_same_scores_and_gradients():
    bb = tiny_backbone("bert", 2)
    torch.manual_seed(3)
    whole = FastLoraModel(bb, LoraConfig(dropout=0.0), bucket=0)
    chunked = FastLoraModel(tiny_backbone("bert", 2), LoraConfig(dropout=0.0), bucket=2, head=whole.head)
    with torch.no_grad():
        for m in whole.loras.values():
            m.lora_B.normal_(0, 0.2)
    chunked.load_lora(whole.lora_weights())
    ids, mask = _batch()
    a, b = whole(ids, mask), chunked(ids, mask)
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), list(whole.loras.values())[0].lora_A)[0]
    gb = torch.autograd.grad(b.square().sum(), list(chunked.loras.values())[0].lora_A)[0]
    assert torch.allclose(ga, gb, atol=1e-5)


def test_xcross_training_form_trains_the_built_models_parameters():
    from model.fast_lora import xcross_training_form

    bb = tiny_backbone("bert", 3)
    loras = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = FastLoraModel(bb, LoraConfig(dropout=0.0), top_k=2)
        with torch.no_grad():
            for lora in m.loras.values():
                lora.lora_B.normal_(0, 0.2)
        loras.append(m.lora_weights())
    torch.manual_seed(0)
    built = XCross(bb, loras, XCrossConfig(n_streams=2, top_k=2, init_std=0.05))
    form = xcross_training_form(built)
    names = {k for k, p in form.named_parameters() if p.requires_grad}
    assert names == {k for k, p in built.named_parameters() if p.requires_grad}
    ids, mask = _batch()
    s_built, s_form = built.eval()(ids, mask), form.train()(ids, mask)
    assert torch.allclose(s_built, s_form, atol=1e-5)
    g_built = torch.autograd.grad(s_built.square().sum(), built.integrators["2"].W_concat.weight)[0]
    g_form = torch.autograd.grad(s_form.square().sum(), built.integrators["2"].W_concat.weight)[0]
    assert g_built.abs().max() > 0 and torch.allclose(g_built, g_form, atol=1e-5, rtol=1e-4)


def _xcross_mean(bb):
    loras = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = FastLoraModel(bb, LoraConfig(dropout=0.0), top_k=2, pooling="mean")
        with torch.no_grad():
            for lora in m.loras.values():
                lora.lora_B.normal_(0, 0.2)
        loras.append(m.lora_weights())
    torch.manual_seed(0)
    return XCross(bb, loras, XCrossConfig(n_streams=2, top_k=2, init_std=0.05, pooling="mean")).eval(), loras


def test_mean_pooled_xcross_scores_the_same_in_every_form():
    from model.inference import optimize_for_inference

    bb = tiny_backbone("bert", 3)
    built, loras = _xcross_mean(bb)
    ids, mask = _batch()
    with torch.no_grad():
        ref = built(ids, mask)
        cls = XCross(bb, loras, XCrossConfig(n_streams=2, top_k=2, init_std=0.05)).eval()
        cls.load_state_dict(built.trainable_state_dict(), strict=False)
        assert (cls(ids, mask) - ref).abs().max() > 1e-3  # the option changes the model
        for form in (optimize_for_inference(_xcross_mean(bb)[0], streamwise=True),
                     optimize_for_inference(_xcross_mean(bb)[0], streamwise=True, packed=False),
                     optimize_for_inference(_xcross_mean(bb)[0])):
            assert torch.allclose(form(ids, mask), ref, atol=1e-5)


def test_mean_pooled_lora_checkpoint_serves_with_its_pooling(tmp_path):
    from model.checkpoint import load_model, save_lora

    bb = tiny_backbone("bert", 2)
    fast = FastLoraModel(bb, LoraConfig(dropout=0.0), pooling="mean")
    with torch.no_grad():
        for m in fast.loras.values():
            m.lora_B.normal_(0, 0.2)
    save_lora(tmp_path / "l", fast.lora_weights(), fast.head, bb, domain="Tools",
              lora_config={"r": 16, "alpha": 32, "dropout": 0.0, "targets": "", "pooling": "mean"})
    served, manifest = load_model(tmp_path / "l", tiny_backbone("bert", 2))
    ids, mask = _batch()
    assert served.config.pooling == "mean" and manifest["lora"]["pooling"] == "mean"
    with torch.no_grad():
        assert torch.allclose(served(ids, mask), fast.eval()(ids, mask), atol=1e-5)
