"""X-Cross fast path vs a naive reference (peft, one adapter at a time, Python loop over eq. 5), and the rest."""

from __future__ import annotations

import pytest
import torch

from model.lora import LoraConfig, LoraWeights
from model.params import head_params, lora_params, report, xcross_params
from model.reference import NaiveXCross, random_lora
from model.source import SourceLoraModel
from model.xcross import Head, Integrator, XCross, XCrossConfig, listwise_loss
from tests.tiny import tiny_backbone

PROMPTS = [
    "History: 1: claw hammer 2: tape measure Candidate: cordless drill",
    "History: 1: lego set Candidate: puzzle",
    "History: 1: usb cable 2: hdmi cable 3: mouse pad Candidate: keyboard with backlight",
]


def batch(backbone):
    enc = backbone.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padding in the batch
    return enc["input_ids"], enc["attention_mask"]


def randomize_trainables(model: XCross, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.5 if p.ndim == 1 and p.numel() <= 3 else 0))


def naive_xcross(family: str, loras: list[LoraWeights], model: XCross, ids, mask, bb=None) -> torch.Tensor:
    """The reference (peft set_adapter per stream, eq. 5 as a loop) on its own backbone copy: peft wraps in place."""
    return NaiveXCross(bb or tiny_backbone(family), loras, model)(ids, mask)  # same seed -> same frozen weights


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
@pytest.mark.parametrize("n", [2, 3])
def test_fast_path_matches_naive_reference(family, n):
    bb = tiny_backbone(family)
    loras = [random_lora(bb, seed=s) for s in range(n)]
    model = XCross(bb, loras, XCrossConfig(n_streams=n, top_k=2)).eval()
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        fast = model(ids, mask)
        ref = naive_xcross(family, loras, model, ids, mask)
    assert fast.shape == (3,)
    assert (fast - ref).abs().max().item() < 1e-4
    # and the integration is doing something: with the integrators removed the scores differ
    plain = XCross(bb, loras, XCrossConfig(n_streams=n, top_k=0), head=model.head).eval()
    plain.w.data.copy_(model.w.data)
    with torch.no_grad():
        assert (plain(ids, mask) - fast).abs().max().item() > 1e-4


@pytest.mark.slow
def test_fast_path_matches_naive_reference_on_real_minilm(minilm):
    from model.backbone import load_backbone

    loras = [random_lora(minilm, seed=s, std=0.02) for s in range(2)]
    model = XCross(minilm, loras, XCrossConfig(n_streams=2, top_k=6)).eval()
    randomize_trainables(model)
    ids, mask = batch(minilm)
    with torch.no_grad():
        fast = model(ids, mask)
        ref = naive_xcross("bert", loras, model, ids, mask, bb=load_backbone("minilm"))  # its own copy for peft
    assert (fast - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_single_stream_equals_peft_source_model(family):
    src = SourceLoraModel(tiny_backbone(family), LoraConfig(dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    bb = tiny_backbone(family)
    ids, mask = batch(bb)
    fast = XCross(bb, [src.lora_weights()], XCrossConfig(n_streams=1, top_k=0), head=src.head).eval()
    with torch.no_grad():
        assert (fast(ids, mask) - src(ids, mask)).abs().max().item() < 1e-5


def test_padding_does_not_change_a_prompts_score():
    bb = tiny_backbone("bert")
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=2)).eval()
    randomize_trainables(model)
    ids, mask = batch(bb)
    alone = bb.tokenizer(PROMPTS[1:2], return_tensors="pt")
    with torch.no_grad():
        assert abs(model(ids, mask)[1] - model(alone["input_ids"], alone["attention_mask"])[0]).item() < 1e-5


def test_only_integrators_w_and_head_are_trainable_and_get_gradients():
    bb = tiny_backbone("bert")
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=1))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"w", "integrators.1.W_concat.weight", "head.pooler.weight", "head.pooler.bias",
                         "head.scorer.weight", "head.scorer.bias"}
    ids, mask = batch(bb)
    listwise_loss(model(ids, mask), group=3).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for name, buf in model.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name
    assert not any(p.requires_grad or p.grad is not None for p in bb.model.parameters())


def test_eq5_on_a_hand_computed_example():
    integ = Integrator(n=2, d=2, beta=0.5, gamma=0.4, init_std=0.0)
    # z = W h_concat; rows: direct(m=0, m'=1), direct(m=1, m'=0), inter(0,1), inter(1,0)
    integ.W_concat.weight.data = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    h0, h1 = torch.tensor([2.0, 3.0]), torch.tensor([5.0, 7.0])
    h = torch.stack([h0, h1]).view(2, 1, 1, 2)  # (n, B, T, d)
    out = integ(h).view(2, 2)
    z = torch.tensor([2.0, 3.0, 5.0, 7.0])
    want0 = h0 + 0.5 * z[0] * h1 + 0.4 * z[2] * (h0 - h1)
    want1 = h1 + 0.5 * z[1] * h0 + 0.4 * z[3] * (h1 - h0)
    torch.testing.assert_close(out, torch.stack([want0, want1]))


def test_ablation_options():
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, 0), random_lora(bb, 1)]
    ids, mask = batch(bb)
    # -Interactions: gamma = 0 makes the interaction half of W_concat irrelevant
    m = XCross(bb, loras, XCrossConfig(top_k=2, gamma=0.0)).eval()
    randomize_trainables(m)
    with torch.no_grad():
        before = m(ids, mask)
        for integ in m.integrators.values():
            integ.W_concat.weight[2:].normal_()
        torch.testing.assert_close(m(ids, mask), before)
    # K = 1 integrates at the last layer only
    assert list(XCross(bb, loras, XCrossConfig(top_k=1)).integrators) == ["1"]
    # one stream (the Pooler+Scorer baseline): nothing to integrate
    one = XCross(bb, loras[:1], XCrossConfig(n_streams=1, top_k=0))
    assert len(one.integrators) == 0 and one(ids, mask).shape == (3,)
    with pytest.raises(ValueError, match="top_k"):
        XCrossConfig(n_streams=1, top_k=1)
    with pytest.raises(ValueError, match="n_streams=3 but 2 LoRAs"):
        XCross(bb, loras, XCrossConfig(n_streams=3))


def test_lower_layers_run_once_when_loras_adapt_only_the_top():
    """Shared-lower-layers: LoRA only on layer 1 -> layer 0 runs on B rows; same scores as folding from layer 0."""
    bb = tiny_backbone("bert")
    loras = []
    for s in range(2):
        full = random_lora(bb, s)
        keep = [k for k in full.A if ".layer.1." in k]
        loras.append(LoraWeights({k: full.A[k] for k in keep}, {k: full.B[k] for k in keep}, full.scale))
    model = XCross(bb, loras, XCrossConfig(top_k=1)).eval()
    assert model.encoder.fold_at == 1
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        shared = model(ids, mask)
        model.encoder.fold_at = 0
        torch.testing.assert_close(model(ids, mask), shared, atol=1e-5, rtol=0)


def test_lora_top_truncates_full_loras_to_the_top_layers_and_survives_a_checkpoint(tmp_path):
    """XCrossConfig.lora_top=1 on LoRAs trained on both layers = the same model built from the layer-1 deltas by
    hand; the truncation is part of the config, so a saved and reloaded checkpoint scores the same."""
    from model.checkpoint import load_model, save_lora, save_xcross
    from model.xcross import Head

    bb = tiny_backbone("bert")
    full = [random_lora(bb, s) for s in range(2)]
    by_hand = [LoraWeights({k: x.A[k] for k in x.A if ".layer.1." in k}, {k: x.B[k] for k in x.B if ".layer.1." in k},
                           x.scale) for x in full]
    model = XCross(bb, full, XCrossConfig(top_k=1, lora_top=1)).eval()
    from model.lora import GroupedLoRALinear

    adapted = [any(isinstance(m, GroupedLoRALinear) for m in layer.modules()) for layer in model.encoder.layers]
    assert model.encoder.fold_at == 1 and adapted == [False, True]
    randomize_trainables(model)
    want = XCross(bb, by_hand, XCrossConfig(top_k=1)).eval()
    want.load_state_dict(model.state_dict())
    ids, mask = batch(bb)
    dirs = [save_lora(tmp_path / f"lora{s}", full[s], Head(bb.hidden_size), bb, domain=f"D{s}",
                      lora_config={"r": 16, "alpha": 32}) for s in range(2)]
    save_xcross(tmp_path / "x", model, bb, target="T", sources=[(f"D{s}", dirs[s]) for s in range(2)])
    loaded, _ = load_model(tmp_path / "x", bb)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), want(ids, mask), atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.eval()(ids, mask), want(ids, mask), atol=1e-6, rtol=0)
    assert loaded.config.lora_top == 1
    with pytest.raises(ValueError, match="lora_top"):
        XCross(bb, full, XCrossConfig(top_k=1, lora_top=3))


def test_mean_of_loras_is_the_mean_delta():
    bb = tiny_backbone("bert")
    a, b = random_lora(bb, 0), random_lora(bb, 1)
    mean = LoraWeights.mean([a, b])
    for m in a.modules:
        torch.testing.assert_close(mean.delta(m), (a.delta(m) + b.delta(m)) / 2)
    assert mean.rank == 32


def test_listwise_loss_is_softmax_nll_of_the_positive():
    scores = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 5.0])
    expected = -(torch.log_softmax(scores[:3], 0)[0] + torch.log_softmax(scores[3:], 0)[0]) / 2
    torch.testing.assert_close(listwise_loss(scores, group=3), expected)
    assert abs(listwise_loss(torch.zeros(30), 30).item() - torch.log(torch.tensor(30.0)).item()) < 1e-6


def test_head_is_fp32_under_bf16_autocast():
    head = Head(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(4, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_parameter_accounting_matches_real_models():
    bb = tiny_backbone("bert")
    d, L = bb.hidden_size, bb.num_layers
    src = SourceLoraModel(tiny_backbone("bert"))
    assert sum(p.numel() for p in src.parameters() if p.requires_grad) == lora_params(d, L) + head_params(d)
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=2))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == xcross_params(d, 2, 2) + head_params(d)
    minilm, deberta = report(384, 6), report(768, 12, top_k=9)
    assert minilm["xcross_over_lora"] == pytest.approx(1 / 16, rel=1e-3)  # 4 adapted matrices per layer
    assert deberta["paper_footnote_ratio"] == pytest.approx(0.25)  # the paper's 25% (its footnote 3)


def test_minus_layers_ablation_is_integration_switched_off():
    """The paper's -Layers (sec. 4.5: beta = gamma = 0, streams combined only at the final stage, eq. 6) is the same
    function as integrating no layer (top_k = 0), which is how the ablation is trained (training/schedule.py)."""
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, s) for s in range(2)]
    switched_off = XCross(bb, loras, XCrossConfig(top_k=2, beta=0.0, gamma=0.0)).eval()
    randomize_trainables(switched_off)
    none = XCross(bb, loras, XCrossConfig(top_k=0)).eval()
    # every weight of the no-integration model (head, eq. 6's stream weights) is taken from the switched-off one
    none.load_state_dict({k: v for k, v in switched_off.state_dict().items() if k in none.state_dict()})
    assert not list(none.integrators) and len(list(switched_off.integrators)) == 2
    ids, mask = batch(bb)
    with torch.no_grad():
        torch.testing.assert_close(none(ids, mask), switched_off(ids, mask), atol=1e-5, rtol=0)
        full = XCross(bb, loras, XCrossConfig(top_k=2)).eval()
        full.load_state_dict(switched_off.state_dict())
        assert not torch.allclose(full(ids, mask), none(ids, mask), atol=1e-4)  # with beta, gamma on, it differs
