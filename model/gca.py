"""Gated cross-attention between domain streams (GCA): an integrator option that replaces X-Cross's eq. 5.

RECONSTRUCTED FROM SUMMARIES (paper 002, arXiv 2510.09435: we have a summary, not the full text; DESIGN 5.7).
The formulas below are our reading of it, not the paper's verified equations:

  A   = MHA(LN(X_m), X_m', X_m')          queries: stream m (LayerNorm optional); keys/values: the other stream(s)
                                          m' != m, concatenated along the token axis, padding masked
  g   = act(W_g [X_m; A] + b)             act in {sigmoid, tanh}; W_g in R^{d x 2d}, an elementwise gate
  out = X_m + g * A                       (elementwise)
One module per integrated layer, shared by the streams (as X-Cross's W_concat is per layer). Its output
projection and gate start near 0 (std `init_std`), so training starts from the source models, as in X-Cross.

The paper's diagnostic ("orthogonal alignment"): mean over non-padding tokens t of |cos(X_t, A_t)|, per layer; the
claim is that lower |cos| (A brings information orthogonal to the query) goes with better accuracy. `track(model)`
switches the accumulation on; `orthogonality(model)` reads it per layer. Shapes: n streams, B, T, d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


def abs_cos_sum(x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of |cos(x_t, a_t)| over tokens with mask 1, their count); x, a (..., T, d), mask (..., T)."""
    cos = F.cosine_similarity(x.float(), a.float(), dim=-1, eps=1e-8).abs()  # (..., T); a zero vector gives 0
    keep = mask.to(cos.dtype)
    return float((cos * keep).sum()), int(keep.sum())


def mean_abs_cos(x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> float:
    """mean_t |cos(X_t, A_t)| over non-padding tokens."""
    total, count = abs_cos_sum(x, a, mask)
    return total / max(count, 1)


class GatedCrossAttention(nn.Module):
    """out_m = X_m + act(W_g [X_m; A_m] + b) * A_m with A_m = MHA(LN(X_m), X_others, X_others), for all m at once."""

    def __init__(self, n: int, d: int, heads: int, act: str = "sigmoid", layer_norm: bool = True,
                 init_std: float = 1e-3):
        super().__init__()
        if n < 2:
            raise ValueError(f"GatedCrossAttention needs at least 2 streams (got {n})")
        if act not in ACTIVATIONS:
            raise ValueError(f"GCA act {act!r}: use one of {', '.join(ACTIVATIONS)}")
        self.n, self.act_name = n, act
        self.act = ACTIVATIONS[act]
        self.ln = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.gate = nn.Linear(2 * d, d)  # W_g, b
        nn.init.normal_(self.attn.out_proj.weight, std=init_std)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.normal_(self.gate.weight, std=init_std)
        nn.init.zeros_(self.gate.bias)
        others = torch.tensor([[j for j in range(n) if j != m] for m in range(n)], dtype=torch.long)
        self.register_buffer("others", others, persistent=False)  # (n, n-1)
        self.tracking, self.cos_sum, self.cos_count = False, 0.0, 0

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, B, T, d = h.shape  # (n, B, T, d)
        mask = torch.ones(B, T, dtype=torch.long, device=h.device) if attention_mask is None else attention_mask
        x = h.reshape(n * B, T, d)  # (n*B, T, d) queries X_m, stream-major
        y = h[self.others].permute(0, 2, 1, 3, 4).reshape(n * B, (n - 1) * T, d)  # (n*B, (n-1)T, d) X_m'
        pad = (mask == 0).repeat(n, n - 1)  # (n*B, (n-1)T) True = padding key
        q = self.ln(x)
        a, _ = self.attn(q, y.to(q.dtype), y.to(q.dtype), key_padding_mask=pad, need_weights=False)  # (n*B, T, d)
        a = a.to(x.dtype)
        g = self.act(self.gate(torch.cat([x, a], -1))).to(x.dtype)  # (n*B, T, d)
        if self.tracking:
            s, c = abs_cos_sum(x, a, mask.repeat(n, 1))
            self.cos_sum, self.cos_count = self.cos_sum + s, self.cos_count + c
        return (x + g * a).view(n, B, T, d)


def gca_modules(model: nn.Module) -> dict[str, GatedCrossAttention]:
    """The GCA modules of a model by integrated layer (the last component of their module path)."""
    return {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, GatedCrossAttention)}


def track(model: nn.Module, on: bool = True) -> None:
    """Start (reset) or stop accumulating |cos(X_t, A_t)| in every GCA module of `model`."""
    for m in gca_modules(model).values():
        m.tracking, m.cos_sum, m.cos_count = on, 0.0, 0


def orthogonality(model: nn.Module) -> dict[str, float]:
    """mean_t |cos(X_t, A_t)| per integrated layer since `track(model)` (all streams, non-padding tokens)."""
    return {layer: m.cos_sum / max(m.cos_count, 1) for layer, m in sorted(gca_modules(model).items(),
                                                                          key=lambda kv: int(kv[0]))}
