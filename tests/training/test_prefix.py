"""The frozen-prefix cache (training/prefix.py): evaluation from cached lower-layer activations gives the same scores
and ranks as the full forward, for every model form that takes part, and a cache entry is never reused for other
tokens, other base weights or another depth."""

from __future__ import annotations

import pytest
import torch

from model.fast_lora import FastLoraModel, xcross_training_form
from model.inference import optimize_for_inference
from model.lora import LoraConfig
from model.xcross import XCross, XCrossConfig
from tests.tiny import tiny_backbone
from training import prefix
from training.data import load_domain
from training.evaluate import PromptSource, autocast, evaluate_users


@pytest.fixture(scope="module")
def tools():
    domain = load_domain("Tools")
    return domain, PromptSource(tiny_backbone("bert", 3).tokenizer, domain.catalog, max_len=64)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prefix.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(prefix, "SHARD", 3)
    return tmp_path / "cache"


def _lora(bb, seed: int, top_k: int = 1) -> FastLoraModel:
    torch.manual_seed(seed)
    m = FastLoraModel(bb, LoraConfig(dropout=0.0), top_k=top_k)
    with torch.no_grad():  # non-zero B and a random head, so every user's scores differ
        for lora in m.loras.values():
            lora.lora_B.normal_(0, 0.3)
        m.head.scorer.weight.normal_(0, 1.0)
    return m.eval()


def _xcross(bb):
    loras = [_lora(bb, s).lora_weights() for s in (1, 2)]
    torch.manual_seed(0)
    return XCross(bb, loras, XCrossConfig(n_streams=2, top_k=1, init_std=0.05)).eval()


def _scores(model, source, users, bf16):
    with torch.inference_mode(), autocast(bf16):
        return [model(*source.batch(u, u.candidates)).float() for u in users]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("form", ["lora", "lora-served", "xcross-served", "xcross-training"])
def test_cached_evaluation_equals_the_full_forward(tools, cache, form, bf16):
    domain, source = tools
    bb = tiny_backbone("bert", 3)
    model = {"lora": lambda: _lora(bb, 1),
             "lora-served": lambda: optimize_for_inference(
                 XCross(bb, [_lora(bb, 1).lora_weights()], XCrossConfig(n_streams=1, top_k=0),
                        head=_lora(bb, 1).head), streamwise=True),
             "xcross-served": lambda: optimize_for_inference(_xcross(bb), streamwise=True),
             "xcross-training": lambda: xcross_training_form(_xcross(bb)).eval()}[form]()
    assert prefix.supports(model) and model.frozen_prefix() == 2
    users = domain.dev[:7]  # shards of 3: two full ones and a partial one
    expected = _scores(model, source, users, bf16)
    ref = [p["rank"] for p in evaluate_users(model, source, users, bf16, progress=False, desc="x")["per_user"]]
    first = evaluate_users(model, source, users, bf16, progress=False)  # builds the shards
    assert len(list(cache.glob("*.safetensors"))) == 3
    c = prefix.PrefixCache(cache, model, [source.batch(u, u.candidates) for u in users], bf16)
    with torch.inference_mode(), autocast(bf16):
        got = [c.scores(i).float() for i in range(len(users))]
    assert c.hits == 7 and c.misses == 0
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (a - b).abs().max()
    assert [p["rank"] for p in first["per_user"]] == ref


def test_the_forms_share_one_cache_under_bf16(tools, cache):
    """The training form with bf16-stored frozen weights (as the LoRA trains) and the served form with fp32 weights
    compute the same prefix under bf16 autocast: one cache. In fp32 the stored dtype matters, and they do not share."""
    domain, source = tools
    fast = _lora(tiny_backbone("bert", 3), 1)
    served = optimize_for_inference(XCross(tiny_backbone("bert", 3), [fast.lora_weights()],
                                           XCrossConfig(n_streams=1, top_k=0), head=fast.head), streamwise=True)
    fast.frozen_bf16_()
    assert prefix.signature(fast, True) == prefix.signature(served, True)
    assert prefix.signature(fast, False) != prefix.signature(served, False)
    ids, mask = source.batch(domain.dev[0], domain.dev[0].candidates)
    with torch.inference_mode(), autocast(True):
        assert torch.equal(fast.prefix(ids, mask)[0], served.prefix(ids, mask)[0])


def test_other_tokens_weights_or_depth_miss(tools, cache):
    domain, source = tools
    users = domain.dev[:3]
    bb = tiny_backbone("bert", 3)
    evaluate_users(_lora(bb, 1), source, users, True, progress=False)
    assert len(list(cache.glob("*.safetensors"))) == 1
    other_len = PromptSource(bb.tokenizer, domain.catalog, max_len=32)  # other tokens (history cut shorter)
    evaluate_users(_lora(bb, 1), other_len, users, True, progress=False)
    evaluate_users(_lora(tiny_backbone("bert", 3, seed=5), 1), source, users, True, progress=False)  # other base
    evaluate_users(_lora(bb, 1, top_k=2), source, users, True, progress=False)  # depth 1, not 2
    assert len(list(cache.glob("*.safetensors"))) == 4
    evaluate_users(_lora(bb, 7), source, users, True, progress=False)  # another LoRA on the same base: a hit
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_off_size_limit_and_unsupported_models(tools, cache, monkeypatch):
    domain, source = tools
    users = domain.dev[:3]
    bb = tiny_backbone("bert", 3)
    monkeypatch.setenv(prefix.GB_ENV, "0")
    evaluate_users(_lora(bb, 1), source, users, True, progress=False)
    assert not list(cache.glob("*.safetensors"))  # no room: computed, not written
    monkeypatch.setenv(prefix.ENV, "off")
    assert prefix.cache_dir() is None
    assert not prefix.supports(_lora(bb, 1, top_k=0))  # every layer adapted: no frozen prefix
    assert not prefix.supports(_lora(tiny_backbone("deberta-v2", 3), 1))  # padded form: no packing
    assert not prefix.supports(lambda ids, mask: torch.zeros(len(ids)))


def test_a_damaged_shard_is_a_miss_and_is_rewritten(tools, cache):
    domain, source = tools
    users = domain.dev[:3]
    model = _lora(tiny_backbone("bert", 3), 1)
    ref = evaluate_users(model, source, users, True, progress=False)
    (shard,) = cache.glob("*.safetensors")
    shard.write_bytes(b"not a safetensors file")
    again = evaluate_users(model, source, users, True, progress=False)
    assert [p["rank"] for p in again["per_user"]] == [p["rank"] for p in ref["per_user"]]
    c = prefix.PrefixCache(cache, model, [source.batch(u, u.candidates) for u in users], True)
    with torch.inference_mode(), autocast(True):
        [c.scores(i) for i in range(len(users))]
    assert c.hits == 3  # rewritten whole


def test_the_key_covers_every_frozen_tensor_the_prefix_reads():
    bb = tiny_backbone("bert", 3)
    model = _lora(bb, 1)  # prefix: embeddings + layers 0-1
    before = prefix.signature(model, True)
    with torch.no_grad():
        bb.layers[1].output.dense.weight.add_(1.0)  # a lower layer's FFN, not layer 0's query
    assert prefix.signature(model, True) != before
    changed = prefix.signature(model, True)
    with torch.no_grad():
        bb.model.embeddings.word_embeddings.weight.add_(1.0)
    assert prefix.signature(model, True) != changed
    top = prefix.signature(model, True)
    with torch.no_grad():
        bb.layers[2].output.dense.weight.add_(1.0)  # above the prefix: not part of it
    assert prefix.signature(model, True) == top
