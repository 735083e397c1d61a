"""Prompt assembly from cached pieces equals tokenizing the whole prompt string (DESIGN 3)."""

from __future__ import annotations

import io
import itertools

import pytest

from model.prompts import PromptBuilder, encode_pieces, normalize_title, prompt_text
from training.data import DOMAINS, load_domain


@pytest.fixture(scope="module")
def real_pairs():
    """1,000 real (history titles, candidate title) pairs, 250 from each domain's dev users."""
    pairs = []
    for name in DOMAINS:
        dom = load_domain(name)
        titles = dom.catalog.titles
        users = itertools.cycle(dom.dev[:125])
        for _ in range(250):
            u = next(users)
            c = u.candidates[len(pairs) % 30]
            pairs.append(([titles[i] for i in u.history], titles[c]))
    assert len(pairs) == 1000
    return pairs


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(real_pairs):
    """A tiny SentencePiece unigram model trained on real titles, wrapped as DeBERTa-v2's tokenizer."""
    import sentencepiece as spm
    from transformers import DebertaV2Tokenizer

    titles = sorted({t for h, c in real_pairs for t in (*h, c)})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(titles),
        model_writer=buf,
        vocab_size=2000,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return DebertaV2Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])


def _check_pairs(tokenizer, pairs, max_len=512):
    builder = PromptBuilder(tokenizer, max_len=max_len)
    mismatches = []
    for history, cand in pairs:
        assembled = builder.build(encode_pieces(tokenizer, history), encode_pieces(tokenizer, [cand])[0])
        full = tokenizer(prompt_text(history, cand))["input_ids"]
        if assembled != full:
            mismatches.append((history, cand))
    return mismatches


def test_wordpiece_assembly_equals_full_tokenization(minilm_tokenizer, real_pairs):
    assert _check_pairs(minilm_tokenizer, real_pairs) == []


def test_sentencepiece_assembly_equals_full_tokenization(sentencepiece_tokenizer, real_pairs):
    assert (
        sentencepiece_tokenizer.convert_ids_to_tokens(encode_pieces(sentencepiece_tokenizer, ["Hammer"])[0])[0][0]
        == "▁"
    )
    assert _check_pairs(sentencepiece_tokenizer, real_pairs) == []


def test_normalize_title():
    assert normalize_title("Claw   Hammer  &amp; Nails ") == "Claw Hammer & Nails"
    assert normalize_title(None) == "unknown item" and normalize_title("  ") == "unknown item"
    assert normalize_title("&quot;Pro&quot;\tKit") == '"Pro" Kit'


def test_oldest_history_dropped_first_and_renumbered(minilm_tokenizer):
    history = [f"item number {w}" for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]]
    cand = "candidate widget"
    full_len = len(minilm_tokenizer(prompt_text(history, cand))["input_ids"])
    max_len = full_len - 6  # forces dropping at least one history item
    builder = PromptBuilder(minilm_tokenizer, max_len=max_len)
    ids = builder.build(encode_pieces(minilm_tokenizer, history), encode_pieces(minilm_tokenizer, [cand])[0])
    assert len(ids) <= max_len
    # the result is exactly the prompt of the most recent items that fit, renumbered from 1
    for keep in range(len(history), -1, -1):
        expected = minilm_tokenizer(prompt_text(history[len(history) - keep :], cand))["input_ids"]
        if len(expected) <= max_len:
            break
    assert 0 < keep < len(history)
    assert ids == expected
    assert "zeta" in minilm_tokenizer.decode(ids) and "alpha" not in minilm_tokenizer.decode(ids)


def test_candidate_is_never_dropped_and_cut_only_when_alone_too_long(minilm_tokenizer):
    builder = PromptBuilder(minilm_tokenizer, max_len=16)
    cand = encode_pieces(minilm_tokenizer, ["word " * 40])[0]
    ids = builder.build(encode_pieces(minilm_tokenizer, ["hammer"]), cand)
    assert len(ids) == 16 and ids[0] == minilm_tokenizer.cls_token_id and ids[-1] == minilm_tokenizer.sep_token_id
    text = minilm_tokenizer.decode(ids)
    assert "candidate" in text and "hammer" not in text


def test_empty_history(minilm_tokenizer):
    ids = PromptBuilder(minilm_tokenizer).build([], encode_pieces(minilm_tokenizer, ["saw"])[0])
    assert ids == minilm_tokenizer(prompt_text([], "saw"))["input_ids"]


def test_collate_pads_to_longest_in_batch(minilm_tokenizer):
    builder = PromptBuilder(minilm_tokenizer)
    prompts = builder.build_many(
        encode_pieces(minilm_tokenizer, ["a b c"]), encode_pieces(minilm_tokenizer, ["x", "y z w v"])
    )
    ids, mask = builder.collate(prompts)
    assert ids.shape == (2, max(map(len, prompts))) and mask.sum().item() == sum(map(len, prompts))
    assert ids[0, len(prompts[0]) :].eq(builder.pad_id).all()


def test_max_len_too_small_is_a_clear_error(minilm_tokenizer):
    with pytest.raises(ValueError, match="max_len"):
        PromptBuilder(minilm_tokenizer, max_len=4)
