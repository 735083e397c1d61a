"""X-Cross (paper section 3.2): n frozen source-domain LoRA streams integrated layer by layer, then pooled and scored.

Read top-down against the paper:
  XCrossConfig                         n streams, top-K integrated layers, beta, gamma
  MultiLoraEncoder                     eq. 3: each stream runs layer l with its own frozen LoRA (folded in the batch)
  Integrator                           eqs. 4-5: z = W_concat [h_1; ...; h_n], then the refined h~_m
                                       (or, with `integrator="gca"`, gated cross-attention: model/gca.py)
  Head                                 eqs. 7-8: pooled = GELU(W_p h[CLS] + b_p), score = V_c . pooled + b_c
  XCross                               the loop over layers, eq. 6 (h_final = sum_m w_m h~_m), the head
  listwise_loss                        eq. 1: softmax NLL of the positive among its group of candidates
A single stream (n=1, no integrated layer, w=1) is exactly a source-domain LoRA model: the same class serves both.
Shapes: n streams, B prompts, T tokens, d hidden. Folded activations are (n*B, T, d), stream-major.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone, LayerRunner
from model.lora import LoraWeights, inject_grouped, shared_copy

POOLING = ("cls", "mean")


def pool_tokens(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """(B, T, d) -> (B, d): the [CLS] token, or the masked token mean in fp32 (sentence-transformers' pooling)."""
    if pooling == "cls":
        return h[:, 0]
    m = attention_mask.unsqueeze(-1).float()
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1)


@dataclass(frozen=True)
class XCrossConfig:
    n_streams: int = 2
    top_k: int = 6  # integrate at the top-K layers (paper: 9 of 12 for DeBERTa; MiniLM has 6)
    beta: float = 0.5  # direct-influence strength (eq. 5)
    gamma: float = 0.4  # interaction strength (eq. 5); 0 = the -Interactions ablation
    init_std: float = 1e-3  # W_concat starts near 0, so training starts from the source models
    integrator: str = "xcross"  # "xcross" (eqs. 4-5) or "gca" (gated cross-attention, model/gca.py; reconstructed)
    layers: tuple[int, ...] = ()  # integrated layers by index (-1 = top) instead of the top-K; empty = top_k
    gca_act: str = "sigmoid"  # GCA gate activation: sigmoid | tanh
    gca_layer_norm: bool = True  # GCA: LayerNorm on the queries
    lora_top: int = 0  # keep the source LoRAs on the top N layers only (0 = all): the lower layers run once for
    #                    all streams (the shared-lower-layers option; LoRAs trained on all layers, truncated)
    pooling: str = "cls"  # the head's input: h_final at [CLS] (eq. 7, the paper's) or its masked token mean
    #                       ("mean", how all-MiniLM-L6-v2 was trained: a backbone-specific option; the sources')

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))  # JSON manifests give lists
        if self.n_streams < 1:
            raise ValueError(f"XCrossConfig.n_streams must be >= 1 (got {self.n_streams})")
        if self.top_k < 0:
            raise ValueError(f"XCrossConfig.top_k must be >= 0 (got {self.top_k})")
        if self.n_streams == 1 and (self.top_k or self.layers):
            raise ValueError("XCrossConfig: a single stream has nothing to integrate; set top_k=0")
        if self.integrator not in ("xcross", "gca"):
            raise ValueError(f"XCrossConfig.integrator {self.integrator!r}: use xcross or gca")
        if self.lora_top < 0:
            raise ValueError(f"XCrossConfig.lora_top must be >= 0 (got {self.lora_top}; 0 keeps every LoRA layer)")
        if self.pooling not in POOLING:
            raise ValueError(f"XCrossConfig.pooling {self.pooling!r}: use one of {', '.join(POOLING)}")
        if self.gca_act not in ("sigmoid", "tanh"):
            raise ValueError(f"XCrossConfig.gca_act {self.gca_act!r}: use sigmoid or tanh")

    @property
    def kind(self) -> str:
        """The checkpoint kind of a model with this config."""
        return "gca" if self.integrator == "gca" else "xcross"

    def integrated_layers(self, num_layers: int) -> list[int]:
        if self.layers:
            bad = [x for x in self.layers if not -num_layers <= x < num_layers]
            if bad:
                raise ValueError(f"XCrossConfig.layers {bad} out of range for the backbone's {num_layers} layers")
            return sorted({x % num_layers for x in self.layers})
        if self.top_k > num_layers:
            raise ValueError(f"XCrossConfig.top_k={self.top_k} exceeds the backbone's {num_layers} layers")
        return list(range(num_layers - self.top_k, num_layers))

    def to_dict(self) -> dict:
        return asdict(self)


class MultiLoraEncoder(nn.Module):
    """The frozen encoder with n LoRA streams; layers share the backbone's tensors (eq. 3, DESIGN 5.3).

    Layers below the lowest adapted (or integrated) layer are identical for every stream: they run once on B
    rows, and the batch is folded to n*B rows only from that layer on.
    """

    def __init__(self, backbone: Backbone, loras: list[LoraWeights], fold_at: int | None = None):
        super().__init__()
        self.family, self.n = backbone.family, len(loras)
        self.layers = shared_copy(backbone.layers)  # new modules, same frozen tensors
        inject_grouped(self.layers, loras, prefix="encoder.layer.")
        self.runner = LayerRunner(backbone.model, backbone.family, self.layers)
        lowest = min(x.layer_index(m) for x in loras for m in x.modules)
        self.fold_at = lowest if fold_at is None else min(lowest, fold_at)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.runner.embed(input_ids, attention_mask)  # (B, T, d), frozen, no LoRA

    def layer(self, i: int, h: torch.Tensor, ctx: dict, first: torch.Tensor | None) -> torch.Tensor:
        return self.runner.layer(i, h, ctx, first)


class Integrator(nn.Module):
    """Eqs. 4-5 at one layer, per token: z = W_concat h_concat;
    h~_m = h_m + sum_{m' != m} (beta z[m'] h_m' + gamma z[m, m'] (h_m - h_m'))."""

    def __init__(self, n: int, d: int, beta: float, gamma: float, init_std: float):
        super().__init__()
        self.n, self.beta, self.gamma = n, beta, gamma
        self.W_concat = nn.Linear(n * d, 2 * n * (n - 1), bias=False)  # (eq. 4), no bias, no activation
        nn.init.normal_(self.W_concat.weight, std=init_std)
        # others[m] = the n-1 streams m' != m, ascending; z is laid out as [direct (n, n-1) | interaction (n, n-1)]
        others = torch.tensor([[j for j in range(n) if j != m] for m in range(n)], dtype=torch.long)
        self.register_buffer("others", others.reshape(n, n - 1), persistent=False)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, B, T, d = h.shape  # (n, B, T, d); the mask is for other integrators (GCA): eq. 5 is per token
        h_concat = h.permute(1, 2, 0, 3).reshape(B, T, n * d)  # (B, T, n*d)          [h_1; ...; h_n]
        z = self.W_concat(h_concat).view(B, T, 2, n, n - 1)  # (B, T, 2, n, n-1)   (eq. 4)
        z_direct, z_inter = z[:, :, 0], z[:, :, 1]  # (B, T, n, n-1) each
        h_other = h[self.others]  # (n, n-1, B, T, d)  h_m'
        direct = torch.einsum("btmj,mjbtd->mbtd", z_direct, h_other)  # sum_m' z[m'] h_m'
        inter = torch.einsum("btmj,mjbtd->mbtd", z_inter, h.unsqueeze(1) - h_other)  # sum_m' z[m,m'] (h_m - h_m')
        return h + self.beta * direct + self.gamma * inter  # (eq. 5)


class Head(nn.Module):
    """Eqs. 7-8: DeBERTa's ContextPooler on [CLS] and a 1-output linear scorer; always computed in fp32."""

    def __init__(self, d: int):
        super().__init__()
        self.pooler = nn.Linear(d, d)  # W_p, b_p
        self.scorer = nn.Linear(d, 1)  # V_c, b_c

    def forward(self, h_cls: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h_cls.device.type, enabled=False):
            pooled = F.gelu(self.pooler(h_cls.float()))  # (eq. 7)  (B, d)
            return self.scorer(pooled).squeeze(-1)  # (eq. 8)  (B,)


class XCross(nn.Module):
    """n source LoRA streams + integrators on the top-K layers + learnable w + head. Trainable: integrators, w, head."""

    def __init__(self, backbone: Backbone, loras: list[LoraWeights], config: XCrossConfig, head: Head | None = None):
        super().__init__()
        if len(loras) != config.n_streams:
            raise ValueError(f"XCrossConfig.n_streams={config.n_streams} but {len(loras)} LoRAs were given")
        self.config, self.d, self.num_layers = config, backbone.hidden_size, backbone.num_layers
        if config.lora_top:
            if config.lora_top > self.num_layers:
                raise ValueError(f"XCrossConfig.lora_top={config.lora_top} exceeds the backbone's {self.num_layers} "
                                 "layers")
            loras = [x.top_layers(config.lora_top, self.num_layers) for x in loras]
        self.layer_ids = config.integrated_layers(self.num_layers)
        fold_at = self.layer_ids[0] if self.layer_ids else None
        self.encoder = MultiLoraEncoder(backbone, loras, fold_at)
        n = config.n_streams
        self.integrators = nn.ModuleDict({str(l): self._integrator(backbone) for l in self.layer_ids})
        self.w = nn.Parameter(torch.full((n,), 1.0 / n))  # (eq. 6), init 1/n
        self.head = head if head is not None else Head(self.d)

    def _integrator(self, backbone: Backbone) -> nn.Module:
        c = self.config
        if c.integrator == "gca":
            from model.gca import GatedCrossAttention

            return GatedCrossAttention(c.n_streams, self.d, int(backbone.config.num_attention_heads), c.gca_act,
                                       c.gca_layer_norm, c.init_std)
        return Integrator(c.n_streams, self.d, c.beta, c.gamma, c.init_std)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h_final[CLS] (or, with pooling "mean", the token mean of h_final: eq. 6 is linear), (B, d)."""
        n, B, T = self.config.n_streams, *input_ids.shape
        enc = self.encoder
        h = enc.embed(input_ids, attention_mask)  # (B, T, d)
        first = h
        ctx = enc.runner.context(h, attention_mask)
        for l in range(self.num_layers):
            if l == enc.fold_at:  # from here on every stream differs: fold streams into the batch
                h, first = h.repeat(n, 1, 1), first.repeat(n, 1, 1)  # (n*B, T, d)
                ctx = enc.runner.context(h, attention_mask.repeat(n, 1))
            h = enc.layer(l, h, ctx, first)  # (eq. 3) each stream with its own LoRA
            if str(l) in self.integrators:
                h = self.integrators[str(l)](h.view(n, B, T, -1), attention_mask).reshape(n * B, T, -1)  # (4-5)
        folded = h.shape[0] == n * B
        pooled = pool_tokens(h, attention_mask.repeat(n, 1) if folded else attention_mask, self.config.pooling)
        h_cls = pooled.view(n, B, -1) if folded else pooled.expand(n, B, -1)  # (n, B, d)
        return torch.einsum("n,nbd->bd", self.w.to(h_cls.dtype), h_cls)  # (eq. 6) h_final[CLS] (or its mean)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per prompt, (B,), fp32."""
        return self.head(self.encode(input_ids, attention_mask))  # (eqs. 7-8)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Integrators, w and head: everything X-Cross trains (and all a checkpoint needs besides its sources)."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def freeze_all_but_head(self) -> None:
        """The Pooler+Scorer baseline: train only the head."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("head."))


def listwise_loss(scores: torch.Tensor, group: int, target_index: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1: -log softmax of the positive within each group of `group` scores (positive first unless given)."""
    logits = scores.float().view(-1, group)  # (U, group)
    if target_index is None:
        target_index = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target_index)
