"""Engine: preprocess (catalog, cached tokenization, prompts), forward batching and padding, postprocess ranking."""

from __future__ import annotations

import pytest
import torch

from model.prompts import prompt_text
from service.catalog import prompt_title
from service.engine import Engine, Prepared, TorchRuntime
from service.loading import find_checkpoints, resolve_precision
from service.schemas import InputError, Item, RecommendRequest

from .conftest import make_engine


def req(**kw) -> RecommendRequest:
    return RecommendRequest.model_validate({"domain": "Tools", **kw})


class RecordingRuntime:
    """Wraps a runtime and records the (B, T) shape and mask of every forward."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, domain, input_ids, attention_mask):
        self.calls.append((domain, tuple(input_ids.shape), attention_mask.sum(1).tolist()))
        return self.inner(domain, input_ids, attention_mask)

    def describe(self):
        return self.inner.describe()


def test_prompts_equal_tokenizing_the_whole_prompt_string(engine: Engine):
    tok = engine.backbone.tokenizer
    cat = engine.catalogs["Tools"]
    raw = "DEWALT  20V MAX Cordless Drill &amp; Driver Kit with two batteries and a bag"
    prepared = engine.preprocess(req(history=[{"id": 17}, {"asin": cat.asins[5]}], candidates=[{"title": raw},
                                                                                              {"id": 3}]))
    titles = [cat.titles[17], cat.titles[5]]
    assert prepared.candidates[0].title == "DEWALT 20V MAX Cordless Drill & Driver Kit"  # unescaped, 8 words
    for prompt, cand in zip(prepared.prompts, [prepared.candidates[0].title, cat.titles[3]], strict=True):
        assert prompt == tok(prompt_text(titles, cand))["input_ids"]


def test_prompt_title_normalises_like_the_catalog():
    assert prompt_title("  a&amp;b \n c  ") == "a&b c"
    assert prompt_title(" ".join(f"w{i}" for i in range(20))) == " ".join(f"w{i}" for i in range(8))


def test_hundred_candidates_are_four_forwards_padded_to_each_batch_longest(engine: Engine, tiny_bb, tiny_artifacts,
                                                                           catalogs):
    rec = RecordingRuntime(engine.runtime)
    e = Engine(tiny_bb, engine.models, catalogs, engine.cache, runtime=rec, batch_prompts=30)
    # short and long titles, so that each batch has its own longest prompt
    cands = [{"id": i} if i % 7 else {"title": "word " * (1 + i % 5) + str(i)} for i in range(100)]
    prepared = e.preprocess(req(history=[{"id": 1}], candidates=cands))
    scores = e.score("Tools", prepared.prompts)
    assert [c[1][0] for c in rec.calls] == [30, 30, 30, 10]
    for k, (_, (b, t), lengths) in enumerate(rec.calls):
        chunk = prepared.prompts[30 * k : 30 * k + b]
        assert t == max(map(len, chunk)) and lengths == [len(p) for p in chunk]  # padded to the batch's longest
    assert t < e.builder.max_len
    # padding does not change a prompt's score: each prompt alone gives the same score
    for i in (0, 29, 45, 99):
        assert abs(e.forward("Tools", [prepared.prompts[i]])[0] - scores[i]) < 1e-5


def test_rank_by_score_then_input_position_and_top_k(engine: Engine):
    prepared = engine.preprocess(req(candidates=[{"id": i} for i in range(5)], top_k=4))
    out = engine.postprocess(prepared, [1.0, 3.0, 3.0, 2.0, 3.0])
    assert [it.position for it in out.items] == [1, 2, 4, 3]
    assert [it.rank for it in out.items] == [1, 2, 3, 4]
    assert out.items[0].id == 1 and out.items[0].title == engine.catalogs["Tools"].titles[1]
    assert out.model.startswith("xcross:Tools@") and len(out.model) == len("xcross:Tools@") + 12


def test_top_k_larger_than_candidates_returns_all(engine: Engine):
    out = engine.recommend(req(candidates=[{"id": 1}, {"id": 2}], top_k=10))
    assert sorted(it.position for it in out.items) == [0, 1]


def test_recommend_ranks_by_the_models_scores(engine: Engine):
    r = req(history=[{"id": 10}, {"id": 11}], candidates=[{"id": i} for i in range(40, 52)], top_k=12)
    prepared = engine.preprocess(r)
    ids, mask = engine.builder.collate(prepared.prompts)
    with torch.no_grad():
        scores = engine.models["Tools"].model(ids, mask).tolist()
    ranked = engine.recommend(r).items
    assert [it.position for it in ranked] == sorted(range(12), key=lambda i: -scores[i])
    assert len({round(s, 4) for s in scores}) > 6  # the random model does discriminate


def test_unknown_items_name_the_field_and_the_valid_range(engine: Engine):
    n = len(engine.catalogs["Tools"])
    with pytest.raises(InputError) as info:
        engine.preprocess(req(history=[{"asin": "NOPE"}], candidates=[{"id": 1}, {"id": 2}, {"id": 3}, {"id": n}]))
    errors = {tuple(e["loc"]): e["msg"] for e in info.value.errors}
    assert errors[("body", "candidates", 3, "id")] == f"unknown item id {n} in Tools; valid ids are 0..{n - 1}"
    assert "unknown asin 'NOPE' in Tools" in errors[("body", "history", 0, "asin")]
    assert "candidates[3].id" in str(info.value) and "history[0].asin" in str(info.value)


def test_unknown_domain_lists_the_served_ones(engine: Engine):
    with pytest.raises(InputError, match=r"domain 'Toys' is not served; served domains: Electronics, Sports, Tools"):
        engine.preprocess(RecommendRequest(domain="Toys", candidates=[Item(id=1)]))


def test_titles_are_tokenized_once_through_the_cache(engine: Engine):
    before = engine.cache.stats()[("tokenizer", "call")]
    title = "A completely new title for the cache test"
    engine.preprocess(req(history=[{"title": title}], candidates=[{"title": title}, {"title": title}]))
    engine.preprocess(req(candidates=[{"title": title}]))
    assert engine.cache.stats()[("tokenizer", "call")] == before + 1


def test_only_the_most_recent_history_is_kept(engine: Engine):
    hist = [{"id": i} for i in range(60)]
    e = Engine(engine.backbone, engine.models, engine.catalogs, engine.cache, max_history=3)
    a = e.preprocess(req(history=hist, candidates=[{"id": 1}]))
    b = e.preprocess(req(history=hist[-3:], candidates=[{"id": 1}]))
    assert a.prompts == b.prompts


def test_bf16_runtime_agrees_with_fp32(engine: Engine):
    prepared = engine.preprocess(req(history=[{"id": 3}], candidates=[{"id": i} for i in range(30)]))
    ids, mask = engine.builder.collate(prepared.prompts)
    models = {d: m.model for d, m in engine.models.items()}
    fp32 = TorchRuntime(models, "cpu", "fp32")("Tools", ids, mask)
    bf16 = TorchRuntime(models, "cpu", "bf16")("Tools", ids, mask)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # autocast did run in bf16
    # close (the tiny random model's candidates differ by less than bf16 resolves, so no ranking check here)
    assert (bf16 - fp32).abs().max() < 0.02 * fp32.abs().max() + 1e-3


@pytest.mark.parametrize(("setting", "device", "flags", "expected"), [
    ("auto", "cpu", "fpu sse avx512f avx512_bf16", "bf16"),
    ("auto", "cpu", "fpu sse amx_bf16 amx_tile", "bf16"),
    ("auto", "cpu", "fpu sse avx2 avx512f", "fp32"),
    ("auto", "cuda", "", "bf16"),
    ("fp32", "cuda", "amx_bf16", "fp32"),
    ("bf16", "cpu", "", "bf16"),
])
def test_precision_resolution(tmp_path, setting, device, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    precision, why = resolve_precision(setting, device, cpuinfo)
    assert precision == expected and why


def test_xcross_directory_wins_over_lora_for_a_domain(tiny_artifacts):
    found = find_checkpoints(tiny_artifacts)
    assert found == {"Tools": tiny_artifacts / "xcross" / "Tools", "Sports": tiny_artifacts / "lora" / "Sports",
                     "Electronics": tiny_artifacts / "lora" / "Electronics"}


def test_each_source_lora_is_read_once(tiny_bb, tiny_artifacts, catalogs, monkeypatch):
    import model.checkpoint as ckpt
    import service.loading as loading

    reads = []
    real = ckpt.load_lora

    def counting(d, bb):
        reads.append(d.name)
        return real(d, bb)

    monkeypatch.setattr(ckpt, "load_lora", counting)  # used by load_xcross for sources
    monkeypatch.setattr(loading, "load_lora", counting)  # used for served LoRA domains
    e = make_engine(tiny_bb, tiny_artifacts, catalogs)
    assert e.domains == ["Electronics", "Sports", "Tools"]
    assert sorted(reads) == ["Electronics", "Sports"]  # served as LoRA and used as X-Cross sources: read once
    assert isinstance(e.preprocess(req(candidates=[{"id": 1}])), Prepared)
