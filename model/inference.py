"""Inference-only forms of a built `XCross`: the same scores (tested within 1e-5) with less work.

    optimize_for_inference(model)                   grouped form (GPU, ONNX export): streams folded in the batch
    optimize_for_inference(model, streamwise=True)  CPU form: StreamwiseXCross (X-Cross's eq. 5 only: a GCA
                                                    model gets the grouped form instead)
    cast_frozen_(model, torch.bfloat16)             frozen weights stored in bf16, for bf16 autocast

Grouped form, modules swapped in place (frozen tensors stay shared):
  Integrator          -> FastIntegrator: eqs. 4-5 regrouped per stream as h~_m = sum_k C[m, k] h_k, with
                         C[m, m] = 1 + gamma sum_m' z'[m, m'] and C[m, k] = beta z[m, k] - gamma z'[m, k];
                         z = sum_m h_m W_m^T as one batched matmul over the stream-major activations (no concat copy)
  GroupedLoRALinear   -> n = 1: one nn.Linear with delta_W merged into W (a source LoRA costs what the base does)
                         n > 1: FusedLoRALinear, the low-rank delta added by the second GEMM (baddbmm), not a pass
CPU form (`StreamwiseXCross`): the streams one after the other, each through layers with its own LoRA merged into
W (on a CPU a batch of n*B rows costs more than n batches of B), and for BERT-family backbones every layer on the
real tokens only (`PackedBertLayer`: no linear work on padding, Q/K/V in one GEMM).
`cast_frozen_` saves bf16 autocast from re-casting every weight on every forward (the head stays fp32, DESIGN 6).

Measured on MiniLM, 30 real prompts x ~100 tokens, one thread: the integrator 15.4 -> 2.9 ms per layer (fp32);
packing ~1.15x fp32 at ~11% padding; docs/performance.md has the rest. These forms could move into
model/xcross.py and model/lora.py; they live here so that training keeps the modules it trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import LayerRunner
from model.lora import GroupedLoRALinear, shared_copy
from model.xcross import Integrator, XCross, pool_tokens


class FastIntegrator(nn.Module):
    """Eqs. 4-5 with the same W_concat, as a per-token n x n mix of the streams (equal to `Integrator`)."""

    def __init__(self, integ: Integrator):
        super().__init__()
        self.n, self.beta, self.gamma = integ.n, integ.beta, integ.gamma
        self.W_concat = integ.W_concat  # shared: (2n(n-1), n*d)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, B, T, d = h.shape  # (n, B, T, d); eq. 5 is per token: the mask is not needed
        hs = h.reshape(n, -1, d)  # (n, B*T, d)
        W = self.W_concat.weight.view(-1, n, d).permute(1, 2, 0)  # (n, d, 2n(n-1))   W_m^T
        z = torch.bmm(hs, W.to(hs.dtype)).sum(0)  # (B*T, 2n(n-1))   (eq. 4) z = sum_m W_m h_m
        k = n * (n - 1)
        z_direct, z_inter = z[:, :k].view(-1, n, n - 1), z[:, k:].view(-1, n, n - 1)  # (B*T, n, n-1) each
        coef = [[None] * n for _ in range(n)]  # coef[m][j]: weight of h_j in h~_m, (B*T,)
        for m in range(n):
            coef[m][m] = 1 + self.gamma * z_inter[:, m].sum(-1)
            others = [j for j in range(n) if j != m]
            for jj, j in enumerate(others):
                coef[m][j] = self.beta * z_direct[:, m, jj] - self.gamma * z_inter[:, m, jj]
        out = torch.stack([coef[m][0] for m in range(n)]).unsqueeze(-1) * hs[0]  # (n, B*T, d)
        for j in range(1, n):
            out = torch.addcmul(out, torch.stack([coef[m][j] for m in range(n)]).unsqueeze(-1), hs[j])
        return out.view(n, B, T, d).to(h.dtype)  # (eq. 5)


class FusedLoRALinear(nn.Module):
    """`GroupedLoRALinear` with the delta accumulated by baddbmm into the base output (one pass fewer)."""

    def __init__(self, grouped: GroupedLoRALinear):
        super().__init__()
        self.base = grouped.base
        self.register_buffer("A", grouped.A, persistent=False)  # (n, in, r)
        self.register_buffer("B", grouped.B, persistent=False)  # (n, r, out), scale folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.A.shape[0]
        y = self.base(x)  # one GEMM over all n*B rows
        xa = torch.bmm(x.reshape(n, -1, x.shape[-1]), self.A.to(x.dtype))  # (n, B*T, r)
        y3 = y.reshape(n, -1, y.shape[-1])  # (n, B*T, out)
        return torch.baddbmm(y3, xa.to(y.dtype), self.B.to(y.dtype)).view(y.shape)


def merged_linear(grouped: GroupedLoRALinear, stream: int = 0) -> nn.Linear:
    """One stream's LoRA folded into its base: W' = W + (A_s B_s)^T (the base stays untouched, shared by others)."""
    if not 0 <= stream < grouped.A.shape[0]:
        raise ValueError(f"stream {stream} of a module with {grouped.A.shape[0]} streams")
    base = grouped.base
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        delta = (grouped.A[stream].double() @ grouped.B[stream].double()).t()  # (out, in)
        merged.weight.copy_((base.weight.double() + delta).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged


def _replace_lora(layers: nn.Module, make) -> None:
    for name, module in list(layers.named_modules()):
        if isinstance(module, GroupedLoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(layers.get_submodule(parent_name) if parent_name else layers, leaf, make(module))


@dataclass
class Packing:
    """Where the real tokens of a right- or left-padded (B, T) batch are, to run them without the padding."""

    index: torch.Tensor  # (N,) flat positions b*T + t of the real tokens, row-major
    pad: torch.Tensor  # (B*T - N,) flat positions of the padding
    rows: torch.Tensor  # (N,) b of each real token
    cols: torch.Tensor  # (N,) t of each real token
    cls: torch.Tensor  # (B,) each row's first real token in the packed order
    attn_mask: torch.Tensor  # (B, 1, 1, T) bool, True = attend
    B: int
    T: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        B, T = attention_mask.shape
        keep = attention_mask.bool()
        lengths = keep.sum(1)
        index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(index, (~keep).reshape(-1).nonzero().squeeze(1), index // T, index % T,
                   torch.cumsum(lengths, 0) - lengths, keep[:, None, None, :], B, T)


def pool_packed(h: torch.Tensor, pk: Packing, pooling: str = "cls") -> torch.Tensor:
    """Packed (N, d) -> (B, d): each row's [CLS] token, or the mean of its real tokens in fp32."""
    if pooling == "cls":
        return h.index_select(0, pk.cls)
    total = h.new_zeros(pk.B, h.shape[-1], dtype=torch.float32).index_add(0, pk.rows, h.float())
    return total / torch.bincount(pk.rows, minlength=pk.B).clamp_min(1).unsqueeze(1).float()


TRAIN_ATTENTION = {"kernel": "math"}  # attention where gradients flow: "math" (default) or "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v on (B, H, T, dh). On a GPU and without gradients (evaluation, serving,
    frozen layers): `scaled_dot_product_attention`. Where gradients flow on the CPU (training), by default the same
    math as plain matmuls with the softmax in fp32: on these CPUs the fused kernel's backward cost several times
    the matmul form's for MiniLM's short prompts (docs/performance.md, "Training"); under bf16 autocast the
    forward then differs from the fused kernel's by bf16 rounding of the logits (tested close)."""
    if TRAIN_ATTENTION["kernel"] == "math" and q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        logits = torch.matmul(q, k.transpose(-1, -2)).float().mul(scale).masked_fill(~mask, float("-inf"))
        return torch.matmul(logits.softmax(-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class PackedBertLayer(nn.Module):
    """A BERT layer on packed tokens (N, d), N = real tokens of the batch: the linear layers skip the padding,
    Q, K and V are one GEMM; only attention sees the padded (B, H, T, dh) layout. Same math as `BertLayer`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        att = layer.attention.self
        if not all(isinstance(m, nn.Linear) for m in (att.query, att.key, att.value)):
            raise ValueError("PackedBertLayer needs plain nn.Linear projections (merge the LoRA first)")
        self.heads, self.head_dim, self.scale = att.num_attention_heads, att.attention_head_size, att.scaling
        d_in = att.query.in_features
        self.qkv = nn.Linear(d_in, 3 * att.all_head_size, device=att.query.weight.device,
                             dtype=att.query.weight.dtype).requires_grad_(False)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
            self.qkv.bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
        out = layer.attention.output
        self.o, self.ln1 = out.dense, out.LayerNorm  # shared with the layer
        self.ffn_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.ffn_out, self.ln2 = layer.output.dense, layer.output.LayerNorm

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Q, K and V of the packed tokens, (N, 3*H*dh) (a trainable form adds its LoRA deltas here)."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, pk: Packing) -> torch.Tensor:
        N, d = x.shape  # (N, d)
        qkv = self.project(x)  # (N, 3*H*dh)
        padded = qkv.new_empty(pk.B * pk.T, qkv.shape[-1])  # (B*T, 3*H*dh); padding rows zeroed (finite keys)
        padded.index_fill_(0, pk.pad, 0.0).index_copy_(0, pk.index, qkv)
        q, k, v = padded.view(pk.B, pk.T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = attention(q, k, v, pk.attn_mask, self.scale)  # (B, H, T, dh)
        ctx = ctx.transpose(1, 2)[pk.rows, pk.cols].reshape(N, -1)  # (N, H*dh): real tokens only
        h = self.ln1(self.o(ctx) + x)
        return self.ln2(self.ffn_out(self.act(self.ffn_in(h))) + h)


class StreamwiseXCross(nn.Module):
    """X-Cross for the CPU: each stream runs its B rows through its own layers, its LoRA merged into W.

    Same scores as the folded forward (tested). On a CPU a batch of n*B rows costs more than n batches of B
    (the activations outgrow the caches: 60 prompts cost 2.2-2.3x of 30 here), and merged weights make a stream
    cost exactly one plain forward, so X-Cross costs n plain forwards + the integrators. Layers below `fold_at`
    (no LoRA, no integrator) run once for all streams. BERT family: packed (`PackedBertLayer`), unless
    `packed=False`. Memory: the adapted matrices once per stream (and Q/K/V once more, concatenated, when packed).
    """

    def __init__(self, model: XCross, packed: bool = True):
        super().__init__()
        if model.config.integrator != "xcross":
            raise ValueError(f"StreamwiseXCross runs eq. 5 only, not the {model.config.integrator!r} integrator")
        if not any(isinstance(m, GroupedLoRALinear) for m in model.encoder.layers.modules()):
            raise ValueError("StreamwiseXCross needs the model as built (GroupedLoRALinear modules), not optimized")
        self.config, self.num_layers, self.fold_at = model.config, model.num_layers, model.encoder.fold_at
        enc, n = model.encoder, model.config.n_streams
        self.streams = nn.ModuleList()
        for s in range(n):
            layers = shared_copy(enc.layers)  # new modules, same frozen tensors
            _replace_lora(layers, lambda g, s=s: merged_linear(g, s))
            self.streams.append(layers)
        self.runners = [LayerRunner(enc.runner.model, enc.family, layers) for layers in self.streams]
        self.packed = nn.ModuleList()  # BERT family: packed[m][l] (stream 0 for the shared lower layers)
        if packed and enc.family == "bert" and _plain_bert(self.streams[0][0]):
            for m, layers in enumerate(self.streams):
                self.packed.append(nn.ModuleList([PackedBertLayer(layer) if m == 0 or l >= self.fold_at
                                                  else nn.Identity() for l, layer in enumerate(layers)]))
        self.integrators = nn.ModuleDict({k: FastIntegrator(v) if isinstance(v, Integrator) else v
                                          for k, v in model.integrators.items()})
        self.w, self.head = model.w, model.head
        self.dtype: torch.dtype | None = None  # activations' dtype in the packed layers (None: the embeddings')

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if len(self.packed):
            return self._forward_packed(input_ids, attention_mask)
        n, runners = self.config.n_streams, self.runners
        h = runners[0].embed(input_ids, attention_mask)  # (B, T, d)
        first, ctx = h, runners[0].context(h, attention_mask)
        hs: list[torch.Tensor] = []
        for l in range(self.num_layers):
            if l < self.fold_at:  # identical for every stream: once
                h = runners[0].layer(l, h, ctx, first)
                continue
            hs = [runners[m].layer(l, hs[m] if hs else h, ctx, first) for m in range(n)]  # (eq. 3), (B, T, d) each
            if str(l) in self.integrators:
                hs = list(self.integrators[str(l)](torch.stack(hs)).unbind(0))  # (eqs. 4-5) on (n, B, T, d)
        p = self.config.pooling
        h_cls = torch.stack([pool_tokens(x, attention_mask, p) for x in hs]) if hs else \
            pool_tokens(h, attention_mask, p).expand(n, h.shape[0], -1)  # (n, B, d)
        return self.head(torch.einsum("n,nbd->bd", self.w.to(h_cls.dtype), h_cls))  # (eqs. 6-8)

    def _forward_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The same on the real tokens only (BERT family): (N, d) activations, N = tokens without padding."""
        return self.score_from_prefix(*self.prefix(input_ids, attention_mask))

    def frozen_prefix(self) -> int:
        """How many lowest layers are the plain frozen base, run once for all streams (training/prefix.py caches
        their packed output); 0 when not packed."""
        return self.fold_at if len(self.packed) else 0

    def prefix_tensors(self) -> list[torch.Tensor]:
        """Every tensor `prefix()` reads: the embeddings and the shared lower layers (the cache keys on them)."""
        layers = self.streams[0][: self.frozen_prefix()]
        return [*self.runners[0].model.embeddings.parameters(), *(p for layer in layers for p in layer.parameters())]

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """The packed (N, d) activations after the `frozen_prefix()` shared base layers, and the packing."""
        pk = Packing.of(attention_mask)
        h = self.runners[0].embed(input_ids, attention_mask).reshape(pk.B * pk.T, -1).index_select(0, pk.index)
        h = h.to(self.dtype or h.dtype)
        for l in range(self.frozen_prefix()):
            h = self.packed[0][l](h, pk)
        return h, pk

    def score_from_prefix(self, h: torch.Tensor, pk: Packing) -> torch.Tensor:
        """Scores from `prefix()`'s activations (the same as `forward` on that batch): the streams from `fold_at`."""
        n = self.config.n_streams
        h = h.to(self.dtype or h.dtype)
        hs: list[torch.Tensor] = []
        for l in range(self.fold_at, self.num_layers):
            hs = [self.packed[m][l](hs[m] if hs else h, pk) for m in range(n)]  # (eq. 3), (N, d) each
            if str(l) in self.integrators:
                hs = list(self.integrators[str(l)](torch.stack(hs).unsqueeze(1)).squeeze(1).unbind(0))  # (eqs. 4-5)
        p = self.config.pooling
        h_cls = torch.stack([pool_packed(x, pk, p) for x in hs]) if hs else pool_packed(h, pk, p).expand(
            n, pk.B, -1)  # (n, B, d)
        return self.head(torch.einsum("n,nbd->bd", self.w.to(h_cls.dtype), h_cls))  # (eqs. 6-8)


def _plain_bert(layer: nn.Module) -> bool:
    """A BERT encoder layer with absolute positions and no cross-attention (what PackedBertLayer reproduces)."""
    cfg = getattr(layer.attention.self, "config", None)
    return (cfg is not None and not getattr(cfg, "is_decoder", False)
            and not getattr(layer, "add_cross_attention", False)
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute")


def optimize_for_inference(model: XCross, streamwise: bool = False, packed: bool = True) -> nn.Module:
    """The inference form of a built model: with `streamwise` (for CPUs) a `StreamwiseXCross` (BERT family:
    `packed`, no work on padding); otherwise the same model with its integrators and LoRA linears swapped in
    place. Returns it in eval mode."""
    if streamwise and model.config.integrator == "xcross":
        return StreamwiseXCross(model, packed=packed).eval()
    # GCA models (model/gca.py) stay in the grouped form: the streamwise form implements eq. 5 only
    _replace_lora(model.encoder.layers, lambda g: merged_linear(g) if g.n_streams == 1 else FusedLoRALinear(g))
    for key, integ in list(model.integrators.items()):
        if isinstance(integ, Integrator):
            model.integrators[key] = FastIntegrator(integ)
    return model.eval()


def serve_bf16_(model: nn.Module) -> nn.Module:
    """The bf16 form served on CPUs with bf16 matmuls (and on CUDA): frozen weights stored in bf16 and, in the
    packed streamwise form, activations kept in bf16 from the embeddings to the head (`runs_pure_bf16`: call it
    without autocast; autocast's casts around every layer norm and GELU cost ~10% on AMX). The integrators run on
    bf16 activations, the head and the scores stay fp32. Other forms (grouped, GCA) run under bf16 autocast."""
    cast_frozen_(model, torch.bfloat16)
    if isinstance(model, StreamwiseXCross) and len(model.packed):
        model.dtype = torch.bfloat16
    return model


def runs_pure_bf16(model: object) -> bool:
    """True for a model `serve_bf16_` set to bf16 activations: run it without autocast."""
    return isinstance(model, StreamwiseXCross) and model.dtype == torch.bfloat16


def serving_autocast(model: object, device_type: str, bf16: bool):
    """The context to call a served model in: bf16 autocast when `bf16`, except for a model that already runs bf16
    end to end (`serve_bf16_`), which needs none."""
    return torch.autocast(device_type, torch.bfloat16, enabled=bf16 and not runs_pure_bf16(model))


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the frozen linear weights of the encoder layers (and LoRA buffers) in `dtype`, in place, for autocast
    in that dtype; layer norms keep fp32 parameters (autocast runs them in fp32).

    The layers' parameters are the backbone's tensors (shared by every model built on it): this casts them for
    all of them. Build a separate backbone for models that must stay in fp32.
    """
    layers = [model.streams, model.packed] if isinstance(model, StreamwiseXCross) else [model.encoder.layers]
    for module in (m for part in layers for m in part.modules()):
        if isinstance(module, (nn.Linear, FusedLoRALinear, GroupedLoRALinear)):
            module.to(dtype)
    return model
