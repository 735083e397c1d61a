"""The fast training form of a source LoRA model (issue 15): the same scores as peft's LoRA in eval mode, with
less work per step.

What it does differently from `SourceLoraModel` (peft), and why:
  * no dropout: the frozen base runs in eval mode (BERT's hidden and attention dropout drew 38% of a CPU step in
    `bernoulli_`), and the LoRA branch has no input dropout (a deviation from peft's default 0.1, measured on
    validation users in docs/training.md);
  * LoRA on the top `top_k` layers only, as the paper does ("we only modify the top-9 layers" of DeBERTa's 12):
    the layers below run once without autograd, and the trained adapter serves with X-Cross's shared lower layers;
  * BERT family: every layer on the real tokens only (`model.inference.PackedBertLayer`: no linear work on the
    padding, Q/K/V in one GEMM); the LoRA deltas of Q/K/V come from one GEMM to the 3r ranks, then one per module;
  * a whole optimizer step's prompts in one forward (`step_batched`): packing makes the padding of a mixed-length
    batch free outside attention.
The math of a LoRA linear is peft's: y = x W^T + b + (alpha/r) (x A^T) B^T, A (r, in) Kaiming-uniform, B (out, r)
zeros. Trained weights come out as `LoraWeights` (the module paths peft would give), served by `XCross` as before.
DeBERTa-v2 backbones run the padded layers (LayerRunner) with the same LoRA linears injected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone, LayerRunner
from model.inference import PackedBertLayer, Packing, _plain_bert, pool_packed
from model.lora import LoraConfig, LoraWeights, shared_copy
from model.xcross import POOLING, Head, pool_tokens


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T with trainable A (r, in), B (out, r) and the frozen `base` shared."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init of lora_A

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)


class PackedLoraBertLayer(PackedBertLayer):
    """`PackedBertLayer` with trainable LoRA on query/key/value (and the attention output where adapted)."""

    def __init__(self, layer: nn.Module, loras: dict[str, LoRALinear]):
        plain = shared_copy(layer)
        att = plain.attention.self
        for leaf in ("query", "key", "value"):  # the packed layer fuses the frozen bases
            if leaf in loras:
                setattr(att, leaf, loras[leaf].base)
        if "output" in loras:
            plain.attention.output.dense = loras["output"].base
        super().__init__(plain)
        self.qkv_loras = nn.ModuleList([loras[k] for k in ("query", "key", "value") if k in loras])
        self.qkv_slots = [i for i, k in enumerate(("query", "key", "value")) if k in loras]
        if "output" in loras:
            self.o = loras["output"]  # LoRALinear over the same frozen dense

    def project(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (N, 3*H*dh), frozen
        if not len(self.qkv_loras):
            return qkv
        A = torch.cat([m.lora_A for m in self.qkv_loras]).to(x.dtype)  # (k*r, in): one GEMM to the ranks
        xa = F.linear(x, A).split(self.qkv_loras[0].lora_A.shape[0], dim=-1)
        parts = list(qkv.split(qkv.shape[-1] // 3, dim=-1))
        for slot, a, m in zip(self.qkv_slots, xa, self.qkv_loras, strict=True):
            parts[slot] = parts[slot] + F.linear(a, m.lora_B.to(x.dtype)) * m.scale
        return torch.cat(parts, -1)


class FastLoraModel(nn.Module):
    """Backbone + LoRA on the top `top_k` layers (0 = all) + head, built for training speed (module docstring).

    `pooling`: "cls" (the paper's pooler input, eq. 7) or "mean" (the masked mean of the last layer's tokens,
    how all-MiniLM-L6-v2 was trained; a backbone-specific option recorded in the checkpoint).
    """

    step_batched = True  # the training loop runs a whole step's prompts in one forward

    def __init__(self, backbone: Backbone, cfg: LoraConfig | None = None, top_k: int = 0, head: Head | None = None,
                 pooling: str = "cls", packed: bool = True, bucket: int = 32):
        super().__init__()
        import re

        cfg = cfg or LoraConfig()
        if pooling not in POOLING:
            raise ValueError(f"pooling {pooling!r}: use one of {', '.join(POOLING)}")
        if cfg.dropout:
            raise ValueError("FastLoraModel has no LoRA dropout: use LoraConfig(dropout=0.0) (the peft model keeps it)")
        L = backbone.num_layers
        if not 0 <= top_k <= L:
            raise ValueError(f"top_k={top_k}: the backbone has {L} layers (0 adapts all of them)")
        self.cfg, self.pooling, self.num_layers, self.bucket = cfg, pooling, L, bucket
        self.lowest = L - top_k if top_k else 0
        targets = re.compile(cfg.targets or backbone.lora_targets)
        self.layers = shared_copy(backbone.layers).eval()  # new modules over the frozen tensors; never dropout
        self.paths: list[str] = []
        self.loras = nn.ModuleDict()
        for name, module in list(self.layers.named_modules()):
            path = f"encoder.layer.{name}"
            if isinstance(module, nn.Linear) and targets.fullmatch(path) and int(name.split(".")[0]) >= self.lowest:
                self.loras[_key(path)] = LoRALinear(module, cfg.r, cfg.scale)
                self.paths.append(path)
        if not self.paths:
            raise ValueError(f"no module of the top {top_k or L} layers matches the LoRA targets {targets.pattern!r}")
        self.packed = packed and backbone.family == "bert" and _plain_bert(self.layers[0])
        if self.packed:
            self.blocks = nn.ModuleList([self._packed_block(i) for i in range(L)])
        else:  # padded layers with the LoRA linears injected
            for path in self.paths:
                parent, _, leaf = path.removeprefix("encoder.layer.").rpartition(".")
                setattr(self.layers.get_submodule(parent), leaf, self.loras[_key(path)])
        self.runner = LayerRunner(backbone.model, backbone.family, self.layers)
        self.head = head if head is not None else Head(backbone.hidden_size)

    def _packed_block(self, i: int) -> nn.Module:
        mine = {p.rsplit(".", 2)[-2] if p.endswith("output.dense") else p.rsplit(".", 1)[-1]:
                self.loras[_key(p)] for p in self.paths if p.startswith(f"encoder.layer.{i}.")}
        return PackedLoraBertLayer(self.layers[i], mine) if mine else PackedBertLayer(self.layers[i])

    def train(self, mode: bool = True) -> FastLoraModel:
        """Only the flag: the frozen layers never run dropout (they hold no dropout in the packed form)."""
        self.training = mode
        self.head.train(mode)
        self.layers.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per prompt, (B,), fp32. Batches over `bucket` prompts run as length-sorted chunks (attention,
        the only padded work here, then pads each chunk only to its own longest prompt); scores in input order."""
        return bucketed(lambda i, m: self.head(self.pool(i, m)), input_ids, attention_mask, self.bucket)

    def frozen_bf16_(self) -> FastLoraModel:
        """Store the frozen linear weights in bf16 (for bf16 autocast: no re-cast of every weight at every call).
        They are the backbone's tensors: build the model on a backbone of its own."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad:
                m.to(torch.bfloat16)
        return self

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head's input, (B, d): the last layer at [CLS], or its masked token mean."""
        if self.packed:  # the frozen lower layers under no_grad (`prefix`), then the adapted ones
            return self._pool_from(*self.prefix(input_ids, attention_mask))
        h = self.runner.embed(input_ids, attention_mask)
        ctx, first = self.runner.context(h, attention_mask), h
        for i in range(self.num_layers):
            if i < self.lowest:
                with torch.no_grad():
                    h = self.runner.layer(i, h, ctx, first)
            else:
                h = self.runner.layer(i, h, ctx, first)
        return pool_tokens(h, attention_mask, self.pooling)

    def _pool_from(self, h: torch.Tensor, pk: Packing) -> torch.Tensor:
        """The adapted layers on `prefix()`'s packed activations, then the pooling."""
        for block in self.blocks[self.frozen_prefix():]:
            h = block(h, pk)
        return pool_packed(h, pk, self.pooling)

    def frozen_prefix(self) -> int:
        """How many lowest layers are the plain frozen base (their packed output can be cached: training/prefix.py)."""
        return self.lowest if self.packed else 0

    def prefix_tensors(self) -> list[torch.Tensor]:
        """Every tensor `prefix()` reads: the embeddings and the frozen lower layers (the cache keys on them)."""
        layers = self.layers[: self.frozen_prefix()]
        return [*self.runner.model.embeddings.parameters(), *(p for layer in layers for p in layer.parameters())]

    @torch.no_grad()  # no LoRA below: no autograd either
    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """The packed (N, d) activations after the `frozen_prefix()` base layers, and the packing."""
        pk = Packing.of(attention_mask)
        h = self.runner.embed(input_ids, attention_mask).reshape(pk.B * pk.T, -1).index_select(0, pk.index)
        for block in self.blocks[: self.frozen_prefix()]:
            h = block(h, pk)
        return h, pk

    def score_from_prefix(self, h: torch.Tensor, pk: Packing) -> torch.Tensor:
        """Scores from `prefix()`'s activations: the same as the forward of one batch of at most `bucket` prompts."""
        return self.head(self._pool_from(h, pk))

    def lora_weights(self) -> LoraWeights:
        """The trained adapter, module paths as peft names them (encoder.layer.<i>...)."""
        A = {p: self.loras[_key(p)].lora_A.detach().clone() for p in self.paths}
        B = {p: self.loras[_key(p)].lora_B.detach().clone() for p in self.paths}
        return LoraWeights(A, B, self.cfg.scale)

    def load_lora(self, lora: LoraWeights) -> FastLoraModel:
        """Set the adapter from trained weights (the same modules)."""
        if set(lora.modules) != set(self.paths):
            raise ValueError(f"LoRA modules {lora.modules[:2]}... do not match this model's {self.paths[:2]}...")
        with torch.no_grad():
            for p in self.paths:
                m = self.loras[_key(p)]
                m.lora_A.copy_(lora.A[p])
                m.lora_B.copy_(lora.B[p] * (lora.scale / m.scale))
        return self


class _TrainableStreamwise(nn.Module):
    """X-Cross's packed streamwise form (model/inference.py) as a training module: the integrators, w and the head
    are the built model's own parameters (same names, trained in place), the frozen layers never run dropout."""

    step_batched = True

    def __init__(self, model: nn.Module, bucket: int = 32):
        super().__init__()
        from model.inference import StreamwiseXCross

        form = StreamwiseXCross(model)
        self.integrators, self.w, self.head = form.integrators, form.w, form.head
        self._form = [form]  # not a submodule: its frozen layers stay out of state dicts and optimizers
        self.bucket = bucket

    def frozen_bf16_(self) -> _TrainableStreamwise:
        """Frozen weights in bf16 for bf16 autocast (they include the backbone's own FFN tensors)."""
        from model.inference import cast_frozen_

        cast_frozen_(self._form[0], torch.bfloat16)
        return self

    def train(self, mode: bool = True) -> _TrainableStreamwise:
        self.training = mode
        self.head.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return bucketed(self._form[0], input_ids, attention_mask, self.bucket)

    def frozen_prefix(self) -> int:
        return self._form[0].frozen_prefix()

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self._form[0].prefix(input_ids, attention_mask)

    def score_from_prefix(self, h: torch.Tensor, pk) -> torch.Tensor:
        return self._form[0].score_from_prefix(h, pk)


def xcross_training_form(model: nn.Module, bf16: bool = False) -> nn.Module:
    """The fast training form of a built `XCross` (eq. 5 integrator, BERT family): the packed streamwise forward with
    the same trainable parameters, by name and by tensor (tested equal to the model as built). Other models (GCA, a
    DeBERTa backbone) are returned as built; train them with `frozen_eval_` after every `.train()` (no dropout).
    `bf16`: frozen weights stored in bf16, for bf16 autocast (the backbone's FFN tensors included)."""
    if model.config.integrator == "xcross" and model.encoder.family == "bert":
        form = _TrainableStreamwise(model)
        if len(form._form[0].packed):
            return form.frozen_bf16_() if bf16 else form
    return model


def frozen_eval_(model: nn.Module) -> nn.Module:
    """Put every submodule that holds nothing trainable (frozen layers, dropout) in eval mode: no dropout on the
    frozen base, whatever the model."""
    for m in model.modules():
        if not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return model


def _key(path: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return path.replace(".", "__")


def bucketed(score, input_ids: torch.Tensor, attention_mask: torch.Tensor, bucket: int) -> torch.Tensor:
    """`score(ids, mask)` over length-sorted chunks of at most `bucket` prompts, scores back in input order (the
    same scores: each prompt is scored on its own; only the padding each chunk carries changes)."""
    B = input_ids.shape[0]
    if not bucket or B <= bucket or input_ids.is_cuda:  # a GPU prefers one launch over the whole batch
        return score(input_ids, attention_mask)
    order = attention_mask.sum(1).argsort(stable=True)
    out = [score(*_trim(input_ids[ix], attention_mask[ix])) for ix in order.tensor_split(math.ceil(B / bucket))]
    return torch.cat(out).index_select(0, order.argsort())


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row (right-padded batches)."""
    T = int(mask.sum(1).max())
    return ids[:, :T], mask[:, :T]
