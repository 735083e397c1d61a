"""WeaveRec (paper 001, abstract only; DESIGN 5.7): the target LoRA and one hybrid LoRA per source, merged into ONE
adapter, so inference costs what a single LoRA costs.

  merge_weights(l, T)          lambda = softmax(l / T); l = 0 gives the default, uniform lambda
  LoraWeights.merge            W = W0 + sum_i lambda_i (alpha/r) B_i A_i, exact (ranks concatenated; model/lora.py)
  merge_heads(heads, lambda)   the pooler + scorer merged with the same lambda: theta = sum_i lambda_i theta_i
  LambdaMerge                  the merged model as a function of trainable logits l (the learned-lambda option):
                               every adapted linear computes W0 x + sum_i lambda_i s_i B_i A_i x, the head is
                               merged on the fly; `export()` gives the merged adapter and head
The merge sums delta_W explicitly; peft's `add_weighted_adapter(combination_type="linear")` mixes the A's and the
B's separately (sum_i l_i B_i)(sum_i l_i A_i), which is a different matrix (DESIGN 5.7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from model.backbone import Backbone, LayerRunner
from model.lora import LoraWeights, shared_copy
from model.xcross import Head


def merge_weights(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """lambda = softmax(l / T)."""
    if temperature <= 0:
        raise ValueError(f"merge temperature must be positive (got {temperature})")
    return torch.softmax(logits.float() / temperature, dim=-1)


def merge_heads(heads: Sequence[Head], weights: Sequence[float] | torch.Tensor | None = None) -> Head:
    """One head whose every parameter is sum_i lambda_i theta_i (default lambda uniform)."""
    n = len(heads)
    lam = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if lam.shape != (n,):
        raise ValueError(f"merge of heads: {lam.numel()} weights for {n} heads")
    merged = Head(heads[0].pooler.in_features)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            stacked = torch.stack([dict(h.named_parameters())[name].float() for h in heads])  # (n, ...)
            p.copy_(torch.einsum("n,n...->...", lam, stacked))
    return merged


class WeightedLoRALinear(nn.Module):
    """y = W0 x + sum_i lambda_i s_i B_i A_i x for n adapters, lambda from the owner (LambdaMerge) on every call."""

    def __init__(self, base: nn.Linear, loras: Sequence[LoraWeights], module: str, weights_fn):
        super().__init__()
        self.base = base  # shared, frozen
        self.register_buffer("A", torch.cat([x.A[module] for x in loras], 0).t().contiguous(), persistent=False)
        self.register_buffer("B", torch.cat([x.B[module] * x.scale for x in loras], 1).t().contiguous(),
                             persistent=False)  # A (in, sum r), B (sum r, out), scales folded in
        self.register_buffer("rank_of", torch.cat([torch.full((x.A[module].shape[0],), i, dtype=torch.long)
                                                   for i, x in enumerate(loras)]), persistent=False)
        self._weights_fn = weights_fn  # a bound method: not a submodule, not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self._weights_fn().to(x.dtype)[self.rank_of]  # (sum r,) lambda_i for each rank row of adapter i
        y = self.base(x)  # (..., out)
        delta = ((x @ self.A.to(x.dtype)) * lam) @ self.B.to(x.dtype)  # (..., out)
        return y + delta.to(y.dtype)


class LambdaMerge(nn.Module):
    """The lambda-merged model with trainable logits l (everything else frozen): lambda = softmax(l / T)."""

    def __init__(self, backbone: Backbone, loras: Sequence[LoraWeights], heads: Sequence[Head],
                 temperature: float = 1.0, logits: torch.Tensor | None = None):
        super().__init__()
        if len(loras) != len(heads) or not loras:
            raise ValueError(f"LambdaMerge: {len(loras)} LoRAs and {len(heads)} heads; give one head per LoRA")
        self.loras, self.temperature = list(loras), temperature
        self.logits = nn.Parameter(torch.zeros(len(loras)) if logits is None else logits.detach().clone().float())
        self.layers = shared_copy(backbone.layers)  # new modules, same frozen tensors
        prefix = "encoder.layer."
        for path in loras[0].modules:
            parent_path, _, leaf = path[len(prefix):].rpartition(".")
            parent = self.layers.get_submodule(parent_path)
            setattr(parent, leaf, WeightedLoRALinear(getattr(parent, leaf), loras, path, self.weights))
        self.runner = LayerRunner(backbone.model, backbone.family, self.layers)
        self.head = Head(backbone.hidden_size).requires_grad_(False)  # a template for the merged parameters
        names = [n for n, _ in self.head.named_parameters()]
        for name in names:
            stacked = torch.stack([dict(h.named_parameters())[name].detach().float() for h in heads])
            self.register_buffer(f"heads_{name.replace('.', '_')}", stacked, persistent=False)  # (n, ...)
        self._head_names = names

    def weights(self) -> torch.Tensor:
        return merge_weights(self.logits, self.temperature)

    def train(self, mode: bool = True) -> LambdaMerge:
        super().train(mode)
        self.layers.eval()  # the frozen encoder keeps inference behaviour (no dropout) while l is tuned
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per prompt, (B,), fp32."""
        h = self.runner.forward(input_ids, attention_mask)  # (B, T, d), every linear lambda-merged
        with torch.autocast(h.device.type, enabled=False):  # the merged head stays fp32 under bf16 autocast
            lam = self.weights()
            params = {n: torch.einsum("n,n...->...", lam, getattr(self, f"heads_{n.replace('.', '_')}"))
                      for n in self._head_names}
        return functional_call(self.head, params, (h[:, 0],))  # (eqs. 7-8) with the merged head

    def export(self) -> tuple[LoraWeights, Head, list[float]]:
        """The merged adapter, the merged head and lambda (as plain floats)."""
        lam = self.weights().detach()
        heads = [Head(self.head.pooler.in_features) for _ in range(len(self.loras))]
        with torch.no_grad():
            for i, h in enumerate(heads):
                for n, p in h.named_parameters():
                    p.copy_(getattr(self, f"heads_{n.replace('.', '_')}")[i])
        return LoraWeights.merge(self.loras, lam), merge_heads(heads, lam), [float(v) for v in lam]
