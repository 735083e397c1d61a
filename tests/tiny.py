"""Tiny random BERT and DeBERTa-v2 backbones that build in milliseconds (no weights downloaded)."""

from __future__ import annotations

from functools import lru_cache

from model.backbone import Backbone, backbone_from_config, minilm_tokenizer, tiny_config


@lru_cache(maxsize=1)
def _tokenizer():
    return minilm_tokenizer()


def bert_config(layers: int = 2, hidden: int = 32):
    return tiny_config("bert", layers, hidden)


def deberta_config(layers: int = 2, hidden: int = 32, conv: int = 0):
    config = tiny_config("deberta-v2", layers, hidden)
    config.conv_kernel_size = conv
    return config


def tiny_backbone(family: str = "bert", layers: int = 2, seed: int = 0) -> Backbone:
    """A random 2-layer encoder of the given family with the MiniLM tokenizer (ids are just ids here)."""
    config = bert_config(layers) if family == "bert" else deberta_config(layers)
    return backbone_from_config(config, _tokenizer(), seed=seed)
