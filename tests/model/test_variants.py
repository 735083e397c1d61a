"""The variants' math: WeaveRec merging (model/weaverec.py, LoraWeights.merge) and GCA (model/gca.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.checkpoint import load_model, save_lora, save_weaverec, save_xcross, single_stream
from model.gca import GatedCrossAttention, abs_cos_sum, mean_abs_cos, orthogonality, track
from model.inference import StreamwiseXCross, optimize_for_inference
from model.lora import LoraWeights
from model.reference import random_lora
from model.weaverec import LambdaMerge, merge_heads, merge_weights
from model.xcross import Head, XCross, XCrossConfig, listwise_loss
from tests.model.test_xcross import batch, randomize_trainables
from tests.tiny import tiny_backbone


def random_head(d: int, seed: int) -> Head:
    head = Head(d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return head


# ----------------------------------------------------------------------------- WeaveRec merge


def test_merged_delta_is_the_explicit_weighted_sum():
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, seed=s, r=r, alpha=a) for s, (r, a) in enumerate([(16, 32), (8, 32), (4, 4)])]
    lam = [0.5, 0.3, 0.2]
    merged = LoraWeights.merge(loras, lam)
    for m in loras[0].modules:
        explicit = sum(w * (x.scale * x.B[m] @ x.A[m]) for w, x in zip(lam, loras, strict=True))  # sum l_i (a/r) B A
        assert torch.allclose(merged.delta(m), explicit, atol=1e-6)
    assert merged.rank == 16 + 8 + 4 and merged.scale == 1.0
    # mixing the A's and the B's separately (peft's "linear" combination) is a different matrix (DESIGN 5.7):
    # s (B_1 + B_2)/2 (A_1 + A_2)/2 != s (B_1 A_1 + B_2 A_2)/2 (the cross terms B_1 A_2, B_2 A_1)
    m = loras[0].modules[0]
    x, y = random_lora(bb, seed=5), random_lora(bb, seed=6)
    mixed = x.scale * ((x.B[m] + y.B[m]) / 2) @ ((x.A[m] + y.A[m]) / 2)
    assert not torch.allclose(LoraWeights.merge([x, y]).delta(m), mixed, atol=1e-4)


def test_default_merge_is_uniform_and_mean_is_the_uniform_merge():
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, seed=s) for s in range(3)]
    uniform, mean = LoraWeights.merge(loras), LoraWeights.mean(loras)
    assert uniform.meta["weights"] == pytest.approx([1 / 3] * 3)
    for m in loras[0].modules:
        assert torch.allclose(uniform.delta(m), sum(x.delta(m) for x in loras) / 3, atol=1e-6)
        assert torch.allclose(mean.delta(m), uniform.delta(m))
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        LoraWeights.merge(loras, [0.5, 0.5])


def test_heads_are_merged_with_the_same_lambda():
    heads = [random_head(8, s) for s in range(3)]
    lam = [0.6, 0.3, 0.1]
    merged = merge_heads(heads, lam)
    for name, p in merged.named_parameters():
        expected = sum(w * dict(h.named_parameters())[name] for w, h in zip(lam, heads, strict=True))
        assert torch.allclose(p, expected, atol=1e-6)
    assert torch.allclose(merge_heads(heads).pooler.weight, sum(h.pooler.weight for h in heads) / 3, atol=1e-6)


def test_lambda_is_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.0, -2.0])
    for t in (0.5, 1.0, 3.0):
        assert torch.allclose(merge_weights(logits, t), torch.softmax(logits / t, -1))
    assert torch.allclose(merge_weights(torch.zeros(4)), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="temperature"):
        merge_weights(logits, 0.0)


def test_lambda_model_equals_the_exported_single_adapter_and_trains():
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, seed=s) for s in range(3)]
    heads = [random_head(bb.hidden_size, s) for s in range(3)]
    model = LambdaMerge(bb, loras, heads, temperature=2.0).eval()
    ids, mask = batch(bb)
    with torch.no_grad():
        model.logits.copy_(torch.tensor([0.4, -1.0, 0.8]))
        merged, head, lam = model.export()
        assert lam == pytest.approx(torch.softmax(torch.tensor([0.4, -1.0, 0.8]) / 2.0, -1).tolist(), abs=1e-6)
        assert torch.allclose(model(ids, mask), single_stream(bb, merged, head)(ids, mask), atol=1e-5)
    # only the logits train, and a step of the listwise loss moves them
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logits"]
    loss = listwise_loss(model(ids, mask), group=3)
    loss.backward()
    assert model.logits.grad is not None and model.logits.grad.abs().sum() > 0
    # under bf16 autocast (the cpu preset's tuning) the merged head stays fp32 and the logits still train
    model.logits.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        scores = model(ids, mask)
    assert scores.dtype == torch.float32
    listwise_loss(scores, group=3).backward()
    assert model.logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- GCA


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_gate_shapes_activation_and_layer_norm(act, layer_norm):
    n, B, T, d = 2, 3, 5, 16
    gca = GatedCrossAttention(n, d, heads=4, act=act, layer_norm=layer_norm, init_std=0.5)
    assert isinstance(gca.ln, nn.LayerNorm if layer_norm else nn.Identity)
    assert gca.gate.weight.shape == (d, 2 * d) and gca.gate.bias.shape == (d,)  # W_g [X; A] + b
    assert sum(p.numel() for p in gca.parameters()) == 6 * d * d + 5 * d + (2 * d if layer_norm else 0)  # docs
    h = torch.randn(n, B, T, d)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    out = gca(h, mask)
    assert out.shape == (n, B, T, d)
    x = h.reshape(n * B, T, d)
    a, _ = gca.attn(gca.ln(x), *[h[gca.others].permute(0, 2, 1, 3, 4).reshape(n * B, T, d)] * 2,
                    key_padding_mask=(mask == 0).repeat(n, 1), need_weights=False)
    g = gca.act(gca.gate(torch.cat([x, a], -1)))
    assert torch.allclose(out.reshape(n * B, T, d), x + g * a, atol=1e-5)  # out = X + g * A
    assert (g > 0).all() and (g < 1).all() if act == "sigmoid" else (g < 0).any()


def test_gca_attends_to_the_other_stream_only_and_ignores_its_padding():
    n, B, T, d = 2, 1, 4, 8
    gca = GatedCrossAttention(n, d, heads=2, init_std=0.5).eval()
    h = torch.randn(n, B, T, d)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = gca(h, mask)
    h2 = h.clone()
    h2[1, :, 3] += 10.0  # stream 1's padding token: stream 0 must not see it
    assert torch.allclose(gca(h2, mask)[0], out[0], atol=1e-5)
    h3 = h.clone()
    h3[1, :, 1] += 1.0  # a real token of stream 1 changes what stream 0 attends to
    assert not torch.allclose(gca(h3, mask)[0], out[0], atol=1e-5)


def test_orthogonality_on_known_inputs():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # (1, T=3, 2)
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    assert mean_abs_cos(x, 2.5 * x, mask) == pytest.approx(1.0)  # parallel
    assert mean_abs_cos(x, -x, mask) == pytest.approx(1.0)  # anti-parallel: |cos| = 1
    ortho = torch.tensor([[[0.0, 5.0], [-1.0, 0.0], [3.0, 3.0]]])  # orthogonal on the real tokens
    assert mean_abs_cos(x, ortho, mask) == pytest.approx(0.0, abs=1e-7)  # padding (cos 1) ignored
    mixed = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])  # 45 degrees, 90 degrees
    assert abs_cos_sum(x, mixed, mask) == (pytest.approx(2 ** -0.5), 2)


def test_gca_model_logs_orthogonality_per_layer_and_checkpoints_as_kind_gca(tmp_path):
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, seed=s) for s in range(2)]
    cfg = XCrossConfig(n_streams=2, top_k=0, layers=(-2, -1), integrator="gca", gca_act="tanh", gca_layer_norm=False)
    model = XCross(bb, loras, cfg).eval()
    randomize_trainables(model)
    assert set(model.integrators) == {"0", "1"} and all(isinstance(m, GatedCrossAttention)
                                                        for m in model.integrators.values())
    ids, mask = batch(bb)
    track(model)
    with torch.no_grad():
        scores = model(ids, mask)
    orth = orthogonality(model)
    assert set(orth) == {"0", "1"} and all(0 <= v <= 1 for v in orth.values())
    dirs = []
    for s, lora in enumerate(loras):
        dirs.append(save_lora(tmp_path / f"l{s}", lora, Head(bb.hidden_size), bb, domain="Sports",
                              lora_config={"r": 16, "alpha": 32}))
    save_xcross(tmp_path / "gca", model, bb, target="Tools", sources=[("Sports", dirs[0]), ("Sports", dirs[1])])
    loaded, manifest = load_model(tmp_path / "gca", bb)
    assert manifest["kind"] == "gca" and manifest["config"]["layers"] == [-2, -1]
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), scores, atol=1e-5)
        served = optimize_for_inference(loaded, streamwise=True)  # GCA: the grouped form, not StreamwiseXCross
        assert not isinstance(served, StreamwiseXCross) and torch.allclose(served(ids, mask), scores, atol=1e-5)
    with pytest.raises(ValueError, match="eq. 5 only"):
        StreamwiseXCross(XCross(bb, loras, cfg))


def test_a_prompts_gca_score_does_not_depend_on_padding():
    bb = tiny_backbone("bert")
    model = XCross(bb, [random_lora(bb, seed=s) for s in range(2)],
                   XCrossConfig(top_k=0, layers=(-1,), integrator="gca")).eval()
    randomize_trainables(model)
    ids, mask = batch(bb)
    with torch.no_grad():
        alone = [model(ids[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())]) for i in range(3)]
        assert torch.allclose(torch.cat(alone), model(ids, mask), atol=1e-5)


def test_weaverec_checkpoint_serves_as_one_plain_stream(tmp_path):
    bb = tiny_backbone("bert")
    loras = [random_lora(bb, seed=s) for s in range(3)]
    heads = [random_head(bb.hidden_size, s) for s in range(3)]
    comps = [(f"c{i}", save_lora(tmp_path / f"c{i}", x, h, bb, domain="Tools", lora_config={"r": 16, "alpha": 32}))
             for i, (x, h) in enumerate(zip(loras, heads, strict=True))]
    lam = [0.2, 0.5, 0.3]
    save_weaverec(tmp_path / "w", LoraWeights.merge(loras, lam), merge_heads(heads, lam), bb, target="Tools",
                  components=comps, weights=lam)
    model, manifest = load_model(tmp_path / "w", bb)
    assert manifest["kind"] == "weaverec" and manifest["weights"] == lam and len(manifest["components"]) == 3
    served = optimize_for_inference(model, streamwise=True)
    plain = optimize_for_inference(single_stream(bb, loras[0], heads[0]), streamwise=True)
    # the same modules, shapes and work as one LoRA stream: LoRA merged into W, nothing else added
    shapes = lambda m: [(type(x).__name__, tuple(p.shape)) for x in m.modules() for p in x.parameters(False)]  # noqa: E731
    assert shapes(served) == shapes(plain) and served.config.n_streams == 1
